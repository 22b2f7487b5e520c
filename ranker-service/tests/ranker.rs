//! End-to-end scoring on the shipped model: cached and uncached paths agree.

mod common;

use ranker_service::sample::movielens_request;
use ranker_service::ScoreInput;

use common::{max_abs_diff, ranker};

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
