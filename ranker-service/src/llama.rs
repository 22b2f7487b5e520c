//! Our Llama forward pass: left-padded batches with an attention mask, a reusable KV cache,
//! per-position hidden states, optional LoRA, and an output head restricted to chosen tokens.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};

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

/// RoPE tables `(max_seq_len, head_dim / 2)` for HF's half-split rotation.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// The same tables as plain f32, for the fused CPU kernels.
    cos_f32: Vec<f32>,
    sin_f32: Vec<f32>,
}

impl Rope {
    fn new(cfg: &LlamaConfig, device: &Device, dtype: DType) -> Result<Self> {
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
    fn gather(&self, positions: &[u32], batch: usize, len: usize) -> Result<(Tensor, Tensor)> {
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

/// Hands the heap pages freed by replacing the f32 projections (~425 MB on SmolLM2-135M) back to
/// the OS; glibc keeps them mapped otherwise, and the pod's resident memory would not shrink.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory at the top of the heap or in free pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One of a block's fused projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Qkv,
    O,
    GateUp,
    Down,
}

impl Slot {
    fn of(self, block: &mut BlockWeights) -> &mut Linear {
        match self {
            Self::Qkv => &mut block.qkv,
            Self::O => &mut block.o,
            Self::GateUp => &mut block.gate_up,
            Self::Down => &mut block.down,
        }
    }

    /// The fused projection holding `proj`, and the first output row of `proj` in it.
    fn of_projection(proj: Projection, cfg: &LlamaConfig) -> (Self, usize) {
        match proj {
            Projection::QProj => (Self::Qkv, 0),
            Projection::KProj => (Self::Qkv, cfg.q_dim()),
            Projection::VProj => (Self::Qkv, cfg.q_dim() + cfg.kv_dim()),
            Projection::OProj => (Self::O, 0),
            Projection::GateProj => (Self::GateUp, 0),
            Projection::UpProj => (Self::GateUp, cfg.intermediate_size),
            Projection::DownProj => (Self::Down, 0),
        }
    }
}

/// `w` `(out, in)` with `delta` added to its rows `offset..offset + delta.rows`.
fn add_rows(w: &Tensor, offset: usize, delta: &Tensor) -> Result<Tensor> {
    let rows = delta.dim(0)?;
    let total = w.dim(0)?;
    let mut parts = Vec::new();
    if offset > 0 {
        parts.push(w.narrow(0, 0, offset)?);
    }
    parts.push((w.narrow(0, offset, rows)? + delta)?);
    if offset + rows < total {
        parts.push(w.narrow(0, offset + rows, total - offset - rows)?);
    }
    Ok(Tensor::cat(&parts, 0)?.contiguous()?)
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

    /// Re-packs every decoder projection as bf16 for the CPU's bf16 kernels (inference only),
    /// merging `adapter` first. Returns the kernel used, or None (nothing changed) when the CPU
    /// has no AVX-512 BF16, the model is off the CPU or not f32.
    ///
    /// Works one block at a time, and a quantized projection is dequantized only for its own
    /// packing: loading the GGUF quantized and packing here keeps the peak near the packed
    /// model's size, where loading dense f32 first held the whole f32 model (~540 MB for
    /// SmolLM2-135M) at once.
    pub fn pack_bf16(&mut self, adapter: Option<&LoraAdapter>) -> Result<Option<crate::bf16_gemm::Bf16Kernel>> {
        let Some(kernel) = crate::bf16_gemm::Bf16Kernel::detect() else {
            return Ok(None);
        };
        if !self.device.is_cpu() || self.dtype != DType::F32 {
            return Ok(None);
        }
        let cfg = self.cfg.clone();
        for (layer, block) in self.weights.blocks.iter_mut().enumerate() {
            for slot in [Slot::Qkv, Slot::O, Slot::GateUp, Slot::Down] {
                let linear = slot.of(block);
                if matches!(linear, Linear::Bf16(_)) {
                    continue;
                }
                let mut w = linear.to_dense(DType::F32)?;
                if let Some(adapter) = adapter {
                    for ((l, proj), pair) in adapter.pairs() {
                        let (target, offset) = Slot::of_projection(*proj, &cfg);
                        if *l == layer && target == slot {
                            w = add_rows(&w, offset, &pair.delta_weight()?.to_dtype(DType::F32)?)?;
                        }
                    }
                }
                let (out, inp) = w.dims2()?;
                let data: Vec<f32> = w.flatten_all()?.to_vec1()?;
                drop(w);
                *slot.of(block) = Linear::Bf16(std::sync::Arc::new(crate::bf16_gemm::PackedBf16::pack(&data, out, inp)));
            }
            // Hand each block's dequantized copies back before the next one is made.
            release_freed_heap();
        }
        // The embedding (also the output head when tied, as in SmolLM2) is the largest single
        // weight left in f32: lookups and the verbalizer's 20 head rows widen what they read,
        // so it can sit in bf16 too (56 MB less resident for SmolLM2-135M).
        let tied = self.weights.lm_head.id() == self.weights.embed.id();
        self.weights.embed = self.weights.embed.to_dtype(DType::BF16)?;
        self.weights.lm_head = if tied { self.weights.embed.clone() } else { self.weights.lm_head.to_dtype(DType::BF16)? };
        release_freed_heap();
        self.bf16 = Some(kernel);
        Ok(Some(kernel))
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

    /// Merges a LoRA adapter into dense weights (serving: no per-token LoRA cost afterwards).
    /// Fails when a target projection is held quantized; pass the adapter to
    /// [`Llama::forward`] instead in that case.
    pub fn merge_lora(&mut self, adapter: &LoraAdapter) -> Result<()> {
        let cfg = self.cfg.clone();
        for ((layer, proj), pair) in adapter.pairs() {
            let delta = pair.delta_weight()?.to_dtype(self.dtype)?;
            let (slot, offset) = Slot::of_projection(*proj, &cfg);
            let Linear::Dense(w) = slot.of(&mut self.weights.blocks[*layer]) else {
                return Err(RankerError::InvalidAdapter(format!(
                    "cannot merge into quantized {proj:?} of layer {layer}"
                )));
            };
            *w = add_rows(w, offset, &delta)?;
        }
        Ok(())
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

/// HF's half-split RoPE from elementary ops (candle's fused `rope` has no backward). `x` is
/// `(b, h, t, d)`, `cos`/`sin` are `(b, t, d / 2)`.
fn rope_differentiable(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(3)? / 2;
    let cos = Tensor::cat(&[cos, cos], 2)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], 2)?.unsqueeze(1)?;
    let rotated = Tensor::cat(
        &[&x.narrow(3, half, half)?.neg()?, &x.narrow(3, 0, half)?],
        3,
    )?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Appends this batch's keys and values to the cached ones.
fn append_kv(past: &LayerKv, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
    if past.k.dim(2)? == 0 {
        return Ok((k, v));
    }
    Ok((
        Tensor::cat(&[&past.k, &k], 2)?,
        Tensor::cat(&[&past.v, &v], 2)?,
    ))
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

/// Grouped-query attention. `q` is `(b, heads, tq, d)`, `k`/`v` are `(b, kv_heads, tk, d)`,
/// `mask` is additive `(b, 1, 1, tq, tk)`. Returns `(b, tq, heads * d)`.
///
/// The query heads that share a key/value head are stacked along the row axis, so each group
/// is one matmul against its K/V without materializing repeated K/V tensors.
#[allow(clippy::too_many_arguments)]
fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    nkv: usize,
    tq: usize,
    hd: usize,
    differentiable: bool,
) -> candle_core::Result<Tensor> {
    let (b, nh, _, _) = q.dims4()?;
    let group = nh / nkv;
    let tk = k.dim(2)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let q = (q.reshape((b, nkv, group * tq, hd))? * scale)?;
    let scores = q.matmul(&k.t()?)?.reshape((b, nkv, group, tq, tk))?;
    let scores = scores.broadcast_add(mask)?;
    let probs = if differentiable {
        candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let probs = probs.reshape((b, nkv, group * tq, tk))?;
    let out = probs.matmul(v)?; // (b, nkv, group * tq, d)
    out.reshape((b, nh, tq, hd))?
        .transpose(1, 2)?
        .reshape((b, tq, nh * hd))
}

/// Convenience: softmax over the last dimension in f32.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?)
}
