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

/// Serves Prometheus metrics at `http://{addr}/metrics`. Must run inside a Tokio runtime.
pub fn install_prometheus(addr: SocketAddr) -> Result<(), metrics_exporter_prometheus::BuildError> {
    metrics_exporter_prometheus::PrometheusBuilder::new().with_http_listener(addr).install()
}
