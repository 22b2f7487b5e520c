//! Layer normalisation over the last dimension, for the training graph.
//!
//! `candle_nn::LayerNorm` dispatches contiguous inputs to a fused kernel without a backward pass,
//! which would silently cut the gradient; this one uses [`crate::train::ops::layer_norm`], which has one.

use crate::train::params::{Init, ParamStore};
use candle_core::{Tensor, Var};

/// Learned gain and bias of a layer norm.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Gain, initialised to 1.
    pub weight: Var,
    /// Bias, initialised to 0.
    pub bias: Var,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Creates (or loads) `{prefix}.weight` and `{prefix}.bias` of width `dim`.
    pub fn new<R: rand::Rng>(store: &mut ParamStore<'_, R>, prefix: &str, dim: usize, eps: f64) -> crate::Result<Self> {
        Ok(Self {
            weight: store.param(&format!("{prefix}.weight"), &[dim], Init::Constant(1.0))?,
            bias: store.param(&format!("{prefix}.bias"), &[dim], Init::Constant(0.0))?,
            eps,
        })
    }

    /// Normalises `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        crate::train::ops::layer_norm(x, self.weight.as_tensor(), self.bias.as_tensor(), self.eps)
    }
}
