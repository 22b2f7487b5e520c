//! The shipped ML-100K checkpoint against the real data set (skipped when the assets have not
//! been fetched): its report's test metrics reproduce, and the step recurrence agrees with the
//! training graph on real histories.

use candle_core::{Device, Tensor};
use llamarec_common::data::{DataConfig, Dataset, Split};
use retriever_service::checkpoint::{read_json, Checkpoint, REPORT_FILE};
use retriever_service::evaluate::{evaluate, split_cases};
use retriever_service::model::LruRec;
use retriever_service::{Encoder, TrainReport};
use std::path::Path;

#[test]
fn shipped_checkpoint_reproduces_its_report_and_its_scan() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let assets = root.join("../assets");
    if !assets.join("ml-100k/ml-100k.inter").is_file() {
        eprintln!("skipped: ML-100K assets not fetched (run `llamarec fetch`)");
        return;
    }
    let dir = root.join("checkpoints/ml-100k");
    let dataset = Dataset::load(&DataConfig::default(), &assets).unwrap();
    let checkpoint = Checkpoint::load(&dir).unwrap();
    let report: TrainReport = read_json(&dir.join(REPORT_FILE)).unwrap();
    assert_eq!(checkpoint.config.num_items, dataset.num_items());

    let encoder = Encoder::new(&checkpoint.config, &checkpoint.tensors).unwrap();
    let test = evaluate(&encoder, &split_cases(&dataset, Split::Test), 2).unwrap();
    for k in [1, 5, 10, 20] {
        let (got, want) = (test.get(k), report.test.get(k));
        assert!((got.recall - want.recall).abs() < 1e-9 && (got.ndcg - want.ndcg).abs() < 1e-9, "@{k}: {got:?} vs {want:?}");
    }

    let model = LruRec::from_tensors(&checkpoint.config, &checkpoint.tensors, &Device::Cpu).unwrap();
    let d = checkpoint.config.embed_dim;
    let mut worst = 0f32;
    for example in dataset.eval_examples(Split::Test).step_by(47) {
        let history = &example.history[example.history.len().saturating_sub(checkpoint.config.max_len)..];
        let tokens = Tensor::new(history, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let graph = model.forward(&tokens, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let steps = encoder.hidden_states(history).unwrap();
        assert_eq!(graph.len(), history.len() * d);
        worst = graph.iter().zip(&steps).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
    }
    assert!(worst <= 1e-4, "trained model on real histories: scan vs step recurrence differ by {worst}");
}
