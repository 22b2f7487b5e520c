//! The `llamarec.v1.Ranker` gRPC service: admission, tokenization off the runtime, the queue,
//! health on model failure, the admin Reload; its errors become status codes in
//! [`crate::error`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llamarec_common::auth::BearerAuth;
use llamarec_common::request_id::request_id_of;
use llamarec_proto::v1::ranker_server::{self, RankerServer};
use llamarec_proto::v1::{
    CandidateScore, InfoRequest, ModelVersion, RankRequest, RankResponse, RankerInfo, RankerReloadRequest,
    RankerReloadResponse,
};
use tonic::{Code, Request, Response, Status};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::instrument;

use crate::backend::{RankJob, RankOutput};
use crate::error::{RankerError, ReloadError};
use crate::metrics as m;
use crate::queue::{Completed, Queue, QueueError};
use crate::reload::{AdapterChoice, ModelSlot, Reloader, ServedModel};

/// A Rank call's errors, defined and mapped to status codes in [`crate::error`].
pub use crate::error::ServiceError;

/// How long after a model failure the service re-checks the model with a real request.
const RECHECK_AFTER: Duration = Duration::from_secs(2);

/// The queue of prepared requests in front of the model thread.
pub type RankQueue = Queue<RankJob, RankOutput>;

/// Longest adapter path a Reload may name, in bytes.
const MAX_ADAPTER_PATH_LEN: usize = 4096;

/// What Info answers about one served model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Base weights plus adapter.
    pub version: ModelVersion,
    /// The adapter's path; empty without one.
    pub adapter: String,
    /// The compute device, e.g. "cpu" or "cuda:0".
    pub device: String,
}

/// Size limits on a Rank request, checked before anything is tokenized (`[ranker]`
/// `max_title_bytes`, `max_history_titles`; the candidate count is bounded by the template's
/// index letters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Longest title, in bytes.
    pub max_title_bytes: usize,
    /// Most history titles.
    pub max_history_titles: usize,
    /// Most candidates (the template's letters).
    pub max_candidates: usize,
}

impl RequestLimits {
    /// The limits of a `[ranker]` section for a template with `letters` index letters.
    pub fn new(config: &crate::service_config::RankerServiceConfig, letters: usize) -> Self {
        Self { max_title_bytes: config.max_title_bytes, max_history_titles: config.max_history_titles, max_candidates: letters }
    }
}

/// Checks a request's counts and title sizes, cheapest first; the error names the field, its
/// size and the limit's configuration key. Runs before tokenization, so an absurd title costs
/// one length comparison.
pub fn validate_request(req: &RankRequest, limits: &RequestLimits) -> Result<(), RankerError> {
    if req.history_titles.len() > limits.max_history_titles {
        return Err(RankerError::OverLimit(format!(
            "history_titles is {} titles; the limit is {} ([ranker] max_history_titles)",
            req.history_titles.len(),
            limits.max_history_titles
        )));
    }
    if req.candidate_titles.is_empty() {
        return Err(RankerError::NoCandidates);
    }
    if req.candidate_titles.len() > limits.max_candidates {
        return Err(RankerError::TooManyCandidates { given: req.candidate_titles.len(), max: limits.max_candidates });
    }
    for (field, titles) in [("history_titles", &req.history_titles), ("candidate_titles", &req.candidate_titles)] {
        if let Some((i, t)) = titles.iter().enumerate().find(|(_, t)| t.len() > limits.max_title_bytes) {
            return Err(RankerError::OverLimit(format!(
                "{field}[{i}] is {} bytes; the limit is {} ([ranker] max_title_bytes)",
                t.len(),
                limits.max_title_bytes
            )));
        }
    }
    Ok(())
}

/// The service's state, shared by all requests.
pub struct RankerService {
    /// The served model. A request loads it once and keeps that `Arc` to its answer, so a
    /// reload never mixes two adapters in one request.
    model: Arc<ModelSlot>,
    reloader: Arc<Reloader>,
    /// Who may call Reload; disabled (no admin tokens) means Reload is refused.
    admin: BearerAuth,
    queue: RankQueue,
    health: HealthReporter,
    rechecking: Arc<AtomicBool>,
    limits: RequestLimits,
}

impl RankerService {
    /// Wires the service around the model slot its reloader swaps and the running queue.
    pub fn new(reloader: Arc<Reloader>, admin: BearerAuth, queue: RankQueue, health: HealthReporter) -> Self {
        let model = reloader.slot();
        let letters = model.load().ranker.renderer().template().letters.len();
        let limits = RequestLimits { max_title_bytes: 1024, max_history_titles: 100, max_candidates: letters };
        Self {
            model,
            reloader,
            admin,
            queue,
            health,
            rechecking: Arc::new(AtomicBool::new(false)),
            limits,
        }
    }

    /// Request size limits (default: 1024-byte titles, 100 history titles).
    pub fn with_limits(mut self, limits: RequestLimits) -> Self {
        self.limits = limits;
        self
    }

    async fn rank_inner(&self, req: RankRequest) -> Result<RankResponse, ServiceError> {
        validate_request(&req, &self.limits)?;
        let place = self.queue.reserve()?;
        let served = self.model.load_full();
        tracing::Span::current().record("model_version", served.info.version.version.as_str());
        let (ranker, generation) = (served.ranker.clone(), served.generation);
        let (job, tokenize) = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let prepared = ranker.prepare(&req.history_titles, &req.candidate_titles);
            (prepared.map(|p| RankJob::new(p, ranker, generation)), start.elapsed())
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("tokenizer task: {e}")))?;
        metrics::histogram!(m::TOKENIZE_DURATION).record(tokenize.as_secs_f64());
        let job = job?;
        let tokens = job.max_tokens();
        let done = place.submit(job, tokens).await;
        if let Err(QueueError::Backend(_)) = &done {
            self.model_failed();
        }
        Ok(response(&served, done?))
    }

    /// Marks the service NOT_SERVING and re-checks the model with a real request until it
    /// answers again.
    fn model_failed(&self) {
        let health = self.health.clone();
        tokio::spawn(async move { set_serving(&health, false).await });
        if self.rechecking.swap(true, Ordering::SeqCst) {
            return;
        }
        let (queue, model, health, rechecking) = (
            self.queue.clone(),
            self.model.clone(),
            self.health.clone(),
            self.rechecking.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RECHECK_AFTER).await;
                match warm_up(&model.load_full(), &queue).await {
                    Ok(()) => {
                        tracing::info!("model answers again: SERVING");
                        set_serving(&health, true).await;
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "model re-check failed"),
                }
            }
            rechecking.store(false, Ordering::SeqCst);
        });
    }
}

/// Sets the overall and the Ranker service's health.
pub async fn set_serving(health: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <RankerServer<RankerService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// One real request through the queue and the served model: the fixed MovieLens sample.
pub async fn warm_up(served: &ServedModel, queue: &RankQueue) -> Result<(), ServiceError> {
    let (history, candidates) = crate::sample::movielens_request();
    let job = RankJob::new(served.ranker.prepare(&history, &candidates)?, served.ranker.clone(), served.generation);
    let tokens = job.max_tokens();
    let done = queue.reserve()?.submit(job, tokens).await?;
    let p: f32 = done.output.probabilities.iter().sum();
    if done.output.logits.len() != candidates.len() || !p.is_finite() || (p - 1.0).abs() > 1e-3 {
        return Err(ServiceError::Internal(format!(
            "warm-up gave {} scores summing to {p}",
            done.output.logits.len()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl ranker_server::Ranker for RankerService {
    #[instrument(skip_all, fields(request_id, model_version))]
    async fn rank(&self, request: Request<RankRequest>) -> Result<Response<RankResponse>, Status> {
        let start = Instant::now();
        tracing::Span::current().record("request_id", request_id_of(&request));
        let result = self
            .rank_inner(request.into_inner())
            .await
            .map_err(Status::from);
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        if let Err(status) = &result {
            if code == Code::Internal {
                tracing::error!(error = status.message(), "rank failed");
            } else {
                tracing::debug!(code = ?code, error = status.message(), "rank refused");
            }
        }
        metrics::histogram!(m::REQUEST_DURATION).record(start.elapsed().as_secs_f64());
        metrics::counter!(m::REQUESTS_TOTAL, "status" => format!("{code:?}")).increment(1);
        result.map(Response::new)
    }

    #[instrument(skip_all, fields(request_id))]
    async fn info(&self, request: Request<InfoRequest>) -> Result<Response<RankerInfo>, Status> {
        tracing::Span::current().record("request_id", request_id_of(&request));
        let served = self.model.load_full();
        let template = served.ranker.renderer().template();
        Ok(Response::new(RankerInfo {
            model: Some(served.info.version.clone()),
            adapter: served.info.adapter.clone(),
            template: template.name.clone(),
            device: served.info.device.clone(),
            max_candidates: template.letters.len() as u32,
            max_history: template.max_history as u32,
            context_length: served.ranker.max_prompt_tokens() as u32,
            projection_kernels: served.ranker.model().projection_kernels().to_string(),
        }))
    }

    #[instrument(skip_all, fields(request_id))]
    async fn reload(&self, request: Request<RankerReloadRequest>) -> Result<Response<RankerReloadResponse>, Status> {
        tracing::Span::current().record("request_id", request_id_of(&request));
        let result = self.reload_checked(request).await;
        if let Err(status) = &result {
            tracing::warn!(code = ?status.code(), message = status.message(), "reload refused");
        }
        result.map(Response::new)
    }
}

impl RankerService {
    /// Reload behind the admin check: refused outright when no admin token is configured
    /// (secure default: an unconfigured ranker cannot be made to load files).
    async fn reload_checked(&self, request: Request<RankerReloadRequest>) -> Result<RankerReloadResponse, Status> {
        if !self.admin.is_enabled() {
            return Err(ReloadError::Disabled { service: "ranker" }.into());
        }
        self.admin.check(request.metadata())?;
        let req = request.into_inner();
        if req.adapter.len() > MAX_ADAPTER_PATH_LEN {
            return Err(ReloadError::InvalidArgument(format!("adapter is {} bytes; the limit is {MAX_ADAPTER_PATH_LEN}", req.adapter.len())).into());
        }
        let choice = match (req.base_only, req.adapter.is_empty()) {
            (true, false) => {
                return Err(ReloadError::InvalidArgument("adapter must be empty when base_only is set (base_only serves the base model without any adapter)".into()).into())
            }
            (true, true) => AdapterChoice::BaseOnly,
            (false, true) => AdapterChoice::Configured,
            (false, false) => AdapterChoice::Dir(PathBuf::from(&req.adapter)),
        };
        let label = (!req.label.is_empty()).then_some(req.label);
        let reloaded = self.reloader.reload(choice, label).await?;
        Ok(RankerReloadResponse {
            previous: Some(reloaded.previous),
            current: Some(reloaded.current),
            adapter: reloaded.adapter.map(|p| p.display().to_string()).unwrap_or_default(),
            load_ms: reloaded.load.as_millis() as u64,
        })
    }
}

/// A Rank answer from the model that computed it.
fn response(served: &ServedModel, done: Completed<RankOutput>) -> RankResponse {
    let letters = &served.ranker.renderer().template().letters;
    let out = done.output;
    let scores = out
        .logits
        .iter()
        .zip(&out.probabilities)
        .zip(letters)
        .map(|((&logit, &probability), letter)| CandidateScore {
            letter: letter.clone(),
            logit,
            probability,
        })
        .collect();
    RankResponse {
        scores,
        model: Some(served.info.version.clone()),
        prompt_tokens: out.prompt_tokens as u32,
        cached_tokens: out.cached_tokens as u32,
        queue_us: done.queue_time.as_micros() as u64,
        compute_us: done.compute_time.as_micros() as u64,
    }
}
