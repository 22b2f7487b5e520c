//! The shipped ML-100K checkpoints against the real data set (the assets must have been fetched
//! with `llamarec fetch`; without them these tests fail, they do not skip): the single LRURec
//! model and the shipped ensemble reproduce their reports' validation and test metrics through the
//! serving encoder, and the LRURec serving encoder agrees with the training graph on real histories.

use candle_core::{Device, Tensor};
use llamarec_common::data::{DataConfig, Dataset, Split};
use retriever_service::checkpoint::{read_json, Checkpoint, REPORT_FILE};
use retriever_service::train::evaluate::{evaluate, split_cases};
use retriever_service::train::sequence_model::SequenceModel;
use retriever_service::{Encoder, TrainReport};
use std::path::Path;

#[test]
fn shipped_checkpoint_reproduces_its_report_and_its_training_graph() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let assets = root.join("../assets");
    let inter = assets.join("ml-100k/ml-100k.inter");
    assert!(
        inter.is_file(),
        "{} is missing: this test needs the ML-100K assets; run `cargo llamarec fetch` first",
        inter.display()
    );
    let dir = root.join("checkpoints/ml-100k");
    let dataset = Dataset::load(&DataConfig::default(), &assets).unwrap();
    let checkpoint = Checkpoint::load(&dir).unwrap();
    let report: TrainReport = read_json(&dir.join(REPORT_FILE)).unwrap();
    assert_eq!(checkpoint.config.num_items, dataset.num_items());
    assert_eq!(checkpoint.config, report.config.model, "config.json and report.json describe the same model");

    let encoder = Encoder::new(&checkpoint.config, &checkpoint.tensors).unwrap();
    for (split, want) in [(Split::Validation, &report.validation), (Split::Test, &report.test)] {
        let got = evaluate(&encoder, &split_cases(&dataset, split), 2).unwrap();
        assert_eq!(got.users, 943);
        for k in [1, 5, 10, 20] {
            let (got, want) = (got.get(k), want.get(k));
            let same = (got.recall - want.recall).abs() < 1e-9 && (got.ndcg - want.ndcg).abs() < 1e-9;
            assert!(same, "{split:?} @{k}: {got:?} vs the report's {want:?}");
        }
    }

    let model = SequenceModel::from_tensors(&checkpoint.config, &checkpoint.tensors, &Device::Cpu).unwrap();
    let d = checkpoint.config.embed_dim;
    let mut worst = 0f32;
    for example in dataset.eval_examples(Split::Test).step_by(47) {
        let history = &example.history[example.history.len().saturating_sub(checkpoint.config.max_len)..];
        let tokens = Tensor::new(history, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let graph = model.forward(&tokens, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let served = encoder.hidden_states(history).unwrap();
        assert_eq!(graph.len(), history.len() * d);
        worst = graph.iter().zip(&served).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
    }
    assert!(worst <= 1e-4, "trained model on real histories: training graph vs serving encoder differ by {worst}");
}

/// The shipped ensemble (the compiled-in default checkpoint): it loads as an ensemble of its
/// manifest's members, its report's validation and test metrics reproduce through the serving
/// encoder, and each member's own report matches what the ensemble's report lists for it.
#[test]
fn shipped_ensemble_reproduces_its_report() {
    use retriever_service::ensemble::EnsembleReport;
    use retriever_service::service_config::RetrieverServiceConfig;
    use retriever_service::Retriever;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let assets = root.join("../assets");
    assert!(assets.join("ml-100k/ml-100k.inter").is_file(), "the ML-100K assets are missing; run `cargo llamarec fetch` first");
    let dir = root.join("..").join(RetrieverServiceConfig::default().checkpoint);
    assert!(dir.ends_with("checkpoints/ml-100k-ensemble"), "{}", dir.display());
    let dataset = Dataset::load(&DataConfig::default(), &assets).unwrap();
    let retriever = Retriever::load(&dir).unwrap();
    let report: EnsembleReport = read_json(&dir.join(REPORT_FILE)).unwrap();
    assert_eq!(retriever.encoder().family(), "ensemble");
    assert_eq!(retriever.encoder().members().len(), report.members.len());
    let families: Vec<&str> = retriever.encoder().members().iter().map(|m| m.family()).collect();
    assert_eq!(families, ["lrurec", "sasrec", "sasrec", "sasrec"]);
    for member in &report.members {
        let own: TrainReport = read_json(&dir.join(&member.dir).join(REPORT_FILE)).unwrap();
        assert_eq!((own.best_epoch, own.config.seed), (member.best_epoch, member.seed), "{}", member.dir.display());
    }
    for (split, want) in [(Split::Validation, &report.validation), (Split::Test, &report.test)] {
        let got = evaluate(retriever.encoder(), &split_cases(&dataset, split), 2).unwrap();
        assert_eq!(got.users, 943);
        for k in [1, 5, 10, 20, 50, 100] {
            let (got, want) = (got.get(k), want.get(k));
            let same = (got.recall - want.recall).abs() < 1e-9 && (got.ndcg - want.ndcg).abs() < 1e-9;
            assert!(same, "{split:?} @{k}: {got:?} vs the report's {want:?}");
        }
    }
}
