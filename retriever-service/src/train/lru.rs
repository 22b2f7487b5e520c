//! The linear recurrent unit (training graph): a complex diagonal recurrence between a complex
//! input projection B and a complex output projection C, followed by a residual layer norm.
//!
//! Complex numbers are kept as real/imaginary halves of real tensors:
//! - `in_proj.weight` (2H × D): rows 0..H are Re B, rows H..2H are Im B (the input is real, so
//!   B x + b splits into two real products); `in_proj.bias` likewise.
//! - `out_proj.weight` (D × 2H) = [Re C | −Im C], so Re(C h) = out_proj · [Re h; Im h]; only the
//!   real part of C's bias can reach the output, so `out_proj.bias` is real.
//! - `params_log` (3 × H): rows ν_log, θ_log, γ_log with λ = exp(−exp(ν_log) + i exp(θ_log)),
//!   γ = exp(γ_log) learned from its normalising initial value sqrt(1 − |λ|²), as the reference
//!   code does.

use crate::config::LruRecConfig;
use crate::train::dropout::{dropout, DropoutRng};
use crate::train::norm::LayerNorm;
use crate::train::params::{Init, ParamStore};
use crate::train::scan::parallel_scan;
use candle_core::{Tensor, Var};

/// Parameters of one LRU layer.
#[derive(Debug, Clone)]
pub struct LruLayer {
    /// (3, H): ν_log, θ_log, γ_log.
    pub params_log: Var,
    /// (2H, D): [Re B; Im B].
    pub in_weight: Var,
    /// (2H): [Re b; Im b].
    pub in_bias: Var,
    /// (D, 2H): [Re C | −Im C].
    pub out_weight: Var,
    /// (D): Re c.
    pub out_bias: Var,
    /// Residual layer norm after the recurrence.
    pub norm: LayerNorm,
    state_dim: usize,
    dropout: f64,
}

impl LruLayer {
    /// Creates (or loads) the layer's parameters under `prefix`.
    pub fn new<R: rand::Rng>(store: &mut ParamStore<'_, R>, prefix: &str, cfg: &LruRecConfig) -> crate::Result<Self> {
        let (d, h, std) = (cfg.embed_dim, cfg.state_dim, cfg.init_std);
        let ring = Init::Ring { r_min: cfg.r_min, r_max: cfg.r_max };
        Ok(Self {
            params_log: store.param(&format!("{prefix}.params_log"), &[3, h], ring)?,
            in_weight: store.param(&format!("{prefix}.in_proj.weight"), &[2 * h, d], Init::TruncatedNormal(std))?,
            in_bias: store.param(&format!("{prefix}.in_proj.bias"), &[2 * h], Init::TruncatedNormal(std))?,
            out_weight: store.param(&format!("{prefix}.out_proj.weight"), &[d, 2 * h], Init::TruncatedNormal(std))?,
            out_bias: store.param(&format!("{prefix}.out_proj.bias"), &[d], Init::TruncatedNormal(std))?,
            norm: LayerNorm::new(store, &format!("{prefix}.layer_norm"), d, cfg.layer_norm_eps)?,
            state_dim: h,
            dropout: cfg.dropout,
        })
    }

    /// `x` (batch, length, D) → LayerNorm(Dropout(Re(C h)) + x), where padded positions
    /// (`mask` (batch, length, 1) = 0) feed nothing into the recurrence: with left padding the
    /// state is exactly zero until the first real event, as if the padding were not there.
    pub fn forward(&self, x: &Tensor, mask: &Tensor, rng: &mut Option<&mut DropoutRng>) -> candle_core::Result<Tensor> {
        let (batch, len, d) = x.dims3()?;
        let h = self.state_dim;
        let p = self.params_log.as_tensor().exp()?;
        let (nu, theta, gamma) = (p.get(0)?, p.get(1)?, p.get(2)?);
        let modulus = nu.neg()?.exp()?;
        let lambda = Tensor::cat(&[(&modulus * theta.cos()?)?, (&modulus * theta.sin()?)?], 0)?;
        let gamma = Tensor::cat(&[&gamma, &gamma], 0)?;
        let b = x
            .reshape((batch * len, d))?
            .matmul(&self.in_weight.as_tensor().t()?)?
            .broadcast_add(self.in_bias.as_tensor())?
            .broadcast_mul(&gamma)?
            .reshape((batch, len, 2 * h))?
            .broadcast_mul(mask)?;
        let states = parallel_scan(&b, &lambda)?;
        let y = states
            .reshape((batch * len, 2 * h))?
            .matmul(&self.out_weight.as_tensor().t()?)?
            .broadcast_add(self.out_bias.as_tensor())?
            .reshape((batch, len, d))?;
        self.norm.forward(&(dropout(&y, self.dropout, rng)? + x)?)
    }
}
