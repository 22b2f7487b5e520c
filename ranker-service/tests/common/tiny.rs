//! A tiny random Llama and the shipped tokenizer, for the training tests.

use candle_core::{DType, Device, Tensor};
use ranker_service::config::LlamaConfig;
use ranker_service::train::{self, TrainableLora};
use ranker_service::weights::{BlockWeights, Linear, LlamaWeights};
use ranker_service::{GgufFile, Kernels, Llama, PromptRenderer, PromptTemplate, Tokenizer};

/// A 2-block model with 4 query heads over 2 key/value heads (grouped-query attention).
pub fn tiny_config(vocab: usize) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 4,
        vocab_size: vocab,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_seq_len: 2048,
    }
}

/// A random Llama of `cfg` in `dtype` (normal weights, std 0.3; norms around 1).
pub fn tiny_model(cfg: LlamaConfig, dtype: DType, seed: u64) -> Llama {
    let dev = Device::Cpu;
    let mut rng = train::Rng::new(seed);
    let mut t = |shape: (usize, usize), std: f32| {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * std * 1.7)
            .collect();
        Tensor::from_vec(v, shape, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let h = cfg.hidden_size;
    let qkv = cfg.q_dim() + 2 * cfg.kv_dim();
    let ones = |n: usize| Tensor::ones(n, dtype, &dev).unwrap();
    let blocks = (0..cfg.num_layers)
        .map(|_| BlockWeights {
            attn_norm: ones(h),
            qkv: Linear::Dense(t((qkv, h), 0.3)),
            o: Linear::Dense(t((h, cfg.q_dim()), 0.3)),
            ffn_norm: ones(h),
            gate_up: Linear::Dense(t((2 * cfg.intermediate_size, h), 0.3)),
            down: Linear::Dense(t((h, cfg.intermediate_size), 0.3)),
        })
        .collect();
    let embed = t((cfg.vocab_size, h), 1.0);
    let weights = LlamaWeights {
        lm_head: embed.clone(),
        embed,
        blocks,
        final_norm: ones(h),
    };
    let mut m = Llama::from_weights(cfg, weights, &dev, dtype).unwrap();
    m.set_kernels(Kernels::Differentiable);
    m
}

/// Random non-zero B so that gradients reach A too.
pub fn perturb_b(lora: &TrainableLora, seed: u64) {
    let mut rng = train::Rng::new(seed);
    for p in lora.params.iter().filter(|p| p.name.contains("lora_B")) {
        let n = p.var.elem_count();
        let v: Vec<f32> = (0..n).map(|_| rng.next_f32() - 0.5).collect();
        let t = Tensor::from_vec(v, p.var.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(p.var.dtype())
            .unwrap();
        p.var.set(&t).unwrap();
    }
}

pub fn shipped_renderer() -> PromptRenderer {
    let gguf = GgufFile::open(super::require_model()).unwrap();
    PromptRenderer::new(
        PromptTemplate::alpaca(),
        Tokenizer::from_gguf(&gguf).unwrap(),
    )
    .unwrap()
}
