//! Latency recording with an HDR histogram (microsecond resolution, 3 significant digits).

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::time::Duration;

/// Latencies of one measured series.
pub struct Latencies {
    histogram: Histogram<u64>,
    errors: u64,
}

impl Default for Latencies {
    fn default() -> Self {
        Self { histogram: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"), errors: 0 }
    }
}

impl Latencies {
    /// Records one successful call.
    pub fn record(&mut self, d: Duration) {
        let _ = self.histogram.record((d.as_micros() as u64).max(1));
    }

    /// Counts one failed call.
    pub fn error(&mut self) {
        self.errors += 1;
    }

    /// Adds another series into this one.
    pub fn merge(&mut self, other: &Latencies) {
        let _ = self.histogram.add(&other.histogram);
        self.errors += other.errors;
    }

    /// Successful calls.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The q-quantile in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.histogram.value_at_quantile(q) as f64 / 1e3
    }

    /// Count, errors, mean and the usual percentiles, in milliseconds.
    pub fn summary(&self) -> Value {
        json!({
            "count": self.count(),
            "errors": self.errors,
            "mean_ms": self.histogram.mean() / 1e3,
            "p50_ms": self.quantile_ms(0.50),
            "p90_ms": self.quantile_ms(0.90),
            "p99_ms": self.quantile_ms(0.99),
            "p999_ms": self.quantile_ms(0.999),
            "max_ms": self.histogram.max() as f64 / 1e3,
        })
    }
}
