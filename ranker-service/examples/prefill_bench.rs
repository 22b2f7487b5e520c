//! Prefill benchmark on the fixed 20-history/20-candidate MovieLens prompt; prints JSON.
//!
//! usage: prefill_bench [GGUF] [--iters N] [--threads T] [--reference]
//!
//! Also times our forward with the generic (candle-op) kernels, to show what the fused CPU
//! kernels buy on the same machine at the same moment.
//!
//! `--reference` also times candle's `quantized_llama` on the same weights dequantized to f32
//! (the baseline of issue 4), so a run on a busy machine still gives a meaningful ratio.

use std::time::Instant;

use candle_core::{Device, Tensor};
use llamarec_common::bench::{median, process_cpu_s};
use ranker_service::sample::movielens_request;
use ranker_service::{
    GgufFile, Kernels, Llama, LoadOptions, Positions, PromptRenderer, PromptTemplate, Ranker,
    ScoreInput, TokenBatch, Tokenizer,
};

/// Median wall and CPU seconds of `f` over `iters` runs, after one warm-up run.
struct Timing {
    wall: f64,
    cpu: f64,
}

fn time<F: FnMut()>(iters: usize, mut f: F) -> Timing {
    f(); // warm-up: first-touch allocations, thread pool start
    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        let (t, c) = (Instant::now(), process_cpu_s());
        f();
        walls.push(t.elapsed().as_secs_f64());
        cpus.push(process_cpu_s() - c);
    }
    Timing {
        wall: median(walls),
        cpu: median(cpus),
    }
}

fn main() {
    let mut path = String::from("assets/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let (mut iters, mut threads, mut reference) = (5usize, None, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iters" => iters = args.next().unwrap().parse().unwrap(),
            "--threads" => threads = Some(args.next().unwrap()),
            "--reference" => reference = true,
            _ => path = a,
        }
    }
    if let Some(t) = &threads {
        // Read by rayon and gemm when their pools start, i.e. before the first tensor op.
        std::env::set_var("RAYON_NUM_THREADS", t);
    }
    let threads = candle_core::utils::get_num_threads();

    let mut gguf = GgufFile::open(&path).expect("open GGUF (run `llamarec fetch`)");
    let t0 = Instant::now();
    let model = Llama::from_gguf(&mut gguf, &LoadOptions::default()).unwrap();
    let load_s = t0.elapsed().as_secs_f64();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let renderer = PromptRenderer::new(PromptTemplate::alpaca(), tok).unwrap();
    let ranker = Ranker::new(model.clone(), renderer).unwrap();
    let (history, candidates) = movielens_request();
    let req = ranker.prepare(&history, &candidates).unwrap();
    let ids = req.prompt.ids.clone();
    let n = ids.len();

    let batch = TokenBatch::left_padded(&[&ids], model.device()).unwrap();
    let prefill_s = time(iters, || {
        model.forward(&batch, None, None, Positions::Last).unwrap();
    });
    let mut generic = model.clone();
    generic.set_kernels(Kernels::Generic);
    let prefill_generic_s = time(iters, || {
        generic
            .forward(&batch, None, None, Positions::Last)
            .unwrap();
    });
    let cold = ranker
        .score_batch(&[ScoreInput {
            request: &req,
            history_cache: None,
            want_history_cache: true,
        }])
        .unwrap()
        .remove(0);
    let history_cache = cold.history_cache.unwrap();
    let cold_s = time(iters, || {
        ranker
            .score_batch(&[ScoreInput {
                request: &req,
                history_cache: None,
                want_history_cache: false,
            }])
            .unwrap();
    });
    let warm_s = time(iters, || {
        ranker
            .score_batch(&[ScoreInput {
                request: &req,
                history_cache: Some(&history_cache),
                want_history_cache: false,
            }])
            .unwrap();
    });

    let reference_s = reference.then(|| {
        use candle_transformers::models::quantized_llama::ModelWeights;
        // Makes QMatMul dequantize to f32 at load: the issue's "plain quantized_llama on f32
        // weights" baseline.
        std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
        let mut f = std::fs::File::open(&path).unwrap();
        let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        let mut r = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        time(iters, || {
            r.clear_kv_cache();
            r.forward(&input, 0).unwrap();
        })
    });

    let mut out = serde_json::json!({
        "bench": "ranker_prefill",
        "model": path,
        "threads": threads,
        "iters": iters,
        "load_s": load_s,
        "prompt_tokens": n,
        "prefill_s": prefill_s.wall,
        "prefill_cpu_s": prefill_s.cpu,
        "prefill_tokens_per_s": n as f64 / prefill_s.wall,
        "prefill_generic_kernels_s": prefill_generic_s.wall,
        "prefill_generic_kernels_cpu_s": prefill_generic_s.cpu,
        "fused_speedup_vs_generic": prefill_generic_s.wall / prefill_s.wall,
        "rank_cold_s": cold_s.wall,
        "rank_warm_s": warm_s.wall,
        "rank_cold_cpu_s": cold_s.cpu,
        "rank_warm_cpu_s": warm_s.cpu,
        "warm_tokens_run": req.prompt.candidates().len(),
        "warm_over_cold": warm_s.wall / cold_s.wall,
    });
    if let Some(r) = reference_s {
        out["reference_quantized_llama_f32_s"] = r.wall.into();
        out["reference_quantized_llama_f32_cpu_s"] = r.cpu.into();
        out["reference_tokens_per_s"] = (n as f64 / r.wall).into();
        out["speedup_vs_reference"] = (r.wall / prefill_s.wall).into();
    }
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
