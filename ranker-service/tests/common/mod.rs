//! Shared helpers for the model tests: the shipped GGUF, loaded once per test binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use ranker_service::{GgufFile, Llama, LoadOptions};

pub mod tiny;

/// The shipped model; `LLAMAREC_RANKER_GGUF` overrides the path.
pub fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("LLAMAREC_RANKER_GGUF") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The model path, or a panic that says how to get the file: these tests must not pass
/// silently without the model.
pub fn require_model() -> PathBuf {
    let p = model_path();
    assert!(
        p.exists(),
        "{} is missing: run `llamarec fetch` to download the shipped model (or set LLAMAREC_RANKER_GGUF)",
        p.display()
    );
    p
}

/// The shipped model with weights dequantized to f32 (the CPU default), loaded once.
pub fn model() -> &'static Llama {
    static MODEL: OnceLock<Llama> = OnceLock::new();
    MODEL.get_or_init(|| {
        let mut gguf = GgufFile::open(require_model()).expect("open GGUF");
        Llama::from_gguf(&mut gguf, &LoadOptions::default()).expect("load model")
    })
}

/// Deterministic pseudo-random token ids in `[100, 49_000)`.
pub fn pseudo_random_ids(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            100 + ((s >> 33) % 48_900) as u32
        })
        .collect()
}

/// Largest absolute elementwise difference of two equal-length slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The ranker on the shipped model with the default (Alpaca) template, loaded once.
pub fn ranker() -> &'static ranker_service::Ranker {
    static RANKER: OnceLock<ranker_service::Ranker> = OnceLock::new();
    RANKER.get_or_init(|| {
        let gguf = GgufFile::open(require_model()).expect("open GGUF");
        let tok = ranker_service::Tokenizer::from_gguf(&gguf).expect("tokenizer");
        let renderer =
            ranker_service::PromptRenderer::new(ranker_service::PromptTemplate::alpaca(), tok)
                .expect("renderer");
        ranker_service::Ranker::new(model().clone(), renderer).expect("ranker")
    })
}
