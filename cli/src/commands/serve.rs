//! `llamarec serve SERVICE`: one service in this process, bound to its configured address.

use anyhow::Result;
use llamarec_common::config::ConfigLayers;

/// The services of the cluster.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ServiceName {
    /// The public gateway.
    Gateway,
    /// The LRURec retriever.
    Retriever,
    /// The LLM ranker.
    Ranker,
}

pub async fn run(layers: &ConfigLayers, service: ServiceName) -> Result<()> {
    match service {
        ServiceName::Gateway => gateway::server::serve(layers).await,
        ServiceName::Retriever => retriever_service::server::serve(layers).await,
        ServiceName::Ranker => ranker_service::server::serve(layers).await,
    }
}

/// The configured event-loop threads of `service` (0: one per core).
pub fn worker_threads(layers: &ConfigLayers, service: ServiceName) -> Result<usize> {
    Ok(match service {
        ServiceName::Gateway => layers.section::<gateway::config::GatewayConfig>()?.worker_threads,
        ServiceName::Retriever => layers.section::<retriever_service::service_config::RetrieverServiceConfig>()?.worker_threads,
        ServiceName::Ranker => 0,
    })
}
