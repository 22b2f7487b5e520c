//! Trains LRURec on a data set from the shipped assets (development entry point; the `llamarec
//! train retriever` command is the user-facing one).
//!
//! `cargo run --release -p retriever-service --example train -- OUT_DIR [CONFIG_JSON]`
//! with `ASSETS` (default `assets`) pointing at the extracted assets.

use llamarec_common::data::{DataConfig, Dataset};
use retriever_service::TrainConfig;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().ok_or("usage: train OUT_DIR [TRAIN_CONFIG_JSON]")?);
    let config: TrainConfig = match args.next() {
        Some(json) => serde_json::from_str(&json)?,
        None => TrainConfig::default(),
    };
    let assets = PathBuf::from(std::env::var("ASSETS").unwrap_or_else(|_| "assets".into()));
    let dataset = Dataset::load(&DataConfig::default(), &assets)?;
    let report = retriever_service::train(&dataset, &config, &out)?;
    println!(
        "best epoch {} of {}, {:.0}s to best ({:.0}s total)",
        report.best_epoch, report.epochs, report.time_to_best_s, report.wall_time_s
    );
    print!("{}", llamarec_common::ranking_metrics::format_table("validation", &report.validation));
    print!("{}", llamarec_common::ranking_metrics::format_table("test", &report.test));
    Ok(())
}
