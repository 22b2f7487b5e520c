//! Traffic capture: a sampled share of Recommend requests written as JSON lines, one
//! [`TrafficRecord`] each, with its arrival time. `llamarec replay` reads the same type back, so
//! a capture can be replayed exactly as it arrived.
//!
//! The request path only draws a sample (one atomic add and a hash) and copies the request's
//! fields when sampled, into a [`PendingTraffic`]; once the request is answered (or fails, or is
//! cancelled) its [`TrafficOutcome`] is added (the canary arm, the items, the retriever and
//! ranker versions, degraded, latency) and the record is offered to a bounded channel; a
//! dedicated writer thread serialises and writes. Records are therefore written in the order
//! requests end, not arrive; [`read_traffic`] sorts them by arrival. When the channel is full the
//! record is dropped and counted (`llamarec_gateway_traffic_dropped_total`): capture never slows
//! or blocks a request. A capture with outcomes and later events is what `llamarec traffic
//! hit-rate` compares the arms of a canary split on.

use crate::capture::{open_capture_file, spawn_jsonl_writer};
use crate::config::TrafficConfig;
use llamarec_common::rng::splitmix64;
use llamarec_proto::v1::{Event, InlineHistory, ModelVersion, RecommendOptions, RecommendRequest, RecommendResponse};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// One interaction sent with a request (`append_events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrafficEvent {
    /// External item id.
    pub item_id: String,
    /// As sent: milliseconds since the Unix epoch, 0 for "now".
    #[serde(default)]
    pub timestamp_ms: i64,
}

/// One captured Recommend request: when it arrived and everything needed to send it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrafficRecord {
    /// Arrival, milliseconds after the capture started (replay keeps these gaps).
    pub offset_ms: f64,
    /// Arrival, milliseconds since the Unix epoch; absent in synthetic traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_ms: Option<u64>,
    /// The user.
    pub user_id: String,
    /// Items wanted.
    pub k: u32,
    /// Candidates for the ranker; 0 = the gateway's default.
    #[serde(default)]
    pub candidates: u32,
    /// Retriever only.
    #[serde(default)]
    pub skip_ranker: bool,
    /// Inline history, as sent (item ids, oldest first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline_history: Option<Vec<String>>,
    /// Events appended before recommending, as sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<TrafficEvent>,
    /// The caller's gRPC deadline, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// How the gateway answered (absent in synthetic traffic and in captures from before
    /// outcomes were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<TrafficOutcome>,
}

/// A model's name, version and label, as in Recommend's `retriever_model` / `ranker_model`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordedModel {
    /// Human-readable model name.
    pub name: String,
    /// Content-derived version.
    pub version: String,
    /// The operator's label.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
}

impl From<&ModelVersion> for RecordedModel {
    fn from(m: &ModelVersion) -> Self {
        Self { name: m.name.clone(), version: m.version.clone(), label: m.label.clone() }
    }
}

/// How a recorded Recommend ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrafficOutcome {
    /// The gRPC status: "Ok", or the error's code ("ResourceExhausted", "Unavailable", ...;
    /// "Cancelled" when the caller went away first).
    pub code: String,
    /// The canary split's arm that served the user ("stable" or "canary"); empty when the request
    /// failed before it was routed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub arm: String,
    /// The fusion weight the answer was merged with (the arm's `ranker_weight`).
    #[serde(default)]
    pub ranker_weight: f32,
    /// The recommended item ids, best first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<String>,
    /// Whether the answer was degraded.
    #[serde(default)]
    pub degraded: bool,
    /// The degraded reason's name, when degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded_reason: Option<String>,
    /// The retriever model that produced the candidates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retriever_model: Option<RecordedModel>,
    /// The ranker model that scored them; absent when not ranked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranker_model: Option<RecordedModel>,
    /// Time inside the gateway, milliseconds.
    #[serde(default)]
    pub latency_ms: f64,
}

impl TrafficOutcome {
    /// The outcome of an answered Recommend, merged with `ranker_weight`, after `latency`.
    pub fn answered(response: &RecommendResponse, ranker_weight: f32, latency: Duration) -> Self {
        Self {
            code: format!("{:?}", tonic::Code::Ok),
            arm: response.arm.clone(),
            ranker_weight,
            items: response.items.iter().map(|i| i.item_id.clone()).collect(),
            degraded: response.degraded,
            degraded_reason: response.degraded.then(|| response.degraded_reason().as_str_name().to_string()),
            retriever_model: response.retriever_model.as_ref().map(RecordedModel::from),
            ranker_model: response.ranker_model.as_ref().map(RecordedModel::from),
            latency_ms: latency.as_secs_f64() * 1e3,
        }
    }

    /// The outcome of a Recommend that failed with `code` after `latency`.
    pub fn failed(code: tonic::Code, latency: Duration) -> Self {
        Self {
            code: format!("{code:?}"),
            arm: String::new(),
            ranker_weight: 0.0,
            items: Vec::new(),
            degraded: false,
            degraded_reason: None,
            retriever_model: None,
            ranker_model: None,
            latency_ms: latency.as_secs_f64() * 1e3,
        }
    }

    /// Whether the request was answered.
    pub fn is_ok(&self) -> bool {
        self.code == "Ok"
    }
}

impl TrafficRecord {
    /// The record of `req`, arrived `offset` after the capture started.
    pub fn from_request(req: &RecommendRequest, offset: Duration, unix_ms: Option<u64>, deadline: Option<Duration>) -> Self {
        let options = req.options.unwrap_or_default();
        Self {
            offset_ms: offset.as_secs_f64() * 1e3,
            unix_ms,
            user_id: req.user_id.clone(),
            k: req.k,
            candidates: options.num_candidates,
            skip_ranker: options.skip_ranker,
            inline_history: req.inline_history.as_ref().map(|h| h.item_ids.clone()),
            events: req.append_events.iter().map(|e| TrafficEvent { item_id: e.item_id.clone(), timestamp_ms: e.timestamp_ms }).collect(),
            deadline_ms: deadline.map(|d| d.as_millis() as u64),
            outcome: None,
        }
    }

    /// The request to send again.
    pub fn to_request(&self) -> RecommendRequest {
        RecommendRequest {
            user_id: self.user_id.clone(),
            k: self.k,
            append_events: self.events.iter().map(|e| Event { item_id: e.item_id.clone(), timestamp_ms: e.timestamp_ms }).collect(),
            inline_history: self.inline_history.clone().map(|item_ids| InlineHistory { item_ids }),
            options: Some(RecommendOptions { num_candidates: self.candidates, skip_ranker: self.skip_ranker }),
        }
    }
}

/// Reads a traffic file: one [`TrafficRecord`] per line (blank lines skipped), sorted by
/// arrival. Errors name the line.
pub fn read_traffic(path: &Path) -> anyhow::Result<Vec<TrafficRecord>> {
    use anyhow::Context;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: TrafficRecord = serde_json::from_str(&line).with_context(|| format!("{}:{}: not a traffic record", path.display(), i + 1))?;
        anyhow::ensure!(record.offset_ms.is_finite() && record.offset_ms >= 0.0, "{}:{}: offset_ms must be >= 0", path.display(), i + 1);
        records.push(record);
    }
    records.sort_by(|a, b| a.offset_ms.total_cmp(&b.offset_ms));
    Ok(records)
}

/// Writes records as JSON lines, as the capture does (`llamarec traffic synth` uses it).
pub fn write_traffic<'a>(out: &mut impl Write, records: impl IntoIterator<Item = &'a TrafficRecord>) -> std::io::Result<()> {
    for r in records {
        serde_json::to_writer(&mut *out, r)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Decides which requests are recorded: each draw hashes a counter (splitmix64), so it is
/// lock-free, uniform, and reproducible for a given seed.
pub struct Sampler {
    threshold: u64,
    always: bool,
    counter: AtomicU64,
}

impl Sampler {
    /// Samples a `rate` share (clamped to 0.0 ..= 1.0).
    pub fn new(rate: f64, seed: u64) -> Self {
        let rate = if rate.is_nan() { 0.0 } else { rate.clamp(0.0, 1.0) };
        Self { threshold: (rate * u64::MAX as f64) as u64, always: rate >= 1.0, counter: AtomicU64::new(seed) }
    }

    /// Whether to record this request.
    pub fn sample(&self) -> bool {
        if self.always {
            return true;
        }
        if self.threshold == 0 {
            return false;
        }
        splitmix64(self.counter.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)) < self.threshold
    }
}

/// The request-path half of the capture: cheap to clone, never blocks.
#[derive(Clone)]
pub struct TrafficRecorder {
    inner: Arc<Inner>,
}

struct Inner {
    sampler: Sampler,
    start: Instant,
    start_unix: Duration,
    tx: mpsc::Sender<TrafficRecord>,
}

impl TrafficRecorder {
    /// Opens the capture file (keeping an earlier non-empty one under a new name) and starts the
    /// writer thread; `None` when `sample_rate` is 0.
    pub fn start(config: &TrafficConfig) -> anyhow::Result<Option<Self>> {
        if config.sample_rate <= 0.0 {
            return Ok(None);
        }
        let file = open_capture_file(&config.path)?;
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        spawn_jsonl_writer("traffic-writer", rx, file, config.path.clone(), "llamarec_gateway_traffic_write_errors_total")?;
        tracing::info!(path = %config.path.display(), sample_rate = config.sample_rate, "capturing Recommend traffic");
        Ok(Some(Self::with_sender(Sampler::new(config.sample_rate, rand::random()), tx)))
    }

    fn with_sender(sampler: Sampler, tx: mpsc::Sender<TrafficRecord>) -> Self {
        let start_unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Self { inner: Arc::new(Inner { sampler, start: Instant::now(), start_unix, tx }) }
    }

    /// Starts the record of `req` (arrived now, with the caller's `deadline`) when sampled; it
    /// is queued for the writer when the returned [`PendingTraffic`] is finished or dropped.
    pub fn offer(&self, req: &RecommendRequest, deadline: Option<Duration>) -> Option<PendingTraffic> {
        if !self.inner.sampler.sample() {
            return None;
        }
        let offset = self.inner.start.elapsed();
        let unix_ms = (self.inner.start_unix + offset).as_millis() as u64;
        let record = TrafficRecord::from_request(req, offset, Some(unix_ms), deadline);
        Some(PendingTraffic { record: Some(record), arrived: Instant::now(), tx: self.inner.tx.clone() })
    }
}

/// A sampled request's record, waiting for the request to end. Dropped unfinished (the caller
/// went away and the request's future with it), it is queued with the outcome "Cancelled", so
/// that a replay still sends every request that arrived.
pub struct PendingTraffic {
    record: Option<TrafficRecord>,
    arrived: Instant,
    tx: mpsc::Sender<TrafficRecord>,
}

impl PendingTraffic {
    /// When the request arrived.
    pub fn arrived(&self) -> Instant {
        self.arrived
    }

    /// Queues the record with `outcome`; whether it was queued (not dropped on a full queue).
    pub fn finish(mut self, outcome: TrafficOutcome) -> bool {
        let mut record = self.record.take().expect("finished once");
        record.outcome = Some(outcome);
        queue(&self.tx, record)
    }
}

impl Drop for PendingTraffic {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.outcome = Some(TrafficOutcome::failed(tonic::Code::Cancelled, self.arrived.elapsed()));
            queue(&self.tx, record);
        }
    }
}

fn queue(tx: &mpsc::Sender<TrafficRecord>, record: TrafficRecord) -> bool {
    match tx.try_send(record) {
        Ok(()) => {
            metrics::counter!("llamarec_gateway_traffic_captured_total").increment(1);
            true
        }
        Err(_) => {
            metrics::counter!("llamarec_gateway_traffic_dropped_total").increment(1);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llamarec_proto::v1::RecommendedItem;

    fn request() -> RecommendRequest {
        RecommendRequest {
            user_id: "42".into(),
            k: 7,
            append_events: vec![Event { item_id: "50".into(), timestamp_ms: 0 }, Event { item_id: "181".into(), timestamp_ms: 1_700_000_000_000 }],
            inline_history: None,
            options: Some(RecommendOptions { num_candidates: 12, skip_ranker: true }),
        }
    }

    #[test]
    fn sampler_extremes_and_share() {
        let never = Sampler::new(0.0, 1);
        assert!((0..10_000).all(|_| !never.sample()));
        let always = Sampler::new(1.0, 1);
        assert!((0..10_000).all(|_| always.sample()));
        for rate in [0.01, 0.1, 0.5, 0.9] {
            let s = Sampler::new(rate, 7);
            let n = 200_000;
            let hits = (0..n).filter(|_| s.sample()).count() as f64;
            // Binomial standard deviation is at most 0.0012 of n here; allow 5 of them.
            assert!((hits / n as f64 - rate).abs() < 0.006, "rate {rate}: sampled {}", hits / n as f64);
        }
        // Same seed, same decisions.
        let (a, b) = (Sampler::new(0.3, 99), Sampler::new(0.3, 99));
        assert!((0..1000).all(|_| a.sample() == b.sample()));
        assert!(Sampler::new(f64::NAN, 1).threshold == 0);
    }

    #[test]
    fn record_round_trips_the_request() {
        let req = request();
        let r = TrafficRecord::from_request(&req, Duration::from_micros(1500), Some(123), Some(Duration::from_secs(2)));
        assert_eq!(r.offset_ms, 1.5);
        assert_eq!(r.deadline_ms, Some(2000));
        assert_eq!(r.to_request(), req);
        let inline =
            RecommendRequest { inline_history: Some(InlineHistory { item_ids: vec!["1".into(), "2".into()] }), append_events: vec![], options: None, ..req };
        let r2 = TrafficRecord::from_request(&inline, Duration::ZERO, None, None);
        assert_eq!(r2.inline_history.as_deref(), Some(&["1".to_string(), "2".to_string()][..]));
        // Absent options come back as the defaults they mean.
        assert_eq!(r2.to_request(), RecommendRequest { options: Some(RecommendOptions::default()), ..inline });

        // Through the file format and back, out of order in the file, sorted on reading.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let mut out = Vec::new();
        write_traffic(&mut out, [&r, &r2]).unwrap();
        out.extend_from_slice(b"\n");
        std::fs::write(&path, &out).unwrap();
        assert_eq!(read_traffic(&path).unwrap(), vec![r2.clone(), r.clone()]);
        // Optional fields are left out of the line, and a minimal line reads.
        assert!(!String::from_utf8(out).unwrap().lines().nth(1).unwrap().contains("unix_ms"));
        std::fs::write(&path, "{\"offset_ms\":3,\"user_id\":\"9\",\"k\":5}\n{\"bad\":1}\n").unwrap();
        let err = format!("{:#}", read_traffic(&path).unwrap_err());
        assert!(err.contains(":2:"), "{err}");
    }

    #[tokio::test]
    async fn recorder_writes_what_it_samples_and_drops_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/traffic.jsonl");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "old\n").unwrap();
        let config = TrafficConfig { sample_rate: 1.0, path: path.clone(), queue: 64 };
        let recorder = TrafficRecorder::start(&config).unwrap().unwrap();
        let mut pending = Vec::new();
        for i in 0..10 {
            let mut req = request();
            req.user_id = i.to_string();
            pending.push(recorder.offer(&req, None).expect("sampled"));
        }
        // Requests end in another order than they arrived; the last one is cancelled (dropped).
        let cancelled = pending.pop().unwrap();
        for (i, p) in pending.into_iter().enumerate().rev() {
            let response = RecommendResponse {
                items: vec![RecommendedItem { item_id: format!("item-{i}"), ..Default::default() }],
                arm: if i % 2 == 0 { "stable" } else { "canary" }.into(),
                retriever_model: Some(ModelVersion { name: "lrurec".into(), version: "abc".into(), label: String::new() }),
                ranker_model: (i % 2 == 1).then(|| ModelVersion { name: "llm".into(), version: "def".into(), label: "new".into() }),
                ..Default::default()
            };
            assert!(p.finish(TrafficOutcome::answered(&response, 0.5, Duration::from_millis(3))));
        }
        drop(cancelled);
        drop(recorder); // closes the channel; the writer drains and exits
        let mut records = Vec::new();
        for _ in 0..500 {
            records = read_traffic(&path).unwrap_or_default();
            if records.len() == 10 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(records.iter().map(|r| r.user_id.as_str()).collect::<Vec<_>>(), (0..10).map(|i| i.to_string()).collect::<Vec<_>>());
        assert!(records.windows(2).all(|w| w[0].offset_ms <= w[1].offset_ms && w[0].unix_ms <= w[1].unix_ms));
        assert!(records.iter().all(|r| r.events.len() == 2 && r.skip_ranker && r.candidates == 12));
        for (i, r) in records.iter().enumerate().take(9) {
            let o = r.outcome.as_ref().expect("an outcome");
            assert!(o.is_ok());
            assert_eq!((o.items.clone(), o.arm.as_str(), o.ranker_weight, o.latency_ms), (vec![format!("item-{i}")], if i % 2 == 0 { "stable" } else { "canary" }, 0.5, 3.0));
            assert_eq!(o.retriever_model.as_ref().map(|m| m.version.as_str()), Some("abc"));
            assert_eq!(o.ranker_model.as_ref().map(|m| (m.version.as_str(), m.label.as_str())), (i % 2 == 1).then_some(("def", "new")));
        }
        let last = records[9].outcome.as_ref().unwrap();
        assert_eq!((last.code.as_str(), last.arm.as_str(), last.items.len()), ("Cancelled", "", 0), "dropped unfinished: recorded as cancelled");
        // The earlier capture was kept, not overwritten.
        let kept: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name() != "traffic.jsonl").collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(std::fs::read_to_string(kept[0].path()).unwrap(), "old\n");

        // No writer draining: the bounded queue fills and further offers are dropped, not blocked.
        let (tx, _rx) = mpsc::channel(3);
        let stuck = TrafficRecorder::with_sender(Sampler::new(1.0, 0), tx);
        let queued = (0..10).filter(|_| stuck.offer(&request(), None).is_some_and(|p| p.finish(TrafficOutcome::failed(tonic::Code::Unavailable, Duration::ZERO)))).count();
        assert_eq!(queued, 3);
        // Off by default.
        assert!(TrafficRecorder::start(&TrafficConfig::default()).unwrap().is_none());
    }
}
