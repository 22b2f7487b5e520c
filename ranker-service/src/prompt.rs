//! Prompt templates (configuration) and their rendering into three cacheable parts:
//! `[fixed prefix][user history][candidates + response header]`.

use serde::{Deserialize, Serialize};

use crate::error::{RankerError, Result};
use crate::tokenizer::Tokenizer;

/// The LlamaRec paper's instruction.
pub const PAPER_INSTRUCTION: &str =
    "Given user history in chronological order, recommend an item from the candidate pool with its index letter.";

/// A prompt template. The full prompt is `prefix + history + candidates`, and the answer
/// letter follows it directly (training appends it; scoring reads its logit).
///
/// The split into three parts exists for caching: `prefix` is the same for every request,
/// `history` is the same for a returning user. Parts must start and end where the
/// tokenizer's pre-tokenization splits anyway (e.g. the history part ends with ";" because a
/// title's closing ")" would merge with a following ";" into one token); [`PromptRenderer`]
/// checks this on every prompt and marks prompts that fail as not splittable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptTemplate {
    /// Name reported by the service's Info RPC.
    pub name: String,
    /// The task instruction, substituted for `{instruction}` in `prefix`.
    pub instruction: String,
    /// Fixed text before the history (may contain `{instruction}`).
    pub prefix: String,
    /// The history part; must contain `{history}`.
    pub history: String,
    /// The candidate part, ending where the answer letter follows; must contain `{candidates}`.
    pub candidates: String,
    /// One history item; `{index}` (1-based) and `{title}`.
    pub history_item: String,
    /// Between history items.
    pub history_separator: String,
    /// One candidate; `{letter}` and `{title}`.
    pub candidate_item: String,
    /// Between candidates.
    pub candidate_separator: String,
    /// Index letters, in candidate order; also the most candidates a request may have.
    pub letters: Vec<String>,
    /// Only the most recent this-many history items are rendered.
    pub max_history: usize,
    /// Each title is cut to this many tokens.
    pub max_title_tokens: usize,
}

impl Default for PromptTemplate {
    fn default() -> Self {
        Self::alpaca()
    }
}

impl PromptTemplate {
    /// The paper's Alpaca-style template:
    /// `"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"` with
    /// input `"User history: {history}; \n Candidate pool: {candidates}"`.
    pub fn alpaca() -> Self {
        Self {
            name: "alpaca".into(),
            instruction: PAPER_INSTRUCTION.into(),
            prefix: "### Instruction:\n{instruction}\n\n### Input:\nUser history:".into(),
            history: " {history};".into(),
            candidates: " \n Candidate pool: {candidates}\n\n### Response:\n".into(),
            history_item: "({index}) {title}".into(),
            history_separator: " \n ".into(),
            candidate_item: "({letter}) {title}".into(),
            candidate_separator: " \n ".into(),
            letters: ('A'..='T').map(String::from).collect(),
            max_history: 20,
            max_title_tokens: 32,
        }
    }

    /// The same content in the ChatML turns of SmolLM2's chat template (with its default
    /// system message); the answer letter is the assistant's first token.
    pub fn chatml() -> Self {
        Self {
            name: "chatml".into(),
            prefix: "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n{instruction}\n\nUser history:".into(),
            candidates: " \n Candidate pool: {candidates}<|im_end|>\n<|im_start|>assistant\n".into(),
            ..Self::alpaca()
        }
    }

    /// A built-in template by name ("alpaca", "chatml").
    pub fn builtin(name: &str) -> Option<Self> {
        match name {
            "alpaca" => Some(Self::alpaca()),
            "chatml" => Some(Self::chatml()),
            _ => None,
        }
    }

    fn validate(&self) -> Result<()> {
        let need = |field: &str, text: &str, ph: &str| {
            if text.contains(ph) {
                Ok(())
            } else {
                Err(RankerError::InvalidTemplate(format!(
                    "{field} must contain {ph}"
                )))
            }
        };
        need("history", &self.history, "{history}")?;
        need("candidates", &self.candidates, "{candidates}")?;
        need("history_item", &self.history_item, "{title}")?;
        need("candidate_item", &self.candidate_item, "{title}")?;
        need("candidate_item", &self.candidate_item, "{letter}")?;
        if self.letters.is_empty() || self.letters.iter().any(String::is_empty) {
            return Err(RankerError::InvalidTemplate(
                "letters must be non-empty".into(),
            ));
        }
        if self.max_title_tokens == 0 {
            return Err(RankerError::InvalidTemplate(
                "max_title_tokens must be > 0".into(),
            ));
        }
        Ok(())
    }
}

/// A prompt as text, in its three parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedPrompt {
    /// The fixed prefix (same for every request).
    pub prefix: String,
    /// The user's history part.
    pub history: String,
    /// The candidates and the response header.
    pub candidates: String,
}

impl RenderedPrompt {
    /// The whole prompt.
    pub fn text(&self) -> String {
        [self.prefix.as_str(), &self.history, &self.candidates].concat()
    }
}

/// A prompt as token ids, with the boundaries of its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// Ids of the whole prompt, exactly as tokenizing the whole text gives them.
    pub ids: Vec<u32>,
    /// `ids[..prefix_len]` is the fixed prefix.
    pub prefix_len: usize,
    /// `ids[prefix_len..prefix_len + history_len]` is the history part.
    pub history_len: usize,
    /// False when tokenizing the parts separately differs from tokenizing the whole text; such
    /// a prompt must run without cached parts (its boundaries are then meaningless).
    pub splittable: bool,
}

impl TokenizedPrompt {
    /// The fixed prefix's ids.
    pub fn prefix(&self) -> &[u32] {
        &self.ids[..self.prefix_len]
    }

    /// The history part's ids.
    pub fn history(&self) -> &[u32] {
        &self.ids[self.prefix_len..self.prefix_len + self.history_len]
    }

    /// The candidate part's ids.
    pub fn candidates(&self) -> &[u32] {
        &self.ids[self.prefix_len + self.history_len..]
    }
}

/// Renders and tokenizes prompts with one template and tokenizer.
#[derive(Debug, Clone)]
pub struct PromptRenderer {
    template: PromptTemplate,
    tokenizer: Tokenizer,
    prefix_text: String,
    prefix_ids: Vec<u32>,
    /// Special-token texts, removed from titles (see [`PromptRenderer::truncate_title`]).
    special_texts: Vec<String>,
}

impl PromptRenderer {
    /// Validates the template and tokenizes its fixed prefix.
    pub fn new(template: PromptTemplate, tokenizer: Tokenizer) -> Result<Self> {
        template.validate()?;
        let prefix_text = template
            .prefix
            .replace("{instruction}", &template.instruction);
        let prefix_ids = tokenizer.encode(&prefix_text)?;
        let special_texts = tokenizer.special_token_texts();
        Ok(Self {
            template,
            tokenizer,
            prefix_text,
            prefix_ids,
            special_texts,
        })
    }

    /// The template.
    pub fn template(&self) -> &PromptTemplate {
        &self.template
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Ids of the fixed prefix (run once per model and cached).
    pub fn prefix_ids(&self) -> &[u32] {
        &self.prefix_ids
    }

    /// A title sanitized, trimmed and cut to `max_title_tokens` tokens, as LlamaRec does
    /// (tokenize, keep the first tokens, decode). A cut inside a multi-byte character leaves a
    /// U+FFFD, which is dropped.
    ///
    /// Titles come from callers, but the prompt is tokenized with special tokens parsed (the
    /// templates use them), so the text of a special token (`<|im_end|>`, ...) in a title is
    /// removed first: otherwise a title could end a chat turn or inject its own. Control
    /// characters (newlines, tabs, ...) become spaces, so a title stays on its line and cannot
    /// imitate the template's own lines (`\n\n### Response:\n`).
    ///
    /// The work is linear in the title's length (times the number of special tokens); the
    /// service refuses titles over `[ranker] max_title_bytes` before they get here.
    pub fn truncate_title(&self, title: &str) -> Result<String> {
        let title = self.sanitize(title);
        let title = title.trim();
        let ids = self.tokenizer.encode(title)?;
        if ids.len() <= self.template.max_title_tokens {
            return Ok(title.to_string());
        }
        // The decoded cut usually re-tokenizes to the same ids; when a word or a character is
        // split at the cut it can take more, so keep fewer until it fits.
        let max = self.template.max_title_tokens;
        let mut keep = max;
        loop {
            let cut = self.tokenizer.decode(&ids[..keep])?;
            let cut = cut.trim_end_matches('\u{FFFD}').trim_end().to_string();
            if keep <= 1 || self.tokenizer.encode(&cut)?.len() <= max {
                return Ok(cut);
            }
            keep -= 1;
        }
    }

    /// `text` without special-token texts; repeated because a removal can join the pieces of
    /// another one ("<|im_<|im_end|>end|>").
    fn sanitize(&self, text: &str) -> String {
        let mut text: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        while let Some(t) = self
            .special_texts
            .iter()
            .find(|t| text.contains(t.as_str()))
        {
            text = text.replace(t.as_str(), "");
        }
        text
    }

    /// Renders a request: the last `max_history` history titles and up to `letters.len()`
    /// candidates. Errors: no candidates, too many candidates, an empty title.
    pub fn render<H: AsRef<str>, C: AsRef<str>>(
        &self,
        history: &[H],
        candidates: &[C],
    ) -> Result<RenderedPrompt> {
        let t = &self.template;
        if candidates.is_empty() {
            return Err(RankerError::NoCandidates);
        }
        if candidates.len() > t.letters.len() {
            return Err(RankerError::TooManyCandidates {
                given: candidates.len(),
                max: t.letters.len(),
            });
        }
        let title = |kind: &'static str, index: usize, s: &str| -> Result<String> {
            let s = self.truncate_title(s)?;
            if s.is_empty() {
                return Err(RankerError::EmptyTitle { kind, index });
            }
            Ok(s)
        };
        let skip = history.len().saturating_sub(t.max_history);
        let history_items = history[skip..]
            .iter()
            .enumerate()
            .map(|(i, h)| {
                Ok(t.history_item
                    .replace("{index}", &(i + 1).to_string())
                    .replace("{title}", &title("history", skip + i, h.as_ref())?))
            })
            .collect::<Result<Vec<_>>>()?;
        let candidate_items = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| {
                Ok(t.candidate_item
                    .replace("{letter}", &t.letters[i])
                    .replace("{title}", &title("candidate", i, c.as_ref())?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RenderedPrompt {
            prefix: self.prefix_text.clone(),
            history: t
                .history
                .replace("{history}", &history_items.join(&t.history_separator)),
            candidates: t.candidates.replace(
                "{candidates}",
                &candidate_items.join(&t.candidate_separator),
            ),
        })
    }

    /// Tokenizes a rendered prompt part by part, and checks the parts against the whole
    /// text's tokenization so that serving (cached parts) and training (whole text) always
    /// see the same ids.
    pub fn tokenize(&self, prompt: &RenderedPrompt) -> Result<TokenizedPrompt> {
        let history = self.tokenizer.encode(&prompt.history)?;
        let candidates = self.tokenizer.encode(&prompt.candidates)?;
        let whole = self.tokenizer.encode(&prompt.text())?;
        let mut ids = Vec::with_capacity(whole.len());
        ids.extend_from_slice(&self.prefix_ids);
        ids.extend_from_slice(&history);
        ids.extend_from_slice(&candidates);
        if prompt.prefix == self.prefix_text && ids == whole {
            Ok(TokenizedPrompt {
                ids,
                prefix_len: self.prefix_ids.len(),
                history_len: history.len(),
                splittable: true,
            })
        } else {
            Ok(TokenizedPrompt {
                ids: whole,
                prefix_len: 0,
                history_len: 0,
                splittable: false,
            })
        }
    }

    /// The training text of a prompt whose answer is candidate `answer`: the prompt followed
    /// directly by the answer's letter.
    pub fn training_text(&self, prompt: &RenderedPrompt, answer: usize) -> Result<String> {
        let letter = self
            .template
            .letters
            .get(answer)
            .ok_or(RankerError::TooManyCandidates {
                given: answer + 1,
                max: self.template.letters.len(),
            })?;
        Ok(prompt.text() + letter)
    }
}
