//! The `[retriever]` configuration section: where the service listens, which checkpoint it
//! serves, its request limits, and (in `[retriever.train]`) the recipe `llamarec train
//! retriever` uses to produce that checkpoint.

use crate::train::TrainConfig;
use llamarec_common::config::Section;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The `[retriever]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrieverServiceConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus metrics listen address (`/metrics`); none disables the exporter.
    pub metrics_listen: Option<SocketAddr>,
    /// Checkpoint directory served (and written by `llamarec train retriever`).
    pub checkpoint: PathBuf,
    /// Human label of the served checkpoint, reported beside its content hash in Info, every
    /// answer's `model` and the `llamarec_retriever_model_info` metric. None: the checkpoint
    /// directory's name.
    pub model_label: Option<String>,
    /// Files of admin tokens (one per line, `#` comments), any of which may call the Reload RPC.
    /// None: Reload is refused (PERMISSION_DENIED). An admin token also passes the
    /// `auth_token` check, so an operator needs only one.
    pub admin_tokens_file: Option<PathBuf>,
    /// Largest `k` a request may ask for.
    pub max_k: u32,
    /// Longest history a request may send; the model reads its last `max_len` events.
    pub max_history: u32,
    /// Requests computed or queued at once; the next one is refused with RESOURCE_EXHAUSTED.
    /// Each request of a RetrieveBatch counts as one.
    pub max_in_flight: usize,
    /// Event-loop threads of the service's runtime; 0: one per core. Scoring a returning user runs
    /// on them; recurrences over whole histories go to tokio's blocking pool either way.
    pub worker_threads: usize,
    /// Most requests one RetrieveBatch may carry; a larger batch is refused whole with
    /// INVALID_ARGUMENT.
    pub max_batch: u32,
    /// Bytes of recent user states kept so that a returning user skips the recurrence (about
    /// 1.9 KB per user with a 200-event window); 0 turns the cache off.
    pub state_cache_bytes: u64,
    /// On SIGTERM: health goes NOT_SERVING, the listener closes, in-flight requests get this
    /// long to finish before the process exits anyway.
    pub shutdown_grace_ms: u64,
    /// Longest item id accepted in a request's history, in bytes.
    pub max_item_id_len: usize,
    /// Largest gRPC request decoded, in bytes.
    pub max_message_bytes: usize,
    /// When set, every call except grpc.health.v1 must carry `authorization: Bearer <token>`
    /// with this token (the gateway's `backend_token`). Environment:
    /// `LLAMAREC_RETRIEVER__AUTH_TOKEN`.
    pub auth_token: Option<String>,
    /// A file holding `auth_token` (e.g. a mounted Kubernetes Secret).
    pub auth_token_file: Option<PathBuf>,
    /// TLS on the listener (`[retriever.tls]`: cert, key, optional client_ca to require client
    /// certificates), so that the gateway's token and the histories do not cross the network
    /// in clear; the gateway then dials it with `[gateway.backend_tls]`. Absent: plaintext.
    pub tls: Option<llamarec_common::auth::TlsConfig>,
    /// A second, plaintext listener serving only grpc.health.v1, for probes that cannot speak
    /// TLS (Kubernetes' native gRPC probes). None: health only on `listen`.
    pub health_listen: Option<SocketAddr>,
    /// Training recipe for `llamarec train retriever`.
    pub train: TrainConfig,
}

impl Default for RetrieverServiceConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: None,
            checkpoint: PathBuf::from("retriever-service/checkpoints/ml-100k-ensemble"),
            model_label: None,
            admin_tokens_file: None,
            max_k: 200,
            max_history: 1000,
            max_in_flight: 64,
            max_batch: 64,
            worker_threads: 0,
            state_cache_bytes: 64 << 20,
            shutdown_grace_ms: 10_000,
            max_item_id_len: 128,
            max_message_bytes: 4 << 20,
            auth_token: None,
            auth_token_file: None,
            tls: None,
            health_listen: None,
            train: TrainConfig::default(),
        }
    }
}

impl Section for RetrieverServiceConfig {
    const NAME: &'static str = "retriever";

    fn validate(&self) -> Result<(), (String, String)> {
        let err = |key: &str, reason: &str| Err((key.to_string(), reason.to_string()));
        if let Some(label) = &self.model_label {
            check_label(label).map_err(|e| ("model_label".to_string(), e))?;
        }
        if self.max_k == 0 {
            return err("max_k", "must be at least 1");
        }
        if self.max_history == 0 {
            return err("max_history", "must be at least 1");
        }
        if self.max_in_flight == 0 {
            return err("max_in_flight", "must be at least 1");
        }
        if self.max_batch == 0 {
            return err("max_batch", "must be at least 1");
        }
        if self.max_item_id_len == 0 {
            return err("max_item_id_len", "must be at least 1");
        }
        if self.max_message_bytes < 1024 {
            return err("max_message_bytes", "must be at least 1024");
        }
        if let Some(t) = &self.auth_token {
            llamarec_common::auth::check_token(t).map_err(|e| ("auth_token".to_string(), e))?;
        }
        if self.health_listen == Some(self.listen) {
            return err("health_listen", "must differ from `listen` (it is a second listener)");
        }
        if self.train.batch_size == 0 {
            return err("train.batch_size", "must be at least 1");
        }
        // `num_items` comes from the data set at training time.
        let model = crate::config::LruRecConfig { num_items: 1, ..self.train.model.clone() };
        model.validate().map_err(|e| ("train.model".to_string(), e.to_string()))
    }
}

pub use llamarec_common::model_label::{check_label, default_label};

impl RetrieverServiceConfig {
    /// The label of the configured checkpoint: `model_label`, else the directory's name.
    pub fn label(&self) -> String {
        self.model_label.clone().unwrap_or_else(|| default_label(&self.checkpoint))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llamarec_common::config::ConfigLayers;

    #[test]
    fn reads_keys_and_environment_overrides_and_names_bad_keys() {
        let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(file.path(), "[retriever]\nmax_k = 50\ncheckpoint = \"x\"\n[retriever.train]\nmax_epochs = 3\n[retriever.train.model]\ndropout = 0.3\n").unwrap();
        let env = vec![("LLAMAREC_RETRIEVER__LISTEN".to_string(), "127.0.0.1:6000".to_string())];
        let c: RetrieverServiceConfig = ConfigLayers::load_with_env(Some(file.path()), Some(env)).unwrap().section().unwrap();
        assert_eq!((c.max_k, c.checkpoint, c.listen.port()), (50, PathBuf::from("x"), 6000));
        assert_eq!((c.train.max_epochs, c.train.model.dropout), (3, 0.3));

        std::fs::write(file.path(), "[retriever]\nmax_k = 0\n").unwrap();
        let e = ConfigLayers::load_with_env(Some(file.path()), Some(vec![])).unwrap().section::<RetrieverServiceConfig>().unwrap_err();
        assert!(e.to_string().contains("retriever.max_k"), "{e}");

        std::fs::write(file.path(), "[retriever]\nmodel_label = \"a\\nb\"\n").unwrap();
        let e = ConfigLayers::load_with_env(Some(file.path()), Some(vec![])).unwrap().section::<RetrieverServiceConfig>().unwrap_err();
        assert!(e.to_string().contains("retriever.model_label"), "{e}");
    }

    #[test]
    fn the_label_defaults_to_the_checkpoint_directory_name() {
        let mut c = RetrieverServiceConfig { checkpoint: PathBuf::from("retriever-service/checkpoints/ml-100k"), ..Default::default() };
        assert_eq!(c.label(), "ml-100k");
        c.model_label = Some("longer run".into());
        assert_eq!(c.label(), "longer run");
        assert!(check_label("").is_err() && check_label(&"x".repeat(129)).is_err() && check_label("tab\there").is_err());
    }
}
