//! The fused CPU kernels against the generic candle-op path, and the LoRA hook.

mod common;

use candle_core::{DType, Device, Tensor};
use ranker_service::{Kernels, Llama, LoraAdapter, LoraPair, Positions, Projection, TokenBatch};

use common::{max_abs_diff, model, pseudo_random_ids};

const IDS: [u32; 4] = [49, 50, 51, 52];

fn padded_cached_scores(model: &Llama, lora: Option<&LoraAdapter>) -> Vec<Vec<f32>> {
    let prefixes = [pseudo_random_ids(11, 61), pseudo_random_ids(5, 62)];
    let suffixes = [pseudo_random_ids(4, 63), pseudo_random_ids(9, 64)];
    let dev = model.device();
    let cache = model
        .forward(
            &TokenBatch::left_padded(&prefixes, dev).unwrap(),
            None,
            lora,
            Positions::All,
        )
        .unwrap()
        .cache;
    let out = model
        .forward(
            &TokenBatch::left_padded(&suffixes, dev).unwrap(),
            Some(&cache),
            lora,
            Positions::Last,
        )
        .unwrap();
    let head = model.token_head(&IDS).unwrap();
    head.logits(&out.last_hidden().unwrap())
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn generic(model: &Llama) -> Llama {
    let mut m = model.clone();
    m.set_kernels(Kernels::Generic);
    m
}

#[test]
fn fused_kernels_match_generic_ops_with_padding_and_cache() {
    let fused = model();
    assert!(fused.uses_fused_kernels());
    let generic = generic(fused);
    assert!(!generic.uses_fused_kernels());
    let a = padded_cached_scores(fused, None);
    let b = padded_cached_scores(&generic, None);
    for (x, y) in a.iter().zip(&b) {
        let d = max_abs_diff(x, y);
        assert!(d <= 1e-3, "fused vs generic {d}");
    }
}

/// A small random adapter on q_proj and v_proj (the paper's targets) and down_proj.
fn random_adapter(model: &Llama) -> LoraAdapter {
    let cfg = model.config();
    let mut adapter = LoraAdapter::new();
    let r = 8;
    for layer in [0, 7, cfg.num_layers - 1] {
        for proj in [Projection::QProj, Projection::VProj, Projection::DownProj] {
            let (din, dout) = proj.dims(cfg);
            let a = Tensor::randn(0f32, 0.05, (r, din), &Device::Cpu).unwrap();
            let b = Tensor::randn(0f32, 0.05, (dout, r), &Device::Cpu).unwrap();
            let pair = LoraPair {
                a,
                b,
                scale: 32.0 / r as f64,
            };
            adapter.insert(cfg, layer, proj, pair).unwrap();
        }
    }
    adapter
}

#[test]
fn lora_runtime_path_matches_merged_weights_and_changes_logits() {
    let base = model();
    let adapter = random_adapter(base);
    let runtime = padded_cached_scores(base, Some(&adapter));
    let runtime_generic = padded_cached_scores(&generic(base), Some(&adapter));
    let mut merged = base.clone();
    merged.merge_lora(&adapter).unwrap();
    let merged = padded_cached_scores(&merged, None);
    let plain = padded_cached_scores(base, None);
    for i in 0..2 {
        assert!(max_abs_diff(&runtime[i], &merged[i]) <= 1e-3);
        assert!(max_abs_diff(&runtime[i], &runtime_generic[i]) <= 1e-3);
        assert!(
            max_abs_diff(&runtime[i], &plain[i]) > 1e-2,
            "adapter had no effect"
        );
    }
}

#[test]
fn lora_shapes_are_checked() {
    let m = model();
    let mut adapter = LoraAdapter::new();
    let bad = LoraPair {
        a: Tensor::zeros((8, 100), DType::F32, &Device::Cpu).unwrap(),
        b: Tensor::zeros((576, 8), DType::F32, &Device::Cpu).unwrap(),
        scale: 4.0,
    };
    assert!(adapter
        .insert(m.config(), 0, Projection::QProj, bad)
        .is_err());
}

/// Gradients reach the LoRA matrices through the differentiable path (the training hook), and
/// that path computes the same logits.
#[test]
fn lora_gets_gradients_on_the_differentiable_path() {
    let mut m = model().clone();
    m.set_kernels(Kernels::Differentiable);
    let a = padded_cached_scores(model(), None);
    let b = padded_cached_scores(&m, None);
    for (x, y) in a.iter().zip(&b) {
        assert!(max_abs_diff(x, y) <= 1e-3);
    }
    let cfg = m.config();
    let (din, dout) = Projection::QProj.dims(cfg);
    let a = candle_core::Var::randn(0f32, 0.05, (4, din), &Device::Cpu).unwrap();
    let b = candle_core::Var::randn(0f32, 0.05, (dout, 4), &Device::Cpu).unwrap();
    let mut adapter = LoraAdapter::new();
    let pair = LoraPair {
        a: a.as_tensor().clone(),
        b: b.as_tensor().clone(),
        scale: 2.0,
    };
    adapter.insert(cfg, 3, Projection::QProj, pair).unwrap();
    let ids = pseudo_random_ids(6, 71);
    let out = m
        .forward(
            &TokenBatch::left_padded(&[&ids], m.device()).unwrap(),
            None,
            Some(&adapter),
            Positions::All,
        )
        .unwrap();
    let logits = m.full_logits(&out.last_hidden().unwrap()).unwrap();
    let loss =
        candle_nn::loss::cross_entropy(&logits, &Tensor::new(&[49u32], &Device::Cpu).unwrap())
            .unwrap();
    let grads = loss.backward().unwrap();
    let ga = grads.get(a.as_tensor()).expect("gradient for A");
    let norm: f32 = ga.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert!(norm > 0.0);
}
