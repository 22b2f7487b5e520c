//! Builds the retriever service from configuration and serves it.

use crate::checkpoint::REPORT_FILE;
use crate::encoder::Encoder;
use crate::reload::{publish_model_info, Configured, LoadedModel, Reloader};
use crate::retriever::Retriever;
use crate::service::{ModelInfo, RetrieverService};
use crate::service_config::RetrieverServiceConfig;
use anyhow::Context;
use llamarec_common::config::ConfigLayers;
use llamarec_common::{auth, serving};
use llamarec_proto::v1::retriever_server::RetrieverServer;
use llamarec_proto::v1::ModelVersion;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tonic_health::ServingStatus;


/// Name (the model family: "lrurec", "sasrec", or "ensemble"), content hash (first 12 hex digits
/// of the SHA-256 of `model.safetensors`; for an ensemble, of its manifest and every member's
/// weights in order) and `label`.
/// The family comes from the encoder loaded from `checkpoint`.
pub fn model_version(checkpoint: &Path, encoder: &Encoder, label: &str) -> anyhow::Result<ModelVersion> {
    let mut hasher = Sha256::new();
    for path in crate::ensemble::weight_files(checkpoint)? {
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        hasher.update(&bytes);
    }
    Ok(ModelVersion { name: encoder.family().into(), version: hex::encode(&hasher.finalize()[..6]), label: label.to_string() })
}

/// The data set named in the checkpoint's `report.json` ("unknown" without one).
fn dataset_name(checkpoint: &Path) -> String {
    #[derive(serde::Deserialize)]
    struct Data {
        name: String,
    }
    #[derive(serde::Deserialize)]
    struct Report {
        data: Data,
    }
    crate::checkpoint::read_json::<Report>(&checkpoint.join(REPORT_FILE)).map_or_else(|_| "unknown".into(), |r| r.data.name)
}

/// Loads the checkpoint and runs one model retrieval and one popularity retrieval, so the first
/// request does not pay for cold caches. Weights that score the catalog with NaN or infinity
/// (a damaged file that still parses) fail the warm-up rather than serve garbage.
pub fn load_and_warm_up(checkpoint: &Path, label: &str) -> anyhow::Result<(Retriever, ModelInfo)> {
    let retriever = Retriever::load(checkpoint).with_context(|| format!("loading the retriever checkpoint {}", checkpoint.display()))?;
    let info = ModelInfo { version: model_version(checkpoint, retriever.encoder(), label)?, dataset: dataset_name(checkpoint) };
    let start = Instant::now();
    // Non-finite scores never enter the top-k heap (every comparison with NaN is false), so a
    // damaged model shows as a short or non-finite answer, or a non-finite query vector.
    let query = retriever.state(&[1]).context("warm-up encoding")?;
    if query.output.iter().any(|x| !x.is_finite()) {
        anyhow::bail!("warm-up retrieval: the encoder's output for a one-item history is not finite: the weights are damaged");
    }
    let wanted = 20.min(retriever.catalog().num_items().saturating_sub(1));
    let warm_up = retriever.retrieve(&[1], 20, true).context("warm-up retrieval")?;
    if let Some(bad) = warm_up.candidates.iter().find(|c| !c.score.is_finite()) {
        anyhow::bail!("warm-up retrieval scored item {} as {}: the weights are damaged", bad.item, bad.score);
    }
    if warm_up.candidates.len() < wanted {
        anyhow::bail!("warm-up retrieval returned {} of {wanted} candidates: the weights are damaged", warm_up.candidates.len());
    }
    retriever.retrieve(&[], 20, true).context("warm-up popularity retrieval")?;
    tracing::info!(warm_up_us = start.elapsed().as_micros() as u64, "retriever warmed up");
    Ok((retriever, info))
}

/// Binds the configured address and serves until SIGTERM or Ctrl-C (the binary and `llamarec
/// serve retriever`).
pub async fn serve(layers: &ConfigLayers) -> anyhow::Result<()> {
    let listener = serving::bind(layers.section::<RetrieverServiceConfig>()?.listen).await?;
    run(layers, listener, serving::shutdown_signal()).await
}

/// Loads the configured checkpoint, then serves on `listener` until `shutdown` resolves. Health
/// reports SERVING only once the checkpoint is loaded and warmed up. SIGHUP re-reads the
/// configuration (same file, same environment) and reloads its checkpoint and label.
pub async fn run(layers: &ConfigLayers, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let file = layers.file().map(Path::to_path_buf);
    let reread: RereadConfig = Box::new(move || Ok(ConfigLayers::load(file.as_deref())?.section::<RetrieverServiceConfig>()?));
    serve_config(layers.section::<RetrieverServiceConfig>()?, listener, shutdown, Some(reread)).await
}

/// Reads the `[retriever]` section again (for SIGHUP).
type RereadConfig = Box<dyn Fn() -> anyhow::Result<RetrieverServiceConfig> + Send + Sync>;

/// [`run`] with the section already read (the benchmark adjusts it first); no SIGHUP reload.
pub async fn run_with(config: RetrieverServiceConfig, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    serve_config(config, listener, shutdown, None).await
}

async fn serve_config(
    config: RetrieverServiceConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reread: Option<RereadConfig>,
) -> anyhow::Result<()> {
    let (bearer, admin) = auth::model_service_access(
        "retriever",
        "retriever admin",
        config.auth_token.as_deref(),
        config.auth_token_file.as_deref(),
        config.admin_tokens_file.as_deref(),
    )?;
    // TLS files are read before the checkpoint loads, so a bad path stops the start at once.
    let tls = config.tls.as_ref().map(|t| t.server_config()).transpose().context("retriever.tls")?;
    auth::warn_if_exposed("retriever", listener.local_addr()?, &bearer, tls.is_some());
    let (health, health_service) = serving::health();
    health.set_service_status("", ServingStatus::NotServing).await;
    if let Some(addr) = config.health_listen {
        serving::spawn_health_listener(addr, health_service.clone()).await.context("retriever.health_listen")?;
    }
    let (checkpoint, label) = (config.checkpoint.clone(), config.label());
    let (retriever, info) = tokio::task::spawn_blocking(move || load_and_warm_up(&checkpoint, &label)).await??;
    if let Some(addr) = config.metrics_listen {
        llamarec_common::telemetry::install_prometheus(addr, &[]).with_context(|| format!("metrics listener on {addr}"))?;
    }
    publish_model_info(&info.version, 1.0);
    let num_items = retriever.catalog().num_items();
    let retriever = retriever.with_state_cache(config.state_cache_bytes);
    let configured = Configured { checkpoint: config.checkpoint.clone(), label: config.label() };
    let reloader = Arc::new(Reloader::new(LoadedModel { retriever, info: info.clone() }, configured, config.state_cache_bytes));
    // Registered before SERVING: from then on SIGHUP reloads instead of ending the process.
    let sighup = match reread {
        Some(reread) => {
            let reloader = reloader.clone();
            Some(llamarec_common::reload::spawn_sighup_reloader("retriever", reread, move |config: RetrieverServiceConfig| {
                let reloader = reloader.clone();
                async move {
                    tracing::info!(checkpoint = %config.checkpoint.display(), "SIGHUP: reloading the configured checkpoint (keys other than checkpoint and model_label apply at the next restart)");
                    reloader.reload_configured(Configured { checkpoint: config.checkpoint.clone(), label: config.label() }).await.map(drop)
                }
            })?)
        }
        None => None,
    };
    let service = RetrieverService::new(reloader, admin.clone(), &config);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("retriever.tls")?;
    }
    let router = builder
        .add_service(health_service)
        .add_service(bearer.wrap(serving::reflection(llamarec_proto::FILE_DESCRIPTOR_SET)?))
        .add_service(bearer.wrap(RetrieverServer::new(service).max_decoding_message_size(config.max_message_bytes)));
    health.set_service_status("", ServingStatus::Serving).await;
    health.set_serving::<RetrieverServer<RetrieverService>>().await;
    tracing::info!(
        listen = %listener.local_addr()?,
        tls = config.tls.is_some(),
        bearer_auth = bearer.is_enabled(),
        reload = admin.is_enabled(),
        checkpoint = %config.checkpoint.display(),
        version = %info.version.version,
        label = %info.version.label,
        items = num_items,
        "retriever serving"
    );
    let served = serving::serve_until(router, listener, health, Duration::from_millis(config.shutdown_grace_ms), shutdown).await;
    if let Some(task) = sighup {
        task.abort();
    }
    served?;
    Ok(())
}
