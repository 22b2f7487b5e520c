//! What a replay reports: counts, errors by code, degraded answers by reason, throughput, and
//! latency percentiles from HDR histograms (microseconds, 3 significant digits).

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    pub(super) fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1e3;
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean_ms: h.mean() / 1e3,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// The outcome of a replay. `sent == completed + errors`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub gateway: String,
    pub connections: usize,
    /// The schedule, in words.
    pub schedule: String,
    pub max_outstanding: usize,
    /// Requests that came due.
    pub sent: u64,
    /// Answered OK (degraded ones included).
    pub completed: u64,
    /// Everything else: gRPC errors, client timeouts, refused by the outstanding bound.
    pub errors: u64,
    /// By gRPC code (`tonic::Code` names) or client-side reason.
    pub errors_by_code: BTreeMap<String, u64>,
    /// Answered OK but in the retriever's order.
    pub degraded: u64,
    /// By `DegradedReason` (without its prefix).
    pub degraded_by_reason: BTreeMap<String, u64>,
    /// From the first scheduled instant to the last answer.
    pub duration_s: f64,
    /// Requests per second the schedule asked for (sent over its span).
    pub offered_rate: f64,
    /// Completed per second over `duration_s`.
    pub throughput: f64,
    /// Of completed requests, from their scheduled send time.
    pub latency: LatencySummary,
    /// How late the scheduler sent requests (the load generator keeping up, or not).
    pub send_lag: LatencySummary,
    /// Most requests in flight at once.
    pub max_outstanding_seen: u64,
}

impl Report {
    /// A text table for people.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "replay against {} over {} connection(s): {}", self.gateway, self.connections, self.schedule);
        let _ = writeln!(s, "{:<22} {:>12}", "sent", self.sent);
        let _ = writeln!(s, "{:<22} {:>12}", "completed", self.completed);
        let _ = writeln!(s, "{:<22} {:>12}", "errors", self.errors);
        let _ = writeln!(s, "{:<22} {:>12}", "degraded", self.degraded);
        let _ = writeln!(s, "{:<22} {:>12.1}", "offered (req/s)", self.offered_rate);
        let _ = writeln!(s, "{:<22} {:>12.1}", "throughput (req/s)", self.throughput);
        let _ = writeln!(s, "{:<22} {:>12.2}", "duration (s)", self.duration_s);
        let _ = writeln!(s, "{:<22} {:>12}", "max in flight", self.max_outstanding_seen);
        let _ = writeln!(s, "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}", "latency (ms)", "mean", "p50", "p90", "p99", "p99.9", "max");
        for (name, l) in [("  from schedule", &self.latency), ("  send lag", &self.send_lag)] {
            let _ =
                writeln!(s, "{name:<22} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}", l.mean_ms, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms);
        }
        for (title, map) in [("errors by code", &self.errors_by_code), ("degraded by reason", &self.degraded_by_reason)] {
            if !map.is_empty() {
                let _ = writeln!(s, "{title}:");
                for (k, v) in map {
                    let _ = writeln!(s, "  {k:<20} {v:>12}");
                }
            }
        }
        s
    }
}

/// A latency histogram from 1 µs to an hour.
pub(super) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_table_names_everything() {
        let mut r = Report { sent: 5, completed: 3, errors: 2, ..Default::default() };
        r.errors_by_code.insert("Unavailable".into(), 2);
        r.degraded_by_reason.insert("OVERLOAD".into(), 1);
        let text = r.table();
        for needle in ["sent", "completed", "p99.9", "Unavailable", "OVERLOAD"] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
