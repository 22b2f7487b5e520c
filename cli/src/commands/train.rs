//! `llamarec train ...`: produce a model checkpoint from the configured data set.

use anyhow::{Context, Result};
use llamarec_common::config::{AssetsConfig, ConfigLayers};
use llamarec_common::data::{DataConfig, Dataset};
use llamarec_common::ranking_metrics::format_table;
use retriever_service::service_config::RetrieverServiceConfig;
use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum TrainCommand {
    /// The retriever (LRURec or SASRec, `[retriever.train.model] kind`) with the
    /// `[retriever.train]` recipe into the `[retriever] checkpoint` directory (resumes from the
    /// directory's last epoch unless --fresh).
    Retriever(RetrieverTrainArgs),
    /// LoRA fine-tuning of the `[ranker]` model with the `[ranker.train]` recipe (resumes from
    /// OUT/checkpoint unless --fresh).
    // Boxed: its many options would make every `TrainCommand` that large.
    Ranker(Box<super::train_ranker::RankerTrainArgs>),
}

#[derive(Debug, clap::Args)]
pub struct RetrieverTrainArgs {
    /// Checkpoint directory to write (default: `retriever.checkpoint`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Start from a fresh initialisation even if the directory holds a resumable run.
    #[arg(long)]
    fresh: bool,
    /// Also print the test split's metrics (always saved in OUT/report.json). Off by default:
    /// candidates are chosen on validation, and test is read once per shipped candidate.
    #[arg(long)]
    show_test: bool,
}

pub fn run(layers: &ConfigLayers, cmd: TrainCommand) -> Result<()> {
    match cmd {
        TrainCommand::Retriever(args) => retriever(layers, args),
        TrainCommand::Ranker(args) => super::train_ranker::run(layers, *args),
    }
}

fn retriever(layers: &ConfigLayers, args: RetrieverTrainArgs) -> Result<()> {
    let config = layers.section::<RetrieverServiceConfig>()?;
    let assets = layers.section::<AssetsConfig>()?;
    let data = layers.section::<DataConfig>()?;
    let dataset = Dataset::load(&data, &assets.dir).with_context(|| format!("loading data set {} (run `llamarec fetch` first?)", data.name))?;
    let out = args.out.unwrap_or(config.checkpoint);
    let mut recipe = config.train;
    recipe.resume = recipe.resume && !args.fresh;
    let kind = match recipe.model.kind {
        retriever_service::ModelKind::LruRec => "LRURec",
        retriever_service::ModelKind::SasRec => "SASRec",
    };
    eprintln!("training {kind} on {} ({} users, {} items) into {}", dataset.name, dataset.users.len(), dataset.num_items(), out.display());
    let report = retriever_service::train(&dataset, &recipe, &out).with_context(|| format!("training into {}", out.display()))?;
    println!(
        "best epoch {} of {}: {:.0} s to best, {:.0} s in all",
        report.best_epoch, report.epochs, report.time_to_best_s, report.wall_time_s
    );
    print!("{}", format_table("validation", &report.validation));
    if args.show_test {
        print!("{}", format_table("test", &report.test));
    } else {
        println!("test metrics: in {}/report.json (--show-test prints them; choose on validation)", out.display());
    }
    eprintln!("wrote {}", out.display());
    Ok(())
}
