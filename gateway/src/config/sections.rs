//! The `[gateway]` section's sub-sections and their shared checks: where histories live
//! (`store`), the ranker pods (`rankers`, and the canary's), TLS to the backends, Retrieve
//! coalescing, traffic recording, shadow ranking and the canary split.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where user histories live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// An embedded redb file: durable, no server, one gateway replica.
    Embedded {
        /// Database file; created if missing.
        path: PathBuf,
    },
    /// Redis, shared by several gateway replicas.
    Redis {
        /// Connection URL, e.g. "redis://127.0.0.1:6379/0".
        url: String,
        /// Key prefix, so several deployments can share one Redis.
        prefix: String,
        /// A file holding the Redis password (`requirepass`; e.g. a mounted Kubernetes Secret),
        /// so that the password stays out of `url` and the config file. Trimmed; giving a
        /// password in `url` as well is an error.
        #[serde(default)]
        password_file: Option<PathBuf>,
    },
}

/// How the gateway finds ranker pods.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RankerEndpoints {
    /// Static list of `host:port` addresses.
    pub addresses: Vec<String>,
    /// A DNS name (`host:port`) re-resolved every `resolve_interval_ms`, e.g. a Kubernetes
    /// headless Service; every address it resolves to becomes an endpoint.
    pub dns: Option<String>,
    /// How often the DNS name is resolved again.
    pub resolve_interval_ms: u64,
    /// After a failed call an endpoint is avoided for this long, unless all are.
    pub eject_ms: u64,
    /// Most Rank calls this gateway has in flight to one endpoint; when every endpoint is at
    /// its limit, Recommend skips the ranker (degraded, reason OVERLOAD) instead of queueing.
    /// Keep it at or below the ranker's `queue_capacity` divided by the gateway replicas.
    pub max_in_flight_per_endpoint: usize,
}

impl Default for RankerEndpoints {
    fn default() -> Self {
        Self { addresses: vec!["127.0.0.1:50052".into()], dns: None, resolve_interval_ms: 5_000, eject_ms: 2_000, max_in_flight_per_endpoint: 32 }
    }
}

/// `[gateway.backend_tls]`: TLS on the gateway's calls to the retriever and the rankers (their
/// `[retriever.tls]` / `[ranker.tls]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTls {
    /// PEM CA certificate(s) the backends' certificates must chain to.
    pub ca: PathBuf,
    /// PEM certificate chain for backends that require client certificates (their
    /// `client_ca`); with `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Name the retriever's certificate must carry; default: the host of `[gateway] retriever`.
    #[serde(default)]
    pub retriever_domain: Option<String>,
    /// Name every ranker's certificate must carry. Needed with `[gateway.rankers] dns`: the
    /// gateway dials the pod addresses the name resolves to, which no certificate names (e.g.
    /// "ranker.llamarec.svc"); default: the host of each ranker address.
    #[serde(default)]
    pub ranker_domain: Option<String>,
}

impl BackendTls {
    /// The client settings shared by both links.
    pub fn settings(&self) -> llamarec_common::auth::ClientTlsSettings {
        llamarec_common::auth::ClientTlsSettings { ca: self.ca.clone(), cert: self.cert.clone(), key: self.key.clone() }
    }
}

/// `[gateway.retrieve_batching]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrieveBatching {
    /// Coalesce concurrent Retrieve calls; off: one gRPC call per Recommend.
    pub enabled: bool,
    /// Retriever calls in flight at once; requests beyond wait and go out together.
    pub max_calls: usize,
    /// Most requests in one RetrieveBatch call (at most the retriever's `max_batch`).
    pub max_batch: usize,
}

impl Default for RetrieveBatching {
    fn default() -> Self {
        Self { enabled: true, max_calls: 2, max_batch: 32 }
    }
}

/// The `[gateway.traffic]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrafficConfig {
    /// Share of Recommend requests recorded, 0.0 ..= 1.0; 0.0 (the default) turns capture off.
    pub sample_rate: f64,
    /// The JSON-lines file. A non-empty file from an earlier capture is kept, renamed to
    /// `<path>.<unix seconds>`, so that every file holds one capture with increasing offsets.
    pub path: PathBuf,
    /// Records waiting for the writer before new ones are dropped (and counted).
    pub queue: usize,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        Self { sample_rate: 0.0, path: "runs/gateway/traffic.jsonl".into(), queue: 4096 }
    }
}

impl TrafficConfig {
    /// Checks the values; `(key, reason)` on error, keys relative to `[gateway.traffic]`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !(0.0..=1.0).contains(&self.sample_rate) {
            return Err(("traffic.sample_rate".into(), "must be within 0.0 ..= 1.0".into()));
        }
        if self.queue == 0 {
            return Err(("traffic.queue".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

/// The `[gateway.shadow_ranker]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShadowRankerConfig {
    /// Share of Recommend requests, 0.0 ..= 1.0, whose candidates the ranker scores for offline
    /// comparison while `ranker_weight` is 0; 0.0 (the default) turns shadow ranking off. It has
    /// no effect while `ranker_weight` is above 0 (every request is then ranked for real) or for
    /// requests that ask to skip the ranker.
    pub fraction: f64,
    /// Most shadow Rank calls in flight from this gateway; a sampled request that finds them all
    /// busy is not shadowed (counted as `dropped`), so shadow load on the rankers stays bounded.
    pub max_in_flight: usize,
    /// Time limit of one shadow Rank call (it has no caller waiting, so no caller deadline).
    pub timeout_ms: u64,
    /// The JSON-lines file of shadow scores, one [`crate::shadow::ShadowRecord`] per call. A
    /// non-empty file from an earlier run is kept, renamed to `<path>.<unix seconds>`.
    pub path: PathBuf,
}

impl Default for ShadowRankerConfig {
    fn default() -> Self {
        Self { fraction: 0.0, max_in_flight: 2, timeout_ms: 10_000, path: "runs/gateway/shadow_ranker.jsonl".into() }
    }
}

impl ShadowRankerConfig {
    /// Checks the values; `(key, reason)` on error, keys relative to `[gateway]`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !(0.0..=1.0).contains(&self.fraction) {
            return Err(("shadow_ranker.fraction".into(), "must be within 0.0 ..= 1.0".into()));
        }
        if self.max_in_flight == 0 {
            return Err(("shadow_ranker.max_in_flight".into(), "must be at least 1".into()));
        }
        if self.timeout_ms == 0 {
            return Err(("shadow_ranker.timeout_ms".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

/// The `[gateway.canary]` section: a share of users, sticky by user id, whose candidates are
/// ranked by a second set of ranker pods (a new adapter) with a fusion weight of its own; every
/// other user is served as before (the "stable" arm). The fraction and the weight can be changed
/// at run time with the gateway's admin RPC `SetSplit` (`llamarec split`); a restart goes back
/// to these values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CanaryConfig {
    /// Share of users, 0.0 ..= 1.0, in the canary arm; 0.0 (the default) turns the canary off.
    /// A user's arm is a stable hash of the user id compared with the fraction, so a user stays
    /// in its arm across requests, gateway replicas and restarts, and raising the fraction only
    /// moves stable users into the canary (never back).
    pub fraction: f64,
    /// The canary arm's `ranker_weight` (0.0 ..= 1.0), in place of `[gateway] ranker_weight`;
    /// at 0 the canary arm does not call a ranker either.
    pub ranker_weight: f32,
    /// The canary's ranker pods (`[gateway.canary.rankers]`, the shape of `[gateway.rankers]`;
    /// write `addresses = []` beside `dns`, as there). Absent: the stable pods, for a canary of
    /// the fusion weight alone.
    pub rankers: Option<RankerEndpoints>,
}

impl Default for CanaryConfig {
    fn default() -> Self {
        Self { fraction: 0.0, ranker_weight: 0.0, rankers: None }
    }
}

impl CanaryConfig {
    /// Checks the values; `(key, reason)` on error, keys relative to `[gateway]`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        check_fraction(self.fraction).map_err(|e| ("canary.fraction".to_string(), e))?;
        check_weight(self.ranker_weight).map_err(|e| ("canary.ranker_weight".to_string(), e))?;
        if let Some(rankers) = &self.rankers {
            if rankers.max_in_flight_per_endpoint == 0 {
                return Err(("canary.rankers.max_in_flight_per_endpoint".into(), "must be at least 1".into()));
            }
            if rankers.addresses.is_empty() && rankers.dns.is_none() && self.fraction > 0.0 && self.ranker_weight > 0.0 {
                // Allowed, as for the stable arm: every canary Recommend is then degraded.
                tracing::warn!("no canary ranker endpoints configured; every Recommend of the canary arm will be degraded");
            }
        }
        Ok(())
    }
}

/// A share of users for the canary arm: 0.0 ..= 1.0 (NaN refused).
pub fn check_fraction(fraction: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&fraction) {
        Ok(())
    } else {
        Err(format!("must be within 0.0 ..= 1.0 (got {fraction})"))
    }
}

/// A fusion weight: 0.0 ..= 1.0 (NaN refused).
pub fn check_weight(weight: f32) -> Result<(), String> {
    if (0.0..=1.0).contains(&weight) {
        Ok(())
    } else {
        Err(format!("must be within 0.0 ..= 1.0 (got {weight})"))
    }
}
