//! Padding, masking and KV-cache invariants of our forward pass on the shipped model.

mod common;

use ranker_service::{KvCache, Llama, Positions, TokenBatch};

use common::{max_abs_diff, model, pseudo_random_ids};

/// Letter-like ids to score (any ids work; these are "A".."E").
const IDS: [u32; 5] = [49, 50, 51, 52, 53];

fn scores_of(model: &Llama, hidden_last: &candle_core::Tensor) -> Vec<Vec<f32>> {
    let head = model.token_head(&IDS).unwrap();
    head.logits(hidden_last).unwrap().to_vec2().unwrap()
}

fn single(model: &Llama, ids: &[u32]) -> Vec<f32> {
    let batch = TokenBatch::left_padded(&[ids], model.device()).unwrap();
    let out = model.forward(&batch, None, None, Positions::Last).unwrap();
    scores_of(model, &out.last_hidden().unwrap()).remove(0)
}

#[test]
fn left_padded_batch_matches_single_runs() {
    let model = model();
    let seqs = [
        pseudo_random_ids(40, 11),
        pseudo_random_ids(17, 12),
        pseudo_random_ids(3, 13),
    ];
    let batch = TokenBatch::left_padded(&seqs, model.device()).unwrap();
    let out = model.forward(&batch, None, None, Positions::Last).unwrap();
    let batched = scores_of(model, &out.last_hidden().unwrap());
    for (seq, got) in seqs.iter().zip(&batched) {
        let want = single(model, seq);
        let diff = max_abs_diff(got, &want);
        assert!(
            diff <= 1e-3,
            "len {}: batched vs single diff {diff}",
            seq.len()
        );
    }
}

#[test]
fn token_head_matches_full_logits() {
    let model = model();
    let ids = pseudo_random_ids(9, 21);
    let batch = TokenBatch::left_padded(&[&ids], model.device()).unwrap();
    let last = model
        .forward(&batch, None, None, Positions::Last)
        .unwrap()
        .last_hidden()
        .unwrap();
    let full: Vec<f32> = model
        .full_logits(&last)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let rows = scores_of(model, &last).remove(0);
    let picked: Vec<f32> = IDS.iter().map(|&i| full[i as usize]).collect();
    assert!(max_abs_diff(&rows, &picked) <= 1e-4);
}

#[test]
fn all_positions_last_row_matches_last_only() {
    let model = model();
    let ids = pseudo_random_ids(20, 31);
    let batch = TokenBatch::left_padded(&[&ids], model.device()).unwrap();
    let all = model.forward(&batch, None, None, Positions::All).unwrap();
    assert_eq!(all.hidden.dims(), &[1, 20, model.config().hidden_size]);
    let last = model.forward(&batch, None, None, Positions::Last).unwrap();
    let a = scores_of(model, &all.last_hidden().unwrap()).remove(0);
    let b = scores_of(model, &last.last_hidden().unwrap()).remove(0);
    assert!(max_abs_diff(&a, &b) <= 1e-4);
}

#[test]
fn cached_prefix_matches_full_run() {
    let model = model();
    let prefix = pseudo_random_ids(30, 41);
    let suffix = pseudo_random_ids(12, 42);
    let full: Vec<u32> = prefix.iter().chain(&suffix).copied().collect();
    let want = single(model, &full);

    let p = TokenBatch::left_padded(&[&prefix], model.device()).unwrap();
    let cache = model
        .forward(&p, None, None, Positions::Last)
        .unwrap()
        .cache;
    assert_eq!(cache.len(), 30);
    let s = TokenBatch::left_padded(&[&suffix], model.device()).unwrap();
    let out = model
        .forward(&s, Some(&cache), None, Positions::Last)
        .unwrap();
    assert_eq!(out.cache.len(), 42);
    let got = scores_of(model, &out.last_hidden().unwrap()).remove(0);
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= 1e-3, "cached vs full diff {diff}");
}

/// The serving pattern: a shared instruction prefix, per-user history caches of different
/// lengths stacked into one batch, then each request's candidate suffix (left-padded).
#[test]
fn stacked_caches_with_padded_suffixes_match_full_runs() {
    let model = model();
    let shared = pseudo_random_ids(10, 51);
    let histories = [pseudo_random_ids(15, 52), pseudo_random_ids(4, 53)];
    let suffixes = [pseudo_random_ids(3, 54), pseudo_random_ids(9, 55)];

    let shared_cache = model
        .forward(
            &TokenBatch::left_padded(&[&shared], model.device()).unwrap(),
            None,
            None,
            Positions::Last,
        )
        .unwrap()
        .cache;
    let user_caches: Vec<KvCache> = histories
        .iter()
        .map(|h| {
            let b = TokenBatch::left_padded(&[h], model.device()).unwrap();
            model
                .forward(&b, Some(&shared_cache), None, Positions::Last)
                .unwrap()
                .cache
        })
        .collect();
    let stacked = KvCache::stack(&user_caches.iter().collect::<Vec<_>>()).unwrap();
    let batch = TokenBatch::left_padded(&suffixes, model.device()).unwrap();
    let out = model
        .forward(&batch, Some(&stacked), None, Positions::Last)
        .unwrap();
    let got = scores_of(model, &out.last_hidden().unwrap());

    for i in 0..2 {
        let full: Vec<u32> = shared
            .iter()
            .chain(&histories[i])
            .chain(&suffixes[i])
            .copied()
            .collect();
        let want = single(model, &full);
        let diff = max_abs_diff(&got[i], &want);
        assert!(diff <= 1e-3, "row {i}: diff {diff}");
    }

    // A row taken out of the batch cache continues like the original.
    let row = out.cache.row(1).unwrap();
    assert_eq!(row.batch_size(), 1);
    assert_eq!(row.token_counts(), vec![10 + 4 + 9]);
    let next = pseudo_random_ids(2, 56);
    let cont = model
        .forward(
            &TokenBatch::left_padded(&[&next], model.device()).unwrap(),
            Some(&row),
            None,
            Positions::Last,
        )
        .unwrap();
    let got = scores_of(model, &cont.last_hidden().unwrap()).remove(0);
    let full: Vec<u32> = shared
        .iter()
        .chain(&histories[1])
        .chain(&suffixes[1])
        .chain(&next)
        .copied()
        .collect();
    assert!(max_abs_diff(&got, &single(model, &full)) <= 1e-3);

    // The shared prefix repeated for a batch behaves like the batch-1 prefix.
    let rep = shared_cache.repeat(2).unwrap();
    assert_eq!(rep.batch_size(), 2);
    assert!(shared_cache.size_bytes() > 0);
}

#[test]
fn context_overflow_is_an_invalid_argument() {
    let model = model();
    let n = model.config().max_seq_len + 1;
    let ids = vec![100u32; n];
    let batch = TokenBatch::left_padded(&[&ids], model.device()).unwrap();
    let err = model
        .forward(&batch, None, None, Positions::Last)
        .unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
}
