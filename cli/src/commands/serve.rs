//! `llamarec serve SERVICE`: one service in this process, bound to its configured address.

use anyhow::{Context, Result};
use llamarec_common::config::ConfigLayers;
use llamarec_common::serving::shutdown_signal;
use tokio::net::TcpListener;

/// The services of the cluster.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ServiceName {
    /// The public gateway.
    Gateway,
}

pub async fn run(layers: &ConfigLayers, service: ServiceName) -> Result<()> {
    match service {
        ServiceName::Gateway => {
            let listen = layers.section::<gateway::config::GatewayConfig>()?.listen;
            let listener = TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
            gateway::server::run(layers, listener, shutdown_signal()).await
        }
    }
}
