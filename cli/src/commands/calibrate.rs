//! `llamarec calibrate`: chooses the gateway's fusion weight (`[gateway] ranker_weight`) on the
//! validation split and writes it into the configuration file, comments preserved.
//!
//! For every validation user the retriever's top N is fused with the LLM's letter scores exactly
//! as the gateway fuses them (`gateway::merge`) at each weight of a grid over [0, 1]; the weight
//! with the best NDCG@10 over all users wins (ties go to the smaller weight, i.e. towards the
//! retriever) if it beats the retriever alone (weight 0) by more than `--min-z` standard errors
//! of the per-user paired NDCG@10 difference; otherwise the weight is 0. Without that margin a
//! blend that wins on validation by a few users' worth of noise is shipped and can lose on new
//! users (seen in session 4: +.0002 on validation, −.0009 on test). A user whose ground truth is
//! not among the N is a miss at every weight, so the LLM runs once per user whose ground truth is
//! a candidate, and never for the others.

use anyhow::{bail, Context, Result};
use gateway::config::GatewayConfig;
use gateway::merge::{log_softmax, merge, Ranked, Retrieved};
use indicatif::{ProgressBar, ProgressStyle};
use llamarec_common::config::{AssetsConfig, ConfigLayers, SHIPPED_CONFIG};
use llamarec_common::data::{DataConfig, Dataset, EvalExample, Split};
use llamarec_common::ranking_metrics::{ndcg_at, TwoStageAccumulator};
use ranker_service::service_config::RankerServiceConfig;
use ranker_service::{Ranker, WeightPrecision};
use retriever_service::Retriever;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct CalibrateArgs {
    /// PEFT adapter of the ranker [default: `[ranker] adapter`; none = the base model].
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Only the first N validation users (default: all).
    #[arg(long)]
    pub sample: Option<usize>,
    /// Grid step over [0, 1].
    #[arg(long, default_value_t = 0.05)]
    pub step: f64,
    /// Configuration file to update [default: the one in use, else deploy/local/llamarec.toml].
    #[arg(long)]
    pub write: Option<PathBuf>,
    /// Print the table and the choice without writing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Standard errors of the paired per-user NDCG@10 difference by which the best blend must
    /// beat the retriever alone to be chosen over weight 0.
    #[arg(long, default_value_t = 2.0)]
    pub min_z: f64,
}

/// One evaluated user: the retriever's candidates and, when the target is among them, the
/// LLM's letter logits per model.
pub struct Case {
    /// Candidates, best first.
    pub retrieved: Vec<Retrieved>,
    /// The target's 0-based position among them, if any.
    pub target_pos: Option<usize>,
    /// Letter logits of each model, in candidate order (empty when the target is not a candidate).
    pub logits: Vec<Vec<f32>>,
}

impl Case {
    /// 1-based rank of the target after fusing model `m`'s scores at `weight` (None = miss).
    pub fn fused_rank(&self, m: usize, weight: f32) -> Option<usize> {
        let t = self.target_pos?;
        let logits = &self.logits[m];
        let ranked: Vec<Ranked> = log_softmax(logits).into_iter().zip(logits).map(|(log_prob, &logit)| Ranked { logit, log_prob }).collect();
        let target = &self.retrieved[t].item_id;
        merge(&self.retrieved, &ranked, weight, self.retrieved.len()).iter().position(|m| &m.item_id == target).map(|p| p + 1)
    }

    /// The retriever's own 1-based rank of the target (None = not among the candidates).
    pub fn retriever_rank(&self) -> Option<usize> {
        self.target_pos.map(|p| p + 1)
    }
}

/// Mean and standard error of the per-user NDCG@10 gain of fusing at `weight` over the
/// retriever alone (a paired difference: the same users, the same candidates).
fn paired_gain(cases: &[Case], weight: f32) -> (f64, f64) {
    let diffs: Vec<f64> = cases.iter().map(|c| ndcg_at(c.fused_rank(0, weight), 10) - ndcg_at(c.retriever_rank(), 10)).collect();
    let n = diffs.len().max(1) as f64;
    let mean = diffs.iter().sum::<f64>() / n;
    let var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, (var / n).sqrt())
}

/// The weight to ship: `best` when its gain over weight 0 is more than `min_z` standard errors,
/// else 0 (the retriever alone).
fn significant_weight(best: f64, gain: f64, se: f64, min_z: f64) -> f64 {
    if best > 0.0 && gain > min_z * se && gain > 0.0 {
        best
    } else {
        0.0
    }
}

/// What `calibrate` and `eval-report` start from, before any LLM is loaded.
pub struct EvalSetup {
    /// The configured data set.
    pub dataset: Dataset,
    /// The in-process retriever for it.
    pub retriever: Retriever,
    /// `[gateway]`: candidates, prompt history, fusion weight.
    pub gateway: GatewayConfig,
    /// The ranker's adapter: the one passed, else `[ranker] adapter`; None = the base model.
    pub adapter: Option<PathBuf>,
}

impl EvalSetup {
    /// Reads the sections, loads the data set and the retriever, and picks the adapter.
    pub fn load(layers: &ConfigLayers, adapter: Option<PathBuf>) -> Result<Self> {
        let assets = layers.section::<AssetsConfig>()?;
        let data = layers.section::<DataConfig>()?;
        let gateway = layers.section::<GatewayConfig>()?;
        let section = layers.section::<RankerServiceConfig>()?;
        let dataset = Dataset::load(&data, &assets.dir)?;
        let retriever = super::eval_retriever::load_for(layers, &dataset)?;
        let adapter = adapter.or(section.adapter);
        Ok(Self { dataset, retriever, gateway, adapter })
    }
}

/// The `[ranker]` model with an optional adapter merged, dense f32 on the `[ranker]` device.
pub fn load_ranker(layers: &ConfigLayers, adapter: Option<&Path>) -> Result<Ranker> {
    let assets = layers.section::<AssetsConfig>()?;
    let section = layers.section::<RankerServiceConfig>()?;
    let mut model = section.model_config(&assets);
    // An adapter merges into dense weights: quantized weights are dequantized (bf16 is packed
    // after the merge, so it stays as configured).
    if model.precision == WeightPrecision::Quantized {
        model.precision = WeightPrecision::F32;
    }
    Ranker::load_with_adapter(&model, adapter, &super::train_ranker::dense_on_device(&section)?)
        .with_context(|| format!("loading {}{}", model.model.display(), adapter.map(|a| format!(" with adapter {}", a.display())).unwrap_or_default()))
}

/// Retrieves the top `n` for every example and runs each ranker where the target is a candidate.
pub fn collect_cases(dataset: &Dataset, retriever: &Retriever, rankers: &[&Ranker], examples: &[EvalExample], n: usize, prompt_history: usize, label: &str) -> Result<Vec<Case>> {
    let bar = ProgressBar::new(examples.len() as u64);
    bar.set_style(ProgressStyle::with_template(&format!("{label} [{{bar:30}}] {{pos}}/{{len}} users · {{msg}} · {{elapsed}} (eta {{eta}})")).unwrap_or_else(|_| ProgressStyle::default_bar()));
    let mut calls = 0usize;
    let mut cases = Vec::with_capacity(examples.len());
    for ex in examples {
        let r = retriever.retrieve(ex.history, n, true)?;
        let retrieved = super::eval_two_stage::retrieved(dataset, &r);
        let target_pos = r.candidates.iter().position(|c| c.item == ex.target);
        let mut logits = Vec::new();
        if target_pos.is_some() {
            let history = super::eval_two_stage::prompt_history(dataset, ex.history, prompt_history);
            let titles: Vec<&str> = retrieved.iter().map(|r| r.title.as_str()).collect();
            for ranker in rankers {
                logits.push(ranker.score(&history, &titles)?.logits);
                calls += 1;
            }
        }
        cases.push(Case { retrieved, target_pos, logits });
        bar.set_message(format!("{calls} LLM calls"));
        bar.inc(1);
        super::progress::log_progress(&bar, label);
    }
    bar.finish();
    Ok(cases)
}

/// Replaces `[gateway] ranker_weight` in the TOML text, keeping everything else (comments too).
pub fn set_ranker_weight(text: &str, weight: f64) -> Result<String> {
    let mut doc: toml_edit::DocumentMut = text.parse().context("parsing the configuration as TOML")?;
    if doc.get("gateway").is_none() {
        doc["gateway"] = toml_edit::table();
    }
    let Some(table) = doc["gateway"].as_table_like_mut() else { bail!("`gateway` is not a table") };
    let rounded = (weight * 1000.0).round() / 1000.0;
    match table.get_mut("ranker_weight").and_then(|i| i.as_value_mut()) {
        Some(v) => {
            // Keep the key's own comments and spacing.
            let decor = v.decor().clone();
            *v = toml_edit::Value::from(rounded);
            *v.decor_mut() = decor;
        }
        None => {
            table.insert("ranker_weight", toml_edit::value(rounded));
        }
    }
    Ok(doc.to_string())
}

pub fn run(layers: &ConfigLayers, args: CalibrateArgs) -> Result<()> {
    if !(args.step > 0.0 && args.step <= 1.0) {
        bail!("--step must be within (0, 1]");
    }
    if args.min_z.is_nan() || args.min_z < 0.0 {
        bail!("--min-z must be >= 0");
    }
    let start = Instant::now();
    let EvalSetup { dataset, retriever, gateway, adapter } = EvalSetup::load(layers, args.adapter.clone())?;
    let ranker = load_ranker(layers, adapter.as_deref())?;
    let examples: Vec<_> = dataset.eval_examples(Split::Validation).take(args.sample.unwrap_or(usize::MAX)).collect();
    let n = gateway.default_candidates as usize;
    let cases = collect_cases(&dataset, &retriever, &[&ranker], &examples, n, gateway.prompt_history as usize, "calibrate")?;
    let steps = (1.0 / args.step).round() as usize;
    let mut rows = Vec::new();
    for i in 0..=steps {
        let w = (i as f64 * args.step).min(1.0);
        let mut acc = TwoStageAccumulator::default();
        for c in &cases {
            acc.add(c.fused_rank(0, w as f32));
        }
        rows.push((w, acc.report()));
    }
    let valid = cases.iter().filter(|c| c.target_pos.is_some()).count();
    println!(
        "validation: {} users, {} with the target among the top {n} (LLM calls), adapter {}",
        cases.len(),
        valid,
        adapter.as_ref().map_or("none (base model)".to_string(), |a| a.display().to_string())
    );
    println!("{:>8} {:>9} {:>9} {:>9} {:>12}", "weight", "NDCG@10", "R@10", "MRR@10", "valid N@10");
    let mut best = 0;
    for (i, (w, r)) in rows.iter().enumerate() {
        let at = r.all_users.get(10);
        println!("{:>8.2} {:>9.4} {:>9.4} {:>9.4} {:>12.4}", w, at.ndcg, at.recall, at.mrr, r.valid_subset.get(10).ndcg);
        if at.ndcg > rows[best].1.all_users.get(10).ndcg + 1e-12 {
            best = i;
        }
    }
    let (best_w, r) = &rows[best];
    let (gain, se) = paired_gain(&cases, *best_w as f32);
    println!(
        "best weight {best_w:.2}: NDCG@10 {:.4} (retriever alone, weight 0: {:.4}; LLM alone, weight 1: {:.4}); gain over the retriever {gain:+.4} ± {se:.4} (paired standard error); {:.0} s",
        r.all_users.get(10).ndcg,
        rows[0].1.all_users.get(10).ndcg,
        rows[rows.len() - 1].1.all_users.get(10).ndcg,
        start.elapsed().as_secs_f64()
    );
    let w = significant_weight(*best_w, gain, se, args.min_z);
    println!(
        "chosen weight {w:.2}: {}",
        if w > 0.0 {
            format!("the gain is more than {} standard errors", args.min_z)
        } else if *best_w > 0.0 {
            format!("the best blend's gain is within {} standard errors of the retriever alone, so the retriever's order is kept", args.min_z)
        } else {
            "no blend beats the retriever alone".to_string()
        }
    );
    if args.dry_run {
        return Ok(());
    }
    let path = args.write.clone().or_else(|| layers.file().map(Path::to_path_buf)).unwrap_or_else(|| PathBuf::from(SHIPPED_CONFIG));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    std::fs::write(&path, set_ranker_weight(&text, w)?).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote [gateway] ranker_weight = {w:.2} into {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_the_weight_and_keeps_comments() {
        let text = "# top\n[gateway]\n# 1.0 = LLM alone\nranker_weight = 1.0 # inline\nlisten = \"x\"\n\n[ranker]\n# adapter = \"a\"\n";
        let out = set_ranker_weight(text, 0.35).unwrap();
        assert_eq!(out, text.replace("ranker_weight = 1.0 # inline", "ranker_weight = 0.35 # inline"));
        let added = set_ranker_weight("[gateway]\nlisten = \"x\"\n", 0.5).unwrap();
        assert!(added.contains("ranker_weight = 0.5"), "{added}");
    }

    #[test]
    fn a_blend_must_beat_the_retriever_by_a_margin() {
        assert_eq!(significant_weight(0.05, 0.0002, 0.0010, 2.0), 0.0, "noise-sized gain keeps the retriever");
        assert_eq!(significant_weight(0.3, 0.0100, 0.0020, 2.0), 0.3);
        assert_eq!(significant_weight(0.3, 0.0100, 0.0020, 6.0), 0.0);
        assert_eq!(significant_weight(0.0, 0.0, 0.0, 0.0), 0.0);
        assert_eq!(significant_weight(0.3, -0.01, 0.001, 0.0), 0.0, "a loss is never chosen");
    }

    #[test]
    fn paired_gain_of_a_blend_that_lifts_one_user() {
        let retrieved: Vec<Retrieved> = (0..4).map(|i| Retrieved { item_id: format!("i{i}"), title: format!("t{i}"), score: 4.0 - i as f32 }).collect();
        // User 1: the LLM lifts the target from third to first; users 2 and 3 are unchanged.
        let lifted = Case { retrieved: retrieved.clone(), target_pos: Some(2), logits: vec![vec![0.0, 0.0, 9.0, 0.0]] };
        let same = Case { retrieved, target_pos: Some(0), logits: vec![vec![9.0, 0.0, 0.0, 0.0]] };
        let miss = Case { retrieved: Vec::new(), target_pos: None, logits: Vec::new() };
        let cases = [lifted, same, miss];
        let (gain, se) = paired_gain(&cases, 1.0);
        let lift = 1.0 - 1.0 / 4f64.log2(); // rank 3 -> rank 1
        assert!((gain - lift / 3.0).abs() < 1e-12, "{gain}");
        // Differences (lift, 0, 0): sample sd = lift / sqrt(3), se = sd / sqrt(3).
        assert!((se - lift / 3.0).abs() < 1e-12, "{se}");
        assert_eq!(paired_gain(&cases, 0.0), (0.0, 0.0));
    }

    #[test]
    fn fused_rank_moves_between_retriever_and_llm_order() {
        let retrieved: Vec<Retrieved> = (0..4).map(|i| Retrieved { item_id: format!("i{i}"), title: format!("t{i}"), score: 4.0 - i as f32 }).collect();
        // The target is the retriever's third; the LLM puts it first.
        let case = Case { retrieved, target_pos: Some(2), logits: vec![vec![0.0, 0.0, 5.0, 0.0]] };
        assert_eq!(case.fused_rank(0, 0.0), Some(3));
        assert_eq!(case.fused_rank(0, 1.0), Some(1));
        assert_eq!(case.retriever_rank(), Some(3));
        let miss = Case { retrieved: Vec::new(), target_pos: None, logits: Vec::new() };
        assert_eq!(miss.fused_rank(0, 0.5), None);
    }
}
