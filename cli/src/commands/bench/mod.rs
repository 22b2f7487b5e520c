//! `llamarec bench ...`: benchmarks that write JSON (figures go to BENCHMARKS.md with the
//! command that produced them). Never timed assertions in tests.

pub mod gateway;
pub mod latency;
pub mod probe;
pub mod ranker;
pub mod replay;
pub mod retriever;
pub mod train_step;

use anyhow::Result;
use llamarec_common::config::ConfigLayers;
use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Gateway overhead over the ranker, and retriever-only Recommend throughput, against a
    /// running cluster (`llamarec up`).
    Gateway(gateway::GatewayBenchArgs),
    /// Retriever: training time to best, Retrieve latency in-process and over gRPC, latency
    /// against catalog size.
    Retriever(retriever::RetrieverBenchArgs),
    /// Ranker: prefill tokens/s and Rank latency (cold, history cached; per thread count),
    /// memory, and one-pass scoring against generating the ranked list (PNG plot).
    Ranker(ranker::RankerBenchArgs),
    /// Ranker training: seconds per LoRA training example (forward, backward, AdamW) on the
    /// fixed MovieLens prompt, native step against candle's autograd; writes the prompt for the
    /// PyTorch peer (`bench/peers`).
    TrainStep(train_step::TrainStepBenchArgs),
    /// Open-loop rate sweeps against a running cluster, retriever-only and two-stage, with the
    /// ranker's queue depth against load (PNG plot).
    Replay(replay::ReplayBenchArgs),
}

pub async fn run(layers: &ConfigLayers, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Gateway(args) => gateway::run(layers, args).await,
        BenchCommand::Retriever(args) => retriever::run(layers, args).await,
        BenchCommand::Ranker(args) => ranker::run(layers, args).await,
        BenchCommand::Replay(args) => replay::run(layers, args).await,
        BenchCommand::TrainStep(args) => train_step::run(layers, args),
    }
}

/// Writes `value` as pretty JSON to `path` (creating its directory) and says so.
pub fn write_json(path: &PathBuf, value: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)?)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
