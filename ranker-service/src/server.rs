//! Builds the ranker service from configuration and serves it.

use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Device};
use llamarec_common::config::{AssetsConfig, ConfigLayers};
use llamarec_common::{auth, serving};
use llamarec_proto::v1::ranker_server::RankerServer;
use llamarec_proto::v1::ModelVersion;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::backend::RankerBackend;
use crate::llama::LoadOptions;
use crate::queue::{BatchLimits, Queue};
use crate::ranker::Ranker;
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

/// Loads the ranker the section describes: model, tokenizer, template, adapter merged, prompt
/// limit applied. The CLI's ranker tools load through here too, so they score what the service
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

/// Name and content hash of the served weights: the model file's name (plus the adapter's
/// directory name) and the first 12 hex digits of the SHA-256 of the weight files and the
/// adapter's files.
pub fn model_version(
    config: &RankerServiceConfig,
    assets: &AssetsConfig,
) -> anyhow::Result<ModelVersion> {
    let model = config.model_path(assets);
    let mut files = weight_files(&model)?;
    let mut name = model
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_default();
    if let Some(adapter) = &config.adapter {
        files.push(adapter.join(crate::peft::CONFIG_FILE));
        files.push(adapter.join(crate::peft::WEIGHTS_FILE));
        name = format!(
            "{name}+{}",
            adapter
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
    }
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for path in files {
        let mut file =
            std::fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
        loop {
            let n = file
                .read(&mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
    }
    Ok(ModelVersion {
        name,
        version: hex::encode(&hash.finalize()[..6]),
        // Ranker labels come with the ranker's hot reload (issue 20, next slice).
        label: String::new(),
    })
}

/// The files whose bytes are the model: a GGUF file, or an HF directory's `*.safetensors`.
fn weight_files(model: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !model.is_dir() {
        return Ok(vec![model.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(model)
        .with_context(|| format!("listing {}", model.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// The model, its queue and what Info reports, warmed up with one real request.
pub struct LoadedRanker {
    /// The model core, shared with the request handlers (for tokenization).
    pub ranker: Arc<Ranker>,
    /// The queue in front of the model thread.
    pub queue: RankQueue,
    /// Info's answer.
    pub info: ModelInfo,
}

/// Loads the model (on a blocking thread), starts its queue and model thread, and runs one real
/// request through both. Must run inside a Tokio runtime.
pub async fn load(
    config: &RankerServiceConfig,
    assets: &AssetsConfig,
) -> anyhow::Result<LoadedRanker> {
    let start = Instant::now();
    let (c, a) = (config.clone(), assets.clone());
    let (ranker, version) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        Ok((load_ranker(&c, &a)?, model_version(&c, &a)?))
    })
    .await??;
    let ranker = Arc::new(ranker);
    let backend = RankerBackend::new(ranker.clone(), config.threads, config.history_cache_bytes)?;
    let limits = BatchLimits {
        max_batch_size: config.max_batch_size,
        max_batch_tokens: config.max_batch_tokens,
        max_wait: Duration::from_millis(config.max_batch_wait_ms),
        capacity: config.queue_capacity,
    };
    let queue = Queue::start(backend, limits, "ranker-model")?;
    let loaded_ms = start.elapsed().as_millis() as u64;
    let warm = Instant::now();
    service::warm_up(&ranker, &queue)
        .await
        .context("warm-up request")?;
    let info = ModelInfo {
        version,
        adapter: config
            .adapter
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        device: config.device.clone(),
    };
    tracing::info!(
        model = %info.version.name,
        version = %info.version.version,
        precision = ?config.precision,
        projection_kernels = ranker.model().projection_kernels(),
        load_ms = loaded_ms,
        warm_up_ms = warm.elapsed().as_millis() as u64,
        resident_mb = crate::metrics::resident_bytes().unwrap_or(0) >> 20,
        "ranker loaded and warmed up"
    );
    Ok(LoadedRanker {
        ranker,
        queue,
        info,
    })
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
    run_with(config, layers.section::<AssetsConfig>()?, listener, shutdown).await
}

/// [`run`] with the sections already read (benchmarks and tests adjust them first).
pub async fn run_with(
    config: RankerServiceConfig,
    assets: AssetsConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let bearer = auth::shared_token_auth("ranker", "ranker", config.auth_token.as_deref(), config.auth_token_file.as_deref())?;
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
    let version = loaded.info.version.clone();
    let limits = service::RequestLimits::new(&config, loaded.ranker.renderer().template().letters.len());
    let service = RankerService::new(loaded.ranker, loaded.queue, loaded.info, health.clone()).with_limits(limits);
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
        model = %version.name,
        version = %version.version,
        template = %config.template,
        device = %config.device,
        "ranker serving"
    );
    serving::serve_until(router, listener, health, Duration::from_millis(config.shutdown_grace_ms), shutdown).await?;
    Ok(())
}
