//! Validation during training: the LLM's order of the retriever's top N on a fixed sample of
//! users, alone and fused with the retriever's scores as the gateway does.

use anyhow::{bail, Result};
use llamarec_common::fusion::fused_rank;
use llamarec_common::ranking_metrics::{MetricReport, TwoStageAccumulator};
use serde::{Deserialize, Serialize};

use crate::llama::{Kernels, Llama};
use crate::lora::LoraAdapter;
use crate::prompt::PromptRenderer;
use crate::ranker::Ranker;

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

/// Titles of the last `max_history` items of `history` and of `candidates`.
pub fn titles_of<'a>(
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
