//! LoRA adapters: low-rank updates `W + (alpha / r) B A` on chosen projections.
//!
//! The forward pass takes an optional adapter and adds `scale * (x A^T) B^T` to the chosen
//! projections' outputs (the training path: gradients reach A and B). For serving on dense
//! weights the adapter can instead be merged into the weights once ([`crate::Llama::merge_lora`]).

use std::collections::HashMap;

use candle_core::{DType, Tensor, D};
use llamarec_common::rng::Rng;

use crate::config::LlamaConfig;
use crate::error::{RankerError, Result};

/// A projection of a decoder block that can carry a LoRA update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    /// Query projection (`self_attn.q_proj`).
    QProj,
    /// Key projection (`self_attn.k_proj`).
    KProj,
    /// Value projection (`self_attn.v_proj`).
    VProj,
    /// Attention output projection (`self_attn.o_proj`).
    OProj,
    /// Feed-forward gate projection (`mlp.gate_proj`).
    GateProj,
    /// Feed-forward up projection (`mlp.up_proj`).
    UpProj,
    /// Feed-forward down projection (`mlp.down_proj`).
    DownProj,
}

impl Projection {
    /// All projections, in block order.
    pub const ALL: [Projection; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// The module path inside a block, as PEFT names it ("self_attn.q_proj").
    pub fn module_path(self) -> &'static str {
        match self {
            Self::QProj => "self_attn.q_proj",
            Self::KProj => "self_attn.k_proj",
            Self::VProj => "self_attn.v_proj",
            Self::OProj => "self_attn.o_proj",
            Self::GateProj => "mlp.gate_proj",
            Self::UpProj => "mlp.up_proj",
            Self::DownProj => "mlp.down_proj",
        }
    }

    /// `(in, out)` widths of the projection.
    pub fn dims(self, cfg: &LlamaConfig) -> (usize, usize) {
        match self {
            Self::QProj => (cfg.hidden_size, cfg.q_dim()),
            Self::KProj | Self::VProj => (cfg.hidden_size, cfg.kv_dim()),
            Self::OProj => (cfg.q_dim(), cfg.hidden_size),
            Self::GateProj | Self::UpProj => (cfg.hidden_size, cfg.intermediate_size),
            Self::DownProj => (cfg.intermediate_size, cfg.hidden_size),
        }
    }
}

/// The low-rank pair of one projection: `delta W = scale * B A`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// Down matrix `(r, in)`.
    pub a: Tensor,
    /// Up matrix `(out, r)`.
    pub b: Tensor,
    /// `alpha / r`.
    pub scale: f64,
}

impl LoraPair {
    /// The update to add to the projection's output for a 2D input `(n, in)`.
    pub fn delta(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.a.t()?)?.matmul(&self.b.t()?)? * self.scale
    }

    /// The dense update `scale * B A`, shape `(out, in)`.
    pub fn delta_weight(&self) -> candle_core::Result<Tensor> {
        self.b.matmul(&self.a)? * self.scale
    }
}

/// A set of LoRA pairs keyed by (block index, projection).
#[derive(Debug, Clone, Default)]
pub struct LoraAdapter {
    pairs: HashMap<(usize, Projection), LoraPair>,
    /// Training only: PEFT's `lora_dropout` on each pair's input, with its own seeded stream.
    dropout: Option<std::sync::Arc<std::sync::Mutex<LoraDropout>>>,
    /// Serving only ([`LoraAdapter::for_serving`]): each fused projection's pairs as one
    /// product, so the update costs two small matmuls instead of two per part, a zero block per
    /// missing part and a concatenation.
    serving: Option<std::sync::Arc<HashMap<(usize, FusedSlot), ServingFactors>>>,
}

/// The projections the forward pass runs as one matmul each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum FusedSlot {
    Qkv,
    O,
    GateUp,
    Down,
}

impl FusedSlot {
    const ALL: [(FusedSlot, &'static [Projection]); 4] = [
        (FusedSlot::Qkv, &[Projection::QProj, Projection::KProj, Projection::VProj]),
        (FusedSlot::O, &[Projection::OProj]),
        (FusedSlot::GateUp, &[Projection::GateProj, Projection::UpProj]),
        (FusedSlot::Down, &[Projection::DownProj]),
    ];

    /// The slot whose parts are exactly `parts`, in order.
    fn of(parts: &[Projection]) -> Option<Self> {
        Self::ALL.iter().find(|(_, p)| *p == parts).map(|(slot, _)| *slot)
    }
}

/// One fused projection's update `x A^T B^T`: `a_t` is the parts' down matrices stacked and
/// transposed `(in, r_total)`, `b_t` the block-diagonal up matrices, scaled, transposed
/// `(r_total, out_total)` with zeros where a part has no pair.
#[derive(Debug, Clone)]
struct ServingFactors {
    a_t: Tensor,
    b_t: Tensor,
}

/// Inverted dropout on the LoRA branch's input (`B A dropout(x)`), as PEFT applies it; a fresh
/// mask per pair and per forward pass. The native training step draws its masks from the same
/// stream in the same order (Q, K, V, O, gate, up, down of each block), so both training paths
/// see the same masks for the same seed.
#[derive(Debug)]
pub(crate) struct LoraDropout {
    p: f32,
    rng: Rng,
}

impl LoraDropout {
    /// A mask stream with drop probability `p`, seeded with `seed`.
    pub(crate) fn new(p: f32, seed: u64) -> Self {
        Self {
            p,
            rng: Rng::new(seed),
        }
    }

    /// The next `n` mask values: 0 (dropped) or `1 / (1 - p)` (kept).
    pub(crate) fn mask(&mut self, n: usize) -> Vec<f32> {
        let keep = 1.0 / (1.0 - self.p);
        (0..n)
            .map(|_| {
                if self.rng.next_f32() < self.p {
                    0.0
                } else {
                    keep
                }
            })
            .collect()
    }
}

impl LoraAdapter {
    /// An adapter with no pairs (a no-op).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the pair of one block's projection after checking its shapes.
    pub fn insert(
        &mut self,
        cfg: &LlamaConfig,
        layer: usize,
        proj: Projection,
        pair: LoraPair,
    ) -> Result<()> {
        if layer >= cfg.num_layers {
            return Err(RankerError::InvalidAdapter(format!(
                "layer {layer} out of {}",
                cfg.num_layers
            )));
        }
        let (din, dout) = proj.dims(cfg);
        let (r, a_in) = pair.a.dims2()?;
        let (b_out, b_r) = pair.b.dims2()?;
        if a_in != din || b_out != dout || b_r != r {
            return Err(RankerError::InvalidAdapter(format!(
                "layer {layer} {proj:?}: A {:?} B {:?}, expected A (r, {din}) B ({dout}, r)",
                pair.a.dims(),
                pair.b.dims()
            )));
        }
        self.pairs.insert((layer, proj), pair);
        // Stacked factors of the old pairs would no longer match.
        self.serving = None;
        Ok(())
    }

    /// Builds an adapter from PEFT-named tensors
    /// (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, `lora_B`), with
    /// `scale = alpha / r` as in PEFT's non-rsLoRA default.
    pub fn from_peft_tensors(
        cfg: &LlamaConfig,
        tensors: &HashMap<String, Tensor>,
        alpha: f64,
    ) -> Result<Self> {
        let mut adapter = Self::new();
        for layer in 0..cfg.num_layers {
            for proj in Projection::ALL {
                let base = format!(
                    "base_model.model.model.layers.{layer}.{}",
                    proj.module_path()
                );
                let a = tensors.get(&format!("{base}.lora_A.weight"));
                let b = tensors.get(&format!("{base}.lora_B.weight"));
                match (a, b) {
                    (Some(a), Some(b)) => {
                        let r = a.dim(0)?;
                        let pair = LoraPair {
                            a: a.clone(),
                            b: b.clone(),
                            scale: alpha / r as f64,
                        };
                        adapter.insert(cfg, layer, proj, pair)?;
                    }
                    (None, None) => {}
                    _ => {
                        return Err(RankerError::InvalidAdapter(format!(
                            "{base}: lora_A and lora_B must both be present"
                        )))
                    }
                }
            }
        }
        if adapter.pairs.is_empty() {
            return Err(RankerError::InvalidAdapter(
                "no PEFT LoRA tensors found".into(),
            ));
        }
        Ok(adapter)
    }

    /// Training: applies inverted dropout with probability `p` to every pair's input from now
    /// on (masks drawn from `seed`); `p = 0` turns it off. Inference never sets it.
    pub fn set_dropout(&mut self, p: f32, seed: u64) {
        self.dropout = (p > 0.0)
            .then(|| std::sync::Arc::new(std::sync::Mutex::new(LoraDropout::new(p, seed))));
    }

    /// The same pairs prepared for serving: each fused projection's pairs stacked into one
    /// pair of matrices (see [`ServingFactors`]). Inference only: the stacked copies are not
    /// what an optimizer updates.
    pub fn for_serving(mut self, cfg: &LlamaConfig) -> Result<Self> {
        let mut factors = HashMap::new();
        for layer in 0..cfg.num_layers {
            for (slot, parts) in FusedSlot::ALL {
                if let Some(f) = self.stack(layer, parts, cfg)? {
                    factors.insert((layer, slot), f);
                }
            }
        }
        self.serving = Some(std::sync::Arc::new(factors));
        Ok(self)
    }

    fn stack(&self, layer: usize, parts: &[Projection], cfg: &LlamaConfig) -> Result<Option<ServingFactors>> {
        let pairs: Vec<(usize, &LoraPair)> = {
            let mut offset = 0;
            let mut found = Vec::new();
            for p in parts {
                if let Some(pair) = self.get(layer, *p) {
                    found.push((offset, pair));
                }
                offset += p.dims(cfg).1;
            }
            found
        };
        let Some((_, first)) = pairs.first() else { return Ok(None) };
        let (device, dtype) = (first.a.device().clone(), first.a.dtype());
        let out_total: usize = parts.iter().map(|p| p.dims(cfg).1).sum();
        let r_total: usize = pairs.iter().map(|(_, p)| p.a.dim(0)).sum::<candle_core::Result<usize>>()?;
        let a = Tensor::cat(&pairs.iter().map(|(_, p)| p.a.clone()).collect::<Vec<_>>(), 0)?;
        // The block-diagonal up matrix, built on the host: (out_total, r_total).
        let mut b = vec![0f32; out_total * r_total];
        let mut col = 0;
        for (row, pair) in &pairs {
            let up: Vec<Vec<f32>> = (pair.b.to_dtype(DType::F32)? * pair.scale)?.to_vec2()?;
            let r = pair.a.dim(0)?;
            for (i, values) in up.iter().enumerate() {
                b[(row + i) * r_total + col..(row + i) * r_total + col + r].copy_from_slice(values);
            }
            col += r;
        }
        let b = Tensor::from_vec(b, (out_total, r_total), &device)?.to_dtype(dtype)?;
        Ok(Some(ServingFactors { a_t: a.t()?.contiguous()?, b_t: b.t()?.contiguous()? }))
    }

    /// The serving factors of the fused projection `parts` of `layer`, when prepared and no
    /// training dropout applies.
    fn serving_factors(&self, layer: usize, parts: &[Projection]) -> Option<&ServingFactors> {
        if self.dropout.is_some() {
            return None;
        }
        self.serving.as_ref()?.get(&(layer, FusedSlot::of(parts)?))
    }

    /// The update of one block's projection for input `x`, with the training dropout if set;
    /// `None` when the projection has no pair.
    pub fn delta(
        &self,
        layer: usize,
        proj: Projection,
        x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if let Some(f) = self.serving_factors(layer, &[proj]) {
            return Ok(Some(x.matmul(&f.a_t)?.matmul(&f.b_t)?));
        }
        match self.get(layer, proj) {
            Some(pair) => pair.delta(&self.dropped(x)?).map(Some),
            None => Ok(None),
        }
    }

    fn dropped(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some(d) = &self.dropout else {
            return Ok(x.clone());
        };
        let mask = d.lock().expect("dropout state").mask(x.elem_count());
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }

    /// The pair of one block's projection, if any.
    pub fn get(&self, layer: usize, proj: Projection) -> Option<&LoraPair> {
        self.pairs.get(&(layer, proj))
    }

    /// All pairs (for optimizers and serialization).
    pub fn pairs(&self) -> impl Iterator<Item = (&(usize, Projection), &LoraPair)> {
        self.pairs.iter()
    }

    /// True when the adapter has no pairs.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The update for a fused projection whose outputs are the concatenation of `parts`
    /// (e.g. `[q, k, v]`), or `None` when none of the parts has a pair. Parts without a pair
    /// contribute zeros.
    pub(crate) fn fused_delta(
        &self,
        layer: usize,
        parts: &[Projection],
        cfg: &LlamaConfig,
        x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if parts.iter().all(|p| self.get(layer, *p).is_none()) {
            return Ok(None);
        }
        if let Some(f) = self.serving_factors(layer, parts) {
            return Ok(Some(x.matmul(&f.a_t)?.matmul(&f.b_t)?));
        }
        let n = x.dim(0)?;
        let mut outs = Vec::with_capacity(parts.len());
        for p in parts {
            outs.push(match self.delta(layer, *p, x)? {
                Some(d) => d,
                None => Tensor::zeros((n, p.dims(cfg).1), x.dtype(), x.device())?,
            });
        }
        Ok(Some(Tensor::cat(&outs, D::Minus1)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Stacked serving factors give the update the per-pair path gives, for every fused
    /// projection, with parts missing (k, up) and of different ranks.
    #[test]
    fn serving_factors_match_the_per_pair_update() {
        let cfg = LlamaConfig { hidden_size: 16, intermediate_size: 24, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 4, vocab_size: 8, rms_norm_eps: 1e-5, rope_theta: 1e4, max_seq_len: 32 };
        let dev = Device::Cpu;
        let mut adapter = LoraAdapter::new();
        for (layer, proj, r) in [(0, Projection::QProj, 2), (0, Projection::VProj, 3), (1, Projection::OProj, 2), (1, Projection::GateProj, 4), (1, Projection::DownProj, 1)] {
            let (din, dout) = proj.dims(&cfg);
            let pair = LoraPair { a: Tensor::randn(0f32, 1.0, (r, din), &dev).unwrap(), b: Tensor::randn(0f32, 1.0, (dout, r), &dev).unwrap(), scale: 1.5 };
            adapter.insert(&cfg, layer, proj, pair).unwrap();
        }
        let served = adapter.clone().for_serving(&cfg).unwrap();
        let groups: [&[Projection]; 4] = [&[Projection::QProj, Projection::KProj, Projection::VProj], &[Projection::OProj], &[Projection::GateProj, Projection::UpProj], &[Projection::DownProj]];
        let mut compared = 0;
        for layer in 0..cfg.num_layers {
            for parts in groups {
                let din = parts[0].dims(&cfg).0;
                let x = Tensor::randn(0f32, 1.0, (5, din), &dev).unwrap();
                let (reference, fast) = if parts.len() == 1 {
                    (adapter.delta(layer, parts[0], &x).unwrap(), served.delta(layer, parts[0], &x).unwrap())
                } else {
                    (adapter.fused_delta(layer, parts, &cfg, &x).unwrap(), served.fused_delta(layer, parts, &cfg, &x).unwrap())
                };
                match (reference, fast) {
                    (None, None) => {}
                    (Some(r), Some(f)) => {
                        let diff = (r - f).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                        assert!(diff < 1e-4, "layer {layer} {parts:?}: {diff}");
                        compared += 1;
                    }
                    (r, f) => panic!("layer {layer} {parts:?}: {:?} vs {:?}", r.is_some(), f.is_some()),
                }
            }
        }
        assert_eq!(compared, 4, "qkv of layer 0; o, gate_up and down of layer 1");
    }

    /// The masks the stream drew before it moved onto the shared generator: a resumed training
    /// run must see the same ones.
    #[test]
    fn dropout_masks_are_pinned() {
        assert_eq!(
            LoraDropout::new(0.5, 123).mask(10),
            [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0, 2.0, 0.0]
        );
        let k = 1.0 / (1.0 - 0.3f32);
        assert_eq!(
            LoraDropout::new(0.3, 9).mask(12),
            [k, k, 0.0, k, 0.0, 0.0, k, k, 0.0, k, k, 0.0]
        );
    }
}
