//! Whether batching pays on this machine: N cold MovieLens requests (different histories) in
//! one forward pass against N passes of one, and the same for returning users (history cached).
//! Prints one JSON object. `cargo run --release --example batch_vs_sequential -- [N] [ITERS]`.

use std::time::Instant;

use ranker_service::sample::MOVIELENS_TITLES;
use ranker_service::{
    LoadOptions, PromptTemplate, Ranker, RankerModelConfig, ScoreInput, WeightPrecision,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(2, |a| a.parse().unwrap());
    let iters: usize = args.next().map_or(3, |a| a.parse().unwrap());
    let config = RankerModelConfig {
        model: "assets/models/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
        tokenizer: None,
        precision: WeightPrecision::F32,
        template: PromptTemplate::alpaca(),
    };
    let ranker =
        Ranker::load(&config, &LoadOptions::default()).expect("load (run `llamarec fetch`)");
    // Different users: rotate the 40 titles so every request has its own history.
    let requests: Vec<_> = (0..n)
        .map(|u| {
            let titles: Vec<&str> = (0..40)
                .map(|i| MOVIELENS_TITLES[(i + u * 3) % 40])
                .collect();
            ranker.prepare(&titles[..20], &titles[20..]).unwrap()
        })
        .collect();
    let cold = |r| ScoreInput {
        request: r,
        history_cache: None,
        want_history_cache: true,
    };
    let caches: Vec<_> = requests
        .iter()
        .map(|r| {
            ranker
                .score_batch(&[cold(r)])
                .unwrap()
                .remove(0)
                .history_cache
                .unwrap()
        })
        .collect();
    let best = |f: &dyn Fn()| {
        (0..iters)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let cold_batched = best(&|| {
        ranker
            .score_batch(&requests.iter().map(cold).collect::<Vec<_>>())
            .unwrap();
    });
    let cold_sequential = best(&|| {
        for r in &requests {
            ranker.score_batch(&[cold(r)]).unwrap();
        }
    });
    let warm = |(r, c)| ScoreInput {
        request: r,
        history_cache: Some(c),
        want_history_cache: false,
    };
    let warm_inputs: Vec<_> = requests.iter().zip(&caches).map(warm).collect();
    let warm_batched = best(&|| {
        ranker.score_batch(&warm_inputs).unwrap();
    });
    let warm_sequential = best(&|| {
        for i in &warm_inputs {
            ranker.score_batch(std::slice::from_ref(i)).unwrap();
        }
    });
    println!(
        "{{\"requests\": {n}, \"threads\": {}, \"prompt_tokens\": {}, \"cold_batched_s\": {cold_batched:.3}, \"cold_sequential_s\": {cold_sequential:.3}, \"warm_batched_s\": {warm_batched:.3}, \"warm_sequential_s\": {warm_sequential:.3}}}",
        candle_core::utils::get_num_threads(),
        requests[0].prompt.ids.len()
    );
}
