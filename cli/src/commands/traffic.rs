//! `llamarec traffic synth`: a traffic file (the gateway's capture format) from the configured
//! data set's users, with Poisson arrivals, for `llamarec replay`.

use anyhow::{Context, Result};
use crate::loadgen::synth::synth;
use gateway::traffic::write_traffic;
use llamarec_common::config::{AssetsConfig, ConfigLayers};
use llamarec_common::data::{DataConfig, Dataset};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, clap::Subcommand)]
pub enum TrafficCommand {
    /// Write synthetic traffic: users drawn uniformly from the data set, Poisson arrivals.
    Synth(SynthArgs),
}

#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// The JSON-lines file to write.
    #[arg(long)]
    out: PathBuf,
    /// Mean arrivals per second.
    #[arg(long)]
    rate: f64,
    /// Seconds of traffic.
    #[arg(long)]
    duration: f64,
    /// Share of requests that skip the ranker (retriever only), 0.0 ..= 1.0.
    #[arg(long, default_value_t = 0.0)]
    skip_ranker_share: f64,
    /// Items per request.
    #[arg(long, default_value_t = 10)]
    k: u32,
    /// Candidates for the ranker (0 = the gateway's default).
    #[arg(long, default_value_t = 0)]
    candidates: u32,
    /// Seed of the arrivals and the user draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn run(layers: &ConfigLayers, cmd: TrafficCommand) -> Result<()> {
    let TrafficCommand::Synth(args) = cmd;
    anyhow::ensure!(args.rate.is_finite() && args.rate > 0.0, "--rate must be > 0");
    anyhow::ensure!(args.duration.is_finite() && args.duration > 0.0, "--duration must be > 0");
    anyhow::ensure!((0.0..=1.0).contains(&args.skip_ranker_share), "--skip-ranker-share must be within 0.0 ..= 1.0");
    let users = dataset_users(layers)?;
    let records = synth(&users, args.rate, Duration::from_secs_f64(args.duration), args.skip_ranker_share, args.k, args.candidates, args.seed);
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::File::create(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut out = std::io::BufWriter::new(file);
    write_traffic(&mut out, &records)?;
    out.flush()?;
    let skipped = records.iter().filter(|r| r.skip_ranker).count();
    eprintln!(
        "wrote {}: {} requests over {} s ({:.2} req/s), {} retriever-only, from {} users",
        args.out.display(),
        records.len(),
        args.duration,
        records.len() as f64 / args.duration,
        skipped,
        users.len()
    );
    Ok(())
}

/// The configured data set's user ids.
pub fn dataset_users(layers: &ConfigLayers) -> Result<Vec<String>> {
    let assets = layers.section::<AssetsConfig>()?;
    let data = layers.section::<DataConfig>()?;
    let dataset = Dataset::load(&data, &assets.dir).with_context(|| format!("loading data set {} (run `llamarec fetch`)", data.name))?;
    Ok(dataset.users.iter().map(|u| u.id.clone()).collect())
}
