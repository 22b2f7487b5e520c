//! Dropout with masks drawn from the trainer's seeded generator.
//!
//! candle's CPU device cannot be seeded, so `candle_nn::ops::dropout` would make runs
//! irreproducible; masks are drawn here instead and multiplied in.

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::RngCore;

/// Source of dropout masks; `None` in a forward pass means evaluation (no dropout).
pub struct DropoutRng {
    rng: StdRng,
}

impl DropoutRng {
    /// Masks drawn from `rng`.
    pub fn new(rng: StdRng) -> Self {
        Self { rng }
    }

    /// `x` with each element zeroed with probability `p` and the rest scaled by 1 / (1 - p).
    pub fn apply(&mut self, x: &Tensor, p: f64) -> candle_core::Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        // Compare raw 32-bit draws against a threshold: no float conversion per element.
        let threshold = (p * u32::MAX as f64) as u32;
        let keep = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> =
            (0..x.elem_count()).map(|_| if self.rng.next_u32() > threshold { keep } else { 0.0 }).collect();
        x * Tensor::from_vec(mask, x.shape(), x.device())?
    }
}

/// Applies dropout when training (`rng` is `Some`), the identity otherwise.
pub fn dropout(x: &Tensor, p: f64, rng: &mut Option<&mut DropoutRng>) -> candle_core::Result<Tensor> {
    match rng {
        Some(rng) => rng.apply(x, p),
        None => Ok(x.clone()),
    }
}
