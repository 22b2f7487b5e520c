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
