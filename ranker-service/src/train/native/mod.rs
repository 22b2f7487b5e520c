//! One LoRA training example on the CPU in f32, with a hand-derived backward pass.
//!
//! Why not candle's autograd: on the ~600-token ranking prompt it spent ~6.5x the forward's
//! time in the backward (where ~1.2x is what the arithmetic needs), most of it outside matrix
//! products: gigabytes of short-lived tensors (page faults: half of the step was sys time), a
//! full score matrix per head with the mask broadcast over it, transposes and copies between
//! head layouts, and single-threaded elementwise ops. This step does what the arithmetic needs:
//!
//! - the forward keeps only what the backward reads, in buffers reused across examples;
//! - a frozen projection costs one GEMM backwards (the input's gradient, never the weight's);
//! - attention, forwards and backwards, skips the keys a causal query cannot see;
//! - the loss reads the last position only, so the last block runs its queries, output
//!   projection and feed-forward layer for that row alone, in both directions;
//! - block 0's input gradient, which nothing trainable reads, is not computed.
//!
//! It computes the same function as [`super::example_loss`] on a model with
//! [`crate::Kernels::Differentiable`] (same LoRA dropout masks for the same seed), which the
//! tests check against candle's autograd and against finite differences.

mod backward;
mod forward;
mod frozen;
mod gemm;
mod ops;

pub use frozen::FrozenPrecision;
use frozen::Frozen;

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::LossKind;
use crate::config::LlamaConfig;
use crate::llama::Llama;
use crate::lora::{LoraDropout, Projection};
use crate::weights::Linear;
use ops::{rms_norm, rms_norm_backward};

/// One LoRA pair as plain f32 matrices.
#[derive(Debug, Clone)]
pub struct PairF32 {
    /// `(r, in)`, row-major.
    pub a: Vec<f32>,
    /// `(out, r)`, row-major.
    pub b: Vec<f32>,
    /// Rank.
    pub r: usize,
    /// `alpha / r`.
    pub scale: f32,
}

/// Gradients of one pair, shaped like [`PairF32`]'s matrices.
#[derive(Debug, Clone)]
pub struct PairGrad {
    /// `dL/dA`, `(r, in)`.
    pub a: Vec<f32>,
    /// `dL/dB`, `(out, r)`.
    pub b: Vec<f32>,
}

/// The trainable adapter as plain f32 matrices, keyed like [`crate::LoraAdapter`].
pub type LoraF32 = HashMap<(usize, Projection), PairF32>;

/// The frozen weights of one block, f32 row-major `(out, in)`.
struct BlockF32 {
    attn_norm: Vec<f32>,
    qkv: Frozen,
    o: Frozen,
    ffn_norm: Vec<f32>,
    gate_up: Frozen,
    down: Frozen,
}

/// What the forward of one LoRA pair keeps for the backward.
#[derive(Default)]
struct LoraSaved {
    /// The pair's (dropped-out) input `(rows, in)`.
    z: Vec<f32>,
    /// Its dropout mask `(rows, in)`; empty without dropout.
    mask: Vec<f32>,
    /// `z A^T`, `(rows, r)`.
    u: Vec<f32>,
}

/// What the forward of one block keeps for the backward (buffers reused across examples).
#[derive(Default)]
struct BlockSaved {
    /// First query row this block computes attention for (the last block: the answer row).
    q_from: usize,
    /// Block input `(t, hidden)` and its RMSNorm reciprocal std `(t)`.
    x_in: Vec<f32>,
    rstd1: Vec<f32>,
    /// RoPE-rotated queries `(t, heads * d)`; keys `(kv_heads, t, d)` rotated; values.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention probabilities per head, query blocks stored back to back, each block
    /// `(rows, keys it can see)`.
    probs: Vec<f32>,
    /// Attention output `(rows_out, heads * d)`.
    attn: Vec<f32>,
    /// Residual after attention `(rows_out, hidden)` and its RMSNorm reciprocal std.
    x_mid: Vec<f32>,
    rstd2: Vec<f32>,
    /// Gate and up projections `(rows_out, 2 * intermediate)`.
    gate_up: Vec<f32>,
    /// LoRA inputs per projection (absent projections have no entry).
    lora: HashMap<Projection, LoraSaved>,
}

/// The hand-derived training step over a model's frozen f32 weights.
pub struct NativeStep {
    cfg: LlamaConfig,
    blocks: Vec<BlockF32>,
    final_norm: Vec<f32>,
    /// `(vocab, hidden)`, the model's tensor (only one row of logits is ever computed).
    lm_head: Tensor,
    embed: Tensor,
    cos: Vec<f32>,
    sin: Vec<f32>,
    saved: Vec<BlockSaved>,
    precision: FrozenPrecision,
}

/// The loss of one example and the gradients of every pair of the adapter.
pub struct StepOutput {
    /// Cross-entropy of the answer (before any scaling).
    pub loss: f64,
    /// `d(loss * loss_scale)/d(pair)` for every pair of the adapter.
    pub grads: HashMap<(usize, Projection), PairGrad>,
}

fn dense_f32(l: &Linear, what: &str) -> Result<Vec<f32>> {
    match l {
        Linear::Dense(w) => Ok(w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
        _ => {
            bail!("native training step: {what} is not a dense weight (load the model dequantized)")
        }
    }
}

fn vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}


impl NativeStep {
    /// Copies the frozen block weights of `model` (dense, any float dtype) as f32; the frozen
    /// products run in f32.
    pub fn new(model: &Llama) -> Result<Self> {
        Self::with_precision(model, FrozenPrecision::F32)
    }

    /// The frozen products' arithmetic.
    pub fn precision(&self) -> FrozenPrecision {
        self.precision
    }

    /// [`NativeStep::new`] with the frozen products in `precision` (bf16: packed here, once).
    pub fn with_precision(model: &Llama, precision: FrozenPrecision) -> Result<Self> {
        let cfg = model.config();
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        if !model.device().is_cpu() {
            bail!("the native training step runs on the CPU");
        }
        let w = model.weights();
        let blocks = w
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                Ok(BlockF32 {
                    attn_norm: vec_f32(&b.attn_norm)?,
                    qkv: Frozen::new(dense_f32(&b.qkv, &format!("block {i} qkv"))?, qd + 2 * kvd, h, precision),
                    o: Frozen::new(dense_f32(&b.o, &format!("block {i} o"))?, h, qd, precision),
                    ffn_norm: vec_f32(&b.ffn_norm)?,
                    gate_up: Frozen::new(dense_f32(&b.gate_up, &format!("block {i} gate_up"))?, 2 * inter, h, precision),
                    down: Frozen::new(dense_f32(&b.down, &format!("block {i} down"))?, h, inter, precision),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (cos, sin) = model.rope_tables();
        let cfg = model.config().clone();
        Ok(Self {
            saved: (0..cfg.num_layers).map(|_| BlockSaved::default()).collect(),
            cfg,
            blocks,
            final_norm: vec_f32(&w.final_norm)?,
            lm_head: w.lm_head.to_dtype(DType::F32)?,
            embed: w.embed.to_dtype(DType::F32)?,
            cos: cos.to_vec(),
            sin: sin.to_vec(),
            precision,
        })
    }

    /// The loss of the prompt `ids` whose answer is candidate `label` (letters `letters`), and
    /// the gradients of `loss * loss_scale` with respect to every pair of `lora`. `dropout` is
    /// `(p, seed)` of the LoRA dropout, drawn as [`crate::LoraAdapter::set_dropout`] does.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grads(
        &mut self,
        lora: &LoraF32,
        dropout: Option<(f32, u64)>,
        ids: &[u32],
        letters: &[u32],
        label: usize,
        loss: LossKind,
        loss_scale: f32,
    ) -> Result<StepOutput> {
        let t = ids.len();
        if t == 0 || t > self.cfg.max_seq_len {
            bail!(
                "prompt of {t} tokens (1..={} allowed)",
                self.cfg.max_seq_len
            );
        }
        if label >= letters.len() {
            bail!("label {label} out of {} letters", letters.len());
        }
        for ((layer, proj), p) in lora {
            let (din, dout) = proj.dims(&self.cfg);
            if *layer >= self.cfg.num_layers || p.a.len() != p.r * din || p.b.len() != dout * p.r {
                bail!("LoRA pair of block {layer} {proj:?} does not fit the model");
            }
        }
        let mut drop = dropout
            .filter(|(p, _)| *p > 0.0)
            .map(|(p, seed)| LoraDropout::new(p, seed));
        let h = self.cfg.hidden_size;
        let idx = Tensor::from_slice(ids, t, self.embed.device())?;
        let mut x: Vec<f32> = self.embed.index_select(&idx, 0)?.flatten_all()?.to_vec1()?;
        let layers = self.cfg.num_layers;
        for l in 0..layers {
            let q_from = if l + 1 == layers { t - 1 } else { 0 };
            x = self.block_forward(l, x, t, q_from, lora, drop.as_mut());
        }
        // `x` is the last row only now.
        let eps = self.cfg.rms_norm_eps as f32;
        let mut hf = vec![0f32; h];
        let mut rstd_f = Vec::new();
        rms_norm(&x, &self.final_norm, eps, &mut hf, &mut rstd_f);
        let hidden = Tensor::from_slice(&hf, (1, h), self.lm_head.device())?;
        let (head, target) = match loss {
            LossKind::AnswerToken => (self.lm_head.clone(), letters[label] as usize),
            LossKind::Letters => {
                let li = Tensor::from_slice(letters, letters.len(), self.lm_head.device())?;
                (self.lm_head.index_select(&li, 0)?, label)
            }
        };
        let logits: Vec<f32> = hidden.matmul(&head.t()?)?.flatten_all()?.to_vec1()?;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = logits.iter().map(|&z| (z as f64 - max).exp()).sum();
        let lse = max + sum.ln();
        let loss_value = lse - logits[target] as f64;
        let mut dlogits: Vec<f32> = logits
            .iter()
            .map(|&z| ((z as f64 - lse).exp() * loss_scale as f64) as f32)
            .collect();
        dlogits[target] -= loss_scale;
        let dl = Tensor::from_vec(dlogits, (1, head.dim(0)?), head.device())?;
        let dhf: Vec<f32> = dl.matmul(&head)?.flatten_all()?.to_vec1()?;
        let mut dx = vec![0f32; h];
        rms_norm_backward(&x, &rstd_f, &self.final_norm, &dhf, &mut dx, false);

        let mut grads = HashMap::new();
        for l in (0..layers).rev() {
            dx = self.block_backward(l, &dx, t, lora, &mut grads);
        }
        Ok(StepOutput {
            loss: loss_value,
            grads,
        })
    }
}

/// Frees a buffer as soon as it is dead (makes the peak memory of a step explicit).
fn drop_vec(v: Vec<f32>) {
    drop(v);
}
