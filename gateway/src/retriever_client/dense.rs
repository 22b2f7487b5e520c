//! Whether Retrieve calls carry the history as dense catalog indices.
//!
//! Indices cost the gateway and the retriever a few bytes per item instead of a string each
//! (an allocation to clone, encode, decode and look up), but they mean something only when both
//! hold the same catalog. The retriever checks the fingerprint on every request and answers
//! FAILED_PRECONDITION on a mismatch; the gateway then sends ids for a while and tries again
//! later (the retriever may be rolled back to the matching catalog).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long the gateway sends ids after the retriever refused its indices.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// On unless recently refused.
pub struct DenseIndices {
    enabled: bool,
    fingerprint: u64,
    start: Instant,
    /// Milliseconds since `start` before which ids are sent.
    off_until_ms: AtomicU64,
}

impl DenseIndices {
    /// `enabled` from configuration; `fingerprint` of the gateway's catalog.
    pub fn new(enabled: bool, fingerprint: u64) -> Self {
        Self { enabled, fingerprint, start: Instant::now(), off_until_ms: AtomicU64::new(0) }
    }

    /// The fingerprint to send with indices, or None when ids should be sent now.
    pub fn fingerprint(&self) -> Option<u64> {
        (self.enabled && self.now_ms() >= self.off_until_ms.load(Ordering::Relaxed)).then_some(self.fingerprint)
    }

    /// The retriever refused indices: send ids for [`RETRY_AFTER`].
    pub fn refused(&self, why: &str) {
        tracing::warn!(why, retry_after_s = RETRY_AFTER.as_secs(), "retriever refused dense item indices; sending item ids");
        metrics::counter!("llamarec_gateway_dense_indices_refused_total").increment(1);
        self.off_until_ms.store(self.now_ms() + RETRY_AFTER.as_millis() as u64, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_switches_to_ids_for_a_while_and_configuration_can_turn_it_off() {
        let dense = DenseIndices::new(true, 7);
        assert_eq!(dense.fingerprint(), Some(7));
        dense.refused("test");
        assert_eq!(dense.fingerprint(), None);
        // Pretend the back-off began long ago.
        dense.off_until_ms.store(0, Ordering::Relaxed);
        assert_eq!(dense.fingerprint(), Some(7));
        assert_eq!(DenseIndices::new(false, 7).fingerprint(), None);
    }
}
