//! `llamarec train ranker`: LoRA fine-tuning of the configured LLM on the configured data set
//! with the `[ranker.train]` recipe (see `ranker_service::train`). Hard negatives and the
//! validation candidates come from the configured retriever checkpoint.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use llamarec_common::config::{AssetsConfig, ConfigLayers};
use llamarec_common::data::{DataConfig, Dataset, Split};
use llamarec_common::ranking_metrics::format_table;
use ranker_service::service_config::RankerServiceConfig;
use ranker_service::train::{self, Event, LossKind, NegativeKind, RankerTrainConfig, Rng, TrainInputs, ValidationCase};
use ranker_service::{LoadOptions, Projection, Ranker, WeightPrecision};
use retriever_service::Retriever;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct RankerTrainArgs {
    /// Output directory: best adapter (PEFT layout), training_report.json, checkpoint/.
    #[arg(long, default_value = "runs/ranker/adapter")]
    pub out: PathBuf,
    /// Start over even if the directory holds a resumable run.
    #[arg(long)]
    pub fresh: bool,
    /// Override `ranker.train.max_examples` (0 = one epoch).
    #[arg(long)]
    pub max_examples: Option<usize>,
    /// Override `ranker.train.max_minutes`.
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// Override `ranker.train.val_users`.
    #[arg(long)]
    pub val_users: Option<usize>,
    /// Override `ranker.train.eval_every_steps`.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Override `ranker.train.grad_accum`.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Override `ranker.train.lr`.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Override `ranker.train.warmup_steps`.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Override `ranker.train.negatives`: random, retriever or mixed.
    #[arg(long, value_parser = parse_negatives)]
    pub negatives: Option<NegativeKind>,
    /// Override `ranker.train.loss`: answer_token or letters.
    #[arg(long, value_parser = parse_loss)]
    pub loss: Option<LossKind>,
    /// A diagnostic: train on the first N examples over and over (with --max-examples repeats
    /// in all); the loss must fall towards 0 if the gradients reach the adapter.
    #[arg(long)]
    pub overfit: Option<usize>,
    /// Override `ranker.train.targets`: comma-separated projections (q_proj,k_proj,v_proj,
    /// o_proj,gate_proj,up_proj,down_proj).
    #[arg(long, value_delimiter = ',', value_parser = parse_projection)]
    pub targets: Option<Vec<Projection>>,
    /// Override `ranker.train.r` (LoRA rank).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Override `ranker.train.alpha`.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Instead of training: write this recipe's training examples (the first --max-examples, in
    /// the run's order, with its negatives) and its validation users as JSONL to FILE, for peer
    /// trainers (bench/peers/ranker_probe.py). Trains nothing and touches no run directory.
    #[arg(long, value_name = "FILE")]
    pub export_examples: Option<PathBuf>,
}

fn parse_projection(s: &str) -> Result<Projection, String> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|_| format!("{s:?} is not a projection name (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"))
}

fn parse_negatives(s: &str) -> Result<NegativeKind, String> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|_| format!("{s:?} is not random, retriever or mixed"))
}

fn parse_loss(s: &str) -> Result<LossKind, String> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|_| format!("{s:?} is not answer_token or letters"))
}

impl RankerTrainArgs {
    fn apply(&self, c: &mut RankerTrainConfig) {
        if let Some(v) = self.max_examples { c.max_examples = v }
        if let Some(v) = self.max_minutes { c.max_minutes = v }
        if let Some(v) = self.val_users { c.val_users = v }
        if let Some(v) = self.eval_every { c.eval_every_steps = v }
        if let Some(v) = self.grad_accum { c.grad_accum = v }
        if let Some(v) = self.lr { c.lr = v }
        if let Some(v) = self.warmup_steps { c.warmup_steps = v }
        if let Some(v) = self.negatives { c.negatives = v }
        if let Some(v) = self.loss { c.loss = v }
        if let Some(v) = self.overfit { c.overfit_examples = v }
        if let Some(v) = &self.targets { c.targets = v.clone() }
        if let Some(v) = self.rank { c.r = v }
        if let Some(v) = self.alpha { c.alpha = v }
    }
}

/// A fixed sample of `n` validation users (all when `n` is 0 or larger than the split) with the
/// retriever's top `k` (history excluded), in user order.
pub fn validation_cases(dataset: &Dataset, retriever: &Retriever, split: Split, n: usize, k: usize, seed: u64) -> Result<Vec<ValidationCase>> {
    let examples: Vec<_> = dataset.eval_examples(split).collect();
    let mut idx: Vec<usize> = (0..examples.len()).collect();
    if n > 0 && n < idx.len() {
        Rng::derived(seed, 4).shuffle(&mut idx);
        idx.truncate(n);
        idx.sort_unstable();
    }
    idx.into_iter()
        .map(|i| {
            let ex = examples[i];
            let r = retriever.retrieve(ex.history, k, true)?;
            Ok(ValidationCase {
                history: ex.history.to_vec(),
                candidates: r.candidates.iter().map(|c| c.item).collect(),
                retriever_scores: r.candidates.iter().map(|c| c.score).collect(),
                target: ex.target,
            })
        })
        .collect()
}

/// The configured base model with dense f32 weights (what LoRA trains on), on the `[ranker]
/// device (`cuda:0` for the GPU recipe).
pub fn load_base(layers: &ConfigLayers) -> Result<Ranker> {
    let assets = layers.section::<AssetsConfig>()?;
    let section = layers.section::<RankerServiceConfig>()?;
    let mut model = section.model_config(&assets);
    model.precision = WeightPrecision::F32;
    Ranker::load(&model, &dense_on_device(&section)?).with_context(|| format!("loading {} (run `llamarec fetch`?)", model.model.display()))
}

/// Dense f32 weights on the `[ranker]` device.
pub fn dense_on_device(section: &RankerServiceConfig) -> Result<LoadOptions> {
    Ok(LoadOptions { device: ranker_service::server::device(section.device_spec())?, ..LoadOptions::default() })
}

pub fn run(layers: &ConfigLayers, args: RankerTrainArgs) -> Result<()> {
    let section = layers.section::<RankerServiceConfig>()?;
    let mut recipe = section.train.clone();
    args.apply(&mut recipe);
    recipe.validate().map_err(|(k, r)| anyhow::anyhow!("ranker.train.{k}: {r}"))?;
    let assets = layers.section::<AssetsConfig>()?;
    let data = layers.section::<DataConfig>()?;
    let dataset = Dataset::load(&data, &assets.dir).with_context(|| format!("loading data set {}", data.name))?;
    let retriever = super::eval_retriever::load_for(layers, &dataset)?;
    let base = load_base(layers)?;
    if args.fresh && args.export_examples.is_none() && args.out.join("checkpoint").exists() {
        std::fs::remove_dir_all(args.out.join("checkpoint"))?;
    }
    let validation = validation_cases(&dataset, &retriever, Split::Validation, recipe.val_users, recipe.val_candidates, recipe.seed)?;
    let valid = validation.iter().filter(|c| c.candidates.contains(&c.target)).count();
    // The baseline every validation line compares against: the retriever's own order.
    let retriever_ndcg10 = train::retriever_order(&validation).get(10).ndcg;
    eprintln!(
        "training LoRA r {} alpha {} on {:?} of {} with {} negatives, {:?} loss; validation: {} users ({} with the target among the top {}, retriever NDCG@10 {retriever_ndcg10:.4}) -> {}",
        recipe.r, recipe.alpha, recipe.targets, section.model.display(), serde_json::to_string(&recipe.negatives)?, recipe.loss, validation.len(), valid, recipe.val_candidates, args.out.display()
    );
    let titles: Vec<String> = dataset.items.iter().map(|i| i.title.clone()).collect();
    let hard = |history: &[u32], n: usize| -> Result<Vec<u32>> { Ok(retriever.retrieve(history, n, true)?.candidates.iter().map(|c| c.item).collect()) };
    let inputs = TrainInputs {
        titles: &titles,
        sequences: (0..dataset.users.len()).map(|u| dataset.train_sequence(u)).collect(),
        validation: &validation,
        hard_negatives: &hard,
        description: format!("{} ({} template) on {} ({} users, {} items)", section.model.display(), section.template, dataset.name, dataset.users.len(), dataset.num_items()),
    };
    if let Some(path) = &args.export_examples {
        let (n, v) = super::export_examples::write(path, base.renderer(), &inputs, &recipe)?;
        eprintln!("wrote {n} training examples and {v} validation users to {}", path.display());
        return Ok(());
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("ranker LoRA [{bar:30}] {pos}/{len} examples · step {msg} · {elapsed} (eta {eta})").unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // A log file (nohup) gets plain lines instead of the bar, which indicatif hides there.
    let say = |line: String| if bar.is_hidden() { eprintln!("{line}") } else { bar.println(line) };
    let report = train::train(base.model(), base.renderer(), &inputs, &recipe, &args.out, !args.fresh, &mut |e| match e {
        Event::Start { done, total, resumed, gradients } => {
            bar.set_length(total);
            bar.set_position(done);
            if resumed {
                say(format!("resuming at example {done} of {total}; gradients: {gradients}"));
            } else {
                say(format!("gradients: {gradients}"));
            }
        }
        Event::Example { done, step, recent_loss, examples_per_s, .. } => {
            bar.set_position(done);
            bar.set_message(format!("{step} · loss {recent_loss:.3} · {examples_per_s:.3} ex/s"));
            if bar.is_hidden() && done % 5 == 0 {
                eprintln!("example {done}/{} · step {step} · loss (last 50) {recent_loss:.3} · {examples_per_s:.3} ex/s · {:.0} s", bar.length().unwrap_or(0), bar.elapsed().as_secs_f64());
            }
        }
        Event::Evaluation { eval, best, all } => {
            if let Err(e) = super::learning_curve::write(&args.out, all) {
                say(format!("could not write the learning curve: {e:#}"));
            }
            say(format!(
            "step {:>4} ({} examples): validation NDCG@10 {:.4} (valid subset {:.4}, {} LLM calls, {:.0} s){}; fused with the retriever ({retriever_ndcg10:.4} alone): {}{}",
            eval.step,
            eval.examples,
            eval.all_users.get(10).ndcg,
            eval.valid_subset.get(10).ndcg,
            eval.llm_calls,
            eval.seconds,
            eval.train_loss.map(|l| format!(", train loss {l:.4}")).unwrap_or_default(),
            eval.fused.iter().map(|f| format!("w {} {:.4}", f.weight, f.all_users.get(10).ndcg)).collect::<Vec<_>>().join(", "),
            if best { " *best, saved" } else { "" }
            ))
        }
        Event::Checkpoint { .. } => {}
    })?;
    bar.finish();
    if report.evaluations.is_empty() {
        bail!("no evaluation ran");
    }
    println!(
        "{} examples, {} steps in {:.0} s ({:.2} s per example, {:.0} prompt tokens on average); stopped: {}",
        report.examples, report.steps, report.wall_seconds, report.seconds_per_example, report.mean_prompt_tokens, report.stopped
    );
    print!("{}", format_table("validation sample, retriever order", &report.retriever_validation));
    print!("{}", format_table("validation sample, untuned LLM (step 0)", &report.evaluations[0].all_users));
    if let Some(best) = report.evaluations.iter().find(|e| e.step == report.best_step) {
        print!("{}", format_table(&format!("validation sample, best LLM (step {})", best.step), &best.all_users));
    }
    eprintln!("wrote {} (best adapter, training_report.json)", args.out.display());
    Ok(())
}
