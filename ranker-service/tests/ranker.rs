//! End-to-end scoring on the shipped model: cached and uncached paths agree.

mod common;

use candle_core::Tensor;
use ranker_service::peft::{save_adapter, PeftLoraConfig};
use ranker_service::sample::movielens_request;
use ranker_service::{
    LoadOptions, LoraAdapter, LoraPair, Positions, Projection, PromptTemplate, Ranker,
    RankerModelConfig, ScoreInput, TokenBatch, WeightPrecision,
};

use common::{max_abs_diff, ranker, require_model};

#[test]
fn history_cache_and_batching_give_the_same_scores() {
    let ranker = ranker();
    let (history, candidates) = movielens_request();
    let short_history = &history[..5];
    let req_a = ranker.prepare(&history, &candidates).unwrap();
    let req_b = ranker.prepare(short_history, &candidates[..7]).unwrap();

    // Cold: full prompt from the shared prefix, and keep each user's history state.
    let cold = ranker
        .score_batch(&[
            ScoreInput {
                request: &req_a,
                history_cache: None,
                want_history_cache: true,
            },
            ScoreInput {
                request: &req_b,
                history_cache: None,
                want_history_cache: true,
            },
        ])
        .unwrap();
    assert_eq!(cold[0].logits.len(), 20);
    assert_eq!(cold[1].logits.len(), 7);
    let sum: f32 = cold[1].probabilities.iter().sum();
    assert!((sum - 1.0).abs() < 1e-5);

    // Unbatched, no cache at all (the reference for the other paths).
    let alone = ranker.score(&history, &candidates).unwrap();
    assert!(max_abs_diff(&alone.logits, &cold[0].logits) <= 1e-3);

    // Returning users: only the candidate part runs.
    let warm = ranker
        .score_batch(&[
            ScoreInput {
                request: &req_b,
                history_cache: cold[1].history_cache.as_ref(),
                want_history_cache: false,
            },
            ScoreInput {
                request: &req_a,
                history_cache: cold[0].history_cache.as_ref(),
                want_history_cache: false,
            },
        ])
        .unwrap();
    assert_eq!(warm[1].tokens_run, req_a.prompt.candidates().len());
    assert!(max_abs_diff(&warm[1].logits, &cold[0].logits) <= 1e-3);
    assert!(max_abs_diff(&warm[0].logits, &cold[1].logits) <= 1e-3);
    eprintln!("logits {:?}", &alone.logits[..5]);
}

#[test]
fn a_peft_adapter_directory_is_merged_at_load_and_scores_like_the_unmerged_lora_path() {
    let config = RankerModelConfig {
        model: require_model(),
        tokenizer: None,
        precision: WeightPrecision::F32,
        template: PromptTemplate::alpaca(),
    };
    let plain = Ranker::load(&config, &LoadOptions::default()).unwrap();
    let model = plain.model();
    let cfg = model.config();
    let targets = [Projection::QProj, Projection::VProj];
    let mut adapter = LoraAdapter::new();
    for layer in 0..cfg.num_layers {
        for proj in targets {
            let (din, dout) = proj.dims(cfg);
            let pair = LoraPair {
                a: Tensor::randn(0f32, 0.05, (2, din), model.device()).unwrap(),
                b: Tensor::randn(0f32, 0.05, (dout, 2), model.device()).unwrap(),
                scale: 16.0,
            };
            adapter.insert(cfg, layer, proj, pair).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    save_adapter(dir.path(), &adapter, &PeftLoraConfig::new(2, 32.0, &targets)).unwrap();
    let tuned =
        Ranker::load_with_adapter(&config, Some(dir.path()), &LoadOptions::default()).unwrap();

    let (history, candidates) = movielens_request();
    let merged = tuned.score(&history, &candidates).unwrap();
    let base = plain.score(&history, &candidates).unwrap();
    assert!(max_abs_diff(&merged.logits, &base.logits) > 1e-2);
    // The reference: base weights with the adapter applied per token.
    let request = plain.prepare(&history, &candidates).unwrap();
    let batch = TokenBatch::left_padded(&[&request.prompt.ids], model.device()).unwrap();
    let out = model
        .forward(&batch, None, Some(&adapter), Positions::Last)
        .unwrap();
    let head = model.token_head(plain.verbalizer().token_ids()).unwrap();
    let reference: Vec<f32> = head
        .logits(&out.last_hidden().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(max_abs_diff(&merged.logits, &reference) <= 1e-3);
}

/// The adapter `llamarec up` loads by default (`[ranker] adapter` in the shipped config): a PEFT
/// directory written by `llamarec train ranker`, with its training report beside it. It must load,
/// match the report's recipe, and change the scores.
#[test]
fn the_shipped_adapter_loads_and_changes_the_scores() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let shipped = std::fs::read_to_string(root.join("deploy/local/llamarec.toml")).unwrap();
    let line = shipped
        .lines()
        .find(|l| l.trim_start().starts_with("adapter ="))
        .expect("the shipped config sets [ranker] adapter");
    let dir = root.join(line.split('"').nth(1).expect("a quoted path"));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("training_report.json")).unwrap())
            .unwrap();
    let peft: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(peft["r"], report["config"]["r"]);
    assert!(report["best_step"].as_u64().unwrap() > 0, "the report names a trained step");

    let config = RankerModelConfig {
        model: require_model(),
        tokenizer: None,
        precision: WeightPrecision::F32,
        template: PromptTemplate::alpaca(),
    };
    let tuned = Ranker::load_with_adapter(&config, Some(&dir), &LoadOptions::default()).unwrap();
    let (history, candidates) = movielens_request();
    let base = ranker().score(&history, &candidates).unwrap();
    let merged = tuned.score(&history, &candidates).unwrap();
    assert!(max_abs_diff(&merged.logits, &base.logits) > 1e-2, "the adapter changes the scores");
}
