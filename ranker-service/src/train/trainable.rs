//! The trainable LoRA matrices ([`Var`]s in PEFT layout) and the autograd loss of one example.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};

use super::{frozen, native, LossKind, NamedVar, RankerTrainConfig, Rng};
use crate::llama::{Llama, Positions, TokenBatch};
use crate::lora::{LoraAdapter, LoraPair, Projection};
use crate::peft::{self, PeftLoraConfig};
use crate::verbalizer::Verbalizer;

/// Where the trainable matrices live: LoRA pairs built on [`Var`]s.
pub struct TrainableLora {
    /// The variables, in a fixed order, with their PEFT names.
    pub params: Vec<NamedVar>,
    /// The adapter whose pairs share storage with `params` (gradients reach the vars).
    pub adapter: LoraAdapter,
    /// Its PEFT configuration.
    pub peft: PeftLoraConfig,
}

impl TrainableLora {
    /// PEFT's initialisation: A ~ kaiming-uniform (bound 1/sqrt(in)), B = 0, so the adapter
    /// starts as a no-op.
    pub fn init(model: &Llama, cfg: &RankerTrainConfig, seed: u64) -> Result<Self> {
        let mc = model.config();
        let mut rng = Rng::derived(seed, 2);
        let (device, dtype) = (model.device(), model.dtype());
        let mut params = Vec::new();
        let mut adapter = LoraAdapter::new();
        let scale = cfg.alpha / cfg.r as f64;
        for layer in 0..mc.num_layers {
            for &proj in &cfg.targets {
                let (din, dout) = proj.dims(mc);
                let bound = 1.0 / (din as f32).sqrt();
                let a: Vec<f32> = (0..cfg.r * din)
                    .map(|_| (rng.next_f32() * 2.0 - 1.0) * bound)
                    .collect();
                let a =
                    Var::from_tensor(&Tensor::from_vec(a, (cfg.r, din), device)?.to_dtype(dtype)?)?;
                let b = Var::zeros((dout, cfg.r), dtype, device)?;
                let base = format!(
                    "base_model.model.model.layers.{layer}.{}",
                    proj.module_path()
                );
                let pair = LoraPair {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    scale,
                };
                adapter.insert(mc, layer, proj, pair)?;
                params.push(NamedVar {
                    name: format!("{base}.lora_A.weight"),
                    var: a,
                });
                params.push(NamedVar {
                    name: format!("{base}.lora_B.weight"),
                    var: b,
                });
            }
        }
        let mut peft = PeftLoraConfig::new(cfg.r, cfg.alpha, &cfg.targets);
        peft.lora_dropout = cfg.dropout;
        Ok(Self {
            params,
            adapter,
            peft,
        })
    }

    /// A copy of the adapter cut off from the graph (evaluation, saving).
    pub fn snapshot(&self, model: &Llama) -> Result<LoraAdapter> {
        let mut out = LoraAdapter::new();
        for ((layer, proj), pair) in self.adapter.pairs() {
            let pair = LoraPair {
                a: pair.a.detach().copy()?,
                b: pair.b.detach().copy()?,
                scale: pair.scale,
            };
            out.insert(model.config(), *layer, *proj, pair)?;
        }
        Ok(out)
    }

    /// Writes the adapter in PEFT's layout.
    pub fn save(&self, model: &Llama, dir: &Path) -> Result<()> {
        peft::save_adapter(dir, &self.snapshot(model)?, &self.peft)?;
        Ok(())
    }

    /// Loads values saved by [`TrainableLora::save`] into the variables.
    pub fn load_values(&self, model: &Llama, dir: &Path) -> Result<()> {
        let (saved, config) =
            peft::load_adapter(dir, model.config(), model.device(), model.dtype())?;
        if config.r != self.peft.r || config.target_modules != self.peft.target_modules {
            bail!(
                "{}: adapter has r {} on {:?}, the recipe says r {} on {:?}",
                dir.display(),
                config.r,
                config.target_modules,
                self.peft.r,
                self.peft.target_modules
            );
        }
        for ((layer, proj), pair) in self.adapter.pairs() {
            let s = saved.get(*layer, *proj).with_context(|| {
                format!("{}: no pair for layer {layer} {proj:?}", dir.display())
            })?;
            self.var_of(&pair.a).set(&s.a)?;
            self.var_of(&pair.b).set(&s.b)?;
        }
        Ok(())
    }

    /// The adapter's current values as plain f32 matrices (the native step's input).
    pub fn to_f32(&self) -> Result<native::LoraF32> {
        let mut out = native::LoraF32::new();
        for (key, pair) in self.adapter.pairs() {
            let flat = |t: &Tensor| -> Result<Vec<f32>> {
                Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
            };
            out.insert(
                *key,
                native::PairF32 {
                    a: flat(&pair.a)?,
                    b: flat(&pair.b)?,
                    r: pair.a.dim(0)?,
                    scale: pair.scale as f32,
                },
            );
        }
        Ok(out)
    }

    /// Indices into `params` of each pair's A and B.
    pub fn param_indices(&self) -> std::collections::HashMap<(usize, Projection), (usize, usize)> {
        let index_of = |t: &Tensor| {
            self.params
                .iter()
                .position(|p| p.var.as_tensor().id() == t.id())
                .expect("pair tensors are vars")
        };
        self.adapter
            .pairs()
            .map(|(key, pair)| (*key, (index_of(&pair.a), index_of(&pair.b))))
            .collect()
    }

    fn var_of(&self, t: &Tensor) -> &Var {
        self.params
            .iter()
            .find(|p| p.var.as_tensor().id() == t.id())
            .map(|p| &p.var)
            .expect("pair tensors are vars")
    }
}

/// The loss of one prompt whose answer is candidate `label`, on a model set to
/// [`Kernels::Differentiable`], with `lora` in the forward pass.
pub fn example_loss(
    model: &Llama,
    lora: &LoraAdapter,
    verbalizer: &Verbalizer,
    ids: &[u32],
    label: usize,
    num_candidates: usize,
    loss: LossKind,
) -> Result<Tensor> {
    let batch = TokenBatch::left_padded(&[ids], model.device())?;
    let out = model.forward(&batch, None, Some(lora), Positions::Last)?;
    let hidden = out.last_hidden()?;
    let letters = &verbalizer.token_ids()[..num_candidates];
    let (logits, target) = match loss {
        LossKind::AnswerToken => (
            frozen::frozen_linear(&hidden, &model.weights().lm_head)?,
            letters[label],
        ),
        LossKind::Letters => (model.token_head(letters)?.logits(&hidden)?, label as u32),
    };
    let target = Tensor::new(&[target], model.device())?;
    Ok(candle_nn::loss::cross_entropy(&logits, &target)?)
}
