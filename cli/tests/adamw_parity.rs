//! The ranker's and the retriever's AdamW share one update (`llamarec_optim`): for the same
//! weights, gradients and hyper-parameters, both callers leave bit-identical weights, step
//! after step, with clipping on.

use candle_core::{Device, Tensor, Var};
use ranker_service::train::{AdamW as RankerAdamW, AdamWConfig as RankerConfig, NamedVar};
use retriever_service::train::optim::{AdamW as RetrieverAdamW, AdamWConfig as RetrieverConfig};
use retriever_service::train::params::Param;

#[test]
fn ranker_and_retriever_adamw_make_identical_updates() {
    let device = Device::Cpu;
    let init = [
        (
            "blocks.0.w",
            Tensor::new(&[[0.5f32, -1.25, 2.0], [0.1, 0.0, -3.0]], &device).unwrap(),
        ),
        (
            "blocks.0.u",
            Tensor::new(&[1.0f32, -0.75], &device).unwrap(),
        ),
    ];
    let grads = [
        Tensor::new(&[[3.0f32, -0.5, 0.25], [-1.0, 2.0, 0.125]], &device).unwrap(),
        Tensor::new(&[-4.0f32, 0.5], &device).unwrap(),
    ];
    let ranker: Vec<NamedVar> = init
        .iter()
        .map(|(name, t)| NamedVar {
            name: name.to_string(),
            var: Var::from_tensor(t).unwrap(),
        })
        .collect();
    let retriever: Vec<Param> = init
        .iter()
        .map(|(name, t)| Param {
            name: name.to_string(),
            var: Var::from_tensor(t).unwrap(),
        })
        .collect();
    assert!(
        retriever.iter().all(Param::decays),
        "both sides decay every tensor"
    );

    let (lr, weight_decay, beta1, beta2, eps) = (0.05, 0.1, 0.9, 0.999, 1e-8);
    let mut ranker_opt = RankerAdamW::new(
        &ranker,
        RankerConfig {
            weight_decay,
            beta1,
            beta2,
            eps,
        },
    )
    .unwrap();
    let mut retriever_opt = RetrieverAdamW::new(
        &retriever,
        RetrieverConfig {
            lr,
            weight_decay,
            beta1,
            beta2,
            eps,
        },
    )
    .unwrap();
    // The gradients' global norm is about 5.5: a limit of 2 clips every step.
    for step in 0..4 {
        // d/dw sum(w * g) = g exactly: the retriever's GradStore holds the very gradients the
        // ranker is handed.
        let loss = retriever
            .iter()
            .zip(&grads)
            .map(|(p, g)| p.var.as_tensor().mul(g).unwrap().sum_all().unwrap())
            .reduce(|a, b| (a + b).unwrap())
            .unwrap();
        let store = loss.backward().unwrap();
        let ranker_norm = ranker_opt.step(&ranker, &grads, lr, Some(2.0)).unwrap();
        let retriever_norm = retriever_opt.step(&retriever, &store, Some(2.0)).unwrap();
        assert_eq!(
            ranker_norm.to_bits(),
            retriever_norm.to_bits(),
            "step {step}"
        );
        for (a, b) in ranker.iter().zip(&retriever) {
            let a = a
                .var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = b
                .var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let (a, b): (Vec<u32>, Vec<u32>) = (
                a.iter().map(|x| x.to_bits()).collect(),
                b.iter().map(|x| x.to_bits()).collect(),
            );
            assert_eq!(a, b, "step {step}: {}", ranker[0].name);
        }
    }
    let moved = ranker[0]
        .var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((moved[0] - 0.5).abs() > 0.1, "the weights moved: {moved:?}");
}
