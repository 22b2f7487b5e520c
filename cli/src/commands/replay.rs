//! `llamarec replay`: drives a gateway open-loop from a traffic file (captured by the gateway or
//! written by `llamarec traffic synth`) and reports throughput, latency percentiles from each
//! request's scheduled send time, errors by gRPC code and degraded answers by reason. The
//! engine is [`crate::loadgen::replay`].

use anyhow::Result;
use gateway::config::GatewayConfig;
use crate::loadgen::replay::{Progress, ReplayOptions};
use crate::loadgen::report::Report;
use crate::loadgen::schedule::{Arrivals, Schedule};
use gateway::traffic::{read_traffic, TrafficRecord};
use llamarec_common::config::ConfigLayers;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Traffic file (JSON lines, the gateway's capture format).
    #[arg(long)]
    traffic: PathBuf,
    /// Gateway address (default: `[gateway] listen`).
    #[arg(long)]
    gateway: Option<String>,
    /// Recorded arrival times sped up by this factor (2 = twice as fast).
    #[arg(long, default_value_t = 1.0, conflicts_with = "rate")]
    speed: f64,
    /// Fixed rate (requests per second) instead of the recorded times, cycling through the
    /// file's requests; needs --duration.
    #[arg(long, requires = "duration")]
    rate: Option<f64>,
    /// Seconds of a fixed-rate replay.
    #[arg(long, requires = "rate")]
    duration: Option<f64>,
    /// Arrivals of a fixed-rate replay.
    #[arg(long, value_enum, default_value_t = ArrivalsArg::Poisson)]
    arrivals: ArrivalsArg,
    /// Seed of Poisson arrivals.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// TCP connections to the gateway, used round-robin.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight beyond which a due request is counted as an error, not queued.
    #[arg(long, default_value_t = 1024)]
    max_outstanding: usize,
    /// gRPC deadline of every request (default: each record's, else the gateway's default).
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Also write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    access: super::gateway_access::GatewayAccess,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ArrivalsArg {
    Poisson,
    Uniform,
}

pub async fn run(layers: &ConfigLayers, args: ReplayArgs) -> Result<()> {
    let traffic = read_traffic(&args.traffic)?;
    let gateway = match args.gateway {
        Some(g) => g,
        None => layers.section::<GatewayConfig>()?.listen.to_string(),
    };
    let schedule = match (args.rate, args.duration) {
        (Some(rate), Some(duration)) => {
            anyhow::ensure!(duration.is_finite() && duration > 0.0, "--duration must be > 0");
            let arrivals = match args.arrivals {
                ArrivalsArg::Poisson => Arrivals::Poisson { seed: args.seed },
                ArrivalsArg::Uniform => Arrivals::Uniform,
            };
            Schedule::Fixed { rate, duration: Duration::from_secs_f64(duration), arrivals }
        }
        _ => Schedule::Recorded { speed: args.speed },
    };
    let options = ReplayOptions {
        gateway,
        connections: args.connections.max(1),
        schedule,
        max_outstanding: args.max_outstanding.max(1),
        deadline: args.deadline_ms.map(Duration::from_millis),
        tls: args.access.tls()?,
        bearer: args.access.bearer()?,
    };
    eprintln!("{} requests from {}", traffic.len(), args.traffic.display());
    let report = run_with_progress(&traffic, &options, Arc::new(Progress::default())).await?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        crate::commands::bench::write_json(path, &serde_json::to_value(&report)?)?;
    }
    Ok(())
}

/// Runs the replay with a progress line on stderr (hidden when stderr is not a terminal).
pub async fn run_with_progress(traffic: &[TrafficRecord], options: &ReplayOptions, progress: Arc<Progress>) -> Result<Report> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} due · {msg}")?.progress_chars("=> "));
    let ticker = {
        let (progress, bar) = (progress.clone(), bar.clone());
        tokio::spawn(async move {
            loop {
                bar.set_length(progress.total.load(Ordering::Relaxed));
                bar.set_position(progress.sent.load(Ordering::Relaxed));
                bar.set_message(format!(
                    "ok {} · errors {} · degraded {} · in flight {}",
                    progress.completed.load(Ordering::Relaxed),
                    progress.errors.load(Ordering::Relaxed),
                    progress.degraded.load(Ordering::Relaxed),
                    progress.outstanding.load(Ordering::Relaxed)
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let result = crate::loadgen::replay::run(traffic, options, progress).await;
    ticker.abort();
    bar.finish_and_clear();
    result
}
