//! Shadow ranking: while `[gateway] ranker_weight` is 0 the ranker's scores cannot change the
//! order, so Recommend does not call it. To keep measuring what the LLM would have answered
//! (before raising the weight, or to compare a new adapter), `[gateway.shadow_ranker]` has the
//! ranker score a sampled `fraction` of requests' candidates *beside* the answer: the call starts
//! after the answer is ready, in a task of its own, so it adds no latency, and whatever happens to
//! it never touches the answer or its `degraded` flag.
//!
//! Sampling is a hash of the request id (the caller's `x-request-id` when it sends one), so the
//! same request is always in or out of the sample. At most `max_in_flight` shadow calls run at
//! once; a sampled request that finds them all busy is not shadowed (outcome `dropped`). Every
//! outcome is counted in `llamarec_gateway_shadow_rank_total{outcome}`, the calls' latency in
//! `llamarec_gateway_shadow_rank_duration_seconds`, and each call (not the dropped ones) is
//! written as one JSON line, a [`ShadowRecord`] with the request id, to `path` for offline
//! comparison with the served (retriever) order.

use crate::capture::{fnv1a, open_capture_file, spawn_jsonl_writer};
use crate::config::ShadowRankerConfig;
use crate::merge::Retrieved;
use crate::ranker_client::Ranker;
use llamarec_common::rng::splitmix64;
use llamarec_proto::v1::DegradedReason;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Records waiting for the writer before new ones are dropped (and counted). At most
/// `max_in_flight` calls produce records, each taking a ranker's forward pass, so this is ample.
const QUEUE: usize = 1024;

/// One candidate of a shadowed request, in the order the request was answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowCandidate {
    /// External item id.
    pub item_id: String,
    /// The retriever's raw score (the served order is the retriever's: position = rank - 1).
    pub retriever_score: f32,
    /// The ranker's log-probability over the candidates; absent when the call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranker_log_prob: Option<f32>,
    /// The ranker's raw letter logit; absent when the call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranker_logit: Option<f32>,
}

/// A model's name and version, as in Recommend's `ranker_model`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowModel {
    /// Human-readable model name.
    pub name: String,
    /// Content-derived version.
    pub version: String,
}

/// One shadow Rank call, as written to `[gateway.shadow_ranker] path`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowRecord {
    /// When the call finished, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The Recommend request's id (its `request_id` in the answer and in the logs).
    pub request_id: String,
    /// The user.
    pub user_id: String,
    /// `ok`, `failed`, `timeout`, `overload` or `no_ranker`.
    pub outcome: String,
    /// Why the call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Duration of the call.
    pub latency_ms: f64,
    /// The ranker model that scored the candidates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranker_model: Option<ShadowModel>,
    /// The candidates the ranker was shown, in served (retriever) order.
    pub candidates: Vec<ShadowCandidate>,
}

/// The gateway's shadow ranking state: the sampler, the in-flight bound, metrics and the writer.
pub struct ShadowRanker {
    threshold: u64,
    always: bool,
    permits: Arc<Semaphore>,
    timeout: Duration,
    tx: mpsc::Sender<ShadowRecord>,
    latency: metrics::Histogram,
}

/// A shadow call that may run: holds one of the `max_in_flight` slots until dropped.
pub struct ShadowSlot {
    _permit: OwnedSemaphorePermit,
}

/// Outcome label of a shadow call that ended with this degraded reason.
fn outcome_label(reason: DegradedReason) -> &'static str {
    match reason {
        DegradedReason::RankerTimeout => "timeout",
        DegradedReason::Overload => "overload",
        DegradedReason::NoRanker => "no_ranker",
        DegradedReason::RankerFailed | DegradedReason::Unspecified | DegradedReason::RetrieverFallback => "failed",
    }
}

impl ShadowRanker {
    /// Opens the record file and starts its writer thread; `None` when `fraction` is 0.
    pub fn start(config: &ShadowRankerConfig) -> anyhow::Result<Option<Arc<Self>>> {
        if config.fraction <= 0.0 {
            return Ok(None);
        }
        let file = open_capture_file(&config.path)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        spawn_jsonl_writer("shadow-writer", rx, file, config.path.clone(), "llamarec_gateway_shadow_write_errors_total")?;
        tracing::info!(path = %config.path.display(), fraction = config.fraction, max_in_flight = config.max_in_flight, "shadow ranking");
        Ok(Some(Arc::new(Self::with_sender(config, tx))))
    }

    fn with_sender(config: &ShadowRankerConfig, tx: mpsc::Sender<ShadowRecord>) -> Self {
        let fraction = config.fraction.clamp(0.0, 1.0);
        Self {
            threshold: (fraction * u64::MAX as f64) as u64,
            always: fraction >= 1.0,
            permits: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            timeout: Duration::from_millis(config.timeout_ms),
            tx,
            latency: metrics::histogram!("llamarec_gateway_shadow_rank_duration_seconds"),
        }
    }

    /// Starts a shadow Rank call for a request answered without the ranker, when it is in the
    /// sample and a slot is free: in a task of its own (the answer is already built), bounded
    /// by `max_in_flight`, with no effect on the answer whatever it does.
    pub fn offer(self: &Arc<Self>, ranker: &Arc<Ranker>, history: &[&str], candidates: &[Retrieved], request_id: &str, user_id: &str) {
        if !self.sampled(request_id) {
            return;
        }
        let Some(slot) = self.try_slot() else { return };
        let request = ranker.request(history, candidates);
        let (shadow, ranker) = (self.clone(), ranker.clone());
        let (request_id, user_id) = (request_id.to_string(), user_id.to_string());
        let served: Vec<(String, f32)> = candidates.iter().map(|c| (c.item_id.clone(), c.score)).collect();
        tokio::spawn(async move {
            let _slot = slot;
            let t = Instant::now();
            let result = ranker.call(request, shadow.timeout(), &request_id).await;
            let latency = t.elapsed();
            let (outcome, error, model, ranked) = match result {
                Ok((ranked, model)) => ("ok", None, Some(ShadowModel { name: model.name, version: model.version }), ranked),
                Err(d) => (outcome_label(d.reason), Some(d.detail), None, Vec::new()),
            };
            let candidates = served
                .into_iter()
                .enumerate()
                .map(|(i, (item_id, retriever_score))| ShadowCandidate {
                    item_id,
                    retriever_score,
                    ranker_log_prob: ranked.get(i).map(|r| r.log_prob),
                    ranker_logit: ranked.get(i).map(|r| r.logit),
                })
                .collect();
            let record =
                ShadowRecord { unix_ms: 0, request_id, user_id, outcome: outcome.to_string(), error, latency_ms: 0.0, ranker_model: model, candidates };
            shadow.finish(latency, record);
        });
    }

    /// Whether the request with this id is in the sample (the same id always gets the same
    /// answer).
    pub fn sampled(&self, request_id: &str) -> bool {
        self.always || (self.threshold > 0 && splitmix64(fnv1a(request_id.as_bytes())) < self.threshold)
    }

    /// A slot for one shadow call, or `None` (counted as `dropped`) when `max_in_flight` calls are
    /// already running.
    pub fn try_slot(&self) -> Option<ShadowSlot> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Some(ShadowSlot { _permit: permit }),
            Err(_) => {
                count("dropped");
                None
            }
        }
    }

    /// Time limit of one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Counts, times and writes one finished call.
    pub fn finish(&self, latency: Duration, mut record: ShadowRecord) {
        count(label(&record.outcome));
        self.latency.record(latency.as_secs_f64());
        record.latency_ms = latency.as_secs_f64() * 1e3;
        record.unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        if let Some(error) = &record.error {
            tracing::debug!(request_id = %record.request_id, outcome = %record.outcome, %error, "shadow rank call failed");
        }
        if self.tx.try_send(record).is_err() {
            metrics::counter!("llamarec_gateway_shadow_records_dropped_total").increment(1);
        }
    }
}

/// The label set is closed: anything unexpected is `failed`.
fn label(outcome: &str) -> &'static str {
    match outcome {
        "ok" => "ok",
        "timeout" => "timeout",
        "overload" => "overload",
        "no_ranker" => "no_ranker",
        _ => "failed",
    }
}

fn count(outcome: &'static str) {
    metrics::counter!("llamarec_gateway_shadow_rank_total", "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(fraction: f64) -> ShadowRankerConfig {
        ShadowRankerConfig { fraction, ..Default::default() }
    }

    #[test]
    fn validation_names_the_key() {
        assert_eq!(ShadowRankerConfig::default().validate(), Ok(()));
        assert_eq!(config(1.0).validate(), Ok(()));
        for bad in [-0.1, 1.5, f64::NAN] {
            assert_eq!(config(bad).validate().unwrap_err().0, "shadow_ranker.fraction", "{bad}");
        }
        let zero = ShadowRankerConfig { max_in_flight: 0, ..config(0.5) };
        assert_eq!(zero.validate().unwrap_err().0, "shadow_ranker.max_in_flight");
        let zero = ShadowRankerConfig { timeout_ms: 0, ..config(0.5) };
        assert_eq!(zero.validate().unwrap_err().0, "shadow_ranker.timeout_ms");
    }

    #[tokio::test]
    async fn off_by_default() {
        assert_eq!(ShadowRankerConfig::default().fraction, 0.0);
        assert!(ShadowRanker::start(&ShadowRankerConfig::default()).unwrap().is_none());
    }

    #[tokio::test]
    async fn sampling_is_deterministic_by_request_id_and_honours_the_fraction() {
        let (tx, _rx) = mpsc::channel(1);
        let ids: Vec<String> = (0..100_000).map(|i| format!("{i:016x}")).collect();
        let all = ShadowRanker::with_sender(&config(1.0), tx.clone());
        assert!(ids.iter().all(|id| all.sampled(id)));
        let none = ShadowRanker::with_sender(&config(0.0), tx.clone());
        assert!(ids.iter().all(|id| !none.sampled(id)));
        let quarter = ShadowRanker::with_sender(&config(0.25), tx.clone());
        let share = ids.iter().filter(|id| quarter.sampled(id)).count() as f64 / ids.len() as f64;
        assert!((share - 0.25).abs() < 0.01, "{share}");
        // Another instance (another process) decides the same for the same id.
        let again = ShadowRanker::with_sender(&config(0.25), tx);
        assert!(ids.iter().take(1000).all(|id| quarter.sampled(id) == again.sampled(id)));
    }

    #[tokio::test]
    async fn slots_are_bounded_and_released() {
        let (tx, _rx) = mpsc::channel(1);
        let shadow = ShadowRanker::with_sender(&ShadowRankerConfig { max_in_flight: 2, ..config(1.0) }, tx);
        let a = shadow.try_slot().expect("first slot");
        let _b = shadow.try_slot().expect("second slot");
        assert!(shadow.try_slot().is_none(), "full: dropped, not queued");
        drop(a);
        assert!(shadow.try_slot().is_some(), "a finished call frees its slot");
    }

    #[tokio::test]
    async fn records_are_written_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shadow.jsonl");
        let shadow = ShadowRanker::start(&ShadowRankerConfig { path: path.clone(), ..config(1.0) }).unwrap().unwrap();
        let candidate = |id: &str, lp: Option<f32>| ShadowCandidate { item_id: id.into(), retriever_score: 1.0, ranker_log_prob: lp, ranker_logit: lp };
        shadow.finish(
            Duration::from_millis(12),
            ShadowRecord {
                unix_ms: 0,
                request_id: "r1".into(),
                user_id: "42".into(),
                outcome: "ok".into(),
                error: None,
                latency_ms: 0.0,
                ranker_model: Some(ShadowModel { name: "m".into(), version: "v".into() }),
                candidates: vec![candidate("50", Some(-0.5)), candidate("181", Some(-1.0))],
            },
        );
        shadow.finish(
            Duration::from_millis(3),
            ShadowRecord {
                unix_ms: 0,
                request_id: "r2".into(),
                user_id: "7".into(),
                outcome: "failed".into(),
                error: Some("ranker down".into()),
                latency_ms: 0.0,
                ranker_model: None,
                candidates: vec![candidate("50", None)],
            },
        );
        drop(shadow); // closes the channel; the writer drains and exits
        let mut records: Vec<ShadowRecord> = Vec::new();
        for _ in 0..500 {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            records = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
            if records.len() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(records.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(), ["r1", "r2"]);
        assert_eq!(records[0].latency_ms, 12.0);
        assert!(records[0].unix_ms > 0);
        assert_eq!(records[0].candidates[1].ranker_log_prob, Some(-1.0));
        assert_eq!(records[1].error.as_deref(), Some("ranker down"));
        assert!(records[1].candidates[0].ranker_log_prob.is_none());
    }
}
