//! Greedy generation with the KV cache on the shipped model.

mod common;

use ranker_service::generate::{generate_greedy, GreedyDecoder, StopReason};
use ranker_service::{Llama, Positions, TokenBatch};

use common::{model, ranker};

/// The greedy next token after `ids`, from a full pass over the whole sequence (no cache).
fn uncached_next(model: &Llama, ids: &[u32]) -> u32 {
    let batch = TokenBatch::left_padded(&[ids], model.device()).unwrap();
    let out = model.forward(&batch, None, None, Positions::Last).unwrap();
    let logits: Vec<f32> = model
        .full_logits(&out.last_hidden().unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut best = 0;
    for (i, x) in logits.iter().enumerate() {
        if *x > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn prompt_ids() -> Vec<u32> {
    ranker()
        .renderer()
        .tokenizer()
        .encode("<|im_start|>user\nName three films about space travel.<|im_end|>\n<|im_start|>assistant\n")
        .unwrap()
}

#[test]
fn cached_steps_match_rerunning_the_whole_sequence() {
    let model = model();
    let mut seq = prompt_ids();
    let generated = generate_greedy(model, &seq, None, 6, &[]).unwrap();
    assert_eq!(generated.tokens.len(), 6);
    assert_eq!(generated.stop, StopReason::Budget);
    for (step, &token) in generated.tokens.iter().enumerate() {
        assert_eq!(token, uncached_next(model, &seq), "step {step}");
        seq.push(token);
    }
}

#[test]
fn starting_from_a_cached_prefix_gives_the_same_tokens() {
    let model = model();
    let ids = prompt_ids();
    let split = ids.len() / 2;
    let prefix = TokenBatch::left_padded(&[&ids[..split]], model.device()).unwrap();
    let cache = model
        .forward(&prefix, None, None, Positions::Last)
        .unwrap()
        .cache;
    let whole = generate_greedy(model, &ids, None, 4, &[]).unwrap();
    let resumed = generate_greedy(model, &ids[split..], Some(&cache), 4, &[]).unwrap();
    assert_eq!(whole.tokens, resumed.tokens);

    let mut decoder = GreedyDecoder::prefill(model, &ids[split..], Some(&cache)).unwrap();
    assert_eq!(decoder.context_len(), ids.len());
    decoder.step().unwrap();
    assert_eq!(decoder.context_len(), ids.len() + 1);
}

#[test]
fn stops_at_a_stop_token_and_keeps_it() {
    let model = model();
    let ids = prompt_ids();
    let free = generate_greedy(model, &ids, None, 3, &[]).unwrap();
    let stop = free.tokens[1];
    let stopped = generate_greedy(model, &ids, None, 3, &[stop]).unwrap();
    assert_eq!(stopped.stop, StopReason::StopToken);
    assert_eq!(stopped.tokens, free.tokens[..2]);
    assert!(generate_greedy(model, &ids, None, 0, &[])
        .unwrap()
        .tokens
        .is_empty());
}
