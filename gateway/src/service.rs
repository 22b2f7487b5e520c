//! The `llamarec.v1.Gateway` service: Recommend, AppendEvents, GetHistory. A Recommend is one
//! trip down and back: admit, validate, read (and append to) the user's history, ask the
//! retriever for candidates ([`crate::retriever_client`]), have the ranker score them when its
//! weight is above 0 ([`crate::ranker_client`]), merge ([`crate::merge`]). Which rankers and
//! which weight is the user's arm of the canary split ([`crate::canary`]); the admin RPCs
//! GetSplit and SetSplit read and change that split. Errors become `Status` in [`crate::error`]
//! only.

use crate::canary::{Arm, Canary};
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
use crate::traffic::{TrafficOutcome, TrafficRecorder};
use crate::validate;
use llamarec_common::auth::BearerAuth;
use llamarec_common::request_id;
use llamarec_proto::v1::gateway_server::Gateway;
use llamarec_proto::v1::{
    AppendEventsRequest, AppendEventsResponse, CanarySplit, DegradedReason, Event, GetHistoryRequest, GetHistoryResponse, GetSplitRequest,
    GetSplitResponse, RecommendRequest, RecommendResponse, RecommendedItem, SetSplitRequest, SetSplitResponse, StageTimings,
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
    /// The stable arm's rankers and, when configured, the canary's, with the split between them.
    canary: Arc<Canary>,
    /// Who may call GetSplit and SetSplit; disabled (no admin tokens) means they are refused.
    admin: BearerAuth,
    in_flight: Arc<Semaphore>,
    traffic: Option<TrafficRecorder>,
    shadow: Option<Arc<ShadowRanker>>,
    fallback: Option<PopularFallback>,
    stages: StageMetrics,
    arms: ArmMetrics,
}

impl<S: HistoryStore> GatewayService<S> {
    /// Wires the service; every user is served by `ranker` until [`Self::with_canary`].
    pub fn new(config: Arc<GatewayConfig>, catalog: Arc<Catalog>, histories: Arc<UserHistoryCache<S>>, retriever: Retriever, ranker: Arc<Ranker>) -> Self {
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
        let canary = Arc::new(Canary::stable_only(&config, ranker));
        Self {
            config,
            catalog,
            histories,
            retriever,
            canary,
            admin: BearerAuth::open("gateway admin"),
            in_flight,
            traffic: None,
            shadow: None,
            fallback: None,
            stages: StageMetrics::register(),
            arms: ArmMetrics::register(),
        }
    }

    /// Splits users between the stable rankers and the canary's (see [`crate::canary`]).
    pub fn with_canary(mut self, canary: Arc<Canary>) -> Self {
        self.canary = canary;
        self
    }

    /// Who may call the admin RPCs (GetSplit, SetSplit); a disabled check (no tokens) refuses
    /// them all with PERMISSION_DENIED.
    pub fn with_admin(mut self, admin: BearerAuth) -> Self {
        self.admin = admin;
        self
    }

    /// The admin check: PERMISSION_DENIED without admin tokens, UNAUTHENTICATED for a missing or
    /// wrong one.
    fn check_admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if !self.admin.is_enabled() {
            return Err(GatewayError::AdminDisabled.into());
        }
        self.admin.check(request.metadata())
    }

    fn split_message(&self) -> CanarySplit {
        let split = self.canary.split();
        CanarySplit {
            fraction: split.fraction,
            canary_ranker_weight: split.canary_ranker_weight,
            stable_ranker_weight: self.canary.stable_ranker_weight(),
            canary_rankers: self.canary.canary_rankers().to_vec(),
        }
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

impl<S: HistoryStore> GatewayService<S> {
    /// Recommend's answer and the fusion weight it was merged with.
    async fn answer(&self, request: Request<RecommendRequest>, start: Instant) -> Result<(RecommendResponse, f32), Status> {
        let _permit = self.admit().inspect_err(|_| metrics::counter!("llamarec_gateway_rejected_total").increment(1))?;
        let request_id = request_id_of(&request);
        let timeout = caller_timeout(&request).unwrap_or(Duration::from_millis(self.config.default_deadline_ms));
        let deadline = Deadline::for_caller(start, timeout, Duration::from_millis(self.config.reserve_ms), self.config.reserve_fraction);
        let req = request.into_inner();
        tracing::Span::current().record("request_id", request_id.as_str()).record("user_id", req.user_id.as_str());

        let validate::RecommendPlan { k, num_candidates: n } = validate::recommend(&self.config, &self.catalog, &req)?;
        let options = req.options.unwrap_or_default();
        // The user's arm, its rankers and weight: one load of the split for the whole request.
        let route = self.canary.route(&req.user_id);
        tracing::Span::current().record("arm", route.arm.as_str());

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
        tracing::Span::current().record("retriever_version", retriever_model.version.as_str());

        let candidates = &retrieved[..n.min(retrieved.len())];
        // At weight 0 the ranker's scores cannot change the order: it is not called, and nothing
        // is lost (not degraded). A sampled share of such requests is scored beside the answer.
        // Popular items are not ranked: the answer is already degraded and not personalized.
        let wanted = !options.skip_ranker && route.ranker_weight > 0.0 && !candidates.is_empty() && fallback.is_none();
        let (ranked, ranker_model, degraded, rank_time) = if wanted {
            let t = Instant::now();
            let result = route.ranker.rank(history, candidates, &deadline, &request_id).await;
            let rank_time = t.elapsed();
            self.stages.rank.record(rank_time.as_secs_f64());
            match result {
                Ok((ranked, model)) => {
                    tracing::Span::current().record("ranker_version", model.version.as_str());
                    (ranked, Some(model), None, rank_time)
                }
                Err(d) => (Vec::new(), None, Some(d), rank_time),
            }
        } else {
            (Vec::new(), None, None, Duration::ZERO)
        };

        let degraded = fallback.or(degraded);
        let items = merge(&retrieved, &ranked, route.ranker_weight, k).into_iter().map(to_proto).collect();
        if !wanted && !options.skip_ranker && !candidates.is_empty() && degraded.is_none() {
            if let Some(shadow) = &self.shadow {
                shadow.offer(route.ranker, history, candidates, &request_id, &req.user_id);
            }
        }
        if let Some(d) = &degraded {
            metrics::counter!("llamarec_gateway_degraded_total", "reason" => d.reason.as_str_name(), "arm" => route.arm.as_str()).increment(1);
            tracing::warn!(reason = d.reason.as_str_name(), detail = %d.detail, "recommendation degraded");
        }
        self.stages.total.record(start.elapsed().as_secs_f64());
        self.arms.duration(route.arm).record(start.elapsed().as_secs_f64());
        let response = RecommendResponse {
            items,
            degraded: degraded.is_some(),
            degraded_reason: degraded.as_ref().map_or(DegradedReason::Unspecified, |d| d.reason) as i32,
            degraded_detail: degraded.map(|d| d.detail).unwrap_or_default(),
            retriever_model: Some(retriever_model),
            ranker_model,
            timings: Some(StageTimings { history_us, retrieve_us: micros(retrieve_time), rank_us: micros(rank_time), total_us: micros(start.elapsed()) }),
            request_id,
            history_length,
            arm: route.arm.as_str().to_string(),
        };
        Ok((response, route.ranker_weight))
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

/// Per arm of the canary split: `llamarec_gateway_recommend_duration_seconds{arm}` (answered
/// Recommends, whole time in the gateway; its `_count` is the arm's answered requests), beside
/// `llamarec_gateway_degraded_total{reason,arm}`. Registered once, like [`StageMetrics`].
struct ArmMetrics {
    stable: metrics::Histogram,
    canary: metrics::Histogram,
}

impl ArmMetrics {
    fn register() -> Self {
        let arm = |arm: Arm| metrics::histogram!("llamarec_gateway_recommend_duration_seconds", "arm" => arm.as_str());
        Self { stable: arm(Arm::Stable), canary: arm(Arm::Canary) }
    }

    fn duration(&self, arm: Arm) -> &metrics::Histogram {
        match arm {
            Arm::Stable => &self.stable,
            Arm::Canary => &self.canary,
        }
    }
}

#[tonic::async_trait]
impl<S: HistoryStore> Gateway for GatewayService<S> {
    #[instrument(skip_all, fields(request_id, user_id, arm, retriever_version, ranker_version))]
    async fn recommend(&self, request: Request<RecommendRequest>) -> Result<Response<RecommendResponse>, Status> {
        let start = Instant::now();
        // As offered, before admission; written once the request ends, with its outcome.
        let pending = self.traffic.as_ref().and_then(|traffic| traffic.offer(request.get_ref(), caller_timeout(&request)));
        let result = self.answer(request, start).await;
        if let Some(pending) = pending {
            pending.finish(match &result {
                Ok((response, weight)) => TrafficOutcome::answered(response, *weight, start.elapsed()),
                Err(status) => TrafficOutcome::failed(status.code(), start.elapsed()),
            });
        }
        result.map(|(response, _)| Response::new(response))
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

    #[instrument(skip_all)]
    async fn get_split(&self, request: Request<GetSplitRequest>) -> Result<Response<GetSplitResponse>, Status> {
        self.check_admin(&request)?;
        Ok(Response::new(GetSplitResponse { split: Some(self.split_message()) }))
    }

    #[instrument(skip_all)]
    async fn set_split(&self, request: Request<SetSplitRequest>) -> Result<Response<SetSplitResponse>, Status> {
        self.check_admin(&request)?;
        let req = request.into_inner();
        let previous = self.split_message();
        self.canary.set(req.fraction, req.canary_ranker_weight)?;
        Ok(Response::new(SetSplitResponse { previous: Some(previous), current: Some(self.split_message()) }))
    }
}
