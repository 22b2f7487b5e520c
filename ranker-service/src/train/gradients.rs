//! One training example's loss and LoRA gradients, by the native step or candle's autograd
//! (chosen by [`Backprop`]), accumulated into one slot per trainable matrix.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::native::NativeStep;
use super::{example_loss, Backprop, LossKind, TrainableLora};
use crate::llama::{Kernels, Llama};
use crate::lora::Projection;
use crate::verbalizer::Verbalizer;

/// One training example: prompt ids and the candidate index of the answer.
#[derive(Debug, Clone, Copy)]
pub struct ExampleInput<'a> {
    /// Prompt token ids.
    pub ids: &'a [u32],
    /// Index of the ground truth among the candidates.
    pub label: usize,
    /// Candidates in the prompt (their letters are the first this many of the template's).
    pub num_candidates: usize,
}

/// Computes examples' gradients with one backprop implementation.
pub struct ExampleGradients {
    /// The model the autograd path runs (differentiable kernels); the native step copies the
    /// weights it needs.
    model: Llama,
    native: Option<NativeStep>,
    /// Indices into the adapter's params of each pair's A and B.
    pair_params: HashMap<(usize, Projection), (usize, usize)>,
}

impl ExampleGradients {
    /// Prepares `backprop` for `base` (dense weights) and the pairs of `lora`.
    pub fn new(base: &Llama, lora: &TrainableLora, backprop: Backprop) -> Result<Self> {
        if base.projection_kernels().starts_with("bf16") {
            // Packed bf16 projections have no backward: gradients would stop at them.
            anyhow::bail!("training needs the model's dense weights: load it with precision \"f32\" (the native step packs its own bf16 products)");
        }
        let mut model = base.clone();
        let native = if backprop.native_for(base) {
            Some(NativeStep::with_precision(base, backprop.frozen_precision()?)?)
        } else {
            model.set_kernels(Kernels::Differentiable);
            None
        };
        Ok(Self {
            model,
            native,
            pair_params: lora.param_indices(),
        })
    }

    /// True when the native step runs.
    pub fn is_native(&self) -> bool {
        self.native.is_some()
    }

    /// "autograd", "native f32", "native bf16-amx" or "native bf16-avx512" (logs and benches).
    pub fn describe(&self) -> String {
        match self.native.as_ref().map(|n| n.precision()) {
            None => "autograd".into(),
            Some(super::native::FrozenPrecision::F32) => "native f32".into(),
            Some(super::native::FrozenPrecision::Bf16(k)) => format!("native {}", k.name()),
        }
    }

    /// Adds the gradients of `loss * loss_scale` for `example` into `acc` (one slot per param
    /// of `lora`) and returns the loss. `dropout` is `(p, seed)` of the LoRA dropout.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        lora: &mut TrainableLora,
        verbalizer: &Verbalizer,
        example: ExampleInput,
        loss: LossKind,
        dropout: (f32, u64),
        loss_scale: f64,
        acc: &mut [Option<Tensor>],
    ) -> Result<f64> {
        let mut accumulate = |i: usize, g: Tensor| -> Result<()> {
            let slot = &mut acc[i];
            *slot = Some(match slot.take() {
                Some(prev) => (prev + g)?,
                None => g,
            });
            Ok(())
        };
        if let Some(step) = self.native.as_mut() {
            let out = step.loss_and_grads(
                &lora.to_f32()?,
                Some(dropout),
                example.ids,
                &verbalizer.token_ids()[..example.num_candidates],
                example.label,
                loss,
                loss_scale as f32,
            )?;
            for (key, g) in out.grads {
                let (ia, ib) = self.pair_params[&key];
                for (i, values) in [(ia, g.a), (ib, g.b)] {
                    let var = &lora.params[i].var;
                    let t = Tensor::from_vec(values, var.shape(), var.device())?;
                    accumulate(i, t.to_dtype(var.dtype())?)?;
                }
            }
            return Ok(out.loss);
        }
        lora.adapter.set_dropout(dropout.0, dropout.1);
        let l = example_loss(
            &self.model,
            &lora.adapter,
            verbalizer,
            example.ids,
            example.label,
            example.num_candidates,
            loss,
        )?;
        lora.adapter.set_dropout(0.0, 0);
        let value = l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let grads = (l * loss_scale)?.backward()?;
        for (i, p) in lora.params.iter().enumerate() {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                accumulate(i, g.clone())?;
            }
        }
        Ok(value)
    }
}
