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
    /// Train one member per seed (comma-separated) with the same recipe into OUT/seed-<seed>
    /// and serve them as an equal-weight ensemble (OUT/ensemble.json): the members' scores are
    /// averaged. Members run side by side as child processes, each with a log in its directory.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    seeds: Vec<u64>,
    /// Ensemble members with another recipe: FILE's `[retriever.train]` keys on top of the
    /// configured recipe, one member per seed, into OUT/<file stem>-seed-<seed> (repeatable; with
    /// or without --seeds). E.g. `--seeds 1 --recipe-seeds
    /// retriever-service/recipes/sasrec-d03-h2.toml=1,2,3`: one LRURec and three SASRec members.
    #[arg(long, value_name = "FILE=SEEDS")]
    recipe_seeds: Vec<super::train_ensemble::RecipeSeeds>,
    /// Members trained at the same time (default: one per core).
    #[arg(long)]
    parallel: Option<usize>,
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
    if args.parallel.is_some() && args.seeds.is_empty() && args.recipe_seeds.is_empty() {
        anyhow::bail!("--parallel sets how many ensemble members train at once: give --seeds or --recipe-seeds");
    }
    if !args.seeds.is_empty() || !args.recipe_seeds.is_empty() {
        let parallel = args.parallel.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let report = super::train_ensemble::train(layers, &dataset, &recipe, &out, &args.seeds, &args.recipe_seeds, parallel, args.fresh)?;
        super::train_ensemble::print_report(&report, &out, args.show_test);
        eprintln!("wrote {}", out.display());
        return Ok(());
    }
    if retriever_service::ensemble::is_ensemble(&out) {
        // Its manifest would go on naming the members, and the single model would never load.
        anyhow::bail!(
            "{} holds an ensemble ({}): give a single model another directory (--out), or retrain the ensemble with --seeds / --recipe-seeds",
            out.display(),
            retriever_service::ensemble::ENSEMBLE_FILE
        );
    }
    let kind = match recipe.model.kind {
        retriever_service::ModelKind::LruRec => "LRURec",
        retriever_service::ModelKind::SasRec => "SASRec",
    };
    if recipe.compute_threads > 0 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // candle reads this on every operation (and rayon when its pool starts, which has not
        // happened yet): the training step's kernels run on `compute_threads` threads.
        std::env::set_var("RAYON_NUM_THREADS", recipe.compute_threads.to_string());
    }
    eprintln!(
        "training {kind} on {} ({} users, {} items) into {} ({} compute thread(s))",
        dataset.name,
        dataset.users.len(),
        dataset.num_items(),
        out.display(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "one per core".into())
    );
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
