//! The native training step (hand-derived backward) against candle's autograd over the
//! differentiable forward pass, which `train.rs` checks against finite differences: same loss,
//! same gradients, with and without LoRA dropout, for every projection a pair can sit on, on a
//! tiny model and on the shipped model.

mod common;

use candle_core::DType;
use common::tiny::{perturb_b, shipped_renderer, tiny_config, tiny_model};
use ranker_service::train::native::{FrozenPrecision, NativeStep};
use ranker_service::train::{self, LossKind, RankerTrainConfig, TrainableLora};
use ranker_service::{Kernels, Llama, Projection, Ranker, Verbalizer};

/// Asserts that the native step's loss and gradients match autograd's for `ids`.
#[allow(clippy::too_many_arguments)]
fn assert_native_matches_autograd(
    reference: &Llama,
    native_model: &Llama,
    lora: &mut TrainableLora,
    verbalizer: &Verbalizer,
    ids: &[u32],
    label: usize,
    dropout: f32,
    loss: LossKind,
    grad_tol: f64,
) {
    let seed = 77;
    lora.adapter.set_dropout(dropout, seed);
    let l =
        train::example_loss(reference, &lora.adapter, verbalizer, ids, label, 20, loss).unwrap();
    let want_loss = l.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let grads = l.backward().unwrap();
    lora.adapter.set_dropout(0.0, 0);

    let mut step = NativeStep::new(native_model).unwrap();
    let letters = &verbalizer.token_ids()[..20];
    let scale = 0.25;
    let out = step
        .loss_and_grads(
            &lora.to_f32().unwrap(),
            Some((dropout, seed)),
            ids,
            letters,
            label,
            loss,
            scale,
        )
        .unwrap();
    assert!(
        (out.loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0),
        "{loss:?} dropout {dropout}: native loss {} autograd {want_loss}",
        out.loss
    );
    let indices = lora.param_indices();
    assert_eq!(out.grads.len(), indices.len(), "every pair gets a gradient");
    for (key, (ia, ib)) in indices {
        let g = &out.grads[&key];
        for (i, got) in [(ia, &g.a), (ib, &g.b)] {
            let p = &lora.params[i];
            let want: Vec<f64> = grads
                .get(p.var.as_tensor())
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let peak = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            assert!(peak > 0.0, "{}: zero reference gradient", p.name);
            let worst = want
                .iter()
                .zip(got.iter())
                .map(|(w, g)| (w * scale as f64 - *g as f64).abs())
                .fold(0f64, f64::max);
            assert!(
                worst <= grad_tol * peak * scale as f64,
                "{loss:?} dropout {dropout} {}: max |native - autograd| {worst:e}, peak {peak:e}",
                p.name
            );
        }
    }
}

#[test]
fn native_step_matches_autograd_on_a_tiny_model() {
    let renderer = shipped_renderer();
    let verbalizer = Verbalizer::new(&renderer).unwrap();
    // f64 reference (what the finite-difference test checks), the same weights in f32 for the
    // native step.
    let reference = tiny_model(tiny_config(96), DType::F64, 5);
    let native_model = tiny_model(tiny_config(96), DType::F32, 5);
    // 150 tokens: three query blocks, the last one partial.
    let ids: Vec<u32> = (0..150).map(|i| (i * 37 + 5) % 96).collect();
    let cases = [
        (Projection::ALL.to_vec(), 0.0, LossKind::AnswerToken),
        (Projection::ALL.to_vec(), 0.2, LossKind::Letters),
        (
            vec![Projection::QProj, Projection::VProj],
            0.05,
            LossKind::AnswerToken,
        ),
    ];
    for (targets, dropout, loss) in cases {
        let cfg = RankerTrainConfig {
            r: 2,
            alpha: 4.0,
            targets,
            ..Default::default()
        };
        let mut lora = TrainableLora::init(&reference, &cfg, 9).unwrap();
        perturb_b(&lora, 11);
        assert_native_matches_autograd(
            &reference,
            &native_model,
            &mut lora,
            &verbalizer,
            &ids,
            3,
            dropout,
            loss,
            1e-3,
        );
    }
}

#[test]
fn native_step_matches_autograd_on_the_shipped_model() {
    let base = common::model();
    let mut reference = base.clone();
    reference.set_kernels(Kernels::Differentiable);
    let ranker: &Ranker = common::ranker();
    let verbalizer = Verbalizer::new(ranker.renderer()).unwrap();
    let (history, candidates) = ranker_service::sample::movielens_request();
    let prompt = ranker.prepare(&history, &candidates).unwrap().prompt;
    // The prompt's first 200 tokens keep autograd's share of the test short; three query
    // blocks and every real dimension (9 query heads over 3 key/value heads, head 64) remain.
    let ids = &prompt.ids[..200];
    let cfg = RankerTrainConfig::default();
    let mut lora = TrainableLora::init(&reference, &cfg, 1).unwrap();
    perturb_b(&lora, 2);
    // perturb_b draws B in [-0.5, 0.5): far from a trained adapter's scale; shrink it so the
    // model stays in its normal range.
    for p in lora.params.iter().filter(|p| p.name.contains("lora_B")) {
        let small = (p.var.as_tensor() * 0.01).unwrap();
        p.var.set(&small).unwrap();
    }
    assert_native_matches_autograd(
        &reference,
        base,
        &mut lora,
        &verbalizer,
        ids,
        7,
        0.05,
        LossKind::AnswerToken,
        2e-3,
    );
}

/// The native step with bf16 frozen products against the f32 step on the full shipped prompt:
/// the loss within 2 % and every LoRA gradient within cosine 0.99 and norm 10 % (bf16 rounds
/// activations and weights to 8 significant bits; the sums, LoRA pairs and gradients stay f32).
#[test]
fn native_bf16_step_agrees_with_f32() {
    let Some(kernel) = ranker_service::bf16_gemm::Bf16Kernel::detect() else {
        eprintln!("SKIPPED: this CPU has no AVX-512 BF16; the bf16 training step is checked where it has");
        return;
    };
    let base = common::model();
    let ranker: &Ranker = common::ranker();
    let verbalizer = Verbalizer::new(ranker.renderer()).unwrap();
    let (history, candidates) = ranker_service::sample::movielens_request();
    let ids = ranker.prepare(&history, &candidates).unwrap().prompt.ids;
    let cfg = RankerTrainConfig::default();
    let lora = TrainableLora::init(base, &cfg, 1).unwrap();
    perturb_b(&lora, 2);
    for p in lora.params.iter().filter(|p| p.name.contains("lora_B")) {
        p.var.set(&(p.var.as_tensor() * 0.01).unwrap()).unwrap();
    }
    let pairs = lora.to_f32().unwrap();
    let letters = &verbalizer.token_ids()[..20];
    let run = |precision| {
        let mut step = NativeStep::with_precision(base, precision).unwrap();
        step.loss_and_grads(&pairs, Some((0.05, 9)), &ids, letters, 7, LossKind::AnswerToken, 1.0).unwrap()
    };
    let f32_out = run(FrozenPrecision::F32);
    let bf16_out = run(FrozenPrecision::Bf16(kernel));
    let rel = (bf16_out.loss - f32_out.loss).abs() / f32_out.loss.abs();
    eprintln!("{} tokens, {kernel:?}: loss f32 {:.5} bf16 {:.5} (rel {rel:.2e})", ids.len(), f32_out.loss, bf16_out.loss);
    assert!(rel <= 0.02, "loss f32 {} vs bf16 {}", f32_out.loss, bf16_out.loss);
    let (mut worst_cos, mut worst_norm) = (1f64, 0f64);
    for (key, g) in &f32_out.grads {
        let h = &bf16_out.grads[key];
        for (a, b) in [(&g.a, &h.a), (&g.b, &h.b)] {
            let dot: f64 = a.iter().zip(b.iter()).map(|(x, y)| *x as f64 * *y as f64).sum();
            let (na, nb) = (a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt(), b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt());
            if na == 0.0 {
                continue;
            }
            worst_cos = worst_cos.min(dot / (na * nb));
            worst_norm = worst_norm.max((na - nb).abs() / na);
        }
    }
    eprintln!("gradients: worst cosine {worst_cos:.5}, worst relative norm difference {worst_norm:.4}");
    assert!(worst_cos >= 0.99, "a LoRA gradient's direction moved: cosine {worst_cos}");
    assert!(worst_norm <= 0.10, "a LoRA gradient's norm moved by {worst_norm}");
}
