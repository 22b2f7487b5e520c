//! The `[ranker.train]` recipe: LoRA shape, optimizer, loss, negatives, budgets, and how
//! gradients are computed.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::native;
use crate::llama::Llama;
use crate::lora::Projection;
use crate::train::NegativeKind;

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
