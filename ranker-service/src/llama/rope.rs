//! Rotary position embeddings: the cos/sin tables, and HF's half-split rotation from elementary
//! ops for training (the fused CPU kernels and candle's `rope` apply the same tables).

use candle_core::{DType, Device, Tensor};

use crate::config::LlamaConfig;
use crate::error::Result;

/// RoPE tables `(max_seq_len, head_dim / 2)` for HF's half-split rotation.
#[derive(Debug, Clone)]
pub(super) struct Rope {
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    /// The same tables as plain f32, for the fused CPU kernels.
    pub(super) cos_f32: Vec<f32>,
    pub(super) sin_f32: Vec<f32>,
}

impl Rope {
    pub(super) fn new(cfg: &LlamaConfig, device: &Device, dtype: DType) -> Result<Self> {
        let half = cfg.head_dim / 2;
        // f32 throughout, as HF's `inv_freq` and llama.cpp compute it, so that positions in
        // the thousands get the same angles as the reference implementations.
        let theta = cfg.rope_theta as f32;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(cfg.max_seq_len * half);
        let mut sin = Vec::with_capacity(cfg.max_seq_len * half);
        for p in 0..cfg.max_seq_len {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (cfg.max_seq_len, half);
        Ok(Self {
            cos: Tensor::from_slice(&cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_slice(&sin, shape, device)?.to_dtype(dtype)?,
            cos_f32: cos,
            sin_f32: sin,
        })
    }

    /// `(batch, len, head_dim / 2)` cos and sin tables for the given positions.
    pub(super) fn gather(
        &self,
        positions: &[u32],
        batch: usize,
        len: usize,
    ) -> Result<(Tensor, Tensor)> {
        let idx = Tensor::from_slice(positions, positions.len(), self.cos.device())?;
        let half = self.cos.dim(1)?;
        let cos = self
            .cos
            .index_select(&idx, 0)?
            .reshape((batch, len, half))?;
        let sin = self
            .sin
            .index_select(&idx, 0)?
            .reshape((batch, len, half))?;
        Ok((cos, sin))
    }
}

/// HF's half-split RoPE from elementary ops (candle's fused `rope` has no backward). `x` is
/// `(b, h, t, d)`, `cos`/`sin` are `(b, t, d / 2)`.
pub(super) fn rope_differentiable(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<Tensor> {
    let half = x.dim(3)? / 2;
    let cos = Tensor::cat(&[cos, cos], 2)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], 2)?.unsqueeze(1)?;
    let rotated = Tensor::cat(
        &[&x.narrow(3, half, half)?.neg()?, &x.narrow(3, 0, half)?],
        3,
    )?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}
