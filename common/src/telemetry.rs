//! Logging and metrics set-up shared by the services and the CLI.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use tracing_subscriber::{fmt, EnvFilter};

/// The `[telemetry]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `tracing` filter directives, e.g. "info" or "ranker_service=debug,info"; `RUST_LOG`
    /// overrides it.
    pub log_level: String,
    /// Emit one JSON object per log line (for log shippers) instead of human-readable text.
    pub json: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { log_level: "info".into(), json: false }
    }
}

impl crate::config::Section for TelemetryConfig {
    const NAME: &'static str = "telemetry";

    fn validate(&self) -> Result<(), (String, String)> {
        EnvFilter::try_new(&self.log_level).map(|_| ()).map_err(|e| ("log_level".into(), e.to_string()))
    }
}

/// Installs the global tracing subscriber (logs go to stderr). Safe to call twice: the second
/// call is ignored, which tests rely on.
pub fn init_tracing(config: &TelemetryConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_level));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if config.json { builder.json().try_init() } else { builder.try_init() };
}

/// Histogram buckets of every `*_duration_seconds` metric: 1 ms to 30 s.
const DURATION_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Serves Prometheus metrics at `http://{addr}/metrics`. Every metric ending in
/// `_duration_seconds` is a real histogram (buckets from 1 ms to 30 s, so latency quantiles can
/// be aggregated across pods); `extra_buckets` gives other histograms theirs, by full name. Must
/// run inside a Tokio runtime.
pub fn install_prometheus(addr: SocketAddr, extra_buckets: &[(&str, &[f64])]) -> Result<(), metrics_exporter_prometheus::BuildError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let mut builder = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), &DURATION_BUCKETS)?;
    for (name, buckets) in extra_buckets {
        builder = builder.set_buckets_for_metric(Matcher::Full((*name).into()), buckets)?;
    }
    builder.install()
}
