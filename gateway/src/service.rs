//! The `llamarec.v1.Gateway` service: Recommend, AppendEvents, GetHistory.

use crate::catalog::Catalog;
use crate::config::GatewayConfig;
use crate::deadline::{parse_grpc_timeout, Deadline};
use crate::error::GatewayError;
use crate::history::{HistoryCache, HistoryStore, StoredEvent};
use crate::merge::{log_softmax, merge, Merged, Ranked, Retrieved};
use crate::ranker_pool::{PickError, RankerPool};
use crate::validate;
use llamarec_proto::v1::gateway_server::Gateway;
use llamarec_proto::v1::retriever_client::RetrieverClient;
use llamarec_proto::v1::{
    AppendEventsRequest, AppendEventsResponse, DegradedReason, Event, GetHistoryRequest, GetHistoryResponse, ModelVersion,
    RankRequest, RecommendRequest, RecommendResponse, RecommendedItem, RetrieveRequest, StageTimings,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tracing::instrument;

/// Metadata key carrying the request id to the retriever and the ranker.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The gateway's state, shared by all requests.
pub struct GatewayService<S> {
    config: Arc<GatewayConfig>,
    catalog: Arc<Catalog>,
    histories: Arc<HistoryCache<S>>,
    retriever: RetrieverClient<Channel>,
    rankers: Arc<RankerPool>,
    in_flight: Arc<Semaphore>,
    traffic: Option<crate::traffic::TrafficRecorder>,
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
        retriever: RetrieverClient<Channel>,
        rankers: Arc<RankerPool>,
    ) -> Self {
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
        Self { config, catalog, histories, retriever, rankers, in_flight, traffic: None }
    }

    /// Records a sampled share of Recommend requests (see [`crate::traffic`]).
    pub fn with_traffic(mut self, recorder: Option<crate::traffic::TrafficRecorder>) -> Self {
        self.traffic = recorder;
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

    /// The history to recommend from: inline, or stored after appending the request's events
    /// (the request passed [`validate::recommend`]).
    async fn history(&self, req: &RecommendRequest) -> Result<Vec<String>, GatewayError> {
        if let Some(inline) = &req.inline_history {
            return Ok(inline.item_ids.clone());
        }
        if !req.append_events.is_empty() {
            self.histories.append(&req.user_id, &Self::stored_events(&req.append_events)).await?;
        }
        let (events, _) = self.histories.read(&req.user_id).await?;
        Ok(events.iter().map(|e| e.item_id.clone()).collect())
    }

    async fn retrieve(&self, history: Vec<String>, want: usize, deadline: &Deadline, request_id: &str) -> Result<(Vec<Retrieved>, ModelVersion), GatewayError> {
        let budget = deadline.remaining().min(Duration::from_millis(self.config.retrieve_budget_ms));
        if budget.is_zero() {
            return Err(GatewayError::Deadline(deadline.elapsed().as_millis() as u64));
        }
        let mut request = Request::new(RetrieveRequest { history, k: want as u32, exclude_history: true });
        request.set_timeout(budget);
        with_request_id(&mut request, request_id);
        llamarec_common::auth::set_bearer(request.metadata_mut(), self.config.backend_token.as_deref());
        let mut client = self.retriever.clone();
        let call = tokio::time::timeout(budget, client.retrieve(request));
        let address = self.config.retriever.clone();
        let response = match call.await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => return Err(GatewayError::Retriever { address, status }),
            Err(_) => return Err(GatewayError::Retriever { address, status: Status::deadline_exceeded(format!("no answer within {} ms", budget.as_millis())) }),
        };
        let items = response.items.into_iter().map(|i| Retrieved { item_id: i.item_id, title: i.title, score: i.score }).collect();
        Ok((items, response.model.unwrap_or_default()))
    }

    /// Ranks `candidates`; on any failure returns why, never an error: the retriever's answer
    /// is kept whatever the ranker does.
    async fn rank(&self, history: &[String], candidates: &[Retrieved], deadline: &Deadline, request_id: &str) -> Result<(Vec<Ranked>, ModelVersion), Degraded> {
        let budget = deadline.remaining();
        if budget < Duration::from_millis(self.config.min_rank_budget_ms) {
            return Err(Degraded {
                reason: DegradedReason::RankerTimeout,
                detail: format!("only {} ms of the deadline left for the ranker", budget.as_millis()),
            });
        }
        let lease = match self.rankers.pick() {
            Ok(lease) => lease,
            Err(PickError::Empty) => {
                return Err(Degraded { reason: DegradedReason::NoRanker, detail: "no ranker endpoint configured or resolved".into() })
            }
            // Beyond the rankers' capacity: answer at once in retriever order rather than queue.
            Err(PickError::AtCapacity { limit }) => {
                return Err(Degraded {
                    reason: DegradedReason::Overload,
                    detail: format!("every ranker endpoint has {limit} requests from this gateway in flight (rankers.max_in_flight_per_endpoint); ranker skipped"),
                })
            }
        };
        let skip = history.len().saturating_sub(self.config.prompt_history as usize);
        let history_titles = history[skip..].iter().filter_map(|id| self.catalog.title(id).map(str::to_string)).collect();
        let candidate_titles = candidates.iter().map(|c| c.title.clone()).collect();
        let mut request = Request::new(RankRequest { history_titles, candidate_titles });
        request.set_timeout(budget);
        with_request_id(&mut request, request_id);
        llamarec_common::auth::set_bearer(request.metadata_mut(), self.config.backend_token.as_deref());
        let mut client = lease.client().max_decoding_message_size(self.config.max_message_bytes);
        let outcome = tokio::time::timeout(budget, client.rank(request)).await;
        let response = match outcome {
            Ok(Ok(r)) => {
                self.rankers.report_success(&lease);
                r.into_inner()
            }
            Ok(Err(status)) => {
                let reason = match status.code() {
                    Code::DeadlineExceeded | Code::Cancelled => DegradedReason::RankerTimeout,
                    Code::ResourceExhausted => DegradedReason::Overload,
                    _ => {
                        self.rankers.report_failure(&lease);
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
        if response.scores.len() != candidates.len() {
            self.rankers.report_failure(&lease);
            return Err(Degraded {
                reason: DegradedReason::RankerFailed,
                detail: format!("ranker {} returned {} scores for {} candidates", lease.address(), response.scores.len(), candidates.len()),
            });
        }
        let logits: Vec<f32> = response.scores.iter().map(|s| s.logit).collect();
        let ranked = log_softmax(&logits).into_iter().zip(&logits).map(|(log_prob, &logit)| Ranked { logit, log_prob }).collect();
        Ok((ranked, response.model.unwrap_or_default()))
    }
}

fn with_request_id<T>(request: &mut Request<T>, request_id: &str) {
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

fn record_stage(stage: &'static str, d: Duration) {
    metrics::histogram!("llamarec_gateway_stage_duration_seconds", "stage" => stage).record(d.as_secs_f64());
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

        let mut history = self.history(&req).await?;
        let history_us = micros(start.elapsed());
        record_stage("history", start.elapsed());
        let history_length = history.len() as u32;
        if history.len() > self.config.max_history {
            history.drain(..history.len() - self.config.max_history);
        }

        let t = Instant::now();
        // The ranker's prompt needs only the last `prompt_history` events; the whole history
        // moves into the Retrieve request (no copy of hundreds of ids per request).
        let prompt_history = history[history.len().saturating_sub(self.config.prompt_history as usize)..].to_vec();
        let (retrieved, retriever_model) = self.retrieve(history, k.max(n), &deadline, &request_id).await?;
        let retrieve_time = t.elapsed();
        record_stage("retrieve", retrieve_time);

        let candidates = &retrieved[..n.min(retrieved.len())];
        let t = Instant::now();
        let (ranked, ranker_model, degraded) = if options.skip_ranker || candidates.is_empty() {
            (Vec::new(), None, None)
        } else {
            match self.rank(&prompt_history, candidates, &deadline, &request_id).await {
                Ok((ranked, model)) => (ranked, Some(model), None),
                Err(d) => (Vec::new(), None, Some(d)),
            }
        };
        let rank_time = if options.skip_ranker { Duration::ZERO } else { t.elapsed() };
        record_stage("rank", rank_time);

        let items = merge(&retrieved, &ranked, self.config.ranker_weight, k).into_iter().map(to_proto).collect();
        if let Some(d) = &degraded {
            metrics::counter!("llamarec_gateway_degraded_total", "reason" => d.reason.as_str_name()).increment(1);
            tracing::warn!(reason = d.reason.as_str_name(), detail = %d.detail, "recommendation degraded to retriever order");
        }
        record_stage("total", start.elapsed());
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
        let (events, _) = self.histories.read(&req.user_id).await.map_err(GatewayError::from)?;
        let skip = if req.limit == 0 { 0 } else { events.len().saturating_sub(req.limit as usize) };
        let events = events[skip..].iter().map(|e| Event { item_id: e.item_id.clone(), timestamp_ms: e.timestamp_ms }).collect();
        Ok(Response::new(GetHistoryResponse { events }))
    }
}
