//! Greedy autoregressive generation with the KV cache.
//!
//! The ranker never generates: LlamaRec scores candidates from one forward pass. This module
//! exists for the paper's efficiency comparison (`llamarec bench ranker`), whose alternative to
//! verbalizer scoring is generating a ranked list of the candidate titles with the same model.

use candle_core::DType;

use crate::error::{RankerError, Result};
use crate::kv_cache::KvCache;
use crate::llama::{Llama, Positions, TokenBatch};

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced one of the stop tokens (kept as the last generated token).
    StopToken,
    /// `max_new_tokens` tokens were generated.
    Budget,
}

/// The result of [`generate_greedy`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated token ids, in order (a stop token, if hit, is the last one).
    pub tokens: Vec<u32>,
    /// Why generation ended.
    pub stop: StopReason,
}

/// Greedy decoding state of one sequence: the attention state of everything fed so far and
/// the token chosen next.
///
/// [`GreedyDecoder::prefill`] runs the whole prompt in one pass; each [`GreedyDecoder::step`]
/// then runs only the previously chosen token against the cache, so a step costs one token's
/// forward pass (plus attention over the cached positions) instead of the whole sequence.
#[derive(Debug, Clone)]
pub struct GreedyDecoder<'a> {
    model: &'a Llama,
    cache: KvCache,
    next: u32,
}

impl<'a> GreedyDecoder<'a> {
    /// Runs `prompt` after the tokens in `start` (e.g. a cached instruction prefix) and picks
    /// the first token.
    pub fn prefill(model: &'a Llama, prompt: &[u32], start: Option<&KvCache>) -> Result<Self> {
        if start.is_some_and(|c| c.batch_size() != 1) {
            return Err(RankerError::InvalidModel(
                "generation runs one sequence: start cache must have one row".into(),
            ));
        }
        let (next, cache) = feed(model, prompt, start)?;
        Ok(Self { model, cache, next })
    }

    /// The token greedy decoding chose to come next (not yet fed to the model).
    pub fn next_token(&self) -> u32 {
        self.next
    }

    /// Number of tokens in the attention state (start cache, prompt and fed tokens).
    pub fn context_len(&self) -> usize {
        self.cache.token_counts()[0]
    }

    /// Feeds the chosen token and picks the one after it; returns the token fed.
    pub fn step(&mut self) -> Result<u32> {
        let token = self.next;
        (self.next, self.cache) = feed(self.model, &[token], Some(&self.cache))?;
        Ok(token)
    }
}

/// Runs `ids` after `cache`; returns the greedy next token and the extended cache.
fn feed(model: &Llama, ids: &[u32], cache: Option<&KvCache>) -> Result<(u32, KvCache)> {
    let batch = TokenBatch::left_padded(&[ids], model.device())?;
    let out = model.forward(&batch, cache, None, Positions::Last)?;
    let logits: Vec<f32> = model
        .full_logits(&out.last_hidden()?)?
        .to_dtype(DType::F32)?
        .squeeze(0)?
        .to_vec1()?;
    Ok((argmax(&logits), out.cache))
}

/// Greedy generation: prefill `prompt` once (after `start`, if given), then one token per step
/// until a token in `stop` or `max_new_tokens` tokens. An empty `stop` forces exactly
/// `max_new_tokens` tokens (benchmarks of a fixed output length).
pub fn generate_greedy(
    model: &Llama,
    prompt: &[u32],
    start: Option<&KvCache>,
    max_new_tokens: usize,
    stop: &[u32],
) -> Result<Generation> {
    let mut tokens = Vec::with_capacity(max_new_tokens);
    if max_new_tokens == 0 {
        return Ok(Generation {
            tokens,
            stop: StopReason::Budget,
        });
    }
    let mut decoder = GreedyDecoder::prefill(model, prompt, start)?;
    loop {
        let token = decoder.next_token();
        tokens.push(token);
        if stop.contains(&token) {
            return Ok(Generation {
                tokens,
                stop: StopReason::StopToken,
            });
        }
        if tokens.len() == max_new_tokens {
            return Ok(Generation {
                tokens,
                stop: StopReason::Budget,
            });
        }
        decoder.step()?;
    }
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::argmax;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -2.0]), 1);
        assert_eq!(argmax(&[5.0]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -1.0]), 1);
    }
}
