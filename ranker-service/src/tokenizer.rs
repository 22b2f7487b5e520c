//! The ranker's tokenizer: byte-level BPE built from GGUF metadata, or an HF `tokenizer.json`.
//!
//! From GGUF we write the equivalent of the model's `tokenizer.json` and load it with the
//! `tokenizers` crate, so both sources go through one code path. candle's own GGUF helper is
//! not used: it does not know the "smollm" pre-tokenizer and adds a leading space
//! ("user" after `<|im_start|>` becomes " user").

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{RankerError, Result};
use crate::gguf::GgufFile;

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A text tokenizer with the model's special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: Option<u32>,
    bos_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let json = tokenizer_json_from_gguf(gguf)?;
        let bytes = serde_json::to_vec(&json).map_err(|e| RankerError::Tokenizer(e.to_string()))?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| RankerError::Tokenizer(format!("{}: {e}", gguf.path().display())))?;
        Ok(Self {
            inner,
            bos_id: gguf
                .get_usize_opt("tokenizer.ggml.bos_token_id")
                .map(|v| v as u32),
            eos_id: gguf
                .get_usize_opt("tokenizer.ggml.eos_token_id")
                .map(|v| v as u32),
        })
    }

    /// Loads an HF `tokenizer.json`. BOS/EOS are taken from the usual special tokens when
    /// present (`<|endoftext|>`, `<|im_end|>`, `<s>`, `</s>`).
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(RankerError::ModelNotFound {
                path: path.to_path_buf(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| RankerError::Tokenizer(format!("{}: {e}", path.display())))?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos_id = find(&["<s>", "<|begin_of_text|>", "<|im_start|>"]);
        let eos_id = find(&["</s>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>"]);
        Ok(Self {
            inner,
            bos_id,
            eos_id,
        })
    }

    /// The `tokenizer.json` document equivalent to a GGUF file's tokenizer (for export, and
    /// to compare with another engine's tokenizer).
    pub fn gguf_to_tokenizer_json(gguf: &GgufFile) -> Result<Value> {
        tokenizer_json_from_gguf(gguf)
    }

    /// Token ids of `text`. Added special tokens (`<|im_start|>`, ...) written in the text are
    /// parsed as single ids; nothing is prepended or appended.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| RankerError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included verbatim.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| RankerError::Tokenizer(e.to_string()))
    }

    /// The id of a token string (byte-level form, e.g. "ĠA" for " A"), if in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The text of every special added token (`<|im_start|>`, `<|endoftext|>`, ...): text that
    /// [`Tokenizer::encode`] turns into a control id wherever it occurs.
    pub fn special_token_texts(&self) -> Vec<String> {
        let mut texts: Vec<String> = self
            .inner
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special)
            .map(|t| t.content)
            .filter(|c| !c.is_empty())
            .collect();
        texts.sort();
        texts
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Beginning-of-sequence id, if the model defines one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// End-of-sequence id, if the model defines one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }
}

/// The pre-tokenizer of a GGUF `tokenizer.ggml.pre` name, as in the model's HF
/// `tokenizer.json`.
fn pre_tokenizer_for(pre: &str) -> Result<Value> {
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    Ok(match pre {
        // SmolLM / StarCoder style: every digit is its own pre-token, then GPT-2's regex.
        "smollm" | "starcoder" | "refact" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]
        }),
        "gpt2" | "default" => byte_level,
        other => {
            return Err(RankerError::Tokenizer(format!(
                "pre-tokenizer {other:?} is not supported; load the model's tokenizer.json instead"
            )))
        }
    })
}

/// Writes the `tokenizer.json` equivalent of a GGUF file's GPT-2-style BPE tokenizer.
fn tokenizer_json_from_gguf(gguf: &GgufFile) -> Result<Value> {
    let model = gguf.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(RankerError::Tokenizer(format!(
            "tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\")"
        )));
    }
    let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
    let merges = gguf.get_str_array("tokenizer.ggml.merges")?;
    let types = gguf
        .get_int_array_opt("tokenizer.ggml.token_type")
        .unwrap_or_default();
    let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("gpt2");

    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    // Control and user-defined tokens are matched in raw text before BPE, as HF does for
    // `added_tokens`; control tokens are also special (skippable when decoding).
    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        .map(|(i, t)| {
            json!({
                "id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": *t == TOKEN_TYPE_CONTROL
            })
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer_for(pre)?,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges
        }
    }))
}
