//! Training end to end on a small synthetic data set: learning, checkpoint layout, resuming,
//! the serving encoder against the training graph on the trained model, and the retriever on
//! top, for LRURec and SASRec.

use candle_core::{Device, Tensor};
use llamarec_common::data::{Dataset, Item, UserHistory};
use retriever_service::checkpoint::{Checkpoint, CONFIG_FILE, ITEMS_FILE, MODEL_FILE, REPORT_FILE};
use retriever_service::train::sequence_model::SequenceModel;
use retriever_service::{CandidateSource, Encoder, LruRecConfig, ModelKind, Retriever, RetrieverError, TrainConfig};
use std::path::Path;

const ITEMS: u32 = 30;

/// Users walk the catalog in steps of +1 (wrapping), from different starting items, with
/// different lengths; item 1 is also sprinkled in so that popularity has a clear winner.
fn synthetic() -> Dataset {
    let items = (0..=ITEMS)
        .map(|i| Item { id: if i == 0 { String::new() } else { format!("m{i}") }, title: format!("Movie {i}") })
        .collect();
    let users = (0..80u32)
        .map(|u| {
            let len = 8 + (u as usize * 7) % 25;
            let mut seq: Vec<u32> = (0..len as u32).map(|t| (u * 3 + t) % ITEMS + 1).collect();
            if u % 2 == 0 {
                seq.insert(1, 1);
            }
            UserHistory { id: format!("u{u}"), timestamps: (0..seq.len() as i64).collect(), items: seq }
        })
        .collect();
    Dataset { name: "synthetic".into(), items, users }
}

fn config(max_epochs: usize) -> TrainConfig {
    TrainConfig {
        model: LruRecConfig { embed_dim: 16, state_dim: 16, ffn_dim: 32, dropout: 0.1, max_len: 20, ..LruRecConfig::default() },
        optimizer: retriever_service::train::optim::AdamWConfig { lr: 5e-3, ..Default::default() },
        max_epochs,
        patience: 100,
        progress: false,
        ..TrainConfig::default()
    }
}

#[test]
fn learns_the_pattern_writes_a_checkpoint_and_resumes_identically() {
    let data = synthetic();
    let dir = tempfile::tempdir().unwrap();

    let full = retriever_service::train(&data, &config(6), &dir.path().join("full")).unwrap();
    for file in [MODEL_FILE, CONFIG_FILE, ITEMS_FILE, REPORT_FILE] {
        assert!(dir.path().join("full").join(file).is_file(), "{file} missing");
    }
    assert_eq!(full.epochs, 6);
    assert_eq!(full.data.users, 80);
    assert!(full.validation.get(10).recall > 0.9, "pattern not learnt: {:?}", full.validation);
    assert!(full.test.get(10).recall > 0.9, "pattern not learnt: {:?}", full.test);

    // Three epochs, then a second run that continues to six: same trajectory as one run.
    let split = dir.path().join("split");
    retriever_service::train(&data, &config(3), &split).unwrap();
    let resumed = retriever_service::train(&data, &config(6), &split).unwrap();
    assert_eq!(resumed.epochs, 6);
    for (a, b) in full.history.iter().zip(&resumed.history) {
        assert!((a.train_loss - b.train_loss).abs() < 1e-9, "epoch {}: {} vs {}", a.epoch, a.train_loss, b.train_loss);
        assert_eq!(a.val_recall_at_10, b.val_recall_at_10);
    }
    assert_eq!(full.test, resumed.test);

    check_trained_model(&dir.path().join("full"), &data);
}

/// The trained model: step recurrence = parallel scan, and the retriever's behaviour.
fn check_trained_model(dir: &Path, data: &Dataset) {
    let checkpoint = Checkpoint::load(dir).unwrap();
    let model = SequenceModel::from_tensors(&checkpoint.config, &checkpoint.tensors, &Device::Cpu).unwrap();
    let encoder = Encoder::new(&checkpoint.config, &checkpoint.tensors).unwrap();
    let d = checkpoint.config.embed_dim;
    let mut worst = 0f32;
    for user in data.users.iter().take(10) {
        let seq = &user.items[..user.items.len().min(checkpoint.config.max_len)];
        let tokens = Tensor::new(seq, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let graph = model.forward(&tokens, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let steps = encoder.hidden_states(seq).unwrap();
        assert_eq!(graph.len(), seq.len() * d);
        worst = graph.iter().zip(&steps).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
    }
    assert!(worst <= 1e-4, "trained model: training graph vs serving encoder differ by {worst}");

    let retriever = Retriever::load(dir).unwrap();
    let popular = retriever.retrieve(&[], 3, true).unwrap();
    assert_eq!(popular.source, CandidateSource::Popularity);
    assert_eq!(popular.candidates[0].item, retriever.catalog().index_of("m1").unwrap(), "item 1 is the most frequent");

    // User 1's first three items.
    let history = [4, 5, 6];
    let got = retriever.retrieve(&history, 5, true).unwrap();
    assert_eq!(got.source, CandidateSource::Model);
    assert_eq!(got.candidates.len(), 5);
    assert_eq!(got.candidates[0].item, 7, "the walk continues with item 7: {:?}", got.candidates);
    assert!(got.candidates.iter().all(|c| !history.contains(&c.item)));
    assert!(got.candidates.windows(2).all(|w| w[0].score >= w[1].score));
    let kept = retriever.retrieve(&history, ITEMS as usize, false).unwrap();
    assert_eq!(kept.candidates.len(), ITEMS as usize, "every real item, none twice, padding never");
    assert!(matches!(retriever.retrieve(&[4, ITEMS + 1], 5, true), Err(RetrieverError::UnknownItem { .. })));
}

#[test]
fn sasrec_learns_the_pattern_and_its_checkpoint_serves_with_cached_states() {
    let data = synthetic();
    let dir = tempfile::tempdir().unwrap();
    let mut recipe = config(8);
    recipe.model.kind = ModelKind::SasRec;
    recipe.model.num_heads = 2;
    recipe.first_item_target = false;
    let report = retriever_service::train(&data, &recipe, dir.path()).unwrap();
    assert!(report.validation.get(10).recall > 0.9, "pattern not learnt: {:?}", report.validation);
    assert!(report.validation.get(100).recall >= report.validation.get(10).recall, "R@100 reported");
    let text = std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap();
    assert!(text.contains("\"kind\": \"sasrec\""), "{text}");
    assert_eq!(Checkpoint::load(dir.path()).unwrap().config.kind, ModelKind::SasRec);
    check_trained_model(dir.path(), &data);

    // Served with a state cache: a returning user's answer equals the uncached one.
    let cached = Retriever::load(dir.path()).unwrap().with_state_cache(1 << 20);
    let history = [10, 11, 12, 13];
    let first = cached.retrieve(&history, 5, true).unwrap();
    assert_eq!(cached.retrieve_if_cheap(&history, 5, true), Some(first.clone()));
    assert_eq!(Retriever::load(dir.path()).unwrap().retrieve(&history, 5, true).unwrap(), first);
    // A history longer than the window: the model reads its last max_len events.
    let long: Vec<u32> = (0..45).map(|t| t % ITEMS + 1).collect();
    let tail = &long[long.len() - recipe.model.max_len..];
    assert_eq!(cached.retrieve(&long, 5, false).unwrap(), cached.retrieve(tail, 5, false).unwrap());
}

#[test]
fn checkpoints_written_before_model_kinds_load_as_lrurec() {
    let old = r#"{"num_items": 3, "embed_dim": 64, "num_blocks": 2, "state_dim": 128, "ffn_dim": 256,
        "r_min": 0.8, "r_max": 0.99, "dropout": 0.5, "layer_norm_eps": 0.00001, "init_std": 0.02, "max_len": 200}"#;
    let config: LruRecConfig = serde_json::from_str(old).unwrap();
    assert_eq!(config.kind, ModelKind::LruRec);
    assert!(serde_json::from_str::<LruRecConfig>(r#"{"kind": "transformer"}"#).is_err(), "unknown kinds are refused");
}
