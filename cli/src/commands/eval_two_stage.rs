//! `llamarec eval --stage two-stage` in-process: the configured retriever's top N, ranked by the
//! configured LLM (base model plus adapter), fused exactly as the gateway fuses
//! (`gateway::merge`), so the figures describe what Recommend returns.
//!
//! A user whose target is not among the N candidates is a miss at every K <= N whatever the LLM
//! says, so the LLM only runs for the others: the same metrics at a fraction of the cost.

use anyhow::{Context, Result};
use gateway::config::GatewayConfig;
use gateway::merge::{log_softmax, merge, Ranked, Retrieved};
use indicatif::{ProgressBar, ProgressStyle};
use llamarec_common::config::{AssetsConfig, ConfigLayers};
use llamarec_common::data::{Dataset, Split};
use llamarec_common::ranking_metrics::{EvalReport, TwoStageAccumulator};
use ranker_service::service_config::RankerServiceConfig;
use ranker_service::{LoadOptions, Ranker};
use std::time::Instant;

/// History items whose titles go into the prompt, as the gateway sends them.
pub(super) fn prompt_history(dataset: &Dataset, history: &[u32], keep: usize) -> Vec<String> {
    history[history.len().saturating_sub(keep)..].iter().map(|&i| dataset.items[i as usize].title.clone()).collect()
}

/// A retrieval's candidates as the gateway's merge sees them (external ids, titles, scores).
pub(super) fn retrieved(dataset: &Dataset, retrieval: &retriever_service::Retrieval) -> Vec<Retrieved> {
    retrieval
        .candidates
        .iter()
        .map(|c| Retrieved { item_id: dataset.items[c.item as usize].id.clone(), title: dataset.items[c.item as usize].title.clone(), score: c.score })
        .collect()
}

/// Evaluates retriever + ranker + fusion on `split` with `candidates` per user.
pub fn in_process(layers: &ConfigLayers, dataset: &Dataset, split: Split, sample: Option<usize>, candidates: usize) -> Result<EvalReport> {
    let start = Instant::now();
    let retriever = super::eval_retriever::load_for(layers, dataset)?;
    let assets = layers.section::<AssetsConfig>()?;
    let ranker_config = layers.section::<RankerServiceConfig>()?;
    let gateway_config = layers.section::<GatewayConfig>()?;
    let ranker = Ranker::load_with_adapter(&ranker_config.model_config(&assets), ranker_config.adapter.as_deref(), &LoadOptions::default())
        .with_context(|| format!("loading the ranker model {}", ranker_config.model_path(&assets).display()))?;

    let examples: Vec<_> = dataset.eval_examples(split).take(sample.unwrap_or(usize::MAX)).collect();
    let bar = ProgressBar::new(examples.len() as u64);
    bar.set_style(ProgressStyle::with_template("two-stage eval [{bar:30}] {pos}/{len} users · {msg} · {elapsed}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    let mut acc = TwoStageAccumulator::default();
    let mut llm_calls = 0usize;
    for ex in &examples {
        let retrieval = retriever.retrieve(ex.history, candidates, true)?;
        let retrieved = retrieved(dataset, &retrieval);
        let target = &dataset.items[ex.target as usize].id;
        let rank = if retrieved.iter().any(|r| &r.item_id == target) {
            llm_calls += 1;
            let titles: Vec<&str> = retrieved.iter().map(|r| r.title.as_str()).collect();
            let scores = ranker.score(&prompt_history(dataset, ex.history, gateway_config.prompt_history as usize), &titles)?;
            let ranked: Vec<Ranked> = log_softmax(&scores.logits).into_iter().zip(&scores.logits).map(|(log_prob, &logit)| Ranked { logit, log_prob }).collect();
            merge(&retrieved, &ranked, gateway_config.ranker_weight, candidates).iter().position(|m| &m.item_id == target).map(|p| p + 1)
        } else {
            None
        };
        acc.add(rank);
        bar.set_message(format!("{llm_calls} LLM calls"));
        bar.inc(1);
        super::progress::log_progress(&bar, "two-stage eval");
    }
    bar.finish();
    let r = acc.report();
    Ok(EvalReport {
        stage: "two-stage".into(),
        split,
        dataset: dataset.name.clone(),
        via: "in-process".into(),
        candidates: Some(candidates),
        all_users: r.all_users,
        valid_subset: Some(r.valid_subset),
        wall_seconds: start.elapsed().as_secs_f64(),
    })
}
