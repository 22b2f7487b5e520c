//! Validation metrics of score ensembles of retriever checkpoints (a probe for issue #17: does
//! averaging an LRURec and a SASRec, or two seeds, beat each alone?). Reads the validation split
//! only.
//!
//! `target/release/examples/ensemble_probe DIR_A DIR_B [DIR_C ...]` (checkpoints or ensembles; build with `cargo build
//! --release --workspace --locked --examples`), `ASSETS` (default `assets`) pointing at the
//! assets. With two directories, prints R/N at 10 and R at 20/50/100 for w·A + (1−w)·B over a
//! grid of w; with more, each model alone and the equal-weight mean (a weight fixed in advance,
//! nothing chosen on the split). Scores are each model's log-softmax over the items (a per-user
//! shift of the raw scores, so w = 0 and 1 rank as the models alone).
//! `SPLIT=test` reads the test split instead (only for a candidate already chosen on validation).

use llamarec_common::data::{DataConfig, Dataset, Split};
use llamarec_common::ranking_metrics::{rank_of_target, MetricAccumulator};
use retriever_service::train::evaluate::{split_cases, RETRIEVER_KS};
use retriever_service::{Encoder, Retriever};
use std::path::PathBuf;

fn log_softmax(scores: &mut [f32]) {
    let max = scores[1..].iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + scores[1..].iter().map(|s| (s - max).exp()).sum::<f32>().ln();
    scores.iter_mut().for_each(|s| *s -= lse);
}

/// R@10, N@10, R@20, R@50 and R@100 as table cells.
fn row(r: &llamarec_common::ranking_metrics::MetricReport) -> String {
    let cells = [r.get(10).recall, r.get(10).ndcg, r.get(20).recall, r.get(50).recall, r.get(100).recall];
    cells.iter().map(|v| format!("{v:>7.4}")).collect::<Vec<_>>().join(" ")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dirs: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    if dirs.len() < 2 {
        return Err("usage: ensemble_probe DIR_A DIR_B [DIR_C ...]".into());
    }
    let split: Split = std::env::var("SPLIT").unwrap_or_else(|_| "validation".into()).parse()?;
    let assets = PathBuf::from(std::env::var("ASSETS").unwrap_or_else(|_| "assets".into()));
    let dataset = Dataset::load(&DataConfig::default(), &assets)?;
    // Retriever::load reads ensembles too, so a group of members can be weighed as one.
    let retrievers = dirs.iter().map(|d| Retriever::load(d)).collect::<Result<Vec<_>, _>>()?;
    let encoders: Vec<&Encoder> = retrievers.iter().map(Retriever::encoder).collect();
    let cases = split_cases(&dataset, split);
    let scores: Vec<Vec<Vec<f32>>> = cases
        .iter()
        .map(|case| {
            let one = |e: &Encoder| {
                let window = &case.history[case.history.len().saturating_sub(e.config().max_len)..];
                let mut s = e.all_scores(&e.encode(window).expect("encodable history"));
                log_softmax(&mut s);
                s
            };
            encoders.iter().map(|e| one(e)).collect()
        })
        .collect();
    println!("{split:?}, {} users", cases.len());
    if encoders.len() > 2 {
        println!("{:>8} {:>7} {:>7} {:>7} {:>7} {:>7}", "model", "R@10", "N@10", "R@20", "R@50", "R@100");
        for member in 0..=encoders.len() {
            let mut acc = MetricAccumulator::new(&RETRIEVER_KS);
            for (case, per_model) in cases.iter().zip(&scores) {
                let mixed: Vec<f32> = if member < encoders.len() {
                    per_model[member].clone()
                } else {
                    (0..per_model[0].len()).map(|i| per_model.iter().map(|s| s[i]).sum::<f32>() / per_model.len() as f32).collect()
                };
                acc.add(Some(rank_of_target(&mixed, case.target, case.history)));
            }
            let name = if member < encoders.len() { format!("{}", (b'A' + member as u8) as char) } else { "mean".into() };
            println!("{name:>8} {}", row(&acc.report()));
        }
        return Ok(());
    }
    println!("{:>5} {:>7} {:>7} {:>7} {:>7} {:>7}", "w_A", "R@10", "N@10", "R@20", "R@50", "R@100");
    for step in 0..=10 {
        let w = step as f32 / 10.0;
        let mut acc = MetricAccumulator::new(&RETRIEVER_KS);
        for (case, per_model) in cases.iter().zip(&scores) {
            let (a, b) = (&per_model[0], &per_model[1]);
            let mixed: Vec<f32> = a.iter().zip(b).map(|(x, y)| w * x + (1.0 - w) * y).collect();
            acc.add(Some(rank_of_target(&mixed, case.target, case.history)));
        }
        println!("{w:>5.1} {}", row(&acc.report()));
    }
    Ok(())
}
