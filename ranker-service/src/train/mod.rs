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

pub mod config;
pub mod examples;
pub mod frozen;
pub mod gradients;
pub mod native;
pub mod optim;
pub mod trainable;
pub mod validation;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use llamarec_common::ranking_metrics::MetricReport;
use serde::{Deserialize, Serialize};

use crate::llama::Llama;
use crate::prompt::{PromptRenderer, RenderedPrompt, TokenizedPrompt};
use crate::verbalizer::Verbalizer;

pub use examples::{build_example, epoch_order, Example, NegativeKind, PrefixRef};
pub use gradients::{ExampleGradients, ExampleInput};
pub use optim::{AdamW, AdamWConfig, NamedVar};
pub use config::{Backprop, LossKind, RankerTrainConfig};
/// The trainer's generator, saved in `checkpoint/trainer_state.json`; shared with the rest of the
/// workspace.
pub use llamarec_common::rng::{self, Rng};
pub use trainable::{example_loss, TrainableLora};
pub use validation::{evaluate, retriever_order, Evaluation, FusedValidation, ValidationCase, ValidationOutcome, FUSION_WEIGHTS};
pub use validation::titles_of;

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

/// The random stream a fresh run draws its examples' negatives and letter order from (saved in
/// the trainer state, so a resumed run continues it).
pub fn example_rng(seed: u64) -> Rng {
    Rng::derived(seed, 3)
}

/// One training example as the trainer sees it: `prefix`'s negatives drawn from `rng` (the
/// retriever's hard ones as the recipe says), its titles rendered and tokenized. The training loop
/// and `llamarec train ranker --export-examples` both build examples here, so an export follows a
/// run exactly.
pub fn build_prompt_example(
    inputs: &TrainInputs,
    config: &RankerTrainConfig,
    renderer: &PromptRenderer,
    prefix: PrefixRef,
    rng: &mut Rng,
) -> Result<(Example, RenderedPrompt, TokenizedPrompt)> {
    let seq = inputs.sequences[prefix.user as usize];
    let hard = match config.negatives {
        NegativeKind::Random => Vec::new(),
        _ => (inputs.hard_negatives)(&seq[..prefix.position as usize], config.num_candidates)?,
    };
    let ex = build_example(
        seq,
        prefix,
        inputs.titles.len() - 1,
        config.num_candidates,
        config.negatives,
        config.retriever_share,
        &hard,
        rng,
    );
    let max_history = renderer.template().max_history;
    let (h, c) = titles_of(inputs.titles, &ex.history, &ex.candidates, max_history);
    let rendered = renderer.render(&h, &c)?;
    let prompt = renderer.tokenize(&rendered)?;
    Ok((ex, rendered, prompt))
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
                rng: example_rng(config.seed),
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
        // Overfitting repeats each example with the same candidates and letters.
        let mut repeat_rng = Rng::derived(config.seed, 10_000 + index as u64);
        let example_rng = if overfit > 0 { &mut repeat_rng } else { &mut st.rng };
        let (ex, _, prompt) = build_prompt_example(inputs, config, renderer, order[index], example_rng)?;
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

/// The validations a run has done so far and the training examples it has seen, from its
/// checkpoint (a run in progress has no `training_report.json` yet).
pub fn checkpoint_evaluations(out: &Path) -> Result<(Vec<Evaluation>, u64)> {
    let path = checkpoint_dir(out).join(STATE_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let state: TrainerState = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok((state.evaluations, state.examples))
}
