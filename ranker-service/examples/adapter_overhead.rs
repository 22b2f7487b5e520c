//! What serving an adapter unmerged costs: the fixed MovieLens request scored cold (whole
//! prompt after the instruction prefix) by the base model alone, by the base with the adapter
//! applied per token (how the service serves it, so that a reload can swap adapters over the
//! same weights), and by weights with the adapter merged in at load (how it served before).
//! Interleaved rounds, medians; prints JSON.
//!
//! usage: adapter_overhead [--adapter DIR] [--model GGUF] [--iters N] [--precision f32|auto]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use llamarec_common::bench::median;
use ranker_service::sample::movielens_request;
use ranker_service::{GgufFile, Llama, LoadOptions, PromptRenderer, PromptTemplate, Ranker, RankerModelConfig, Tokenizer, WeightPrecision};

fn main() {
    let mut adapter = PathBuf::from("ranker-service/adapters/ml-100k");
    let mut model = PathBuf::from("assets/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let (mut iters, mut precision) = (10usize, WeightPrecision::Auto);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--adapter" => adapter = args.next().expect("--adapter DIR").into(),
            "--model" => model = args.next().expect("--model GGUF").into(),
            "--iters" => iters = args.next().expect("--iters N").parse().expect("a count"),
            "--precision" => {
                precision = match args.next().as_deref() {
                    Some("f32") => WeightPrecision::F32,
                    Some("auto") => WeightPrecision::Auto,
                    other => panic!("--precision f32|auto, not {other:?}"),
                }
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let config = RankerModelConfig { model: model.clone(), tokenizer: None, precision, template: PromptTemplate::alpaca() };
    let base = Ranker::load(&config, &LoadOptions::default()).expect("load the base (run `llamarec fetch`)");
    let lora = Arc::new(base.read_adapter(&adapter).expect("read the adapter"));
    let unmerged = base.with_adapter(Some(lora.clone())).unwrap();
    // The merged reference: the weights loaded again with the adapter folded in before packing.
    let mut gguf = GgufFile::open(&model).unwrap();
    let packed = unmerged.model().projection_kernels() != "f32";
    let opts = LoadOptions { precision: if packed { WeightPrecision::Quantized } else { WeightPrecision::F32 }, ..LoadOptions::default() };
    let mut weights = Llama::from_gguf(&mut gguf, &opts).unwrap();
    if packed {
        weights.pack_bf16(Some(&lora)).unwrap();
    } else {
        weights.merge_lora(&lora).unwrap();
    }
    let renderer = PromptRenderer::new(PromptTemplate::alpaca(), Tokenizer::from_gguf(&gguf).unwrap()).unwrap();
    let merged = Ranker::new(weights, renderer).unwrap();

    let (history, candidates) = movielens_request();
    let variants = [("base", &base), ("unmerged", &unmerged), ("merged", &merged)];
    let mut times = vec![Vec::new(); variants.len()];
    let mut logits = vec![Vec::new(); variants.len()];
    for round in 0..=iters {
        for (i, (_, ranker)) in variants.iter().enumerate() {
            let t = Instant::now();
            let scores = ranker.score(&history, &candidates).unwrap();
            if round > 0 {
                times[i].push(t.elapsed().as_secs_f64());
            }
            logits[i] = scores.logits;
        }
    }
    let max_diff = logits[1].iter().zip(&logits[2]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let ms: Vec<f64> = times.into_iter().map(|t| median(t) * 1e3).collect();
    let out = serde_json::json!({
        "bench": "adapter_overhead",
        "model": model,
        "adapter": adapter,
        "projection_kernels": unmerged.model().projection_kernels(),
        "threads": candle_core::utils::get_num_threads(),
        "iters": iters,
        "cold_rank_ms": { "base": ms[0], "unmerged": ms[1], "merged": ms[2] },
        "unmerged_over_merged": ms[1] / ms[2],
        "max_abs_logit_diff_unmerged_vs_merged": max_diff,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
