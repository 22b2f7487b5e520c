//! Experiment: does training on train + validation items (with the epoch count that early
//! stopping chose on validation) lift the test metrics? Prints the test Recall/NDCG@10 of the
//! model after the last epoch. Kept so the figures in BENCHMARKS.md ("Retriever", session 4)
//! can be reproduced; `llamarec train retriever` does not refit.
//!
//! `cargo run --release -p retriever-service --example refit_probe -- OUT_DIR TRAIN_CONFIG_JSON`
//! (set `max_epochs` to the selection run's best epoch and `patience` above it).
//!
//! Each user's test item is appended a second time, so that the trainer's "training sequence"
//! (all but the last two items) is train + validation, and its "validation" case is the real
//! test case (history = train + validation, target = test). The per-epoch figures the trainer
//! prints are therefore test figures: read only the last epoch's, fixed in advance.

use llamarec_common::data::{DataConfig, Dataset};
use retriever_service::TrainConfig;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: refit_probe OUT_DIR TRAIN_CONFIG_JSON";
    let out = PathBuf::from(args.next().ok_or(usage)?);
    let config: TrainConfig = serde_json::from_str(&args.next().ok_or(usage)?)?;
    let assets = PathBuf::from(std::env::var("ASSETS").unwrap_or_else(|_| "assets".into()));
    let mut dataset = Dataset::load(&DataConfig::default(), &assets)?;
    for user in &mut dataset.users {
        if let (Some(&item), Some(&ts)) = (user.items.last(), user.timestamps.last()) {
            user.items.push(item);
            user.timestamps.push(ts);
        }
    }
    let report = retriever_service::train(&dataset, &config, &out)?;
    let last = report.history.last().ok_or("no epoch ran")?;
    println!(
        "trained on train + validation for {} epochs: test R@10 {:.4} N@10 {:.4}",
        report.epochs, last.val_recall_at_10, last.val_ndcg_at_10
    );
    Ok(())
}
