//! The `llamarec.v1.Gateway` service: Recommend, AppendEvents, GetHistory. A Recommend is one
//! trip down and back: admit, validate, read (and append to) the user's history, ask the
//! retriever for candidates ([`crate::retriever_client`]), have the ranker score them when its
//! weight is above 0 ([`crate::ranker_client`]), merge ([`crate::merge`]). Errors become
//! `Status` in [`crate::error`] only.

use crate::catalog::Catalog;
use crate::config::GatewayConfig;
use crate::deadline::{parse_grpc_timeout, Deadline};
use crate::error::GatewayError;
use crate::history::{CachedHistory, HistoryStore, StoredEvent, UserHistoryCache};
use crate::merge::{merge, Merged};
use crate::ranker_client::{Degraded, Ranker};
use crate::retriever_client::fallback::PopularFallback;
use crate::retriever_client::Retriever;
use crate::shadow::ShadowRanker;
use crate::traffic::TrafficRecorder;
use crate::validate;
use llamarec_common::request_id;
use llamarec_proto::v1::gateway_server::Gateway;
use llamarec_proto::v1::{
    AppendEventsRequest, AppendEventsResponse, DegradedReason, Event, GetHistoryRequest, GetHistoryResponse, RecommendRequest, RecommendResponse,
    RecommendedItem, StageTimings,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::instrument;

/// The gateway's state, shared by all requests.
pub struct GatewayService<S> {
    config: Arc<GatewayConfig>,
    catalog: Arc<Catalog>,
    histories: Arc<UserHistoryCache<S>>,
    retriever: Retriever,
    ranker: Arc<Ranker>,
    in_flight: Arc<Semaphore>,
    traffic: Option<TrafficRecorder>,
    shadow: Option<Arc<ShadowRanker>>,
    fallback: Option<PopularFallback>,
    stages: StageMetrics,
}

impl<S: HistoryStore> GatewayService<S> {
    /// Wires the service.
    pub fn new(config: Arc<GatewayConfig>, catalog: Arc<Catalog>, histories: Arc<UserHistoryCache<S>>, retriever: Retriever, ranker: Arc<Ranker>) -> Self {
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
        Self { config, catalog, histories, retriever, ranker, in_flight, traffic: None, shadow: None, fallback: None, stages: StageMetrics::register() }
    }

    /// Answers from `fallback` when the retriever cannot be reached (see
    /// [`crate::retriever_client::fallback`]).
    pub fn with_fallback(mut self, fallback: Option<PopularFallback>) -> Self {
        self.fallback = fallback;
        self
    }

    /// Records a sampled share of Recommend requests (see [`crate::traffic`]).
    pub fn with_traffic(mut self, recorder: Option<TrafficRecorder>) -> Self {
        self.traffic = recorder;
        self
    }

    /// Scores a sampled share of the requests answered without the ranker (ranker_weight 0)
    /// beside the answer (see [`crate::shadow`]).
    pub fn with_shadow(mut self, shadow: Option<Arc<ShadowRanker>>) -> Self {
        self.shadow = shadow;
        self
    }

    fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, GatewayError> {
        self.in_flight.clone().try_acquire_owned().map_err(|_| GatewayError::Overloaded(self.config.max_in_flight))
    }

    fn stored_events(events: &[Event]) -> Vec<StoredEvent> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        events.iter().map(|e| StoredEvent { item_id: e.item_id.clone(), timestamp_ms: if e.timestamp_ms == 0 { now } else { e.timestamp_ms } }).collect()
    }

    /// The stored history to recommend from, after appending the request's events (the request
    /// passed [`validate::recommend`] and carries no inline history).
    async fn stored_history(&self, req: &RecommendRequest) -> Result<Arc<CachedHistory>, GatewayError> {
        if !req.append_events.is_empty() {
            self.histories.append(&req.user_id, &Self::stored_events(&req.append_events)).await?;
        }
        Ok(self.histories.read(&req.user_id).await?.0)
    }
}

/// The caller's request id when it sent a usable one (at most 128 bytes), else a new one.
fn request_id_of<T>(request: &Request<T>) -> String {
    request_id::received(request).filter(|s| !s.is_empty() && s.len() <= 128).map(str::to_string).unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()))
}

fn caller_timeout<T>(request: &Request<T>) -> Option<Duration> {
    request.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout)
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn to_proto(m: Merged) -> RecommendedItem {
    RecommendedItem {
        item_id: m.item_id,
        title: m.title,
        final_score: m.final_score,
        retriever_score: m.retriever_score,
        retriever_rank: m.retriever_rank,
        ranker_log_prob: m.ranked.map(|r| r.log_prob),
        ranker_logit: m.ranked.map(|r| r.logit),
    }
}

/// `llamarec_gateway_stage_duration_seconds` per stage, registered once when the service is
/// built (after the exporter is installed): the `histogram!` macro would build and hash the
/// labelled key on every call, four times per Recommend.
struct StageMetrics {
    history: metrics::Histogram,
    retrieve: metrics::Histogram,
    rank: metrics::Histogram,
    total: metrics::Histogram,
}

impl StageMetrics {
    fn register() -> Self {
        let stage = |stage: &'static str| metrics::histogram!("llamarec_gateway_stage_duration_seconds", "stage" => stage);
        Self { history: stage("history"), retrieve: stage("retrieve"), rank: stage("rank"), total: stage("total") }
    }
}

#[tonic::async_trait]
impl<S: HistoryStore> Gateway for GatewayService<S> {
    #[instrument(skip_all, fields(request_id, user_id))]
    async fn recommend(&self, request: Request<RecommendRequest>) -> Result<Response<RecommendResponse>, Status> {
        let start = Instant::now();
        if let Some(traffic) = &self.traffic {
            traffic.offer(request.get_ref(), caller_timeout(&request)); // as offered, before admission
        }
        let _permit = self.admit().inspect_err(|_| metrics::counter!("llamarec_gateway_rejected_total").increment(1))?;
        let request_id = request_id_of(&request);
        let timeout = caller_timeout(&request).unwrap_or(Duration::from_millis(self.config.default_deadline_ms));
        let deadline = Deadline::for_caller(start, timeout, Duration::from_millis(self.config.reserve_ms), self.config.reserve_fraction);
        let req = request.into_inner();
        tracing::Span::current().record("request_id", request_id.as_str()).record("user_id", req.user_id.as_str());

        let validate::RecommendPlan { k, num_candidates: n } = validate::recommend(&self.config, &self.catalog, &req)?;
        let options = req.options.unwrap_or_default();

        // Borrowed ids, not copies: the stored history is shared with the cache.
        let stored;
        let (history, indices): (Vec<&str>, Option<&[u32]>) = match &req.inline_history {
            Some(inline) => (inline.item_ids.iter().map(String::as_str).collect(), None),
            None => {
                stored = self.stored_history(&req).await?;
                (stored.events.iter().map(|e| e.item_id.as_str()).collect(), stored.indices.as_deref())
            }
        };
        let history_us = micros(start.elapsed());
        self.stages.history.record(start.elapsed().as_secs_f64());
        let history_length = history.len() as u32;
        let skip = history.len().saturating_sub(self.config.max_history);
        let (history, indices) = (&history[skip..], indices.map(|i| &i[skip..]));

        let t = Instant::now();
        let (retrieved, retriever_model, fallback) = match self.retriever.candidates(history, indices, k.max(n), &deadline, &request_id).await {
            Ok((retrieved, model)) => (retrieved, model, None),
            Err(GatewayError::Retriever { address, status }) if self.fallback.is_some() && PopularFallback::covers(status.code()) => {
                let popular = self.fallback.as_ref().expect("checked").answer(&self.catalog, history, k.max(n));
                let detail = format!("retriever {address}: {}: {}", status.code(), status.message());
                (popular, PopularFallback::version(), Some(Degraded { reason: DegradedReason::RetrieverFallback, detail }))
            }
            Err(e) => return Err(e.into()),
        };
        let retrieve_time = t.elapsed();
        self.stages.retrieve.record(retrieve_time.as_secs_f64());

        let candidates = &retrieved[..n.min(retrieved.len())];
        // At weight 0 the ranker's scores cannot change the order: it is not called, and nothing
        // is lost (not degraded). A sampled share of such requests is scored beside the answer.
        // Popular items are not ranked: the answer is already degraded and not personalized.
        let wanted = !options.skip_ranker && self.config.ranker_weight > 0.0 && !candidates.is_empty() && fallback.is_none();
        let (ranked, ranker_model, degraded, rank_time) = if wanted {
            let t = Instant::now();
            let result = self.ranker.rank(history, candidates, &deadline, &request_id).await;
            let rank_time = t.elapsed();
            self.stages.rank.record(rank_time.as_secs_f64());
            match result {
                Ok((ranked, model)) => (ranked, Some(model), None, rank_time),
                Err(d) => (Vec::new(), None, Some(d), rank_time),
            }
        } else {
            (Vec::new(), None, None, Duration::ZERO)
        };

        let degraded = fallback.or(degraded);
        let items = merge(&retrieved, &ranked, self.config.ranker_weight, k).into_iter().map(to_proto).collect();
        if !wanted && !options.skip_ranker && !candidates.is_empty() && degraded.is_none() {
            if let Some(shadow) = &self.shadow {
                shadow.offer(&self.ranker, history, candidates, &request_id, &req.user_id);
            }
        }
        if let Some(d) = &degraded {
            metrics::counter!("llamarec_gateway_degraded_total", "reason" => d.reason.as_str_name()).increment(1);
            tracing::warn!(reason = d.reason.as_str_name(), detail = %d.detail, "recommendation degraded");
        }
        self.stages.total.record(start.elapsed().as_secs_f64());
        Ok(Response::new(RecommendResponse {
            items,
            degraded: degraded.is_some(),
            degraded_reason: degraded.as_ref().map_or(DegradedReason::Unspecified, |d| d.reason) as i32,
            degraded_detail: degraded.map(|d| d.detail).unwrap_or_default(),
            retriever_model: Some(retriever_model),
            ranker_model,
            timings: Some(StageTimings { history_us, retrieve_us: micros(retrieve_time), rank_us: micros(rank_time), total_us: micros(start.elapsed()) }),
            request_id,
            history_length,
        }))
    }

    #[instrument(skip_all)]
    async fn append_events(&self, request: Request<AppendEventsRequest>) -> Result<Response<AppendEventsResponse>, Status> {
        let _permit = self.admit()?;
        let req = request.into_inner();
        validate::append_events(&self.config, &self.catalog, &req)?;
        let history_length = self.histories.append(&req.user_id, &Self::stored_events(&req.events)).await.map_err(GatewayError::from)?;
        Ok(Response::new(AppendEventsResponse { history_length }))
    }

    #[instrument(skip_all)]
    async fn get_history(&self, request: Request<GetHistoryRequest>) -> Result<Response<GetHistoryResponse>, Status> {
        let _permit = self.admit()?;
        let req = request.into_inner();
        validate::get_history(&self.config, &req)?;
        let (history, _) = self.histories.read(&req.user_id).await.map_err(GatewayError::from)?;
        let events = &history.events;
        let skip = if req.limit == 0 { 0 } else { events.len().saturating_sub(req.limit as usize) };
        let events = events[skip..].iter().map(|e| Event { item_id: e.item_id.clone(), timestamp_ms: e.timestamp_ms }).collect();
        Ok(Response::new(GetHistoryResponse { events }))
    }
}
