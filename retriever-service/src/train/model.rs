//! LRURec as a candle graph, for training and batched evaluation.
//!
//! item embedding → LayerNorm(Dropout(·)) → blocks of [LRU layer, feed-forward] → hidden states;
//! scores = hidden · Eᵀ + bias with the output tied to the item embedding.

use crate::config::LruRecConfig;
use crate::train::dropout::{dropout, DropoutRng};
use crate::train::ffn::FeedForward;
use crate::train::lru::LruLayer;
use crate::train::norm::LayerNorm;
use crate::train::params::{BuildFromParams, Init, Param, ParamStore};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// One block: recurrence, then position-wise feed-forward.
#[derive(Debug, Clone)]
pub struct LruBlock {
    /// The linear recurrent unit.
    pub lru: LruLayer,
    /// The feed-forward network.
    pub ffn: FeedForward,
}

/// The trainable LRURec model.
#[derive(Debug, Clone)]
pub struct LruRec {
    /// Hyper-parameters.
    pub config: LruRecConfig,
    /// (V+1, D) item embedding, row 0 = padding; also the output projection.
    pub embedding: Var,
    /// Layer norm after the embedding.
    pub embed_norm: LayerNorm,
    /// The blocks, input first.
    pub blocks: Vec<LruBlock>,
    /// (V+1) per-item score bias.
    pub output_bias: Var,
    params: Vec<Param>,
}

impl BuildFromParams for LruRec {
    fn build<R: rand::Rng>(config: &LruRecConfig, mut store: ParamStore<'_, R>) -> crate::Result<Self> {
        let (v, d, std) = (config.vocab_size(), config.embed_dim, config.init_std);
        let embedding = store.param("embedding.token.weight", &[v, d], Init::TruncatedNormal(std))?;
        let embed_norm = LayerNorm::new(&mut store, "embedding.layer_norm", d, config.layer_norm_eps)?;
        let mut blocks = Vec::with_capacity(config.num_blocks);
        for i in 0..config.num_blocks {
            let lru = LruLayer::new(&mut store, &format!("blocks.{i}.lru"), config)?;
            let ffn = FeedForward::new(&mut store, &format!("blocks.{i}.ffn"), config)?;
            blocks.push(LruBlock { lru, ffn });
        }
        let output_bias = store.param("output.bias", &[v], Init::TruncatedNormal(std))?;
        Ok(Self { config: config.clone(), embedding, embed_norm, blocks, output_bias, params: store.into_params() })
    }
}

impl LruRec {

    /// All trainable parameters with their checkpoint names.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Writes the weights to a safetensors file.
    pub fn save(&self, path: &Path) -> crate::Result<()> {
        crate::train::params::save(&self.params, path)
    }

    /// Hidden states (batch, length, D) for left-padded item indices `tokens` (batch, length,
    /// u32, 0 = padding). Dropout is applied when `rng` is given (training).
    pub fn forward(&self, tokens: &Tensor, mut rng: Option<&mut DropoutRng>) -> candle_core::Result<Tensor> {
        let (batch, len) = tokens.dims2()?;
        let mask = tokens.ne(0u32)?.to_dtype(DType::F32)?.unsqueeze(2)?;
        let x = self.embedding.as_tensor().index_select(&tokens.flatten_all()?, 0)?.reshape((
            batch,
            len,
            self.config.embed_dim,
        ))?;
        let mut x = self.embed_norm.forward(&dropout(&x, self.config.dropout, &mut rng)?)?;
        for block in &self.blocks {
            x = block.lru.forward(&x, &mask, &mut rng)?;
            x = block.ffn.forward(&x, &mut rng)?;
        }
        Ok(x)
    }

    /// Scores of every item (padding included) for hidden states `hidden` (N, D): (N, V+1).
    pub fn scores(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        hidden.matmul(&self.embedding.as_tensor().t()?)?.broadcast_add(self.output_bias.as_tensor())
    }

    /// Weights by name, for the serving encoder.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.params.iter().map(|p| (p.name.clone(), p.var.as_tensor().detach())).collect()
    }
}
