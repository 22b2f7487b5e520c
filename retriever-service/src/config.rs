//! Model hyper-parameters, written to a checkpoint's `config.json`.

use crate::error::{Result, RetrieverError};
use serde::{Deserialize, Serialize};

/// Which sequence model a checkpoint holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// LRURec: linear recurrent units (the LlamaRec paper's retriever). A user's state absorbs
    /// one more event in O(1).
    #[default]
    LruRec,
    /// SASRec: causal self-attention with learned positional embeddings. No recurrence: a new
    /// event means re-encoding the last `max_len` events.
    SasRec,
}

/// Shape and regularisation of a retriever model (the defaults are the LRURec paper's).
///
/// `config.json` of checkpoints written before `kind` existed has no such key: they are LRURec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LruRecConfig {
    /// The model family; the fields below that only one family uses say so.
    pub kind: ModelKind,
    /// Number of real items; the embedding has one more row (index 0 = padding).
    pub num_items: usize,
    /// Item embedding and hidden width.
    pub embed_dim: usize,
    /// Number of blocks (LRU layer followed by a position-wise feed-forward network).
    pub num_blocks: usize,
    /// Complex state size of each LRU layer (the paper uses 2 x `embed_dim`). LRURec only.
    pub state_dim: usize,
    /// Attention heads per block (`embed_dim` must be a multiple). SASRec only.
    pub num_heads: usize,
    /// Inner width of the feed-forward networks.
    pub ffn_dim: usize,
    /// Smallest initial |lambda| of the recurrence (ring initialisation). LRURec only.
    pub r_min: f64,
    /// Largest initial |lambda| of the recurrence. LRURec only.
    pub r_max: f64,
    /// Dropout probability used during training (embedding, LRU or attention output,
    /// feed-forward).
    pub dropout: f64,
    /// Dropout probability on the attention weights during training (RecBole's
    /// `attn_dropout_prob`). SASRec only.
    pub attention_dropout: f64,
    /// Epsilon of every layer norm.
    pub layer_norm_eps: f64,
    /// Standard deviation of the truncated-normal initialisation (truncated at two deviations).
    pub init_std: f64,
    /// Longest history the model was trained on; serving keeps the last `max_len` events
    /// (SASRec also has one positional embedding per position up to it).
    pub max_len: usize,
}

impl Default for LruRecConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::LruRec,
            num_items: 0,
            embed_dim: 64,
            num_blocks: 2,
            state_dim: 128,
            num_heads: 1,
            ffn_dim: 256,
            r_min: 0.8,
            r_max: 0.99,
            dropout: 0.2,
            attention_dropout: 0.0,
            layer_norm_eps: 1e-5,
            init_std: 0.02,
            max_len: 200,
        }
    }
}

impl LruRecConfig {
    /// The paper's model for a catalog of `num_items` items.
    pub fn for_items(num_items: usize) -> Self {
        Self { num_items, ..Self::default() }
    }

    /// Rows of the item embedding (padding included).
    pub fn vocab_size(&self) -> usize {
        self.num_items + 1
    }

    /// Rejects shapes and ranges the model cannot work with.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(RetrieverError::Config(msg));
        if self.num_items == 0 {
            return bad("num_items must be positive".into());
        }
        if self.embed_dim == 0 || self.state_dim == 0 || self.ffn_dim == 0 || self.num_blocks == 0 {
            return bad(format!(
                "embed_dim ({}), state_dim ({}), ffn_dim ({}) and num_blocks ({}) must be positive",
                self.embed_dim, self.state_dim, self.ffn_dim, self.num_blocks
            ));
        }
        if self.kind == ModelKind::SasRec && (self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads)) {
            return bad(format!("embed_dim ({}) must be a positive multiple of num_heads ({})", self.embed_dim, self.num_heads));
        }
        if !(0.0 < self.r_min && self.r_min <= self.r_max && self.r_max < 1.0) {
            return bad(format!("need 0 < r_min <= r_max < 1, got r_min {} and r_max {}", self.r_min, self.r_max));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        if !(0.0..1.0).contains(&self.attention_dropout) {
            return bad(format!("attention_dropout must be in [0, 1), got {}", self.attention_dropout));
        }
        if self.max_len == 0 {
            return bad("max_len must be positive".into());
        }
        Ok(())
    }
}
