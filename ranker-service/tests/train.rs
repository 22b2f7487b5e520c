//! LoRA training: gradients of the differentiable forward pass against finite differences, a
//! few optimizer steps lowering the loss, and the whole training loop (checkpoint, resume,
//! PEFT output) on a tiny random model with the shipped tokenizer.

mod common;

use common::tiny::{perturb_b, shipped_renderer, tiny_config, tiny_model};

use candle_core::{DType, Device, Tensor};
use ranker_service::train::{
    self, AdamW, AdamWConfig, LossKind, RankerTrainConfig, TrainInputs, TrainableLora,
    ValidationCase,
};
use ranker_service::{Llama, Projection, Verbalizer};

fn recipe() -> RankerTrainConfig {
    RankerTrainConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec![Projection::QProj, Projection::VProj],
        ..Default::default()
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    let renderer = shipped_renderer();
    let verbalizer = Verbalizer::new(&renderer).unwrap();
    // Vocabulary large enough for the letter tokens (ids 49..68); f64 so that central
    // differences are accurate.
    let model = tiny_model(tiny_config(96), DType::F64, 5);
    let lora = TrainableLora::init(&model, &recipe(), 9).unwrap();
    perturb_b(&lora, 11);
    let ids: Vec<u32> = (0..23).map(|i| (i * 37 + 5) % 96).collect();
    for loss_kind in [LossKind::AnswerToken, LossKind::Letters] {
        let loss = |m: &Llama| -> f64 {
            train::example_loss(m, &lora.adapter, &verbalizer, &ids, 3, 20, loss_kind)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let l = train::example_loss(&model, &lora.adapter, &verbalizer, &ids, 3, 20, loss_kind)
            .unwrap();
        let grads = l.backward().unwrap();
        let mut checked = 0;
        for (pi, p) in lora.params.iter().enumerate() {
            let g = grads
                .get(p.var.as_tensor())
                .expect("every LoRA matrix gets a gradient");
            let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f64> = p.var.flatten_all().unwrap().to_vec1().unwrap();
            // A few coordinates of each matrix.
            for k in [0, base.len() / 2 + pi % 3, base.len() - 1] {
                let eps = 1e-4;
                let mut plus = base.clone();
                plus[k] += eps;
                p.var
                    .set(&Tensor::from_vec(plus, p.var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let lp = loss(&model);
                let mut minus = base.clone();
                minus[k] -= eps;
                p.var
                    .set(&Tensor::from_vec(minus, p.var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let lm = loss(&model);
                p.var
                    .set(&Tensor::from_vec(base.clone(), p.var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let numeric = (lp - lm) / (2.0 * eps);
                let tol = 1e-5 * numeric.abs().max(g[k].abs()) + 1e-7;
                assert!(
                    (numeric - g[k]).abs() <= tol,
                    "{loss_kind:?} {} [{k}]: analytic {} numeric {numeric}",
                    p.name,
                    g[k]
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 3 * 8, "2 layers x 2 projections x (A, B)");
    }
}

#[test]
fn a_few_steps_lower_the_loss_and_touch_only_lora() {
    let renderer = shipped_renderer();
    let verbalizer = Verbalizer::new(&renderer).unwrap();
    let model = tiny_model(tiny_config(96), DType::F32, 21);
    let embed_before: Vec<f32> = model
        .weights()
        .embed
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let cfg = RankerTrainConfig {
        r: 4,
        alpha: 8.0,
        ..recipe()
    };
    let lora = TrainableLora::init(&model, &cfg, 3).unwrap();
    let data: Vec<(Vec<u32>, usize)> = (0..4)
        .map(|s| {
            (
                (0..30).map(|i| (i * 13 + s * 7 + 1) % 96).collect(),
                (s as usize * 5) % 20,
            )
        })
        .collect();
    let loss = |ids: &[u32], y: usize| {
        train::example_loss(
            &model,
            &lora.adapter,
            &verbalizer,
            ids,
            y,
            20,
            LossKind::AnswerToken,
        )
        .unwrap()
    };
    let mean_loss = || -> f64 {
        data.iter()
            .map(|(ids, y)| loss(ids, *y).to_scalar::<f32>().unwrap() as f64)
            .sum::<f64>()
            / 4.0
    };
    let before = mean_loss();
    let mut opt = AdamW::new(
        &lora.params,
        AdamWConfig {
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
    )
    .unwrap();
    for _ in 0..15 {
        // One optimizer step over all four examples (gradient accumulation).
        let mut acc: Vec<Option<Tensor>> = vec![None; lora.params.len()];
        for (ids, y) in &data {
            let l = (loss(ids, *y) / 4.0).unwrap();
            let g = l.backward().unwrap();
            for (slot, p) in acc.iter_mut().zip(&lora.params) {
                let gi = g.get(p.var.as_tensor()).unwrap().clone();
                *slot = Some(match slot.take() {
                    Some(prev) => (prev + gi).unwrap(),
                    None => gi,
                });
            }
        }
        let grads: Vec<Tensor> = acc.into_iter().map(Option::unwrap).collect();
        opt.step(&lora.params, &grads, 3e-2, Some(1.0)).unwrap();
    }
    let after = mean_loss();
    assert!(after < 0.5 * before, "loss {before} -> {after}");
    let embed_after: Vec<f32> = model
        .weights()
        .embed
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(embed_before, embed_after, "the base model is frozen");
}

/// The whole loop on a tiny random model with the real tokenizer and template: validation at
/// the start and the end, a PEFT adapter and report in the output directory, and a run stopped
/// after 4 examples and resumed equal to one run of 8.
#[test]
fn training_loop_writes_a_peft_adapter_and_resumes_exactly() {
    let renderer = shipped_renderer();
    let model = tiny_model(
        tiny_config(renderer.tokenizer().vocab_size()),
        DType::F32,
        33,
    );
    let titles: Vec<String> = std::iter::once("padding".to_string())
        .chain((1..=60).map(|i| format!("Movie number {i} ({})", 1950 + i)))
        .collect();
    let seqs: Vec<Vec<u32>> = (0..6)
        .map(|u| {
            (0..12)
                .map(|i| 1 + ((u * 11 + i * 7) % 60) as u32)
                .collect()
        })
        .collect();
    let validation: Vec<ValidationCase> = (0..4)
        .map(|u| ValidationCase {
            history: seqs[u][..10].to_vec(),
            candidates: (1..=20).map(|c| ((c + u as u32 * 9) % 60) + 1).collect(),
            retriever_scores: (0..20).map(|c| -(c as f32) * 0.3).collect(),
            target: seqs[u][10],
        })
        .collect();
    let hard = |history: &[u32], n: usize| -> anyhow::Result<Vec<u32>> {
        Ok((1..=60u32)
            .rev()
            .filter(|i| !history.contains(i))
            .take(n)
            .collect())
    };
    let inputs = TrainInputs {
        titles: &titles,
        sequences: seqs.iter().map(Vec::as_slice).collect(),
        validation: &validation,
        hard_negatives: &hard,
        description: "tiny".into(),
    };
    let mut cfg = RankerTrainConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.1,
        grad_accum: 2,
        warmup_steps: 2,
        lr: 1e-2,
        max_examples: 8,
        eval_every_steps: 2,
        checkpoint_every_steps: 1,
        negatives: train::NegativeKind::Mixed,
        ..Default::default()
    };
    // Every run below trains the same model on the same examples; only the recipe, the
    // directory and what is watched change.
    let run =
        |cfg: &RankerTrainConfig, dir: &std::path::Path, on_event: &mut dyn FnMut(train::Event)| {
            train::train(&model, &renderer, &inputs, cfg, dir, true, on_event)
        };
    let one = tempfile::tempdir().unwrap();
    let mut evals = 0;
    let report = run(&cfg, one.path(), &mut |e| {
        if let train::Event::Evaluation { .. } = e {
            evals += 1
        }
    })
    .unwrap();
    assert_eq!((report.examples, report.steps), (8, 4));
    assert_eq!(
        report
            .evaluations
            .iter()
            .map(|e| e.step)
            .collect::<Vec<_>>(),
        vec![0, 2, 4]
    );
    assert_eq!(evals, 3);
    assert!(report.evaluations.iter().all(|e| e.all_users.users == 4));
    // Every validation also scores the gateway's fused order at each weight; users whose target
    // is not a candidate stay misses there too.
    for e in &report.evaluations {
        let weights: Vec<f32> = e.fused.iter().map(|f| f.weight).collect();
        assert_eq!(weights, ranker_service::train::FUSION_WEIGHTS);
        for f in &e.fused {
            assert_eq!(f.all_users.users, 4);
            assert_eq!(f.all_users.get(20).recall, e.all_users.get(20).recall);
        }
    }
    let valid = validation
        .iter()
        .filter(|c| c.candidates.contains(&c.target))
        .count();
    assert_eq!(
        report.evaluations[0].llm_calls, valid,
        "the LLM runs only where the target is a candidate"
    );
    assert_eq!(report.step_losses.len(), 4);
    assert!(one.path().join("training_report.json").exists());
    let (best, peft) =
        ranker_service::peft::load_adapter(one.path(), model.config(), &Device::Cpu, DType::F32)
            .unwrap();
    assert_eq!(
        (peft.r, peft.lora_alpha, peft.target_modules.clone()),
        (2, 4.0, vec!["q_proj".to_string(), "v_proj".to_string()])
    );
    assert_eq!(best.pairs().count(), 2 * 2);

    // Stop after 4 examples, then resume to 8.
    let two = tempfile::tempdir().unwrap();
    cfg.max_examples = 4;
    run(&cfg, two.path(), &mut |_| {}).unwrap();
    cfg.max_examples = 8;
    let mut resumed = false;
    let again = run(&cfg, two.path(), &mut |e| {
        if let train::Event::Start {
            done, resumed: r, ..
        } = e
        {
            resumed = r && done == 4;
        }
    })
    .unwrap();
    assert!(resumed);
    assert_eq!(
        again.step_losses, report.step_losses,
        "resumed run = uninterrupted run"
    );
    let load = |d: &std::path::Path| {
        ranker_service::peft::load_adapter(
            &train::checkpoint_dir(d),
            model.config(),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap()
        .0
    };
    let (a, b) = (load(one.path()), load(two.path()));
    for ((l, p), pair) in a.pairs() {
        let other = b.get(*l, *p).unwrap();
        let d: f32 = (&pair.b - &other.b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(d, 0.0);
    }
    // A different recipe refuses to resume.
    cfg.r = 4;
    let e = run(&cfg, two.path(), &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("different recipe"), "{e}");

    // The overfit diagnostic repeats 2 examples with the same candidates and letters, so the
    // loss falls well below ln 20 (~3.0, a uniform guess among the letters).
    let three = tempfile::tempdir().unwrap();
    let overfit = RankerTrainConfig {
        r: 2,
        overfit_examples: 2,
        max_examples: 200,
        dropout: 0.0,
        lr: 3e-2,
        eval_every_steps: 1000,
        ..cfg.clone()
    };
    let report = run(&overfit, three.path(), &mut |_| {}).unwrap();
    assert_eq!((report.examples, report.steps), (200, 100));
    let (first, last) = (report.step_losses[0], *report.step_losses.last().unwrap());
    assert!(last < 2.0, "overfitting 2 examples: step loss {first} -> {last}");
    // Without a budget the repeats would never end.
    let e = run(&RankerTrainConfig { max_examples: 0, ..overfit }, three.path(), &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("overfit_examples"), "{e}");
}

#[test]
fn the_ranker_train_section_parses_and_bad_values_name_their_key() {
    use llamarec_common::config::ConfigLayers;
    use ranker_service::service_config::RankerServiceConfig;
    let load = |toml: &str| {
        let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(file.path(), toml).unwrap();
        ConfigLayers::load_with_env(Some(file.path()), Some(Vec::new()))
            .unwrap()
            .section::<RankerServiceConfig>()
            .map_err(|e| e.to_string())
    };
    let c = load("[ranker]\nthreads = 2\n[ranker.train]\nr = 4\ntargets = [\"q_proj\", \"o_proj\"]\nnegatives = \"mixed\"\nloss = \"letters\"\n").unwrap();
    assert_eq!((c.train.r, c.train.alpha), (4, 32.0));
    assert_eq!(c.train.targets, vec![Projection::QProj, Projection::OProj]);
    assert_eq!(
        (c.train.negatives, c.train.loss),
        (train::NegativeKind::Mixed, LossKind::Letters)
    );
    assert_eq!(
        load("[ranker]\n").unwrap().train,
        RankerTrainConfig::default()
    );
    for (line, key) in [
        ("r = 0", "ranker.train.r"),
        ("dropout = 1.5", "ranker.train.dropout"),
        ("targets = [\"lm_head\"]", "ranker.train.targets"),
        ("epochs = 3", "unknown field `epochs`"),
    ] {
        let e = load(&format!("[ranker.train]\n{line}\n")).unwrap_err();
        assert!(e.contains(key), "{line}: {e}");
    }
}
