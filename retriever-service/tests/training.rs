//! Training end to end on a small synthetic data set: learning, checkpoint layout, resuming,
//! step recurrence against the training graph on the trained model, and the retriever on top.

use candle_core::{Device, Tensor};
use llamarec_common::data::{Dataset, Item, UserHistory};
use retriever_service::checkpoint::{Checkpoint, CONFIG_FILE, ITEMS_FILE, MODEL_FILE, REPORT_FILE};
use retriever_service::model::LruRec;
use retriever_service::{CandidateSource, Encoder, LruRecConfig, Retriever, RetrieverError, TrainConfig};
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
        optimizer: retriever_service::optim::AdamWConfig { lr: 5e-3, ..Default::default() },
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
    let model = LruRec::from_tensors(&checkpoint.config, &checkpoint.tensors, &Device::Cpu).unwrap();
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
    assert!(worst <= 1e-4, "trained model: parallel scan vs step recurrence differ by {worst}");

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
