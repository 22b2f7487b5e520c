//! The `[ranker]` configuration section: where the service listens, which model, adapter and
//! template it serves, on which device, and its batching, queue and cache limits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use llamarec_common::config::{AssetsConfig, Section};
use serde::{Deserialize, Serialize};

use crate::prompt::PromptTemplate;
use crate::ranker::RankerModelConfig;
use crate::weights::WeightPrecision;

/// The `[ranker]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RankerServiceConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus metrics listen address (`/metrics`); none disables the exporter.
    pub metrics_listen: Option<SocketAddr>,
    /// A GGUF file or an HF safetensors directory; relative paths resolve against `[assets] dir`.
    pub model: PathBuf,
    /// An explicit `tokenizer.json` (relative to `[assets] dir`); default: the GGUF metadata or
    /// the HF directory's file.
    pub tokenizer: Option<PathBuf>,
    /// A PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`),
    /// applied over the base weights; relative to the working directory. SIGHUP or the Reload
    /// RPC replaces it without a restart.
    pub adapter: Option<PathBuf>,
    /// Human label of the served model, reported beside its content hash in Info, every Rank
    /// answer and the `llamarec_ranker_model_info` metric. Default: the adapter directory's
    /// name, "base" without an adapter.
    pub model_label: Option<String>,
    /// A file of admin tokens (one per line, `#` comments), any of which may call the Reload
    /// RPC. None: Reload is refused (PERMISSION_DENIED). An admin token also passes the
    /// `auth_token` check of the other RPCs.
    pub admin_tokens_file: Option<PathBuf>,
    /// Prompt template: "alpaca" (the paper's) or "chatml".
    pub template: String,
    /// How quantized GGUF weights are held: "f32" (dequantized at load; fast on CPU) or
    /// "quantized" (as stored; less memory, slow on CPU).
    pub precision: WeightPrecision,
    /// Compute device: "cpu" or "cuda:N" (needs the `cuda` build feature).
    pub device: String,
    /// Threads of the model's compute pool on CPU; 0 = one per core.
    pub threads: usize,
    /// Most requests in one forward pass.
    pub max_batch_size: usize,
    /// Most tokens one forward pass runs, summed over its requests (prompt minus the shared
    /// instruction prefix); a single longer request still runs alone.
    pub max_batch_tokens: usize,
    /// How long the oldest queued request may wait for others to fill a batch.
    pub max_batch_wait_ms: u64,
    /// Requests queued or computing at once; the next one is refused with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Bytes of per-user history attention state kept for returning users (quick_cache; an
    /// entry over half of it is not cached); 0 disables it.
    pub history_cache_bytes: usize,
    /// Longest prompt accepted, in tokens; default: the model's context length.
    pub max_prompt_tokens: Option<usize>,
    /// Longest title accepted in a request, in bytes (history and candidates). Titles are cut
    /// to the template's 32 tokens anyway; this refuses absurd ones before tokenizing.
    pub max_title_bytes: usize,
    /// Most history titles a request may carry (only the template's last 20 are rendered).
    pub max_history_titles: usize,
    /// Largest gRPC request decoded, in bytes.
    pub max_message_bytes: usize,
    /// When set, every call except grpc.health.v1 must carry `authorization: Bearer <token>`
    /// with this token (the gateway's `backend_token`). Environment:
    /// `LLAMAREC_RANKER__AUTH_TOKEN`.
    pub auth_token: Option<String>,
    /// A file holding `auth_token` (e.g. a mounted Kubernetes Secret).
    pub auth_token_file: Option<PathBuf>,
    /// TLS on the listener (`[ranker.tls]`: cert, key, optional client_ca to require client
    /// certificates), so that the gateway's token and the histories do not cross the network
    /// in clear; the gateway then dials it with `[gateway.backend_tls]`. Absent: plaintext.
    pub tls: Option<llamarec_common::auth::TlsConfig>,
    /// A second, plaintext listener serving only grpc.health.v1, for probes that cannot speak
    /// TLS (Kubernetes' native gRPC probes). None: health only on `listen`.
    pub health_listen: Option<SocketAddr>,
    /// On SIGTERM: health goes NOT_SERVING, the listener closes, queued and computing requests
    /// get this long to finish before the process exits anyway.
    pub shutdown_grace_ms: u64,
    /// The `[ranker.train]` recipe of `llamarec train ranker`.
    pub train: crate::train::RankerTrainConfig,
}

impl Default for RankerServiceConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50052)),
            metrics_listen: None,
            model: PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            tokenizer: None,
            adapter: None,
            model_label: None,
            admin_tokens_file: None,
            template: "alpaca".into(),
            precision: WeightPrecision::F32,
            device: "cpu".into(),
            threads: 0,
            // On CPU one ~600-token prompt already fills the matmuls; batching only adds padding
            // (design.md), so requests run one at a time unless configured otherwise.
            max_batch_size: 1,
            max_batch_tokens: 4096,
            max_batch_wait_ms: 0,
            queue_capacity: 32,
            // A returning user's prefix + history state is ~15 MB for SmolLM2-135M (30 blocks x
            // 2 x 3 heads x 64 x 4 bytes = 46 KB per token, ~330 tokens).
            history_cache_bytes: 256 << 20,
            max_prompt_tokens: None,
            max_title_bytes: 1024,
            max_history_titles: 100,
            max_message_bytes: 4 << 20,
            auth_token: None,
            auth_token_file: None,
            tls: None,
            health_listen: None,
            shutdown_grace_ms: 10_000,
            train: crate::train::RankerTrainConfig::default(),
        }
    }
}

/// A parsed `device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU.
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl DeviceSpec {
    /// Parses "cpu" or "cuda:N".
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("{s:?} is not \"cpu\" or \"cuda:N\"")),
        }
    }
}

impl RankerServiceConfig {
    /// The model path with `[assets] dir` applied.
    pub fn model_path(&self, assets: &AssetsConfig) -> PathBuf {
        resolve(&assets.dir, &self.model)
    }

    /// The model-core configuration this section describes.
    pub fn model_config(&self, assets: &AssetsConfig) -> RankerModelConfig {
        RankerModelConfig {
            model: self.model_path(assets),
            tokenizer: self.tokenizer.as_ref().map(|t| resolve(&assets.dir, t)),
            precision: self.precision,
            template: PromptTemplate::builtin(&self.template).expect("validated template name"),
        }
    }

    /// The label of the configured model: `model_label`, else the adapter directory's name
    /// ("base" without one).
    pub fn label(&self) -> String {
        self.model_label.clone().unwrap_or_else(|| crate::model_version::default_label(self.adapter.as_deref()))
    }

    /// The parsed `device`.
    pub fn device_spec(&self) -> DeviceSpec {
        DeviceSpec::parse(&self.device).expect("validated device")
    }
}

fn resolve(dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    }
}

impl Section for RankerServiceConfig {
    const NAME: &'static str = "ranker";

    fn validate(&self) -> Result<(), (String, String)> {
        self.validate_settings()?;
        if let DeviceSpec::Cuda(_) = self.device_spec() {
            if !BUILT_WITH_CUDA {
                return Err((
                    "device".into(),
                    "this build has no CUDA support (cargo feature `cuda`)".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Whether this build of the ranker can use a CUDA device (cargo feature `cuda`).
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");

impl RankerServiceConfig {
    /// Every check of [`Section::validate`] except whether this build supports the device: what
    /// `llamarec config check` applies to a deployment whose rankers run another build (the
    /// CUDA image), where the build that checks is not the one that serves.
    pub fn validate_settings(&self) -> Result<(), (String, String)> {
        let err = |key: &str, reason: String| Err((key.to_string(), reason));
        if let Some(label) = &self.model_label {
            llamarec_common::model_label::check_label(label).map_err(|e| ("model_label".to_string(), e))?;
        }
        if PromptTemplate::builtin(&self.template).is_none() {
            return err(
                "template",
                format!("{:?} is not one of \"alpaca\", \"chatml\"", self.template),
            );
        }
        if let Err(reason) = DeviceSpec::parse(&self.device) {
            return err("device", reason);
        }
        for (key, value) in [
            ("max_batch_size", self.max_batch_size),
            ("max_batch_tokens", self.max_batch_tokens),
            ("queue_capacity", self.queue_capacity),
            ("max_title_bytes", self.max_title_bytes),
            ("max_history_titles", self.max_history_titles),
        ] {
            if value == 0 {
                return err(key, "must be at least 1".into());
            }
        }
        if self.max_message_bytes < 1024 {
            return err("max_message_bytes", "must be at least 1024".into());
        }
        if let Some(t) = &self.auth_token {
            if let Err(e) = llamarec_common::auth::check_token(t) {
                return err("auth_token", e);
            }
        }
        if self.health_listen == Some(self.listen) {
            return err("health_listen", "must differ from `listen` (it is a second listener)".into());
        }
        if self.max_prompt_tokens == Some(0) {
            return err("max_prompt_tokens", "must be at least 1".into());
        }
        if let Err((key, reason)) = self.train.validate() {
            return err(&format!("train.{key}"), reason);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llamarec_common::config::ConfigLayers;

    fn section(toml: &str, env: &[(&str, &str)]) -> Result<RankerServiceConfig, String> {
        let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(file.path(), toml).unwrap();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ConfigLayers::load_with_env(Some(file.path()), Some(env))
            .unwrap()
            .section::<RankerServiceConfig>()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn reads_keys_environment_overrides_and_resolves_the_model_against_assets() {
        let c = section(
            "[ranker]\ntemplate = \"chatml\"\nmax_batch_size = 4\nprecision = \"quantized\"\n",
            &[
                ("LLAMAREC_RANKER__LISTEN", "127.0.0.1:6001"),
                ("LLAMAREC_RANKER__THREADS", "2"),
            ],
        )
        .unwrap();
        assert_eq!((c.listen.port(), c.threads, c.max_batch_size), (6001, 2, 4));
        assert_eq!(c.precision, WeightPrecision::Quantized);
        let assets = AssetsConfig {
            dir: PathBuf::from("/data"),
        };
        let model = c.model_config(&assets);
        assert_eq!(
            model.model,
            PathBuf::from("/data/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
        assert_eq!(model.template.name, "chatml");
        assert_eq!(c.device_spec(), DeviceSpec::Cpu);
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("template = \"llama\"", "ranker.template"),
            ("device = \"gpu\"", "ranker.device"),
            ("max_batch_size = 0", "ranker.max_batch_size"),
            ("queue_capacity = 0", "ranker.queue_capacity"),
            ("precision = \"f16\"", "ranker.precision"),
            ("batch = 3", "unknown field `batch`"),
        ];
        for (line, key) in cases {
            let e = section(&format!("[ranker]\n{line}\n"), &[]).unwrap_err();
            assert!(e.contains(key), "{line}: {e}");
        }
        if !cfg!(feature = "cuda") {
            let e = section("[ranker]\ndevice = \"cuda:0\"\n", &[]).unwrap_err();
            assert!(e.contains("ranker.device") && e.contains("CUDA"), "{e}");
        }
    }

    #[test]
    fn device_specs() {
        assert_eq!(DeviceSpec::parse("cuda:1"), Ok(DeviceSpec::Cuda(1)));
        assert!(DeviceSpec::parse("cuda:x").is_err());
    }
}
