//! Our Llama forward pass: left-padded batches with an attention mask, a reusable KV cache,
//! per-position hidden states, optional LoRA, and an output head restricted to chosen tokens.
//!
//! - [`rope`]: the RoPE tables (and the differentiable rotation for training).
//! - [`attention`]: the generic (candle-op) attention path; the fused CPU one is `cpu_kernels`.
//! - [`pack`]: re-packing a loaded model for serving ([`Llama::pack_bf16`],
//!   [`Llama::merge_lora`]).

mod attention;
mod pack;
mod rope;

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};

use self::attention::{append_kv, attention};
use self::rope::{rope_differentiable, Rope};
use crate::config::LlamaConfig;
use crate::cpu_kernels;
use crate::error::{RankerError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::{KvCache, LayerKv};
use crate::lora::{LoraAdapter, Projection};
use crate::weights::{self, BlockWeights, Linear, LlamaWeights, WeightPrecision, WeightSource};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Whether quantized GGUF weights are dequantized at load (CPU default) or kept.
    pub precision: WeightPrecision,
    /// Where the tensors live.
    pub device: Device,
    /// Compute dtype of dense weights and activations.
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            precision: WeightPrecision::F32,
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }
}

/// A batch of token sequences, left-padded to a common length.
///
/// Left padding keeps every row's last real token in the last column, which is where the
/// verbalizer reads its logits.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    ids: Tensor,
    valid: Vec<Vec<bool>>,
}

impl TokenBatch {
    /// Left-pads `seqs` (all non-empty) to the longest one.
    pub fn left_padded<S: AsRef<[u32]>>(seqs: &[S], device: &Device) -> Result<Self> {
        let len = seqs.iter().map(|s| s.as_ref().len()).max().unwrap_or(0);
        if seqs.is_empty() || seqs.iter().any(|s| s.as_ref().is_empty()) {
            return Err(RankerError::InvalidModel(
                "empty token sequence in batch".into(),
            ));
        }
        let mut ids = Vec::with_capacity(seqs.len() * len);
        let mut valid = Vec::with_capacity(seqs.len());
        for s in seqs {
            let s = s.as_ref();
            let pad = len - s.len();
            // Any id works for padding: padded positions are masked out of attention.
            ids.extend(std::iter::repeat_n(0u32, pad));
            ids.extend_from_slice(s);
            let mut v = vec![false; pad];
            v.extend(std::iter::repeat_n(true, s.len()));
            valid.push(v);
        }
        let ids = Tensor::from_vec(ids, (seqs.len(), len), device)?;
        Ok(Self { ids, valid })
    }

    /// `(batch, len)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.valid.len(), self.valid.first().map_or(0, Vec::len))
    }
}

/// Which positions' hidden states a forward pass must produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// Every position (training, debugging).
    All,
    /// Only the last position (scoring): the last block then runs attention output and the
    /// feed-forward layer for one row per sequence instead of all of them.
    Last,
}

/// The result of a forward pass.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// Final-norm hidden states `(batch, positions, hidden)`; `positions` is the input length
    /// for [`Positions::All`] and 1 for [`Positions::Last`].
    pub hidden: Tensor,
    /// The input cache extended by this batch's tokens.
    pub cache: KvCache,
}

impl ForwardOutput {
    /// Hidden state of the last position of each row, `(batch, hidden)`.
    pub fn last_hidden(&self) -> Result<Tensor> {
        let t = self.hidden.dim(1)?;
        Ok(self.hidden.i((.., t - 1, ..))?.contiguous()?)
    }
}

/// An output head restricted to a few token ids: `logits = hidden . E[ids]^T`.
#[derive(Debug, Clone)]
pub struct TokenHead {
    ids: Vec<u32>,
    /// `(hidden, ids.len())`, pre-transposed so scoring is one small matmul.
    weight_t: Tensor,
}

impl TokenHead {
    /// The token ids whose logits this head computes, in output order.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Logits `(batch, ids.len())` for hidden states `(batch, hidden)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(hidden.matmul(&self.weight_t)?)
    }
}

/// Which implementation of attention, RoPE and SwiGLU a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Fused f32 CPU kernels (inference only: no backward). The default on CPU with f32;
    /// ignored on other devices and dtypes.
    Fused,
    /// candle's fused tensor ops (RMSNorm, RoPE, softmax): any device and dtype, no backward.
    Generic,
    /// Only elementary candle ops, so gradients flow everywhere (LoRA training).
    Differentiable,
}

/// A Llama-architecture decoder with our forward pass. Immutable and `Sync`: the attention
/// state lives in [`KvCache`] values owned by the caller.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    weights: LlamaWeights,
    rope: Rope,
    device: Device,
    dtype: DType,
    kernels: Kernels,
    /// Set once the projections are packed as bf16 ([`Llama::pack_bf16`]).
    bf16: Option<crate::bf16_gemm::Bf16Kernel>,
}

/// Per-forward data shared by all blocks.
struct Step<'a> {
    batch: usize,
    len: usize,
    /// Cached positions per row before this batch.
    cached: usize,
    /// RoPE position of every input token, row-major `(batch, len)`.
    positions: Vec<u32>,
    /// Per row, whether each of the `cached + len` positions is a real token.
    valid: Vec<Vec<bool>>,
    cos: Tensor,
    sin: Tensor,
    /// Additive mask `(batch, 1, 1, len, cached + len)`: 0 where attention is allowed.
    mask: Tensor,
    lora: Option<&'a LoraAdapter>,
}

impl Llama {
    /// Loads a model from a GGUF file or an HF safetensors directory.
    pub fn load(source: &WeightSource, opts: &LoadOptions) -> Result<Self> {
        let (cfg, weights) = match source {
            WeightSource::Gguf(path) => {
                let mut gguf = GgufFile::open(path)?;
                weights::load_gguf(&mut gguf, opts.precision, &opts.device, opts.dtype)?
            }
            WeightSource::Safetensors(dir) => {
                weights::load_safetensors_dir(dir, &opts.device, opts.dtype)?
            }
        };
        Self::from_weights(cfg, weights, &opts.device, opts.dtype)
    }

    /// Loads a model from an already opened GGUF file (which also holds the tokenizer).
    pub fn from_gguf(gguf: &mut GgufFile, opts: &LoadOptions) -> Result<Self> {
        let (cfg, weights) = weights::load_gguf(gguf, opts.precision, &opts.device, opts.dtype)?;
        Self::from_weights(cfg, weights, &opts.device, opts.dtype)
    }

    /// Loads a model from an HF directory (`config.json` + `*.safetensors`).
    pub fn from_safetensors_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load(&WeightSource::Safetensors(dir.to_path_buf()), opts)
    }

    /// Wraps loaded weights.
    pub fn from_weights(
        cfg: LlamaConfig,
        weights: LlamaWeights,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let rope = Rope::new(&cfg, device, dtype)?;
        Ok(Self {
            cfg,
            weights,
            rope,
            device: device.clone(),
            dtype,
            kernels: Kernels::Fused,
            bf16: None,
        })
    }

    /// Chooses the kernels of later forward passes (training must use
    /// [`Kernels::Differentiable`]).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// True when forward passes run the fused CPU kernels.
    pub fn uses_fused_kernels(&self) -> bool {
        self.kernels == Kernels::Fused && self.device.is_cpu() && self.dtype == DType::F32
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The weights (for training code that needs the dense matrices).
    pub fn weights(&self) -> &LlamaWeights {
        &self.weights
    }

    /// The RoPE tables as plain f32 `(max_seq_len, head_dim / 2)`, row-major: cos, sin.
    pub(crate) fn rope_tables(&self) -> (&[f32], &[f32]) {
        (&self.rope.cos_f32, &self.rope.sin_f32)
    }

    /// An empty cache for `batch` rows; forwarding with it is the same as with no cache.
    pub fn empty_cache(&self, batch: usize) -> Result<KvCache> {
        let shape = (batch, self.cfg.num_kv_heads, 0, self.cfg.head_dim);
        let layers = (0..self.cfg.num_layers)
            .map(|_| {
                Ok(LayerKv {
                    k: Tensor::zeros(shape, self.dtype, &self.device)?,
                    v: Tensor::zeros(shape, self.dtype, &self.device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            valid: vec![Vec::new(); batch],
        })
    }

    /// An output head computing only the logits of `ids`.
    pub fn token_head(&self, ids: &[u32]) -> Result<TokenHead> {
        if let Some(bad) = ids.iter().find(|id| **id as usize >= self.cfg.vocab_size) {
            return Err(RankerError::InvalidModel(format!(
                "token id {bad} out of vocab"
            )));
        }
        let idx = Tensor::from_slice(ids, ids.len(), &self.device)?;
        let rows = self.weights.lm_head.index_select(&idx, 0)?.to_dtype(self.dtype)?;
        Ok(TokenHead {
            ids: ids.to_vec(),
            weight_t: rows.t()?.contiguous()?,
        })
    }

    /// Full-vocabulary logits `(.., vocab)` for hidden states `(.., hidden)`.
    pub fn full_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = &self.weights.lm_head;
        if head.dtype() == self.dtype {
            return Ok(hidden.broadcast_matmul(&head.t()?)?);
        }
        // A bf16-packed model keeps the (tied) head in bf16.
        let dims = hidden.dims().to_vec();
        let width = *dims.last().expect("hidden states have a width");
        let flat = hidden.reshape((hidden.elem_count() / width, width))?;
        let logits = cpu_kernels::logits_against_bf16_rows(&flat, head)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-empty") = head.dim(0)?;
        Ok(logits.reshape(out_dims)?)
    }

    /// Which kernels the decoder projections run on: "f32", "quantized", "bf16-amx" or
    /// "bf16-avx512" (for Info and logs).
    pub fn projection_kernels(&self) -> &'static str {
        match (self.bf16, &self.weights.blocks.first().map(|b| &b.qkv)) {
            (Some(k), _) => k.name(),
            (None, Some(Linear::Quantized(_) | Linear::Concat(_))) => "quantized",
            _ => "f32",
        }
    }

    /// Runs `input` after the tokens held in `cache` (if any).
    ///
    /// Each row's RoPE positions continue from the number of real tokens already cached for
    /// it, and attention sees only real tokens, so a left-padded batch gives each row the same
    /// result as running it alone, and a cached prefix plus a suffix gives the same result as
    /// the whole sequence.
    pub fn forward(
        &self,
        input: &TokenBatch,
        cache: Option<&KvCache>,
        lora: Option<&LoraAdapter>,
        positions: Positions,
    ) -> Result<ForwardOutput> {
        let (batch, len) = input.dims();
        let empty;
        let cache = match cache {
            Some(c) => {
                if c.batch_size() != batch {
                    return Err(RankerError::InvalidModel(format!(
                        "cache has {} rows, batch has {batch}",
                        c.batch_size()
                    )));
                }
                c
            }
            None => {
                empty = self.empty_cache(batch)?;
                &empty
            }
        };
        let cached = cache.len();
        let total = cached + len;
        let counts = cache.token_counts();
        if let Some(over) = counts
            .iter()
            .zip(&input.valid)
            .map(|(c, v)| c + v.iter().filter(|x| **x).count())
            .find(|n| *n > self.cfg.max_seq_len)
        {
            return Err(RankerError::ContextOverflow {
                tokens: over,
                max: self.cfg.max_seq_len,
            });
        }

        let mut valid = cache.valid.clone();
        let mut pos = Vec::with_capacity(batch * len);
        let mut mask = vec![f32::NEG_INFINITY; batch * len * total];
        for (r, row_valid) in valid.iter_mut().enumerate() {
            let mut next = counts[r];
            for &v in &input.valid[r] {
                // Padding gets the next real position; its output is never read.
                pos.push(next as u32);
                next += usize::from(v);
            }
            row_valid.extend_from_slice(&input.valid[r]);
            for q in 0..len {
                let row = &mut mask[(r * len + q) * total..(r * len + q + 1) * total];
                for (k, m) in row.iter_mut().enumerate().take(cached + q + 1) {
                    if row_valid[k] {
                        *m = 0.0;
                    }
                }
                // A padding query may see no real key at all; letting it see itself keeps its
                // softmax finite.
                row[cached + q] = 0.0;
            }
        }
        let mask = Tensor::from_vec(mask, (batch, 1, 1, len, total), &self.device)?
            .to_dtype(self.dtype)?;
        let (cos, sin) = self.rope.gather(&pos, batch, len)?;
        let step = Step {
            batch,
            len,
            cached,
            positions: pos,
            valid,
            cos,
            sin,
            mask,
            lora,
        };

        let ids = input.ids.flatten_all()?;
        let mut x = self.weights.embed.index_select(&ids, 0)?.to_dtype(self.dtype)?;
        let mut layers = Vec::with_capacity(self.cfg.num_layers);
        let last_layer = self.cfg.num_layers - 1;
        for (i, block) in self.weights.blocks.iter().enumerate() {
            let last_only = positions == Positions::Last && i == last_layer;
            let (y, kv) = self.block_forward(i, block, &x, &cache.layers[i], &step, last_only)?;
            x = y;
            layers.push(kv);
        }
        let rows = x.dim(0)? / batch;
        let hidden = self.rms_norm(&x, &self.weights.final_norm)?.reshape((
            batch,
            rows,
            self.cfg.hidden_size,
        ))?;
        Ok(ForwardOutput {
            hidden,
            cache: KvCache {
                layers,
                valid: step.valid,
            },
        })
    }

    /// A frozen projection; when training, through an op whose backward skips the weight's
    /// gradient (only LoRA matrices are trained).
    fn project(&self, w: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
        match w {
            Linear::Dense(weight) if self.kernels == Kernels::Differentiable => {
                crate::train::frozen::frozen_linear(x, weight)
            }
            _ => w.forward(x),
        }
    }

    fn eps(&self) -> f32 {
        self.cfg.rms_norm_eps as f32
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        if self.kernels == Kernels::Differentiable {
            candle_nn::ops::rms_norm_slow(x, w, self.eps())
        } else {
            candle_nn::ops::rms_norm(x, w, self.eps())
        }
    }

    /// One decoder block on `x` of shape `(batch * len, hidden)`. With `last_only`, returns
    /// only the rows of each sequence's last position, `(batch, hidden)`.
    fn block_forward(
        &self,
        layer: usize,
        w: &BlockWeights,
        x: &Tensor,
        past: &LayerKv,
        s: &Step,
        last_only: bool,
    ) -> Result<(Tensor, LayerKv)> {
        let cfg = &self.cfg;
        let (b, t, hd) = (s.batch, s.len, cfg.head_dim);
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);

        let h = self.rms_norm(x, &w.attn_norm)?;
        let mut qkv = self.project(&w.qkv, &h)?;
        if let Some(lora) = s.lora {
            let parts = [Projection::QProj, Projection::KProj, Projection::VProj];
            if let Some(d) = lora.fused_delta(layer, &parts, cfg, &h)? {
                qkv = (qkv + d)?;
            }
        }
        let fused = self.uses_fused_kernels();
        let (k, v, attn, tq) = if fused {
            let (q, k, v) = cpu_kernels::split_qkv_rope(
                &qkv,
                (b, t),
                (nh, nkv, hd),
                &self.rope.cos_f32,
                &self.rope.sin_f32,
                &s.positions,
            )?;
            let (k, v) = append_kv(past, k, v)?;
            let shape = cpu_kernels::AttentionShape {
                batch: b,
                len: t,
                cached: s.cached,
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                valid: &s.valid,
                last_only,
            };
            let attn = cpu_kernels::causal_attention(&q, &k, &v, &shape)?;
            (k, v, attn, if last_only { 1 } else { t })
        } else {
            let heads = |offset: usize, n: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(1, offset, n * hd)?
                    .reshape((b, t, n, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let differentiable = self.kernels == Kernels::Differentiable;
            let rope = |x: &Tensor| -> candle_core::Result<Tensor> {
                if differentiable {
                    rope_differentiable(x, &s.cos, &s.sin)
                } else {
                    candle_nn::rotary_emb::rope(x, &s.cos, &s.sin)
                }
            };
            let q = rope(&heads(0, nh)?)?;
            let k = rope(&heads(nh * hd, nkv)?)?;
            let v = heads((nh + nkv) * hd, nkv)?;
            let (k, v) = append_kv(past, k, v)?;
            let (q, mask, tq) = if last_only {
                (
                    q.narrow(2, t - 1, 1)?.contiguous()?,
                    s.mask.narrow(3, t - 1, 1)?,
                    1,
                )
            } else {
                (q, s.mask.clone(), t)
            };
            let attn = attention(&q, &k, &v, &mask, nkv, tq, hd, differentiable)?;
            (k, v, attn, tq)
        };
        let x = if last_only {
            x.reshape((b, t, cfg.hidden_size))?
                .i((.., t - 1, ..))?
                .contiguous()?
        } else {
            x.clone()
        };
        let h = attn.reshape((b * tq, nh * hd))?;
        let mut o = self.project(&w.o, &h)?;
        if let Some(d) = lora_delta(s.lora, layer, Projection::OProj, &h)? {
            o = (o + d)?;
        }
        let x = (x + o)?;

        let h = self.rms_norm(&x, &w.ffn_norm)?;
        let mut gu = self.project(&w.gate_up, &h)?;
        if let Some(lora) = s.lora {
            let parts = [Projection::GateProj, Projection::UpProj];
            if let Some(d) = lora.fused_delta(layer, &parts, cfg, &h)? {
                gu = (gu + d)?;
            }
        }
        let inter = cfg.intermediate_size;
        let act = if fused {
            cpu_kernels::swiglu(&gu, inter)?
        } else {
            (candle_nn::ops::silu(&gu.narrow(1, 0, inter)?)? * gu.narrow(1, inter, inter)?)?
        };
        let mut down = self.project(&w.down, &act)?;
        if let Some(d) = lora_delta(s.lora, layer, Projection::DownProj, &act)? {
            down = (down + d)?;
        }
        let x = (x + down)?;
        Ok((x, LayerKv { k, v }))
    }
}

fn lora_delta(
    lora: Option<&LoraAdapter>,
    layer: usize,
    proj: Projection,
    x: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    match lora {
        Some(l) => l.delta(layer, proj, x),
        None => Ok(None),
    }
}

/// Convenience: softmax over the last dimension in f32.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?)
}
