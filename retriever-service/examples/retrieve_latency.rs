//! Retrieve latency in-process: real test histories against a trained checkpoint, then random
//! models with growing catalogs (history of `max_len` events, the worst case).
//!
//! `cargo run --release -p retriever-service --example retrieve_latency -- CHECKPOINT_DIR [SIZES]`

use candle_core::Device;
use llamarec_common::data::{DataConfig, Dataset, Split};
use retriever_service::train::model::LruRec;
use retriever_service::train::params::BuildFromParams;
use retriever_service::{Catalog, CatalogItem, Encoder, LruRecConfig, Retriever};
use std::path::PathBuf;
use std::time::Instant;

fn percentiles(mut micros: Vec<f64>) -> (f64, f64, f64) {
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| micros[((micros.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99), micros.iter().sum::<f64>() / micros.len() as f64)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: retrieve_latency CHECKPOINT_DIR [SIZES]")?);
    let sizes: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "1000,10000,100000,1000000".into())
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let assets = PathBuf::from(std::env::var("ASSETS").unwrap_or_else(|_| "assets".into()));
    let dataset = Dataset::load(&DataConfig::default(), &assets)?;
    let retriever = Retriever::load(&dir)?;
    let cases: Vec<_> = dataset.eval_examples(Split::Test).collect();
    for e in cases.iter().take(50) {
        retriever.retrieve(e.history, 20, true)?;
    }
    let mut times = Vec::new();
    for _ in 0..3 {
        for e in &cases {
            let t = Instant::now();
            std::hint::black_box(retriever.retrieve(e.history, 20, true)?);
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let (p50, p99, mean) = percentiles(times);
    println!("ml-100k test histories (k=20, history masked): p50 {p50:.0} us  p99 {p99:.0} us  mean {mean:.0} us");

    for n in sizes {
        let config = LruRecConfig::for_items(n);
        let model = LruRec::init(&config, 7, &Device::Cpu)?;
        let encoder = Encoder::new(&config, &model.tensors())?;
        drop(model);
        let items = (0..=n).map(|i| CatalogItem { id: i.to_string(), title: String::new(), train_count: 0 }).collect();
        let retriever = Retriever::new(encoder, Catalog::new(items));
        let history: Vec<u32> = (0..config.max_len as u32).map(|i| (i * 7919) % n as u32 + 1).collect();
        let rounds = if n >= 1_000_000 { 30 } else { 200 };
        let mut times = Vec::new();
        for round in 0..rounds + 5 {
            let t = Instant::now();
            std::hint::black_box(retriever.retrieve(&history, 20, true)?);
            if round >= 5 {
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        let (p50, p99, mean) = percentiles(times);
        println!("catalog {n:>8} items, history {}: p50 {p50:.0} us  p99 {p99:.0} us  mean {mean:.0} us", history.len());
    }
    Ok(())
}
