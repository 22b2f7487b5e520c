//! LoRA fine-tuning of the ranker (`llamarec train ranker`), as LlamaRec does it: the dense base
//! model frozen, LoRA pairs on chosen projections trained with AdamW (linear warm-up, gradient
//! accumulation, global-norm clipping) so that the ground truth's letter is the next token after
//! the prompt. The answer token is the verbalizer's token of that letter, so training and
//! scoring read the same id.
//!
//! Loss: by default the paper's causal-LM loss on the answer token, i.e. cross-entropy over the
//! full vocabulary at the last prompt position ([`LossKind::AnswerToken`]); optionally
//! cross-entropy over the candidates' letter logits only ([`LossKind::Letters`]), which is what
//! the ranking reads.
//!
//! Checkpoint selection: NDCG@10 of the LLM's order of the retriever's top-N on a fixed sample
//! of validation users (users whose ground truth is not among the N are misses whatever the LLM
//! says; they are counted without running it). Files in the output directory:
//! `adapter_config.json` + `adapter_model.safetensors` (the best adapter, PEFT layout),
//! `training_report.json`, and `checkpoint/` (the latest adapter, optimizer moments and trainer
//! state, for resuming).

pub mod examples;
pub mod frozen;
pub mod gradients;
pub mod native;
pub mod optim;
pub mod rng;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use llamarec_common::fusion::fused_rank;
use llamarec_common::ranking_metrics::{MetricReport, TwoStageAccumulator};
use serde::{Deserialize, Serialize};

use crate::llama::{Kernels, Llama, Positions, TokenBatch};
use crate::lora::{LoraAdapter, LoraPair, Projection};
use crate::peft::{self, PeftLoraConfig};
use crate::prompt::PromptRenderer;
use crate::ranker::Ranker;
use crate::verbalizer::Verbalizer;

pub use examples::{build_example, epoch_order, Example, NegativeKind, PrefixRef};
pub use gradients::{ExampleGradients, ExampleInput};
pub use optim::{AdamW, AdamWConfig, NamedVar};
pub use rng::Rng;

/// Which cross-entropy trains the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Causal-LM loss on the answer token: softmax over the whole vocabulary (the paper).
    AnswerToken,
    /// Softmax over the candidates' letter tokens only.
    Letters,
}

/// Which implementation computes a training example's gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backprop {
    /// The native step on the CPU (its frozen products in bf16 where the CPU has AMX, else
    /// f32: [`native::FrozenPrecision::auto`]), [`Backprop::Autograd`] on other devices.
    Auto,
    /// The hand-derived CPU step ([`native::NativeStep`]), all in f32: several times faster
    /// than autograd, and the reference the bf16 variant is checked against.
    Native,
    /// The native step with the frozen projections' products in bf16 with f32 sums (AMX, or
    /// AVX-512 BF16); LoRA pairs, gradients and optimizer stay f32. Fails where the CPU has
    /// neither.
    NativeBf16,
    /// candle's autograd over the differentiable forward pass (any device and dtype).
    Autograd,
}

impl Backprop {
    /// Whether training `model` runs the native step.
    pub fn native_for(self, model: &Llama) -> bool {
        match self {
            Self::Auto => model.device().is_cpu(),
            Self::Native | Self::NativeBf16 => true,
            Self::Autograd => false,
        }
    }

    /// The frozen products' arithmetic of the native step, or an error naming what is missing.
    pub fn frozen_precision(self) -> Result<native::FrozenPrecision> {
        Ok(match self {
            Self::Auto => native::FrozenPrecision::auto(),
            Self::Native | Self::Autograd => native::FrozenPrecision::F32,
            Self::NativeBf16 => match crate::bf16_gemm::Bf16Kernel::detect() {
                Some(kernel) => native::FrozenPrecision::Bf16(kernel),
                None => bail!("backprop = \"native_bf16\" needs a CPU with AVX-512 BF16 or AMX, which this is not; use \"auto\" or \"native\""),
            },
        })
    }
}

/// The `[ranker.train]` section: the recipe of `llamarec train ranker`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RankerTrainConfig {
    /// LoRA rank.
    pub r: usize,
    /// LoRA alpha (the update is scaled by `alpha / r`).
    pub alpha: f64,
    /// Dropout on the LoRA branch's input during training.
    pub dropout: f64,
    /// Projections that get a LoRA pair ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
    /// "up_proj", "down_proj").
    pub targets: Vec<Projection>,
    /// Peak learning rate. The paper uses 1e-4 for one epoch of ~100K examples on a 7B model;
    /// the CPU budget here is a few hundred examples (~50 optimizer steps), hence 5e-4.
    pub lr: f64,
    /// Optimizer steps of linear warm-up from 0 to `lr`; constant afterwards.
    pub warmup_steps: u64,
    /// Examples whose gradients are summed into one optimizer step.
    pub grad_accum: usize,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW first-moment decay.
    pub beta1: f64,
    /// AdamW second-moment decay.
    pub beta2: f64,
    /// AdamW epsilon.
    pub eps: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub max_grad_norm: f64,
    /// Loss on the answer.
    pub loss: LossKind,
    /// Candidates per training example (ground truth included); at most the template's letters.
    pub num_candidates: usize,
    /// Where negatives come from.
    pub negatives: NegativeKind,
    /// With `negatives = "mixed"`, the share of negatives taken from the retriever.
    pub retriever_share: f64,
    /// Shortest prefix used as a training example.
    pub min_history: usize,
    /// Stop after this many training examples (0 = one epoch over all prefixes).
    pub max_examples: usize,
    /// Stop after this many minutes of wall time (training plus evaluations; 0 = no limit).
    pub max_minutes: f64,
    /// Validate every this many optimizer steps (and at the start and the end).
    pub eval_every_steps: u64,
    /// Write the resumable checkpoint every this many optimizer steps.
    pub checkpoint_every_steps: u64,
    /// Validation users (a fixed sample); 0 = all.
    pub val_users: usize,
    /// Candidates per validation user (the retriever's top N).
    pub val_candidates: usize,
    /// Seed of example order, negatives, shuffling, LoRA init, dropout and the validation sample.
    pub seed: u64,
    /// How gradients are computed (an execution choice, not part of the recipe: a run may
    /// resume with another).
    pub backprop: Backprop,
    /// A diagnostic, 0 = off: train on the first N examples of the epoch over and over, each
    /// with the same candidates every time, so the loss must fall towards 0 if gradients reach
    /// the adapter (the "overfit one batch" check before blaming the recipe for a flat loss).
    pub overfit_examples: usize,
}

impl Default for RankerTrainConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 32.0,
            dropout: 0.05,
            targets: vec![Projection::QProj, Projection::VProj],
            lr: 5e-4,
            warmup_steps: 5,
            grad_accum: 8,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            loss: LossKind::AnswerToken,
            num_candidates: 20,
            negatives: NegativeKind::Retriever,
            retriever_share: 0.5,
            min_history: 1,
            max_examples: 0,
            max_minutes: 80.0,
            eval_every_steps: 10,
            checkpoint_every_steps: 5,
            val_users: 200,
            val_candidates: 20,
            seed: 42,
            backprop: Backprop::Auto,
            overfit_examples: 0,
        }
    }
}

impl RankerTrainConfig {
    /// Checks ranges; returns the offending key and the reason.
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        let err = |k: &str, r: &str| Err((k.to_string(), r.to_string()));
        if self.r == 0 {
            return err("r", "must be at least 1");
        }
        if self.targets.is_empty() {
            return err("targets", "must name at least one projection");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return err("dropout", "must be within 0.0 ..< 1.0");
        }
        if self.grad_accum == 0 || self.eval_every_steps == 0 || self.checkpoint_every_steps == 0 {
            return err(
                "grad_accum",
                "grad_accum, eval_every_steps and checkpoint_every_steps must be at least 1",
            );
        }
        if !(2..=20).contains(&self.num_candidates) || !(1..=20).contains(&self.val_candidates) {
            return err(
                "num_candidates",
                "num_candidates must be 2..=20 and val_candidates 1..=20",
            );
        }
        if !(0.0..=1.0).contains(&self.retriever_share) {
            return err("retriever_share", "must be within 0.0 ..= 1.0");
        }
        if self.lr.is_nan() || self.lr <= 0.0 {
            return err("lr", "must be > 0");
        }
        Ok(())
    }
}

/// A validation user: the history, the retriever's top N (best first) and the held-out item.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationCase {
    /// Dense item ids, oldest first.
    pub history: Vec<u32>,
    /// The retriever's candidates, best first.
    pub candidates: Vec<u32>,
    /// The retriever's raw score of each candidate (what the gateway fuses with the LLM's).
    pub retriever_scores: Vec<f32>,
    /// The held-out item.
    pub target: u32,
}

/// What training reads.
pub struct TrainInputs<'a> {
    /// Item titles by dense id (index 0 is padding).
    pub titles: &'a [String],
    /// Each user's training sequence (dense ids, oldest first).
    pub sequences: Vec<&'a [u32]>,
    /// Validation users, with the retriever's candidates.
    pub validation: &'a [ValidationCase],
    /// The retriever's top `n` items for a prefix, history excluded (hard negatives).
    pub hard_negatives: &'a HardNegatives<'a>,
    /// Free-form description of the base model and data set, copied into the report.
    pub description: String,
}

/// The retriever's top `n` items for a prefix (dense ids), history excluded.
pub type HardNegatives<'a> = dyn Fn(&[u32], usize) -> Result<Vec<u32>> + 'a;

/// Validation metrics of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Optimizer steps done when it ran.
    pub step: u64,
    /// Training examples seen.
    pub examples: u64,
    /// Mean training loss since the previous evaluation (none at step 0).
    pub train_loss: Option<f64>,
    /// The LLM's order of the candidates, all sampled users.
    pub all_users: MetricReport,
    /// The same over users whose ground truth is among the candidates.
    pub valid_subset: MetricReport,
    /// LLM calls made (= valid-subset users).
    pub llm_calls: usize,
    /// The gateway's fused order (`llamarec_common::fusion`) at each of [`FUSION_WEIGHTS`], all
    /// sampled users: what serving would gain from this adapter. Empty in evaluations written
    /// before it was recorded.
    #[serde(default)]
    pub fused: Vec<FusedValidation>,
    /// Seconds the evaluation took.
    pub seconds: f64,
}

/// Fusion weights at which every validation also scores the gateway's fused order (0 = the
/// retriever's own order, the baseline every adapter has to beat).
pub const FUSION_WEIGHTS: [f32; 5] = [0.0, 0.25, 0.5, 0.75, 0.9];

/// The fused order's metrics at one weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FusedValidation {
    /// `[gateway] ranker_weight`.
    pub weight: f32,
    /// All sampled users.
    pub all_users: MetricReport,
}

/// What one validation pass measured.
pub struct ValidationOutcome {
    /// The LLM's order alone (ties count against the target).
    pub llm: TwoStageAccumulator,
    /// The fused order at each of [`FUSION_WEIGHTS`].
    pub fused: Vec<TwoStageAccumulator>,
    /// LLM calls made.
    pub llm_calls: usize,
}

/// Written next to the adapter as `training_report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingReport {
    /// The recipe.
    pub config: RankerTrainConfig,
    /// Base model and data set.
    pub description: String,
    /// Wall time of the whole run (across resumes), seconds.
    pub wall_seconds: f64,
    /// Seconds spent in training steps only (forward + backward + update).
    pub train_seconds: f64,
    /// Training examples seen.
    pub examples: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Mean seconds per training example (forward + backward), from `train_seconds`.
    pub seconds_per_example: f64,
    /// Mean prompt length of the training examples, tokens.
    pub mean_prompt_tokens: f64,
    /// Retriever order on the same validation sample (the baseline to beat).
    pub retriever_validation: MetricReport,
    /// Every validation, step 0 (untuned) first.
    pub evaluations: Vec<Evaluation>,
    /// The step whose adapter is saved (best validation NDCG@10, all sampled users).
    pub best_step: u64,
    /// Its NDCG@10.
    pub best_ndcg10: f64,
    /// Mean training loss of every optimizer step.
    pub step_losses: Vec<f64>,
    /// Why training stopped.
    pub stopped: String,
}

/// Resumable state, `checkpoint/trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    config: RankerTrainConfig,
    steps: u64,
    examples: u64,
    rng: Rng,
    wall_seconds: f64,
    train_seconds: f64,
    prompt_tokens: u64,
    evaluations: Vec<Evaluation>,
    best_step: u64,
    best_ndcg10: f64,
    step_losses: Vec<f64>,
    losses_since_eval: Vec<f64>,
}

/// Progress reported to the caller (the CLI draws a progress bar).
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// Training starts (or resumes) with this many examples done of `total`; `gradients` names
    /// what computes them ("native bf16-amx", "native f32", "autograd").
    Start {
        done: u64,
        total: u64,
        resumed: bool,
        gradients: String,
    },
    /// One example done.
    Example {
        done: u64,
        total: u64,
        step: u64,
        recent_loss: f64,
        examples_per_s: f64,
    },
    /// A validation finished; `best` says whether its adapter was saved as the best; `all` is
    /// every validation of the run so far, this one last (the learning curve).
    Evaluation {
        eval: &'a Evaluation,
        best: bool,
        all: &'a [Evaluation],
    },
    /// A resumable checkpoint was written.
    Checkpoint { step: u64 },
}

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

/// Titles of the last `max_history` items of `history` and of `candidates`.
fn titles_of<'a>(
    titles: &'a [String],
    history: &[u32],
    candidates: &[u32],
    max_history: usize,
) -> (Vec<&'a str>, Vec<&'a str>) {
    let h = history[history.len().saturating_sub(max_history)..]
        .iter()
        .map(|&i| titles[i as usize].as_str())
        .collect();
    let c = candidates
        .iter()
        .map(|&i| titles[i as usize].as_str())
        .collect();
    (h, c)
}

/// Validation: the LLM (base + `adapter` merged) orders each case's candidates, alone and fused
/// with the retriever's scores as the gateway would; cases whose target is not a candidate are
/// misses without running it.
pub fn evaluate(
    base: &Llama,
    renderer: &PromptRenderer,
    adapter: Option<&LoraAdapter>,
    titles: &[String],
    cases: &[ValidationCase],
) -> Result<ValidationOutcome> {
    let mut model = base.clone();
    model.set_kernels(if model.device().is_cpu() {
        Kernels::Fused
    } else {
        Kernels::Generic
    });
    if let Some(a) = adapter {
        model.merge_lora(a)?;
    }
    let ranker = Ranker::new(model, renderer.clone())?;
    let max_history = renderer.template().max_history;
    let mut out = ValidationOutcome {
        llm: TwoStageAccumulator::default(),
        fused: vec![TwoStageAccumulator::default(); FUSION_WEIGHTS.len()],
        llm_calls: 0,
    };
    for case in cases {
        let Some(t) = case.candidates.iter().position(|&c| c == case.target) else {
            out.llm.add(None);
            out.fused.iter_mut().for_each(|a| a.add(None));
            continue;
        };
        let (h, c) = titles_of(titles, &case.history, &case.candidates, max_history);
        let scores = ranker.score(&h, &c)?;
        out.llm_calls += 1;
        let target_score = scores.logits[t];
        // Ties count against the target, as everywhere in the metrics.
        let rank = 1 + scores
            .logits
            .iter()
            .enumerate()
            .filter(|&(i, &s)| i != t && (s >= target_score || s.is_nan()))
            .count();
        out.llm.add(Some(rank));
        if case.retriever_scores.len() != case.candidates.len() {
            bail!(
                "validation case has {} retriever scores for {} candidates",
                case.retriever_scores.len(),
                case.candidates.len()
            );
        }
        for (acc, &w) in out.fused.iter_mut().zip(&FUSION_WEIGHTS) {
            acc.add(Some(fused_rank(&case.retriever_scores, &scores.logits, w, t)));
        }
    }
    Ok(out)
}

/// The retriever's own order on the validation cases.
pub fn retriever_order(cases: &[ValidationCase]) -> MetricReport {
    let mut acc = TwoStageAccumulator::default();
    for c in cases {
        acc.add(
            c.candidates
                .iter()
                .position(|&x| x == c.target)
                .map(|p| p + 1),
        );
    }
    acc.report().all_users
}

const CHECKPOINT_DIR: &str = "checkpoint";
const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The report's file name, next to the adapter.
pub const REPORT_FILE: &str = "training_report.json";

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Keeps freed activation buffers in the heap instead of returning them to the kernel: a
/// training step allocates gigabytes of short-lived tensors, and fresh pages cost a page fault
/// and a clear each (a fifth of a step's time otherwise), as in the retriever's training.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator thresholds; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Trains an adapter for `base` (dense weights) into `out`; with `resume`, continues from
/// `out/checkpoint` when it holds a run with the same recipe.
pub fn train(
    base: &Llama,
    renderer: &PromptRenderer,
    inputs: &TrainInputs,
    config: &RankerTrainConfig,
    out: &Path,
    resume: bool,
    on_event: &mut dyn FnMut(Event),
) -> Result<TrainingReport> {
    config
        .validate()
        .map_err(|(k, r)| anyhow::anyhow!("ranker.train.{k}: {r}"))?;
    let letters = renderer.template().letters.len();
    if config.num_candidates > letters || config.val_candidates > letters {
        bail!(
            "ranker.train: {} candidates but the template has {letters} letters",
            config.num_candidates.max(config.val_candidates)
        );
    }
    let started = Instant::now();
    tune_allocator();
    let verbalizer = Verbalizer::new(renderer)?;
    // Used for shapes, device and dtype only: the engine below runs the forward passes.
    let model = base.clone();
    let mut lora = TrainableLora::init(&model, config, config.seed)?;
    let adamw = AdamWConfig {
        weight_decay: config.weight_decay,
        beta1: config.beta1,
        beta2: config.beta2,
        eps: config.eps,
    };
    let num_items = inputs.titles.len() - 1;
    let order = epoch_order(&inputs.sequences, config.min_history, config.seed);
    if order.is_empty() {
        bail!("no training prefixes of length >= {}", config.min_history);
    }
    let overfit = config.overfit_examples.min(order.len());
    let total = if config.max_examples == 0 {
        if overfit > 0 {
            bail!("ranker.train.overfit_examples needs max_examples (how many repeats to run)");
        }
        order.len()
    } else if overfit > 0 {
        config.max_examples
    } else {
        config.max_examples.min(order.len())
    } as u64;
    let ckpt = out.join(CHECKPOINT_DIR);
    std::fs::create_dir_all(&ckpt).with_context(|| format!("creating {}", ckpt.display()))?;

    let state_path = ckpt.join(STATE_FILE);
    let previous: Option<TrainerState> = if resume && state_path.exists() {
        let s: TrainerState = serde_json::from_str(&std::fs::read_to_string(&state_path)?)
            .with_context(|| format!("reading {}", state_path.display()))?;
        let same = TrainerState {
            config: config.clone(),
            ..s.clone()
        };
        // Budget keys may change between runs; everything else must match.
        let comparable = |c: &RankerTrainConfig| RankerTrainConfig {
            max_examples: 0,
            max_minutes: 0.0,
            eval_every_steps: 1,
            checkpoint_every_steps: 1,
            backprop: Backprop::Auto,
            ..c.clone()
        };
        if comparable(&s.config) != comparable(&same.config) {
            bail!(
                "{} was written with a different recipe; pass --fresh to start over",
                state_path.display()
            );
        }
        Some(s)
    } else {
        None
    };
    let (mut opt, mut st) = match previous {
        Some(s) => {
            lora.load_values(&model, &ckpt)?;
            let opt = AdamW::load(&lora.params, adamw, &ckpt.join(OPTIMIZER_FILE), s.steps)?;
            (
                opt,
                TrainerState {
                    config: config.clone(),
                    ..s
                },
            )
        }
        None => (
            AdamW::new(&lora.params, adamw)?,
            TrainerState {
                config: config.clone(),
                steps: 0,
                examples: 0,
                rng: Rng::derived(config.seed, 3),
                wall_seconds: 0.0,
                train_seconds: 0.0,
                prompt_tokens: 0,
                evaluations: Vec::new(),
                best_step: 0,
                best_ndcg10: f64::NEG_INFINITY,
                step_losses: Vec::new(),
                losses_since_eval: Vec::new(),
            },
        ),
    };
    let resumed = st.examples > 0 || !st.evaluations.is_empty();
    let wall_before = st.wall_seconds;
    let retriever_validation = retriever_order(inputs.validation);
    let mut engine = ExampleGradients::new(base, &lora, config.backprop)?;
    on_event(Event::Start {
        done: st.examples,
        total,
        resumed,
        gradients: engine.describe(),
    });

    let max_history = renderer.template().max_history;
    let run_eval = |st: &mut TrainerState,
                    lora: &TrainableLora,
                    on_event: &mut dyn FnMut(Event)|
     -> Result<()> {
        let t = Instant::now();
        let snapshot = lora.snapshot(&model)?;
        let outcome = evaluate(
            base,
            renderer,
            Some(&snapshot),
            inputs.titles,
            inputs.validation,
        )?;
        let r = outcome.llm.report();
        let train_loss = (!st.losses_since_eval.is_empty())
            .then(|| st.losses_since_eval.iter().sum::<f64>() / st.losses_since_eval.len() as f64);
        st.losses_since_eval.clear();
        let eval = Evaluation {
            step: st.steps,
            examples: st.examples,
            train_loss,
            all_users: r.all_users,
            valid_subset: r.valid_subset,
            llm_calls: outcome.llm_calls,
            fused: FUSION_WEIGHTS
                .iter()
                .zip(&outcome.fused)
                .map(|(&weight, acc)| FusedValidation {
                    weight,
                    all_users: acc.report().all_users,
                })
                .collect(),
            seconds: t.elapsed().as_secs_f64(),
        };
        let ndcg = eval.all_users.get(10).ndcg;
        let best = ndcg > st.best_ndcg10;
        if best {
            st.best_ndcg10 = ndcg;
            st.best_step = st.steps;
            lora.save(&model, out)?;
        }
        st.evaluations.push(eval);
        on_event(Event::Evaluation {
            eval: st.evaluations.last().expect("just pushed"),
            best,
            all: &st.evaluations,
        });
        Ok(())
    };
    let save_checkpoint =
        |st: &mut TrainerState, lora: &TrainableLora, opt: &AdamW| -> Result<()> {
            st.wall_seconds = wall_before + started.elapsed().as_secs_f64();
            lora.save(&model, &ckpt)?;
            opt.save(&lora.params, &ckpt.join(OPTIMIZER_FILE))?;
            write_json(&state_path, st)
        };

    if st.evaluations.is_empty() {
        run_eval(&mut st, &lora, on_event)?;
        save_checkpoint(&mut st, &lora, &opt)?;
    }
    let mut acc_grads: Vec<Option<Tensor>> = vec![None; lora.params.len()];
    let mut micro = 0usize;
    let mut micro_losses = Vec::new();
    let mut recent: std::collections::VecDeque<f64> = Default::default();
    let run_start = Instant::now();
    let examples_at_start = st.examples;
    let mut stopped = "epoch or max_examples reached".to_string();
    let budget_s = config.max_minutes * 60.0;
    // Examples run in whole optimizer steps, so a resumed run starts on a step boundary.
    while st.examples < total {
        if micro == 0 && budget_s > 0.0 && wall_before + started.elapsed().as_secs_f64() >= budget_s
        {
            stopped = format!("max_minutes ({}) reached", config.max_minutes);
            break;
        }
        let t = Instant::now();
        let index = if overfit > 0 { st.examples as usize % overfit } else { st.examples as usize };
        let prefix = order[index];
        let seq = inputs.sequences[prefix.user as usize];
        // Overfitting repeats each example with the same candidates and letters.
        let mut repeat_rng = Rng::derived(config.seed, 10_000 + index as u64);
        let example_rng = if overfit > 0 { &mut repeat_rng } else { &mut st.rng };
        let hard = match config.negatives {
            NegativeKind::Random => Vec::new(),
            _ => (inputs.hard_negatives)(&seq[..prefix.position as usize], config.num_candidates)?,
        };
        let ex = build_example(
            seq,
            prefix,
            num_items,
            config.num_candidates,
            config.negatives,
            config.retriever_share,
            &hard,
            example_rng,
        );
        let (h, c) = titles_of(inputs.titles, &ex.history, &ex.candidates, max_history);
        let prompt = renderer.tokenize(&renderer.render(&h, &c)?)?;
        let dropout_seed = Rng::derived(config.seed, 1000 + st.examples).next_u64();
        let value = engine.add(
            &mut lora,
            &verbalizer,
            ExampleInput {
                ids: &prompt.ids,
                label: ex.label,
                num_candidates: ex.candidates.len(),
            },
            config.loss,
            (config.dropout as f32, dropout_seed),
            1.0 / config.grad_accum as f64,
            &mut acc_grads,
        )?;
        micro += 1;
        micro_losses.push(value);
        st.examples += 1;
        st.prompt_tokens += prompt.ids.len() as u64;
        recent.push_back(value);
        if recent.len() > 50 {
            recent.pop_front();
        }
        let last_example = st.examples >= total;
        if micro == config.grad_accum || last_example {
            let grads: Vec<Tensor> = acc_grads
                .iter_mut()
                .zip(&lora.params)
                .map(|(g, p)| g.take().map_or_else(|| p.var.as_tensor().zeros_like(), Ok))
                .collect::<candle_core::Result<_>>()?;
            let step = st.steps + 1;
            let lr = config.lr
                * if config.warmup_steps > 0 {
                    (step as f64 / config.warmup_steps as f64).min(1.0)
                } else {
                    1.0
                };
            let max_norm = (config.max_grad_norm > 0.0).then_some(config.max_grad_norm);
            opt.step(&lora.params, &grads, lr, max_norm)?;
            st.steps = step;
            let mean = micro_losses.iter().sum::<f64>() / micro_losses.len() as f64;
            st.step_losses.push(mean);
            st.losses_since_eval.append(&mut micro_losses);
            micro = 0;
        }
        st.train_seconds += t.elapsed().as_secs_f64();
        let rate =
            (st.examples - examples_at_start) as f64 / run_start.elapsed().as_secs_f64().max(1e-9);
        on_event(Event::Example {
            done: st.examples,
            total,
            step: st.steps,
            recent_loss: recent.iter().sum::<f64>() / recent.len() as f64,
            examples_per_s: rate,
        });
        if micro == 0 {
            if st.steps % config.eval_every_steps == 0 && !last_example {
                run_eval(&mut st, &lora, on_event)?;
            }
            if st.steps % config.checkpoint_every_steps == 0 || last_example {
                save_checkpoint(&mut st, &lora, &opt)?;
                on_event(Event::Checkpoint { step: st.steps });
            }
        }
    }
    if st.evaluations.last().is_none_or(|e| e.step != st.steps) {
        run_eval(&mut st, &lora, on_event)?;
    }
    save_checkpoint(&mut st, &lora, &opt)?;
    let report = TrainingReport {
        config: config.clone(),
        description: inputs.description.clone(),
        wall_seconds: wall_before + started.elapsed().as_secs_f64(),
        train_seconds: st.train_seconds,
        examples: st.examples,
        steps: st.steps,
        seconds_per_example: st.train_seconds / st.examples.max(1) as f64,
        mean_prompt_tokens: st.prompt_tokens as f64 / st.examples.max(1) as f64,
        retriever_validation,
        evaluations: st.evaluations.clone(),
        best_step: st.best_step,
        best_ndcg10: st.best_ndcg10,
        step_losses: st.step_losses.clone(),
        stopped,
    };
    write_json(&out.join(REPORT_FILE), &report)?;
    Ok(report)
}

/// The checkpoint directory of a training output directory.
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join(CHECKPOINT_DIR)
}
