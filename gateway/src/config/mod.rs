//! The `[gateway]` configuration section (its sub-sections in [`sections`]).

mod sections;
pub use sections::*;

use llamarec_common::config::Section;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The `[gateway]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus metrics listen address (`/metrics`); none disables the exporter.
    pub metrics_listen: Option<SocketAddr>,
    /// Retriever address, `host:port`.
    pub retriever: String,
    /// Ranker pods.
    pub rankers: RankerEndpoints,
    /// History store.
    pub store: StoreConfig,
    /// On first start with an empty store, load the data set's train + validation histories so
    /// that each user's test item is what Recommend should predict.
    pub seed_from_dataset: bool,
    /// Largest `k` a request may ask for.
    pub max_k: u32,
    /// Candidates the ranker re-orders when a request does not say (the paper's 20).
    pub default_candidates: u32,
    /// Largest number of candidates (the ranker's index letters).
    pub max_candidates: u32,
    /// History items whose titles go into the ranker's prompt (the paper's 20).
    pub prompt_history: u32,
    /// Weight of the verbalizer log-probability in the fused score; the retriever's normalised
    /// score gets `1 - ranker_weight`. 1.0 is the paper's behaviour (order by the LLM alone).
    /// At 0 the LLM's scores cannot change the order, so Recommend does not call the ranker at
    /// all (its answers are the retriever's order, not degraded; see `shadow_ranker` to keep
    /// measuring the ranker). The default is 0 because that is what `llamarec calibrate` chooses
    /// for the shipped adapter and retriever: no blend beats the retriever alone on validation,
    /// and the LLM alone is the worst row of EVAL.md. Raise it only when calibrate says so.
    pub ranker_weight: f32,
    /// Longest accepted user id, in bytes.
    pub max_user_id_len: usize,
    /// Most events in one AppendEvents or Recommend call.
    pub max_events_per_call: usize,
    /// Longest history sent to the retriever (the most recent items are kept). The retriever
    /// reads only its model's window but leaves every item it is sent out of the answer, so this
    /// also bounds which seen items can never be recommended again; keep it within the
    /// retriever's `max_history`.
    pub max_history: usize,
    /// Longest inline history a request may carry.
    pub max_inline_history: usize,
    /// Requests in flight before new ones are refused with RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// Deadline assumed when the caller sends none.
    pub default_deadline_ms: u64,
    /// Share of the remaining deadline the retriever may use.
    pub retrieve_budget_ms: u64,
    /// Send histories to the retriever as dense catalog indices (a packed `uint32` field) rather
    /// than external ids, when the retriever serves the same catalog (same fingerprint; on a
    /// mismatch the gateway falls back to ids by itself). Off only to compare the two.
    pub retrieve_dense_indices: bool,
    /// Time kept back from the deadline for merging and sending the answer: at least this...
    pub reserve_ms: u64,
    /// ...and at least this share of the caller's deadline, which also covers the time the
    /// request spent before the gateway saw it (so that a degraded answer reaches the caller
    /// before its deadline, instead of the caller giving up on a late one).
    pub reserve_fraction: f64,
    /// Below this much remaining time the ranker is not even called (degraded, timeout).
    pub min_rank_budget_ms: u64,
    /// Popular items the gateway keeps (from the data set, at start) to answer with when the
    /// retriever cannot be reached, flagged `DEGRADED_REASON_RETRIEVER_FALLBACK`; 0 turns the
    /// fallback off (Recommend then fails UNAVAILABLE naming the retriever).
    pub retriever_fallback_items: usize,
    /// User-history cache: most bytes of histories kept (event ids, timestamps, catalog indices
    /// and per-entry overhead, as counted by the cache), so one long history cannot crowd the
    /// budget unseen the way a count of users would let it.
    pub cache_bytes: u64,
    /// User-history cache: how long an entry is trusted (other replicas may have appended).
    pub cache_ttl_ms: u64,
    /// On SIGTERM: health goes NOT_SERVING, the listener closes, in-flight requests get this
    /// long to finish before the process exits anyway (keep Kubernetes'
    /// terminationGracePeriodSeconds above it).
    pub shutdown_grace_ms: u64,
    /// Longest accepted item id, in bytes.
    pub max_item_id_len: usize,
    /// Largest gRPC message decoded, in bytes: requests from callers, and answers from the
    /// retriever and the rankers.
    pub max_message_bytes: usize,
    /// TLS on the listener (`[gateway.tls]`: cert, key, optional client_ca for mutual TLS);
    /// absent: plaintext.
    pub tls: Option<llamarec_common::auth::TlsConfig>,
    /// Bearer tokens callers must send (`[gateway.auth]`: tokens, tokens_file); none: open.
    /// grpc.health.v1 never needs one.
    pub auth: llamarec_common::auth::AuthConfig,
    /// Token sent to the retriever and the rankers (their `auth_token`).
    pub backend_token: Option<String>,
    /// A file holding `backend_token` (e.g. a mounted Kubernetes Secret).
    pub backend_token_file: Option<PathBuf>,
    /// TLS towards the retriever and the rankers (`[gateway.backend_tls]`); absent: plaintext.
    pub backend_tls: Option<BackendTls>,
    /// A second, plaintext listener serving only grpc.health.v1, for probes that cannot speak
    /// TLS (Kubernetes' native gRPC probes) while `[gateway.tls]` is on. None: health only on
    /// `listen`.
    pub health_listen: Option<SocketAddr>,
    /// Traffic capture (`[gateway.traffic]`): a sampled share of Recommend requests as JSON lines.
    pub traffic: TrafficConfig,
    /// Event-loop threads of the gateway's runtime; 0: one per core. On a machine it shares with
    /// the retriever and the ranker (the local cluster) one is cheaper and answers sooner.
    pub worker_threads: usize,
    /// Coalescing of concurrent Retrieve calls (`[gateway.retrieve_batching]`).
    pub retrieve_batching: RetrieveBatching,
    /// Shadow ranking at `ranker_weight` 0 (`[gateway.shadow_ranker]`): a sampled fraction of
    /// requests' candidates scored by the ranker beside the answer, for offline comparison. Off.
    pub shadow_ranker: ShadowRankerConfig,
    /// The canary split (`[gateway.canary]`): a sticky share of users ranked by other pods with
    /// another weight. Off.
    pub canary: CanaryConfig,
    /// A file of admin tokens (one per line, `#` comments), any of which may call the admin RPCs
    /// `GetSplit` and `SetSplit` (`llamarec split`). None: they are refused (PERMISSION_DENIED).
    /// An admin token also passes the `[gateway.auth]` check, so an operator needs only one.
    pub admin_tokens_file: Option<PathBuf>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50050".parse().expect("valid literal"),
            metrics_listen: Some("127.0.0.1:9090".parse().expect("valid literal")),
            retriever: "127.0.0.1:50051".into(),
            rankers: RankerEndpoints::default(),
            store: StoreConfig::Embedded { path: "runs/gateway/histories.redb".into() },
            seed_from_dataset: true,
            max_k: 100,
            default_candidates: 20,
            max_candidates: 20,
            prompt_history: 20,
            ranker_weight: 0.0,
            max_user_id_len: 256,
            max_events_per_call: 256,
            max_history: 1000,
            max_inline_history: 1000,
            max_in_flight: 256,
            default_deadline_ms: 5_000,
            retrieve_budget_ms: 200,
            retrieve_dense_indices: true,
            reserve_ms: 2,
            reserve_fraction: 0.05,
            min_rank_budget_ms: 20,
            cache_bytes: 64 << 20,
            retriever_fallback_items: 200,
            cache_ttl_ms: 30_000,
            shutdown_grace_ms: 10_000,
            max_item_id_len: 128,
            max_message_bytes: 4 << 20,
            tls: None,
            auth: llamarec_common::auth::AuthConfig::default(),
            backend_token: None,
            backend_token_file: None,
            backend_tls: None,
            health_listen: None,
            traffic: TrafficConfig::default(),
            worker_threads: 0,
            retrieve_batching: Default::default(),
            shadow_ranker: Default::default(),
            canary: Default::default(),
            admin_tokens_file: None,
        }
    }
}

impl Section for GatewayConfig {
    const NAME: &'static str = "gateway";

    fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, r: &str| Err((k.to_string(), r.to_string()));
        if !(0.0..=1.0).contains(&self.ranker_weight) {
            return err("ranker_weight", "must be within 0.0 ..= 1.0");
        }
        if !(0.0..=0.5).contains(&self.reserve_fraction) {
            return err("reserve_fraction", "must be within 0.0 ..= 0.5");
        }
        if self.max_k == 0 {
            return err("max_k", "must be at least 1");
        }
        if self.retrieve_batching.max_calls == 0 {
            return err("retrieve_batching.max_calls", "must be at least 1");
        }
        if self.retrieve_batching.max_batch == 0 {
            return err("retrieve_batching.max_batch", "must be at least 1");
        }
        if self.default_candidates == 0 || self.default_candidates > self.max_candidates {
            return err("default_candidates", "must be within 1 ..= max_candidates");
        }
        if self.max_candidates == 0 || self.max_candidates > 26 {
            return err("max_candidates", "must be within 1 ..= 26 (one index letter each)");
        }
        if self.max_in_flight == 0 {
            return err("max_in_flight", "must be at least 1");
        }
        if self.rankers.max_in_flight_per_endpoint == 0 {
            return err("rankers.max_in_flight_per_endpoint", "must be at least 1");
        }
        self.shadow_ranker.validate()?;
        self.canary.validate()?;
        if self.rankers.addresses.is_empty() && self.rankers.dns.is_none() {
            // Allowed: the gateway then serves the retriever's order, flagged as degraded when
            // the ranker was wanted.
            if self.ranker_weight > 0.0 {
                tracing::warn!("no ranker endpoints configured; every Recommend will be degraded");
            } else if self.shadow_ranker.fraction > 0.0 {
                tracing::warn!("no ranker endpoints configured; every shadow rank call will fail");
            }
        }
        if self.ranker_weight > 0.0 && self.shadow_ranker.fraction > 0.0 {
            // Allowed (calibrate may raise the weight in a file that enables shadow ranking).
            tracing::warn!("shadow_ranker.fraction has no effect while ranker_weight > 0: every request is ranked");
        }
        if self.cache_bytes < 4096 {
            return err("cache_bytes", "must be at least 4096 (one typical history)");
        }
        if self.max_history == 0 {
            return err("max_history", "must be at least 1");
        }
        for (key, value) in
            [("max_user_id_len", self.max_user_id_len), ("max_item_id_len", self.max_item_id_len), ("max_events_per_call", self.max_events_per_call)]
        {
            if value == 0 {
                return err(key, "must be at least 1");
            }
        }
        if self.max_message_bytes < 1024 {
            return err("max_message_bytes", "must be at least 1024");
        }
        self.auth.validate("auth.")?;
        if let Some(t) = &self.backend_token {
            llamarec_common::auth::check_token(t).map_err(|e| ("backend_token".to_string(), e))?;
        }
        if let Some(tls) = &self.backend_tls {
            tls.settings().validate("backend_tls.")?;
            for (key, domain) in [("backend_tls.retriever_domain", &tls.retriever_domain), ("backend_tls.ranker_domain", &tls.ranker_domain)] {
                if domain.as_deref().is_some_and(|d| d.is_empty() || d.contains([':', '/', ' '])) {
                    return err(key, "must be a DNS name (no port, scheme or spaces)");
                }
            }
        }
        if self.health_listen == Some(self.listen) {
            return err("health_listen", "must differ from `listen` (it is a second listener)");
        }
        if let StoreConfig::Redis { url, password_file: Some(_), .. } = &self.store {
            if redis_url_has_password(url) {
                return err("store.password_file", "`store.url` already carries a password; keep it in one place");
            }
        }
        self.traffic.validate()?;
        Ok(())
    }
}

/// Whether a `redis://[user][:password]@host` URL carries a password.
fn redis_url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority.rsplit_once('@').is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use llamarec_common::config::ConfigLayers;

    fn invalid_key(config: GatewayConfig) -> String {
        config.validate().expect_err("invalid").0
    }

    #[test]
    fn defaults_are_weight_zero_without_shadow_and_valid() {
        let c = GatewayConfig::default();
        assert_eq!(c.ranker_weight, 0.0, "the ranker stays out of Recommend until calibrate says otherwise");
        assert_eq!(c.shadow_ranker.fraction, 0.0, "shadow ranking is off by default");
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn bad_weights_and_shadow_keys_are_named() {
        for w in [-0.1, 1.01, f32::NAN] {
            assert_eq!(invalid_key(GatewayConfig { ranker_weight: w, ..Default::default() }), "ranker_weight", "{w}");
        }
        let shadow = |fraction: f64| GatewayConfig { shadow_ranker: ShadowRankerConfig { fraction, ..Default::default() }, ..Default::default() };
        assert_eq!(invalid_key(shadow(1.5)), "shadow_ranker.fraction");
        assert_eq!(invalid_key(shadow(-1.0)), "shadow_ranker.fraction");
        assert_eq!(shadow(1.0).validate(), Ok(()));
        // Allowed, with a warning: a weight above 0 makes the shadow moot.
        assert_eq!(GatewayConfig { ranker_weight: 0.5, ..shadow(0.1) }.validate(), Ok(()));
    }

    #[test]
    fn backend_tls_health_listen_and_the_redis_password_are_checked() {
        let tls = |cert: Option<&str>, key: Option<&str>, domain: Option<&str>| GatewayConfig {
            backend_tls: Some(BackendTls {
                ca: "ca.pem".into(),
                cert: cert.map(Into::into),
                key: key.map(Into::into),
                retriever_domain: None,
                ranker_domain: domain.map(Into::into),
            }),
            ..Default::default()
        };
        assert_eq!(tls(None, None, Some("ranker")).validate(), Ok(()));
        assert_eq!(tls(Some("c.pem"), Some("k.pem"), None).validate(), Ok(()));
        assert_eq!(invalid_key(tls(Some("c.pem"), None, None)), "backend_tls.key");
        assert_eq!(invalid_key(tls(None, Some("k.pem"), None)), "backend_tls.cert");
        assert_eq!(invalid_key(tls(None, None, Some("ranker:50052"))), "backend_tls.ranker_domain");
        let c = GatewayConfig::default();
        assert_eq!(invalid_key(GatewayConfig { health_listen: Some(c.listen), ..c }), "health_listen");

        let redis = |url: &str| GatewayConfig {
            store: StoreConfig::Redis { url: url.into(), prefix: "p".into(), password_file: Some("pw".into()) },
            ..Default::default()
        };
        assert_eq!(redis("redis://redis:6379/0").validate(), Ok(()));
        assert_eq!(redis("redis://user@redis:6379/0").validate(), Ok(()));
        assert_eq!(invalid_key(redis("redis://:hunter2@redis:6379/0")), "store.password_file");
        assert_eq!(invalid_key(redis("redis://default:hunter2@redis:6379/0")), "store.password_file");
    }

    #[test]
    fn shipped_configs_use_weight_zero_and_shadow_off() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        for file in ["deploy/local/llamarec.toml", "deploy/docker/llamarec.toml", "deploy/k8s/base/llamarec.toml"] {
            let c = ConfigLayers::load_with_env(Some(&root.join(file)), Some(vec![])).unwrap().section::<GatewayConfig>().unwrap();
            assert_eq!((c.ranker_weight, c.shadow_ranker.fraction), (0.0, 0.0), "{file}");
        }
    }

    #[test]
    fn the_canary_section_is_off_by_default_reads_from_toml_and_names_bad_keys() {
        let c = GatewayConfig::default();
        assert_eq!(c.canary, CanaryConfig { fraction: 0.0, ranker_weight: 0.0, rankers: None }, "no canary by default");
        assert_eq!(c.admin_tokens_file, None, "admin RPCs refused by default");
        let canary = |fraction: f64, ranker_weight: f32| GatewayConfig { canary: CanaryConfig { fraction, ranker_weight, rankers: None }, ..Default::default() };
        assert_eq!(canary(0.3, 0.5).validate(), Ok(()));
        assert_eq!(canary(1.0, 1.0).validate(), Ok(()));
        for bad in [-0.1, 1.5, f64::NAN] {
            assert_eq!(invalid_key(canary(bad, 0.5)), "canary.fraction", "{bad}");
        }
        for bad in [-0.1, 1.01, f32::NAN] {
            assert_eq!(invalid_key(canary(0.3, bad)), "canary.ranker_weight", "{bad}");
        }
        let zero = GatewayConfig {
            canary: CanaryConfig { rankers: Some(RankerEndpoints { max_in_flight_per_endpoint: 0, ..Default::default() }), ..canary(0.3, 0.5).canary },
            ..Default::default()
        };
        assert_eq!(invalid_key(zero), "canary.rankers.max_in_flight_per_endpoint");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[gateway]\nadmin_tokens_file = \"/run/secrets/admin\"\n[gateway.canary]\nfraction = 0.1\nranker_weight = 0.4\n\
             [gateway.canary.rankers]\naddresses = []\ndns = \"ranker-canary:50052\"\nmax_in_flight_per_endpoint = 2\n",
        )
        .unwrap();
        let c = ConfigLayers::load_with_env(Some(&path), Some(vec![])).unwrap().section::<GatewayConfig>().unwrap();
        assert_eq!((c.canary.fraction, c.canary.ranker_weight, c.ranker_weight), (0.1, 0.4, 0.0));
        let rankers = c.canary.rankers.expect("canary pods");
        assert_eq!((rankers.addresses.len(), rankers.dns.as_deref(), rankers.max_in_flight_per_endpoint), (0, Some("ranker-canary:50052"), 2));
        assert_eq!(c.rankers, RankerEndpoints::default(), "the stable pods are unchanged");
        assert_eq!(c.admin_tokens_file.as_deref(), Some(std::path::Path::new("/run/secrets/admin")));
        for (text, key) in [
            ("[gateway.canary]\nfraction = 1.5\n", "gateway.canary.fraction"),
            ("[gateway.canary]\nranker_weight = -1.0\n", "gateway.canary.ranker_weight"),
            ("[gateway.canary]\nfractoin = 0.5\n", "gateway.canary"),
            ("[gateway.canary.rankers]\nadresses = []\n", "gateway.canary.rankers"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = ConfigLayers::load_with_env(Some(&path), Some(vec![])).unwrap().section::<GatewayConfig>().unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_shadow_section_reads_from_toml_and_names_bad_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[gateway.shadow_ranker]\nfraction = 0.25\nmax_in_flight = 3\n").unwrap();
        let c = ConfigLayers::load_with_env(Some(&path), Some(vec![])).unwrap().section::<GatewayConfig>().unwrap();
        assert_eq!((c.shadow_ranker.fraction, c.shadow_ranker.max_in_flight, c.ranker_weight), (0.25, 3, 0.0));
        for (text, key) in [
            ("[gateway.shadow_ranker]\nfraction = 2.0\n", "gateway.shadow_ranker.fraction"),
            ("[gateway.shadow_ranker]\nfractoin = 0.5\n", "gateway.shadow_ranker"),
            ("[gateway]\nranker_weight = 1.5\n", "gateway.ranker_weight"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = ConfigLayers::load_with_env(Some(&path), Some(vec![])).unwrap().section::<GatewayConfig>().unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }
}
