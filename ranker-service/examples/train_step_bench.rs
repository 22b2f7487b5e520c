//! Seconds per LoRA training example (forward + backward, no update) on the shipped model and
//! the fixed MovieLens request (~620 tokens), against the inference forward pass.
//!
//! `cargo run --release -p ranker-service --example train_step_bench -- [N]`

use std::time::Instant;

use candle_core::DType;
use ranker_service::train::{self, LossKind, RankerTrainConfig, TrainableLora};
use ranker_service::{
    GgufFile, Kernels, Llama, LoadOptions, Positions, PromptRenderer, PromptTemplate, TokenBatch,
    Tokenizer, Verbalizer,
};

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3);
    let path = std::env::var("LLAMAREC_RANKER_GGUF")
        .unwrap_or_else(|_| "assets/models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let mut gguf = GgufFile::open(&path)?;
    let base = Llama::from_gguf(&mut gguf, &LoadOptions::default())?;
    let renderer = PromptRenderer::new(PromptTemplate::alpaca(), Tokenizer::from_gguf(&gguf)?)?;
    let verbalizer = Verbalizer::new(&renderer)?;
    let (history, candidates) = ranker_service::sample::movielens_request();
    let ids = renderer
        .tokenize(&renderer.render(&history, &candidates)?)?
        .ids;
    println!("prompt: {} tokens", ids.len());

    let batch = TokenBatch::left_padded(&[&ids], base.device())?;
    let t = Instant::now();
    for _ in 0..n {
        base.forward(&batch, None, None, Positions::Last)?;
    }
    println!(
        "inference forward (fused kernels): {:.2} s",
        t.elapsed().as_secs_f64() / n as f64
    );

    if std::env::var_os("NO_MALLOPT").is_none() {
        train::tune_allocator();
    }
    let mut model = base.clone();
    model.set_kernels(Kernels::Differentiable);
    let cfg = RankerTrainConfig::default();
    let lora = TrainableLora::init(&model, &cfg, 1)?;
    let mut adapter = lora.adapter.clone();
    adapter.set_dropout(cfg.dropout as f32, 7);
    // The answer-token loss of one example (answer at candidate index 3 of 20).
    let example_loss = || {
        train::example_loss(
            &model,
            &adapter,
            &verbalizer,
            &ids,
            3,
            20,
            LossKind::AnswerToken,
        )
    };
    let t = Instant::now();
    for _ in 0..n {
        example_loss()?;
    }
    let fwd = t.elapsed().as_secs_f64() / n as f64;
    println!("training forward (differentiable, LoRA q/v r8, dropout): {fwd:.2} s");
    let t = Instant::now();
    let mut loss = 0.0;
    for _ in 0..n {
        let l = example_loss()?;
        loss = l.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let g = l.backward()?;
        assert!(g.get(lora.params[0].var.as_tensor()).is_some());
    }
    let step = t.elapsed().as_secs_f64() / n as f64;
    println!("training example (forward + backward): {step:.2} s (loss {loss:.3}); {:.0} examples per 90 minutes", 5400.0 / step);
    Ok(())
}
