//! Hyper-parameters of a Llama-architecture model, read from GGUF metadata or an HF
//! `config.json`.

use std::path::Path;

use serde::Deserialize;

use crate::error::{RankerError, Result};
use crate::gguf::GgufFile;

/// Shape and numerics of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU feed-forward layer.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Number of token ids.
    pub vocab_size: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Longest sequence (prompt plus cache) the model accepts.
    pub max_seq_len: usize,
}

impl LlamaConfig {
    /// Reads the `llama.*` metadata of a GGUF file.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch = gguf.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(RankerError::InvalidModel(format!(
                "architecture {arch:?} is not supported (only llama)"
            )));
        }
        let hidden_size = gguf.get_usize("llama.embedding_length")?;
        let num_heads = gguf.get_usize("llama.attention.head_count")?;
        let head_dim = gguf
            .get_usize_opt("llama.rope.dimension_count")
            .unwrap_or(hidden_size / num_heads);
        let vocab_size = match gguf.get_usize_opt("llama.vocab_size") {
            Some(v) => v,
            None => gguf.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let cfg = Self {
            hidden_size,
            intermediate_size: gguf.get_usize("llama.feed_forward_length")?,
            num_layers: gguf.get_usize("llama.block_count")?,
            num_heads,
            num_kv_heads: gguf
                .get_usize_opt("llama.attention.head_count_kv")
                .unwrap_or(num_heads),
            head_dim,
            vocab_size,
            rms_norm_eps: gguf
                .get_f64_opt("llama.attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5),
            rope_theta: gguf.get_f64_opt("llama.rope.freq_base").unwrap_or(10_000.0),
            max_seq_len: gguf.get_usize_opt("llama.context_length").unwrap_or(4096),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads an HF `config.json` (`LlamaForCausalLM`).
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct Hf {
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            vocab_size: usize,
            rms_norm_eps: Option<f64>,
            rope_theta: Option<f64>,
            max_position_embeddings: Option<usize>,
        }
        let text = std::fs::read_to_string(path).map_err(|source| RankerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let hf: Hf = serde_json::from_str(&text)
            .map_err(|e| RankerError::InvalidModel(format!("{}: {e}", path.display())))?;
        let cfg = Self {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads),
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-5),
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            max_seq_len: hf.max_position_embeddings.unwrap_or(4096),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
            || !self.head_dim.is_multiple_of(2)
        {
            return Err(RankerError::InvalidModel(format!(
                "inconsistent attention shape: {} heads, {} kv heads, head dim {}",
                self.num_heads, self.num_kv_heads, self.head_dim
            )));
        }
        Ok(())
    }

    /// Output width of the query projection.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Output width of the key (and of the value) projection.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}
