//! The position-wise feed-forward network of each block (training graph):
//! LayerNorm(Dropout(W2 Dropout(GELU(W1 x))) + x).

use crate::config::LruRecConfig;
use crate::train::dropout::{dropout, DropoutRng};
use crate::train::norm::LayerNorm;
use crate::train::params::{Init, ParamStore};
use candle_core::{Tensor, Var};

/// Parameters of one feed-forward network.
#[derive(Debug, Clone)]
pub struct FeedForward {
    /// (F, D).
    pub w1: Var,
    /// (F).
    pub b1: Var,
    /// (D, F).
    pub w2: Var,
    /// (D).
    pub b2: Var,
    /// Residual layer norm.
    pub norm: LayerNorm,
    dropout: f64,
}

impl FeedForward {
    /// Creates (or loads) the network's parameters under `prefix`.
    pub fn new<R: rand::Rng>(store: &mut ParamStore<'_, R>, prefix: &str, cfg: &LruRecConfig) -> crate::Result<Self> {
        let (d, f, std) = (cfg.embed_dim, cfg.ffn_dim, cfg.init_std);
        Ok(Self {
            w1: store.param(&format!("{prefix}.w_1.weight"), &[f, d], Init::TruncatedNormal(std))?,
            b1: store.param(&format!("{prefix}.w_1.bias"), &[f], Init::TruncatedNormal(std))?,
            w2: store.param(&format!("{prefix}.w_2.weight"), &[d, f], Init::TruncatedNormal(std))?,
            b2: store.param(&format!("{prefix}.w_2.bias"), &[d], Init::TruncatedNormal(std))?,
            norm: LayerNorm::new(store, &format!("{prefix}.layer_norm"), d, cfg.layer_norm_eps)?,
            dropout: cfg.dropout,
        })
    }

    /// Applies the network to every position of `x` (batch, length, D).
    pub fn forward(&self, x: &Tensor, rng: &mut Option<&mut DropoutRng>) -> candle_core::Result<Tensor> {
        let (batch, len, d) = x.dims3()?;
        let pre = x.reshape((batch * len, d))?.matmul(&self.w1.as_tensor().t()?)?.broadcast_add(self.b1.as_tensor())?;
        // The reference uses PyTorch's exact (erf) GELU; serving uses the same formula.
        let inner = crate::train::ops::gelu_erf(&pre)?;
        let out = dropout(&inner, self.dropout, rng)?
            .matmul(&self.w2.as_tensor().t()?)?
            .broadcast_add(self.b2.as_tensor())?
            .reshape((batch, len, d))?;
        self.norm.forward(&(dropout(&out, self.dropout, rng)? + x)?)
    }
}
