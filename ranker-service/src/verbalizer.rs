//! The verbalizer: which token's logit scores each candidate letter.

use crate::error::{RankerError, Result};
use crate::prompt::PromptRenderer;

/// The token ids of the index letters, resolved once from the rendering training uses.
///
/// LlamaRec's public code trains on the answer letter as tokenized after "### Response:\n"
/// (no leading space) but scores the logits of different tokens (with a leading-space
/// marker). Resolving ids from `training_text` itself rules that mismatch out: the scored id
/// of letter i is, by construction, the id the trained answer gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verbalizer {
    letters: Vec<String>,
    token_ids: Vec<u32>,
}

impl Verbalizer {
    /// Resolves every letter's answer token from a probe prompt with a full candidate list.
    pub fn new(renderer: &PromptRenderer) -> Result<Self> {
        let letters = renderer.template().letters.clone();
        let candidates: Vec<String> = (0..letters.len())
            .map(|i| format!("Probe Candidate {i} (2000)"))
            .collect();
        let prompt = renderer.render(&["Probe History (1999)"], &candidates)?;
        let tok = renderer.tokenizer();
        let prompt_ids = tok.encode(&prompt.text())?;
        let mut token_ids = Vec::with_capacity(letters.len());
        for (i, letter) in letters.iter().enumerate() {
            let ids = tok.encode(&renderer.training_text(&prompt, i)?)?;
            if ids.len() != prompt_ids.len() + 1 || ids[..prompt_ids.len()] != prompt_ids[..] {
                return Err(RankerError::InvalidTemplate(format!(
                    "answer letter {letter:?} is not exactly one token after the prompt"
                )));
            }
            token_ids.push(ids[prompt_ids.len()]);
        }
        let mut sorted = token_ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != token_ids.len() {
            return Err(RankerError::InvalidTemplate(
                "two letters share one answer token".into(),
            ));
        }
        Ok(Self { letters, token_ids })
    }

    /// The letters, in candidate order.
    pub fn letters(&self) -> &[String] {
        &self.letters
    }

    /// The answer token id of each letter, in candidate order.
    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }
}
