//! A user's recurrent state: everything needed to score the next item or to absorb one more event
//! without rereading the history.

use serde::{Deserialize, Serialize};

/// The state after a user's history.
///
/// Only the recurrences carry information across events: embedding, layer norms and
/// feed-forward networks are position-wise. So the state is one complex vector per LRU layer,
/// plus the last layer's output at the latest event (the query vector for scoring), which would
/// otherwise have to be recomputed from that event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserState {
    /// Per LRU layer, the hidden state h as [Re h (H values) | Im h (H values)].
    pub hidden: Vec<Vec<f32>>,
    /// Output of the last block at the latest event (D values); empty before the first event.
    pub output: Vec<f32>,
    /// Number of events absorbed.
    pub events: usize,
}

impl UserState {
    /// The state of a user without events: zero recurrences, no output yet.
    pub fn empty(num_layers: usize, state_dim: usize) -> Self {
        Self { hidden: vec![vec![0.0; 2 * state_dim]; num_layers], output: Vec::new(), events: 0 }
    }

    /// Whether no event has been absorbed (scoring falls back to popularity).
    pub fn is_empty(&self) -> bool {
        self.events == 0
    }
}
