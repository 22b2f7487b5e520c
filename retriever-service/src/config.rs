//! Model hyper-parameters, written to a checkpoint's `config.json`.

use crate::error::{Result, RetrieverError};
use serde::{Deserialize, Serialize};

/// Shape and regularisation of an LRURec model (the defaults are the paper's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LruRecConfig {
    /// Number of real items; the embedding has one more row (index 0 = padding).
    pub num_items: usize,
    /// Item embedding and hidden width.
    pub embed_dim: usize,
    /// Number of blocks (LRU layer followed by a position-wise feed-forward network).
    pub num_blocks: usize,
    /// Complex state size of each LRU layer (the paper uses 2 x `embed_dim`).
    pub state_dim: usize,
    /// Inner width of the feed-forward networks.
    pub ffn_dim: usize,
    /// Smallest initial |lambda| of the recurrence (ring initialisation).
    pub r_min: f64,
    /// Largest initial |lambda| of the recurrence.
    pub r_max: f64,
    /// Dropout probability used during training (embedding, LRU output, feed-forward).
    pub dropout: f64,
    /// Epsilon of every layer norm.
    pub layer_norm_eps: f64,
    /// Standard deviation of the truncated-normal initialisation (truncated at two deviations).
    pub init_std: f64,
    /// Longest history the model was trained on; serving keeps the last `max_len` events.
    pub max_len: usize,
}

impl Default for LruRecConfig {
    fn default() -> Self {
        Self {
            num_items: 0,
            embed_dim: 64,
            num_blocks: 2,
            state_dim: 128,
            ffn_dim: 256,
            r_min: 0.8,
            r_max: 0.99,
            dropout: 0.2,
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
        if !(0.0 < self.r_min && self.r_min <= self.r_max && self.r_max < 1.0) {
            return bad(format!("need 0 < r_min <= r_max < 1, got r_min {} and r_max {}", self.r_min, self.r_max));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        if self.max_len == 0 {
            return bad("max_len must be positive".into());
        }
        Ok(())
    }
}
