//! Hot reload of the ranker's LoRA adapter over the base model already in memory: read the
//! adapter, build a ranker that shares the base weights, warm it up on a blocking thread, then
//! swap it in atomically.
//!
//! The served model sits in an [`ArcSwap`]: a Rank call takes it once and its job carries that
//! `Arc` through the queue to the model thread, so requests already queued or computing finish
//! on the old adapter (and report its version) while new ones get the new one; the old adapter
//! is freed when its last request ends. Each served model has a generation, higher for each
//! swap; the model thread keeps its history cache for one generation only (the cached
//! attention state depends on the adapter) and starts an empty one when a newer generation
//! arrives.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use llamarec_common::model_label::check_label;
use llamarec_proto::v1::ModelVersion;

use crate::error::ReloadError;
use crate::model_version::{default_label, BaseDigest};
use crate::ranker::Ranker;
use crate::service::ModelInfo;

/// A ranker loaded, warmed up and ready to answer.
pub struct ServedModel {
    /// Base weights (shared between generations) plus this generation's adapter.
    pub ranker: Arc<Ranker>,
    /// What Info and every answer report about it.
    pub info: ModelInfo,
    /// 0 for the model loaded at start, one more for each swap.
    pub generation: u64,
}

/// Where the served model lives.
pub type ModelSlot = ArcSwap<ServedModel>;

/// The configured adapter and label: what a Reload without an adapter and SIGHUP load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configured {
    /// `[ranker] adapter`; None: the base model alone.
    pub adapter: Option<PathBuf>,
    /// `[ranker] model_label`, or the adapter directory's name ("base" without one).
    pub label: String,
}

/// What a Reload asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterChoice {
    /// The configured adapter, re-read from disk.
    Configured,
    /// This adapter directory.
    Dir(PathBuf),
    /// No adapter: the base model alone.
    BaseOnly,
}

/// A swap that happened.
#[derive(Debug, Clone)]
pub struct Reloaded {
    /// Served before.
    pub previous: ModelVersion,
    /// Served from now on.
    pub current: ModelVersion,
    /// The adapter loaded; None for the base alone.
    pub adapter: Option<PathBuf>,
    /// Adapter load, prefix pass and warm-up time.
    pub load: Duration,
}

/// Loads new adapters into the slot, one at a time.
pub struct Reloader {
    slot: Arc<ModelSlot>,
    base: BaseDigest,
    /// The configured adapter (replaced by SIGHUP). Its lock is held for a whole reload, so
    /// concurrent reloads run one after the other and the last one asked is the one served.
    configured: tokio::sync::Mutex<Configured>,
}

impl Reloader {
    /// A reloader around the model served at start (generation 0).
    pub fn new(initial: ServedModel, base: BaseDigest, configured: Configured) -> Self {
        publish_model_info(&initial.info.version, 1.0);
        Self {
            slot: Arc::new(ArcSwap::from_pointee(initial)),
            base,
            configured: tokio::sync::Mutex::new(configured),
        }
    }

    /// The slot requests load the model from.
    pub fn slot(&self) -> Arc<ModelSlot> {
        self.slot.clone()
    }

    /// Loads `choice` with `label` (None: the configured label for the configured adapter,
    /// else the adapter directory's name, "base" for none) and swaps it in.
    pub async fn reload(&self, choice: AdapterChoice, label: Option<String>) -> Result<Reloaded, ReloadError> {
        let configured = self.configured.lock().await;
        let (adapter, label) = match choice {
            AdapterChoice::Configured => (configured.adapter.clone(), label.unwrap_or_else(|| configured.label.clone())),
            AdapterChoice::Dir(dir) => {
                let label = label.unwrap_or_else(|| default_label(Some(&dir)));
                (Some(dir), label)
            }
            AdapterChoice::BaseOnly => (None, label.unwrap_or_else(|| default_label(None))),
        };
        self.swap_in(adapter, label).await
    }

    /// After a re-read of the configuration (SIGHUP): loads its adapter and label, and makes
    /// them the configured ones only once they serve.
    pub async fn reload_configured(&self, new: Configured) -> Result<Reloaded, ReloadError> {
        let mut configured = self.configured.lock().await;
        let reloaded = self.swap_in(new.adapter.clone(), new.label.clone()).await?;
        *configured = new;
        Ok(reloaded)
    }

    /// Called with the `configured` lock held.
    async fn swap_in(&self, adapter: Option<PathBuf>, label: String) -> Result<Reloaded, ReloadError> {
        check_label(&label).map_err(|e| ReloadError::InvalidArgument(format!("label: {e}")))?;
        let start = Instant::now();
        let previous = self.slot.load_full();
        let (base, dir, device) = (previous.ranker.clone(), adapter.clone(), previous.info.device.clone());
        let digest = self.base.clone();
        let what = adapter.as_ref().map_or_else(|| "the base model alone".to_string(), |p| format!("adapter {}", p.display()));
        let built = tokio::task::spawn_blocking(move || -> anyhow::Result<(Ranker, ModelInfo)> {
            let lora = dir.as_deref().map(|d| base.read_adapter(d)).transpose()?;
            let ranker = base.with_adapter(lora.map(Arc::new))?;
            warm_up(&ranker)?;
            let version = digest.version(dir.as_deref(), &label)?;
            let adapter = dir.map(|d| d.display().to_string()).unwrap_or_default();
            Ok((ranker, ModelInfo { version, adapter, device }))
        })
        .await
        .map_err(|e| ReloadError::Internal(format!("the load task for {what} died: {e}")))?
        .map_err(|e| ReloadError::FailedPrecondition(format!("{what} refused: {e:#}; the previous model keeps serving")))?;
        let (ranker, info) = built;
        let load = start.elapsed();
        // Swaps run one at a time (the `configured` lock), so the served model is still `previous`.
        let generation = previous.generation + 1;
        let current = info.version.clone();
        self.slot.store(Arc::new(ServedModel { ranker: Arc::new(ranker), info, generation }));
        publish_model_info(&previous.info.version, 0.0);
        publish_model_info(&current, 1.0);
        tracing::info!(
            adapter = %adapter.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_default(),
            previous = %previous.info.version.version,
            previous_label = %previous.info.version.label,
            version = %current.version,
            label = %current.label,
            generation,
            load_ms = load.as_millis() as u64,
            "ranker adapter reloaded"
        );
        Ok(Reloaded { previous: previous.info.version.clone(), current, adapter, load })
    }
}

/// Scores the fixed MovieLens request on `ranker` (outside the queue) and checks the answer:
/// one finite score per candidate, probabilities summing to 1. An adapter with NaN or infinite
/// weights fails here rather than serving garbage.
pub fn warm_up(ranker: &Ranker) -> anyhow::Result<()> {
    let (history, candidates) = crate::sample::movielens_request();
    let scores = ranker.score(&history, &candidates)?;
    let p: f32 = scores.probabilities.iter().sum();
    if scores.logits.len() != candidates.len() || scores.logits.iter().any(|x| !x.is_finite()) || (p - 1.0).abs() > 1e-3 {
        anyhow::bail!("warm-up gave {} scores ({:?}) whose probabilities sum to {p}: the adapter's weights are damaged", scores.logits.len(), scores.logits);
    }
    Ok(())
}

/// `llamarec_ranker_model_info{version,label}`: 1 for the model served, 0 for one replaced
/// (kept so a dashboard sees when it stopped).
pub fn publish_model_info(version: &ModelVersion, value: f64) {
    metrics::gauge!(crate::metrics::MODEL_INFO, "version" => version.version.clone(), "label" => version.label.clone()).set(value);
}
