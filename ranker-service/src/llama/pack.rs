//! Re-packing a loaded model for serving: the decoder projections as bf16 for the CPU's bf16
//! kernels ([`Llama::pack_bf16`]), and LoRA adapters merged into the weights
//! ([`Llama::merge_lora`]). Neither changes the forward pass, only the weights it reads.

use candle_core::{DType, Tensor};

use super::Llama;
use crate::config::LlamaConfig;
use crate::error::{RankerError, Result};
use crate::lora::{LoraAdapter, Projection};
use crate::weights::{BlockWeights, Linear};

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

impl Llama {
    /// Re-packs every decoder projection as bf16 for the CPU's bf16 kernels (inference only),
    /// merging `adapter` first. Returns the kernel used, or None (nothing changed) when the CPU
    /// has no AVX-512 BF16, the model is off the CPU or not f32.
    ///
    /// Works one block at a time, and a quantized projection is dequantized only for its own
    /// packing: loading the GGUF quantized and packing here keeps the peak near the packed
    /// model's size, where loading dense f32 first held the whole f32 model (~540 MB for
    /// SmolLM2-135M) at once.
    pub fn pack_bf16(
        &mut self,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Option<crate::bf16_gemm::Bf16Kernel>> {
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
                *slot.of(block) = Linear::Bf16(std::sync::Arc::new(
                    crate::bf16_gemm::PackedBf16::pack(&data, out, inp),
                ));
            }
            // Hand each block's dequantized copies back before the next one is made.
            release_freed_heap();
        }
        // The embedding (also the output head when tied, as in SmolLM2) is the largest single
        // weight left in f32: lookups and the verbalizer's 20 head rows widen what they read,
        // so it can sit in bf16 too (56 MB less resident for SmolLM2-135M).
        let tied = self.weights.lm_head.id() == self.weights.embed.id();
        self.weights.embed = self.weights.embed.to_dtype(DType::BF16)?;
        self.weights.lm_head = if tied {
            self.weights.embed.clone()
        } else {
            self.weights.lm_head.to_dtype(DType::BF16)?
        };
        release_freed_heap();
        self.bf16 = Some(kernel);
        Ok(Some(kernel))
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
}
