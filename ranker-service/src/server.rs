//! Builds the ranker service from configuration and serves it.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Device};
use llamarec_common::config::{AssetsConfig, ConfigLayers};
use llamarec_common::{auth, serving};
use llamarec_proto::v1::ranker_server::RankerServer;
use tokio::net::TcpListener;

use crate::backend::RankerBackend;
use crate::llama::LoadOptions;
use crate::queue::{BatchLimits, Queue};
use crate::model_version::BaseDigest;
use crate::ranker::Ranker;
use crate::reload::{Configured, Reloader, ServedModel};
use crate::service::{self, ModelInfo, RankQueue, RankerService};
use crate::service_config::{DeviceSpec, RankerServiceConfig};

/// How often the resident-memory gauge is refreshed.
const MEMORY_REPORT_PERIOD: Duration = Duration::from_secs(5);

/// The configured compute device.
pub fn device(spec: DeviceSpec) -> anyhow::Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(ordinal) => Ok(Device::new_cuda(ordinal)?),
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => {
            anyhow::bail!("this build has no CUDA support (cargo feature `cuda`)")
        }
    }
}

/// Loads the ranker the section describes: model, tokenizer, template, adapter, prompt limit
/// applied. The CLI's ranker tools load through here too, so they score what the service
/// scores.
pub fn load_ranker(config: &RankerServiceConfig, assets: &AssetsConfig) -> anyhow::Result<Ranker> {
    let model = config.model_config(assets);
    let opts = LoadOptions {
        precision: config.precision,
        device: device(config.device_spec())?,
        dtype: DType::F32,
    };
    let mut ranker = Ranker::load_with_adapter(&model, config.adapter.as_deref(), &opts)
        .with_context(|| format!("loading the ranker model {}", model.model.display()))?;
    if let Some(limit) = config.max_prompt_tokens {
        ranker.set_max_prompt_tokens(limit);
    }
    Ok(ranker)
}

/// The served model's reloader and the queue in front of the model thread, warmed up with one
/// real request.
pub struct LoadedRanker {
    /// Holds the served model (generation 0: the configured adapter) and swaps in others.
    pub reloader: Arc<Reloader>,
    /// The queue in front of the model thread.
    pub queue: RankQueue,
}

/// Loads the model (on a blocking thread), starts its queue and model thread, and runs one real
/// request through both. Must run inside a Tokio runtime.
pub async fn load(
    config: &RankerServiceConfig,
    assets: &AssetsConfig,
) -> anyhow::Result<LoadedRanker> {
    let start = Instant::now();
    let (c, a) = (config.clone(), assets.clone());
    let (ranker, base) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        Ok((load_ranker(&c, &a)?, BaseDigest::of(&c.model_path(&a))?))
    })
    .await??;
    let label = config.label();
    let info = ModelInfo {
        version: base.version(config.adapter.as_deref(), &label)?,
        adapter: config
            .adapter
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        device: config.device.clone(),
    };
    let kernels = ranker.model().projection_kernels();
    let served = ServedModel { ranker: Arc::new(ranker), info, generation: 0 };
    let backend = RankerBackend::new(config.threads, config.history_cache_bytes)?;
    let limits = BatchLimits {
        max_batch_size: config.max_batch_size,
        max_batch_tokens: config.max_batch_tokens,
        max_wait: Duration::from_millis(config.max_batch_wait_ms),
        capacity: config.queue_capacity,
    };
    let queue = Queue::start(backend, limits, "ranker-model")?;
    let loaded_ms = start.elapsed().as_millis() as u64;
    let warm = Instant::now();
    service::warm_up(&served, &queue)
        .await
        .context("warm-up request")?;
    tracing::info!(
        model = %served.info.version.name,
        version = %served.info.version.version,
        label = %served.info.version.label,
        precision = ?config.precision,
        projection_kernels = kernels,
        load_ms = loaded_ms,
        warm_up_ms = warm.elapsed().as_millis() as u64,
        resident_mb = crate::metrics::resident_bytes().unwrap_or(0) >> 20,
        "ranker loaded and warmed up"
    );
    let configured = Configured { adapter: config.adapter.clone(), label };
    Ok(LoadedRanker { reloader: Arc::new(Reloader::new(served, base, configured)), queue })
}

/// Binds the configured address and serves until SIGTERM or Ctrl-C (the binary and `llamarec
/// serve ranker`).
pub async fn serve(layers: &ConfigLayers) -> anyhow::Result<()> {
    let listener = serving::bind(layers.section::<RankerServiceConfig>()?.listen).await?;
    run(layers, listener, serving::shutdown_signal()).await
}

/// Loads and warms up the configured ranker, then serves on `listener` until `shutdown`
/// resolves. Health reports SERVING only after the warm-up request succeeded.
pub async fn run(
    layers: &ConfigLayers,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = layers.section::<RankerServiceConfig>()?;
    let file = layers.file().map(Path::to_path_buf);
    let reread: RereadConfig = Box::new(move || Ok(ConfigLayers::load(file.as_deref())?.section::<RankerServiceConfig>()?));
    serve_config(config, layers.section::<AssetsConfig>()?, listener, shutdown, Some(reread)).await
}

/// Reads the `[ranker]` section again (for SIGHUP).
type RereadConfig = Box<dyn Fn() -> anyhow::Result<RankerServiceConfig> + Send + Sync>;

/// [`run`] with the sections already read (benchmarks and tests adjust them first); no SIGHUP
/// reload.
pub async fn run_with(
    config: RankerServiceConfig,
    assets: AssetsConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_config(config, assets, listener, shutdown, None).await
}

async fn serve_config(
    config: RankerServiceConfig,
    assets: AssetsConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reread: Option<RereadConfig>,
) -> anyhow::Result<()> {
    let (bearer, admin) = auth::model_service_access(
        "ranker",
        "ranker admin",
        config.auth_token.as_deref(),
        config.auth_token_file.as_deref(),
        config.admin_tokens_file.as_deref(),
    )?;
    // TLS files are read before the model loads, so a bad path stops the start at once.
    let tls = config.tls.as_ref().map(|t| t.server_config()).transpose().context("ranker.tls")?;
    auth::warn_if_exposed("ranker", listener.local_addr()?, &bearer, tls.is_some());
    let (health, health_service) = serving::health();
    service::set_serving(&health, false).await;
    if let Some(addr) = config.health_listen {
        serving::spawn_health_listener(addr, health_service.clone()).await.context("ranker.health_listen")?;
    }
    if let Some(addr) = config.metrics_listen {
        crate::metrics::install_prometheus(addr)
            .with_context(|| format!("metrics listener on {addr}"))?;
    }
    tokio::spawn(crate::metrics::report_resident_memory(MEMORY_REPORT_PERIOD));
    let loaded = load(&config, &assets).await?;
    let served = loaded.reloader.slot().load_full();
    let (version, letters) = (served.info.version.clone(), served.ranker.renderer().template().letters.len());
    drop(served); // held to the end of serving, it would keep the first model alive after a reload
    let limits = service::RequestLimits::new(&config, letters);
    // Registered before SERVING: from then on SIGHUP reloads instead of ending the process.
    let sighup = match reread {
        Some(reread) => {
            let reloader = loaded.reloader.clone();
            Some(llamarec_common::reload::spawn_sighup_reloader("ranker", reread, move |config: RankerServiceConfig| {
                let reloader = reloader.clone();
                async move {
                    tracing::info!(
                        adapter = %config.adapter.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_default(),
                        "SIGHUP: reloading the configured adapter (keys other than adapter and model_label apply at the next restart)"
                    );
                    reloader.reload_configured(Configured { adapter: config.adapter.clone(), label: config.label() }).await.map(drop)
                }
            })?)
        }
        None => None,
    };
    let service = RankerService::new(loaded.reloader, admin.clone(), loaded.queue, health.clone()).with_limits(limits);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("ranker.tls")?;
    }
    let router = builder
        .add_service(health_service)
        .add_service(bearer.wrap(serving::reflection(llamarec_proto::FILE_DESCRIPTOR_SET)?))
        .add_service(bearer.wrap(RankerServer::new(service).max_decoding_message_size(config.max_message_bytes)));
    service::set_serving(&health, true).await;
    tracing::info!(
        listen = %listener.local_addr()?,
        tls = config.tls.is_some(),
        bearer_auth = bearer.is_enabled(),
        reload = admin.is_enabled(),
        model = %version.name,
        version = %version.version,
        label = %version.label,
        template = %config.template,
        device = %config.device,
        "ranker serving"
    );
    let served = serving::serve_until(router, listener, health, Duration::from_millis(config.shutdown_grace_ms), shutdown).await;
    if let Some(task) = sighup {
        task.abort();
    }
    served?;
    Ok(())
}
