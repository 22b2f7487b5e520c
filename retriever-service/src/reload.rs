//! Hot reload of the served checkpoint: load and warm up on the blocking pool, check that the new
//! checkpoint can stand in for the old one, then swap it in atomically.
//!
//! The served model sits in an [`ArcSwap`]: a request takes it once (a lock-free load, no cache
//! line written by every reader as an `RwLock` read would) and holds that `Arc` to its answer, so
//! requests in flight finish on the old model while new ones get the new one; the old model is
//! freed when its last request ends. Each [`LoadedModel`] owns its own user-state cache (inside
//! its [`Retriever`]), so states computed by the old weights can never answer for the new ones.

use crate::retriever::Retriever;
use crate::server::load_and_warm_up;
use crate::service::ModelInfo;
use crate::service_config::{check_label, default_label};
use arc_swap::ArcSwap;
use llamarec_proto::v1::ModelVersion;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a reload was refused, defined and mapped to status codes in [`crate::error`].
pub use crate::error::ReloadError;

/// A checkpoint loaded, warmed up and ready to answer.
pub struct LoadedModel {
    /// Weights, catalog and this model's own state cache.
    pub retriever: Retriever,
    /// What Info and every answer report about it.
    pub info: ModelInfo,
}

/// Where the served model lives.
pub type ModelSlot = ArcSwap<LoadedModel>;

/// The configured checkpoint and its label: what a Reload without a path and SIGHUP load.
#[derive(Debug, Clone)]
pub struct Configured {
    /// `[retriever] checkpoint`.
    pub checkpoint: PathBuf,
    /// `[retriever] model_label`, or the directory's name.
    pub label: String,
}

/// A swap that happened.
#[derive(Debug, Clone)]
pub struct Reloaded {
    /// Served before.
    pub previous: ModelVersion,
    /// Served from now on.
    pub current: ModelVersion,
    /// The directory loaded.
    pub checkpoint: PathBuf,
    /// Load and warm-up time.
    pub load: Duration,
}

/// Loads new checkpoints into the slot, one at a time.
pub struct Reloader {
    slot: Arc<ModelSlot>,
    state_cache_bytes: u64,
    /// The configured checkpoint (replaced by SIGHUP). Its lock is held for a whole reload, so
    /// that concurrent reloads run one after the other: two interleaved ones could each check
    /// against the model the other is replacing, and the one that finished last would win
    /// whichever was asked last.
    configured: tokio::sync::Mutex<Configured>,
}

impl Reloader {
    /// A reloader around the model loaded at start.
    pub fn new(initial: LoadedModel, configured: Configured, state_cache_bytes: u64) -> Self {
        Self { slot: Arc::new(ArcSwap::from_pointee(initial)), state_cache_bytes, configured: tokio::sync::Mutex::new(configured) }
    }

    /// The slot requests load the model from.
    pub fn slot(&self) -> Arc<ModelSlot> {
        self.slot.clone()
    }

    /// Loads `checkpoint` (None: the configured one) with `label` (None: the configured label
    /// for the configured checkpoint, else the directory's name) and swaps it in.
    pub async fn reload(&self, checkpoint: Option<PathBuf>, label: Option<String>) -> Result<Reloaded, ReloadError> {
        let configured = self.configured.lock().await;
        let (checkpoint, label) = match checkpoint {
            Some(path) => {
                let label = label.unwrap_or_else(|| default_label(&path));
                (path, label)
            }
            None => (configured.checkpoint.clone(), label.unwrap_or_else(|| configured.label.clone())),
        };
        self.swap_in(checkpoint, label).await
    }

    /// Re-reads of the configuration (SIGHUP): loads its checkpoint and label, and makes them
    /// the configured ones only once they serve.
    pub async fn reload_configured(&self, new: Configured) -> Result<Reloaded, ReloadError> {
        let mut configured = self.configured.lock().await;
        let reloaded = self.swap_in(new.checkpoint.clone(), new.label.clone()).await?;
        *configured = new;
        Ok(reloaded)
    }

    /// Called with the `configured` lock held.
    async fn swap_in(&self, checkpoint: PathBuf, label: String) -> Result<Reloaded, ReloadError> {
        check_label(&label).map_err(|e| ReloadError::InvalidArgument(format!("label: {e}")))?;
        let start = Instant::now();
        let (path, cache_bytes) = (checkpoint.clone(), self.state_cache_bytes);
        let loaded = tokio::task::spawn_blocking(move || {
            load_and_warm_up(&path, &label).map(|(retriever, info)| LoadedModel { retriever: retriever.with_state_cache(cache_bytes), info })
        })
        .await
        .map_err(|e| ReloadError::Internal(format!("the load task for {} died: {e}", checkpoint.display())))?
        .map_err(|e| ReloadError::FailedPrecondition(format!("checkpoint {} refused: {e:#}; the previous model keeps serving", checkpoint.display())))?;
        let load = start.elapsed();
        let previous = self.slot.load_full();
        let (old, new) = (previous.retriever.catalog().fingerprint(), loaded.retriever.catalog().fingerprint());
        if old != new {
            // Callers (the gateway) send dense catalog indices checked against the fingerprint
            // they read at start; another catalog would turn them all into FAILED_PRECONDITION
            // or, worse, other items. A new catalog is a new deployment, not a reload.
            return Err(ReloadError::FailedPrecondition(format!(
                "checkpoint {} holds another catalog (catalog_fingerprint {new:016x}; the served one is {old:016x}): a reload must keep the \
                 catalog, since callers' dense item indices refer to it; deploy a new catalog as a new retriever. The previous model keeps serving",
                checkpoint.display()
            )));
        }
        let current = loaded.info.version.clone();
        self.slot.store(Arc::new(loaded));
        publish_model_info(&previous.info.version, 0.0);
        publish_model_info(&current, 1.0);
        tracing::info!(
            checkpoint = %checkpoint.display(),
            previous = %previous.info.version.version,
            previous_label = %previous.info.version.label,
            version = %current.version,
            label = %current.label,
            load_ms = load.as_millis() as u64,
            "retriever model reloaded"
        );
        Ok(Reloaded { previous: previous.info.version.clone(), current, checkpoint, load })
    }
}

/// `llamarec_retriever_model_info{version,label}`: 1 for the model served, 0 for one replaced
/// (kept so a dashboard sees when it stopped).
pub fn publish_model_info(version: &ModelVersion, value: f64) {
    metrics::gauge!("llamarec_retriever_model_info", "version" => version.version.clone(), "label" => version.label.clone()).set(value);
}
