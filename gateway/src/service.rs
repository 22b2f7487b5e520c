//! The `llamarec.v1.Gateway` service: Recommend, AppendEvents, GetHistory.

use crate::catalog::Catalog;
use crate::config::GatewayConfig;
use crate::deadline::{parse_grpc_timeout, Deadline};
use crate::dense::DenseIndices;
use crate::error::GatewayError;
use crate::history::{CachedHistory, HistoryCache, HistoryStore, StoredEvent};
use crate::merge::{log_softmax, merge, Merged, Ranked, Retrieved};
use crate::ranker_pool::{PickError, RankerPool};
use crate::retriever_calls::RetrieverCalls;
use crate::shadow::{ShadowCandidate, ShadowModel, ShadowRecord};
use crate::validate;
use llamarec_proto::v1::gateway_server::Gateway;
use llamarec_proto::v1::{
    AppendEventsRequest, AppendEventsResponse, DegradedReason, Event, GetHistoryRequest, GetHistoryResponse, ModelVersion,
    RankRequest, RecommendRequest, RecommendResponse, RecommendedItem, RetrieveRequest, RetrieveResponse, StageTimings,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};
use tracing::instrument;

/// Metadata key carrying the request id to the retriever and the ranker.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The gateway's state, shared by all requests.
pub struct GatewayService<S> {
    config: Arc<GatewayConfig>,
    catalog: Arc<Catalog>,
    histories: Arc<HistoryCache<S>>,
    retriever: RetrieverCalls,
    rankers: Arc<RankerPool>,
    in_flight: Arc<Semaphore>,
    traffic: Option<crate::traffic::TrafficRecorder>,
    shadow: Option<Arc<crate::shadow::ShadowRanker>>,
    dense: DenseIndices,
    stages: StageMetrics,
}

/// Why the ranker's scores are missing.
struct Degraded {
    reason: DegradedReason,
    detail: String,
}

impl<S: HistoryStore> GatewayService<S> {
    /// Wires the service.
    pub fn new(
        config: Arc<GatewayConfig>,
        catalog: Arc<Catalog>,
        histories: Arc<HistoryCache<S>>,
        retriever: RetrieverCalls,
        rankers: Arc<RankerPool>,
    ) -> Self {
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
        let dense = DenseIndices::new(config.retrieve_dense_indices, catalog.fingerprint());
        Self { config, catalog, histories, retriever, rankers, in_flight, traffic: None, shadow: None, dense, stages: StageMetrics::register() }
    }

    /// Records a sampled share of Recommend requests (see [`crate::traffic`]).
    pub fn with_traffic(mut self, recorder: Option<crate::traffic::TrafficRecorder>) -> Self {
        self.traffic = recorder;
        self
    }

    /// Scores a sampled share of the requests answered without the ranker (ranker_weight 0)
    /// beside the answer (see [`crate::shadow`]).
    pub fn with_shadow(mut self, shadow: Option<Arc<crate::shadow::ShadowRanker>>) -> Self {
        self.shadow = shadow;
        self
    }

    fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, GatewayError> {
        self.in_flight.clone().try_acquire_owned().map_err(|_| GatewayError::Overloaded(self.config.max_in_flight))
    }

    fn stored_events(events: &[Event]) -> Vec<StoredEvent> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        events
            .iter()
            .map(|e| StoredEvent { item_id: e.item_id.clone(), timestamp_ms: if e.timestamp_ms == 0 { now } else { e.timestamp_ms } })
            .collect()
    }

    /// The stored history to recommend from, after appending the request's events (the request
    /// passed [`validate::recommend`] and carries no inline history).
    async fn stored_history(&self, req: &RecommendRequest) -> Result<Arc<CachedHistory>, GatewayError> {
        if !req.append_events.is_empty() {
            self.histories.append(&req.user_id, &Self::stored_events(&req.append_events)).await?;
        }
        Ok(self.histories.read(&req.user_id).await?.0)
    }

    /// Top `want` candidates for `history` (external ids, oldest first; `indices`: the same as
    /// dense indices when the cache has them). Sends dense indices when the retriever shares the
    /// gateway's catalog, ids otherwise or after it refused indices.
    async fn retrieve(&self, history: &[&str], indices: Option<&[u32]>, want: usize, deadline: &Deadline, request_id: &str) -> Result<(Vec<Retrieved>, ModelVersion), GatewayError> {
        let dense = self.dense.fingerprint().and_then(|fingerprint| {
            // An id the catalog lacks (the data set changed under a stored history) goes as an
            // id, so the retriever names it in its error.
            let indices: Option<Vec<u32>> = match indices {
                Some(known) => Some(known.to_vec()),
                None => history.iter().map(|id| self.catalog.index_of(id)).collect(),
            };
            indices.map(|history_indices| RetrieveRequest {
                history_indices,
                catalog_fingerprint: fingerprint,
                indices_only: true,
                ..Default::default()
            })
        });
        if let Some(request) = dense {
            let nonempty = !request.history_indices.is_empty();
            match self.call_retriever(request, want, deadline, request_id).await {
                Err(GatewayError::Retriever { status, .. }) if status.code() == Code::FailedPrecondition => self.dense.refused(status.message()),
                // A retriever that ignores indices (older than the field) sees an empty history.
                Ok(response) if response.popularity_fallback && nonempty => self.dense.refused("the retriever ignored history_indices"),
                Ok(response) => return self.resolve_indices(response),
                Err(e) => return Err(e),
            }
        }
        let request = RetrieveRequest { history: history.iter().map(|id| id.to_string()).collect(), ..Default::default() };
        let response = self.call_retriever(request, want, deadline, request_id).await?;
        let items = response.items.into_iter().map(|i| Retrieved { item_id: i.item_id, title: i.title, score: i.score }).collect();
        Ok((items, response.model.unwrap_or_default()))
    }

    /// Candidates of an `indices_only` answer, with ids and titles from the gateway's catalog.
    fn resolve_indices(&self, response: RetrieveResponse) -> Result<(Vec<Retrieved>, ModelVersion), GatewayError> {
        let items = response
            .items
            .into_iter()
            .map(|i| match self.catalog.item(i.item_index) {
                Some(item) => Ok(Retrieved { item_id: item.id.clone(), title: item.title.clone(), score: i.score }),
                None => Err(GatewayError::Retriever {
                    address: self.config.retriever.clone(),
                    status: Status::internal(format!("answered item index {} outside the catalog of {} items", i.item_index, self.catalog.len())),
                }),
            })
            .collect::<Result<_, _>>()?;
        Ok((items, response.model.unwrap_or_default()))
    }

    async fn call_retriever(&self, request: RetrieveRequest, want: usize, deadline: &Deadline, request_id: &str) -> Result<RetrieveResponse, GatewayError> {
        let budget = deadline.remaining().min(Duration::from_millis(self.config.retrieve_budget_ms));
        if budget.is_zero() {
            return Err(GatewayError::Deadline(deadline.elapsed().as_millis() as u64));
        }
        let request = RetrieveRequest { k: want as u32, exclude_history: true, ..request };
        let call = tokio::time::timeout(budget, self.retriever.retrieve(request, budget, request_id));
        let address = self.config.retriever.clone();
        match call.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(status)) => Err(GatewayError::Retriever { address, status }),
            Err(_) => Err(GatewayError::Retriever { address, status: Status::deadline_exceeded(format!("no answer within {} ms", budget.as_millis())) }),
        }
    }

    /// Ranks `candidates`; on any failure returns why, never an error: the retriever's answer
    /// is kept whatever the ranker does.
    async fn rank(&self, history: &[&str], candidates: &[Retrieved], deadline: &Deadline, request_id: &str) -> Result<(Vec<Ranked>, ModelVersion), Degraded> {
        let budget = deadline.remaining();
        if budget < Duration::from_millis(self.config.min_rank_budget_ms) {
            return Err(Degraded {
                reason: DegradedReason::RankerTimeout,
                detail: format!("only {} ms of the deadline left for the ranker", budget.as_millis()),
            });
        }
        call_ranker(&self.rankers, &self.config, self.rank_request(history, candidates), budget, request_id).await
    }

    /// The Rank request for `candidates` after `history` (the last `prompt_history` titles).
    fn rank_request(&self, history: &[&str], candidates: &[Retrieved]) -> RankRequest {
        let skip = history.len().saturating_sub(self.config.prompt_history as usize);
        let history_titles = history[skip..].iter().filter_map(|&id| self.catalog.title(id).map(str::to_string)).collect();
        let candidate_titles = candidates.iter().map(|c| c.title.clone()).collect();
        RankRequest { history_titles, candidate_titles }
    }

    /// Starts a shadow Rank call for a sampled request answered without the ranker: in a task of
    /// its own, after the answer is built, bounded by `[gateway.shadow_ranker] max_in_flight`,
    /// with no effect on the answer whatever it does.
    fn shadow_rank(&self, history: &[&str], candidates: &[Retrieved], request_id: &str, user_id: &str) {
        let Some(shadow) = &self.shadow else { return };
        if !shadow.sampled(request_id) {
            return;
        }
        let Some(slot) = shadow.try_slot() else { return };
        let request = self.rank_request(history, candidates);
        let (shadow, rankers, config) = (shadow.clone(), self.rankers.clone(), self.config.clone());
        let (request_id, user_id) = (request_id.to_string(), user_id.to_string());
        let served: Vec<(String, f32)> = candidates.iter().map(|c| (c.item_id.clone(), c.score)).collect();
        tokio::spawn(async move {
            let _slot = slot;
            let t = Instant::now();
            let result = call_ranker(&rankers, &config, request, shadow.timeout(), &request_id).await;
            let latency = t.elapsed();
            let (outcome, error, model, ranked) = match result {
                Ok((ranked, model)) => ("ok", None, Some(ShadowModel { name: model.name, version: model.version }), ranked),
                Err(d) => (crate::shadow::outcome_label(d.reason), Some(d.detail), None, Vec::new()),
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
            let record = ShadowRecord { unix_ms: 0, request_id, user_id, outcome: outcome.to_string(), error, latency_ms: 0.0, ranker_model: model, candidates };
            shadow.finish(latency, record);
        });
    }
}

/// One Rank call to a ranker endpoint picked from `rankers`, within `budget`; on any failure
/// returns why (the reason a Recommend would be degraded with).
async fn call_ranker(rankers: &RankerPool, config: &GatewayConfig, rank_request: RankRequest, budget: Duration, request_id: &str) -> Result<(Vec<Ranked>, ModelVersion), Degraded> {
    let lease = match rankers.pick() {
        Ok(lease) => lease,
        Err(PickError::Empty) => return Err(Degraded { reason: DegradedReason::NoRanker, detail: "no ranker endpoint configured or resolved".into() }),
        // Beyond the rankers' capacity: answer at once in retriever order rather than queue.
        Err(PickError::AtCapacity { limit }) => {
            return Err(Degraded {
                reason: DegradedReason::Overload,
                detail: format!("every ranker endpoint has {limit} requests from this gateway in flight (rankers.max_in_flight_per_endpoint); ranker skipped"),
            })
        }
    };
    let n = rank_request.candidate_titles.len();
    let mut request = Request::new(rank_request);
    request.set_timeout(budget);
    with_request_id(&mut request, request_id);
    llamarec_common::auth::set_bearer(request.metadata_mut(), config.backend_token.as_deref());
    let mut client = lease.client().max_decoding_message_size(config.max_message_bytes);
    let outcome = tokio::time::timeout(budget, client.rank(request)).await;
    let response = match outcome {
        Ok(Ok(r)) => {
            rankers.report_success(&lease);
            r.into_inner()
        }
        Ok(Err(status)) => {
            let reason = match status.code() {
                Code::DeadlineExceeded | Code::Cancelled => DegradedReason::RankerTimeout,
                Code::ResourceExhausted => DegradedReason::Overload,
                _ => {
                    rankers.report_failure(&lease);
                    DegradedReason::RankerFailed
                }
            };
            return Err(Degraded { reason, detail: format!("ranker {}: {}: {}", lease.address(), status.code(), status.message()) });
        }
        Err(_) => {
            return Err(Degraded {
                reason: DegradedReason::RankerTimeout,
                detail: format!("ranker {} gave no answer within {} ms", lease.address(), budget.as_millis()),
            })
        }
    };
    if response.scores.len() != n {
        rankers.report_failure(&lease);
        return Err(Degraded {
            reason: DegradedReason::RankerFailed,
            detail: format!("ranker {} returned {} scores for {} candidates", lease.address(), response.scores.len(), n),
        });
    }
    let logits: Vec<f32> = response.scores.iter().map(|s| s.logit).collect();
    let ranked = log_softmax(&logits).into_iter().zip(&logits).map(|(log_prob, &logit)| Ranked { logit, log_prob }).collect();
    Ok((ranked, response.model.unwrap_or_default()))
}

/// Puts `request_id` in the call's `x-request-id` metadata (skipped if it is not valid ASCII).
pub(crate) fn with_request_id<T>(request: &mut Request<T>, request_id: &str) {
    if let Ok(v) = MetadataValue::try_from(request_id) {
        request.metadata_mut().insert(REQUEST_ID_HEADER, v);
    }
}

fn request_id_of<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()))
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
        let (retrieved, retriever_model) = self.retrieve(history, indices, k.max(n), &deadline, &request_id).await?;
        let retrieve_time = t.elapsed();
        self.stages.retrieve.record(retrieve_time.as_secs_f64());

        let candidates = &retrieved[..n.min(retrieved.len())];
        // At weight 0 the ranker's scores cannot change the order: it is not called, and nothing
        // is lost (not degraded). A sampled share of such requests is scored beside the answer.
        let wanted = !options.skip_ranker && self.config.ranker_weight > 0.0 && !candidates.is_empty();
        let (ranked, ranker_model, degraded, rank_time) = if wanted {
            let t = Instant::now();
            let result = self.rank(history, candidates, &deadline, &request_id).await;
            let rank_time = t.elapsed();
            self.stages.rank.record(rank_time.as_secs_f64());
            match result {
                Ok((ranked, model)) => (ranked, Some(model), None, rank_time),
                Err(d) => (Vec::new(), None, Some(d), rank_time),
            }
        } else {
            (Vec::new(), None, None, Duration::ZERO)
        };

        let items = merge(&retrieved, &ranked, self.config.ranker_weight, k).into_iter().map(to_proto).collect();
        if !wanted && !options.skip_ranker && !candidates.is_empty() {
            self.shadow_rank(history, candidates, &request_id, &req.user_id);
        }
        if let Some(d) = &degraded {
            metrics::counter!("llamarec_gateway_degraded_total", "reason" => d.reason.as_str_name()).increment(1);
            tracing::warn!(reason = d.reason.as_str_name(), detail = %d.detail, "recommendation degraded to retriever order");
        }
        self.stages.total.record(start.elapsed().as_secs_f64());
        Ok(Response::new(RecommendResponse {
            items,
            degraded: degraded.is_some(),
            degraded_reason: degraded.as_ref().map_or(DegradedReason::Unspecified, |d| d.reason) as i32,
            degraded_detail: degraded.map(|d| d.detail).unwrap_or_default(),
            retriever_model: Some(retriever_model),
            ranker_model,
            timings: Some(StageTimings {
                history_us,
                retrieve_us: micros(retrieve_time),
                rank_us: micros(rank_time),
                total_us: micros(start.elapsed()),
            }),
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
