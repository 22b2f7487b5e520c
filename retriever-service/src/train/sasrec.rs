//! SASRec as a candle graph, for training and batched evaluation.
//!
//! LayerNorm(Dropout(item embedding + position embedding)) → blocks of [causal self-attention,
//! feed-forward], each LayerNorm(Dropout(f(x)) + x) as in RecBole's SASRec → hidden states;
//! scores = hidden · Eᵀ + bias with the output tied to the item embedding. Trained with
//! cross-entropy over all items at every position ("SASRec+CE", Klenitskiy & Vasilev 2023).
//!
//! Positions count from the first event of the window (position 0), whatever the padding on its
//! left. With causal attention, the hidden state at position t of a training window is then
//! exactly what serving computes for the window's first t + 1 events: every training target is
//! predicted as it would be served. (Counting back from the latest event instead, as left-padded
//! SASRec code often does in effect, trains the served configuration, the latest event at
//! position 0, only at the last position of each window; on ML-100K it also predicted short
//! histories poorly.)

use crate::config::LruRecConfig;
use crate::train::dropout::{dropout, DropoutRng};
use crate::train::ffn::FeedForward;
use crate::train::norm::LayerNorm;
use crate::train::params::{BuildFromParams, Init, Param, ParamStore};
use candle_core::{Tensor, Var};

/// `x` (rows, in) · Wᵀ + b.
fn linear(x: &Tensor, w: &Var, b: &Var) -> candle_core::Result<Tensor> {
    x.matmul(&w.as_tensor().t()?)?.broadcast_add(b.as_tensor())
}

/// Multi-head causal self-attention with its residual layer norm.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    /// (D, D) query projection and its bias.
    pub query: (Var, Var),
    /// (D, D) key projection and its bias.
    pub key: (Var, Var),
    /// (D, D) value projection and its bias.
    pub value: (Var, Var),
    /// (D, D) output projection and its bias.
    pub output: (Var, Var),
    /// Residual layer norm after the attention.
    pub norm: LayerNorm,
    heads: usize,
    dropout: f64,
    attention_dropout: f64,
}

impl SelfAttention {
    /// Creates (or loads) the layer's parameters under `prefix`.
    pub fn new<R: rand::Rng>(store: &mut ParamStore<'_, R>, prefix: &str, cfg: &LruRecConfig) -> crate::Result<Self> {
        let (d, std) = (cfg.embed_dim, cfg.init_std);
        let mut projection = |name: &str| -> crate::Result<(Var, Var)> {
            Ok((
                store.param(&format!("{prefix}.{name}.weight"), &[d, d], Init::TruncatedNormal(std))?,
                store.param(&format!("{prefix}.{name}.bias"), &[d], Init::Constant(0.0))?,
            ))
        };
        let (query, key, value, output) = (projection("query")?, projection("key")?, projection("value")?, projection("output")?);
        Ok(Self {
            query,
            key,
            value,
            output,
            norm: LayerNorm::new(store, &format!("{prefix}.layer_norm"), d, cfg.layer_norm_eps)?,
            heads: cfg.num_heads,
            dropout: cfg.dropout,
            attention_dropout: cfg.attention_dropout,
        })
    }

    /// `x` (batch, length, D) of left-padded rows whose first real column is `first[b]` →
    /// LayerNorm(Dropout(attention(x)) + x), each position attending to itself and the real
    /// positions before it.
    pub fn forward(&self, x: &Tensor, first: &[usize], rng: &mut Option<&mut DropoutRng>) -> candle_core::Result<Tensor> {
        let (batch, len, d) = x.dims3()?;
        let (heads, head_dim) = (self.heads, d / self.heads);
        let flat = x.reshape((batch * len, d))?;
        let split_heads = |t: Tensor| t.reshape((batch, len, heads, head_dim))?.transpose(1, 2)?.contiguous();
        let q = split_heads((linear(&flat, &self.query.0, &self.query.1)? * (1.0 / (head_dim as f64).sqrt()))?)?;
        let k = split_heads(linear(&flat, &self.key.0, &self.key.1)?)?;
        let v = split_heads(linear(&flat, &self.value.0, &self.value.1)?)?;
        let probs = crate::train::ops::causal_softmax(&q.matmul(&k.t()?.contiguous()?)?, first)?;
        let probs = dropout(&probs, self.attention_dropout, rng)?;
        let context = probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((batch * len, d))?;
        let out = linear(&context, &self.output.0, &self.output.1)?.reshape((batch, len, d))?;
        self.norm.forward(&(dropout(&out, self.dropout, rng)? + x)?)
    }
}

/// One block: self-attention, then position-wise feed-forward.
#[derive(Debug, Clone)]
pub struct SasBlock {
    /// Causal self-attention.
    pub attention: SelfAttention,
    /// The feed-forward network (the same as LRURec's).
    pub ffn: FeedForward,
}

/// The trainable SASRec model.
#[derive(Debug, Clone)]
pub struct SasRec {
    /// Hyper-parameters (`kind` = SASRec).
    pub config: LruRecConfig,
    /// (V+1, D) item embedding, row 0 = padding; also the output projection.
    pub embedding: Var,
    /// (max_len, D) position embedding, row p = the window's (p+1)-th event.
    pub positions: Var,
    /// Layer norm after the embeddings.
    pub embed_norm: LayerNorm,
    /// The blocks, input first.
    pub blocks: Vec<SasBlock>,
    /// (V+1) per-item score bias.
    pub output_bias: Var,
    params: Vec<Param>,
}

impl BuildFromParams for SasRec {
    fn build<R: rand::Rng>(config: &LruRecConfig, mut store: ParamStore<'_, R>) -> crate::Result<Self> {
        let (v, d, std) = (config.vocab_size(), config.embed_dim, config.init_std);
        let embedding = store.param("embedding.token.weight", &[v, d], Init::TruncatedNormal(std))?;
        let positions = store.param("embedding.position.weight", &[config.max_len, d], Init::TruncatedNormal(std))?;
        let embed_norm = LayerNorm::new(&mut store, "embedding.layer_norm", d, config.layer_norm_eps)?;
        let mut blocks = Vec::with_capacity(config.num_blocks);
        for i in 0..config.num_blocks {
            let attention = SelfAttention::new(&mut store, &format!("blocks.{i}.attention"), config)?;
            let ffn = FeedForward::new(&mut store, &format!("blocks.{i}.ffn"), config)?;
            blocks.push(SasBlock { attention, ffn });
        }
        let output_bias = store.param("output.bias", &[v], Init::TruncatedNormal(std))?;
        Ok(Self { config: config.clone(), embedding, positions, embed_norm, blocks, output_bias, params: store.into_params() })
    }
}

impl SasRec {

    /// All trainable parameters with their checkpoint names.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Hidden states (batch, length, D) for left-padded item indices `tokens` (batch, length ≤
    /// `max_len`, u32, 0 = padding). Dropout is applied when `rng` is given (training).
    pub fn forward(&self, tokens: &Tensor, mut rng: Option<&mut DropoutRng>) -> candle_core::Result<Tensor> {
        let (batch, len) = tokens.dims2()?;
        if len > self.config.max_len {
            candle_core::bail!("SASRec input of {len} positions, longer than max_len {}", self.config.max_len);
        }
        let first: Vec<usize> =
            tokens.to_vec2::<u32>()?.iter().map(|row| row.iter().take_while(|&&t| t == 0).count()).collect();
        let d = self.config.embed_dim;
        let items = self.embedding.as_tensor().index_select(&tokens.flatten_all()?, 0)?.reshape((batch, len, d))?;
        // Padding columns take position 0; nothing real attends to them.
        let index: Vec<u32> = first.iter().flat_map(|&f| (0..len).map(move |t| t.saturating_sub(f) as u32)).collect();
        let index = Tensor::from_vec(index, batch * len, tokens.device())?;
        let positions = self.positions.as_tensor().index_select(&index, 0)?.reshape((batch, len, d))?;
        let mut x = self.embed_norm.forward(&dropout(&(items + positions)?, self.config.dropout, &mut rng)?)?;
        for block in &self.blocks {
            x = block.attention.forward(&x, &first, &mut rng)?;
            x = block.ffn.forward(&x, &mut rng)?;
        }
        Ok(x)
    }

    /// Scores of every item (padding included) for hidden states `hidden` (N, D): (N, V+1).
    pub fn scores(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        hidden.matmul(&self.embedding.as_tensor().t()?)?.broadcast_add(self.output_bias.as_tensor())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelKind;
    use crate::train::params::BuildFromParams;
    use candle_core::Device;
    use rand::SeedableRng;

    fn model(attention_dropout: f64) -> SasRec {
        let config = LruRecConfig {
            kind: ModelKind::SasRec,
            num_items: 30,
            embed_dim: 8,
            num_heads: 2,
            ffn_dim: 16,
            init_std: 0.5,
            dropout: 0.0,
            attention_dropout,
            max_len: 6,
            ..LruRecConfig::default()
        };
        SasRec::init(&config, 3, &Device::Cpu).unwrap()
    }

    fn hidden(model: &SasRec, train: bool) -> Vec<f32> {
        let tokens = Tensor::new(&[[0u32, 4, 9, 2, 17, 5], [3, 8, 1, 30, 12, 6]], &Device::Cpu).unwrap();
        let mut rng = DropoutRng::new(rand::rngs::StdRng::seed_from_u64(11));
        let out = model.forward(&tokens, if train { Some(&mut rng) } else { None }).unwrap();
        out.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn attention_dropout_acts_in_training_only() {
        let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        // With every other dropout at 0, a training pass differs from evaluation only through the
        // attention weights' dropout.
        let plain = model(0.0);
        assert!(max_diff(&hidden(&plain, true), &hidden(&plain, false)) < 1e-6);
        let dropped = model(0.5);
        assert!(max_diff(&hidden(&dropped, true), &hidden(&dropped, false)) > 1e-2, "attention dropout changed nothing");
        assert!(max_diff(&hidden(&dropped, false), &hidden(&plain, false)) < 1e-6, "evaluation must not depend on it");
    }
}
