//! The ranker's Prometheus metrics: names (prefix `llamarec_ranker_`), descriptions, histogram
//! buckets, and the exporter.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::BuildError;

/// Requests waiting for a batch: the autoscaling signal.
pub const QUEUE_DEPTH: &str = "llamarec_ranker_queue_depth";
/// Requests per forward pass.
pub const BATCH_SIZE: &str = "llamarec_ranker_batch_size";
/// Tokens run per forward pass (after cached parts).
pub const BATCH_TOKENS: &str = "llamarec_ranker_batch_tokens";
/// Time from submission to the start of the request's batch.
pub const QUEUE_DURATION: &str = "llamarec_ranker_queue_duration_seconds";
/// Rendering, tokenizing and checking a request.
pub const TOKENIZE_DURATION: &str = "llamarec_ranker_tokenize_duration_seconds";
/// One batch's forward pass (including cache look-ups).
pub const FORWARD_DURATION: &str = "llamarec_ranker_forward_duration_seconds";
/// A Rank call from arrival to answer, by status.
pub const REQUEST_DURATION: &str = "llamarec_ranker_request_duration_seconds";
/// Rank calls by gRPC status.
pub const REQUESTS_TOTAL: &str = "llamarec_ranker_requests_total";
/// Requests dropped from the queue because their caller had gone away.
pub const SKIPPED_TOTAL: &str = "llamarec_ranker_skipped_requests_total";
/// Requests whose history state was cached.
pub const CACHE_HITS_TOTAL: &str = "llamarec_ranker_history_cache_hits_total";
/// Requests whose history state was computed (and cached).
pub const CACHE_MISSES_TOTAL: &str = "llamarec_ranker_history_cache_misses_total";
/// Bytes held by the history cache.
pub const CACHE_BYTES: &str = "llamarec_ranker_history_cache_bytes";
/// The served model: 1 with its `version` and `label`, 0 for one a reload replaced.
pub const MODEL_INFO: &str = "llamarec_ranker_model_info";
/// Resident memory of the process (VmRSS).
pub const RESIDENT_BYTES: &str = "llamarec_ranker_resident_bytes";

/// Registers every metric's description.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        QUEUE_DEPTH,
        "Rank requests waiting for a batch (autoscaling signal)."
    );
    describe_histogram!(BATCH_SIZE, "Requests per forward pass.");
    describe_histogram!(
        BATCH_TOKENS,
        "Tokens run per forward pass, after cached parts."
    );
    describe_histogram!(
        QUEUE_DURATION,
        Unit::Seconds,
        "Time from submission to the start of the request's batch."
    );
    describe_histogram!(
        TOKENIZE_DURATION,
        Unit::Seconds,
        "Rendering, tokenizing and checking one request."
    );
    describe_histogram!(FORWARD_DURATION, Unit::Seconds, "One batch's forward pass.");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Rank calls from arrival to answer."
    );
    describe_counter!(REQUESTS_TOTAL, "Rank calls by gRPC status.");
    describe_counter!(
        SKIPPED_TOTAL,
        "Queued requests skipped because their caller went away."
    );
    describe_counter!(
        CACHE_HITS_TOTAL,
        "Requests whose history attention state was cached."
    );
    describe_counter!(
        CACHE_MISSES_TOTAL,
        "Requests whose history attention state was computed."
    );
    describe_gauge!(CACHE_BYTES, Unit::Bytes, "Bytes held by the history cache.");
    describe_gauge!(
        MODEL_INFO,
        "The served model (1) with its version and label; 0 for one a reload replaced."
    );
    describe_gauge!(
        RESIDENT_BYTES,
        Unit::Bytes,
        "Resident memory of the ranker process."
    );
}

/// Serves the metrics at `http://{addr}/metrics` through the shared installer, adding buckets
/// for the batch histograms. Must run inside a Tokio runtime.
pub fn install_prometheus(addr: SocketAddr) -> Result<(), BuildError> {
    let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
    let tokens = [64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];
    llamarec_common::telemetry::install_prometheus(addr, &[(BATCH_SIZE, &sizes), (BATCH_TOKENS, &tokens)])?;
    describe();
    Ok(())
}

/// Resident memory of this process in bytes (Linux: VmRSS of /proc/self/status).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Updates the resident-memory gauge every `period`, forever.
pub async fn report_resident_memory(period: Duration) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        if let Some(bytes) = resident_bytes() {
            metrics::gauge!(RESIDENT_BYTES).set(bytes as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_resident_memory() {
        let bytes = super::resident_bytes().unwrap();
        assert!(bytes > 1 << 20 && bytes < 1 << 40, "{bytes}");
    }
}
