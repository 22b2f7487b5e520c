//! The gateway binary: configuration in, gRPC out. Everything else lives in the library.

use clap::Parser;
use gateway::config::GatewayConfig;
use llamarec_common::config::ConfigLayers;
use llamarec_common::telemetry::{init_tracing, TelemetryConfig};
use std::path::PathBuf;

/// LlamaRec gateway: Recommend, AppendEvents, GetHistory.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file (else $LLAMAREC_CONFIG, else deploy/local/llamarec.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = async {
        let layers = ConfigLayers::discover(args.config.as_deref())?;
        init_tracing(&layers.section::<TelemetryConfig>()?);
        let listen = layers.section::<GatewayConfig>()?.listen;
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("binding {listen}: {e}"))?;
        gateway::server::run(&layers, listener, llamarec_common::serving::shutdown_signal()).await
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
