//! The `llamarec.v1.Retriever` gRPC service: validation, admission, compute on the blocking
//! pool; its errors become status codes in [`crate::error`].

use crate::error::ReloadError;
use crate::reload::{LoadedModel, ModelSlot, Reloader};
use crate::retriever::CandidateSource;
use crate::service_config::RetrieverServiceConfig;
use llamarec_common::auth::BearerAuth;
use llamarec_common::request_id::request_id_of;
use llamarec_proto::v1::retriever_server;
use llamarec_proto::v1::{
    retrieve_result, InfoRequest, ModelVersion, ReloadRequest, ReloadResponse, RetrieveBatchRequest, RetrieveBatchResponse, RetrieveError,
    RetrieveRequest, RetrieveResponse, RetrieveResult, RetrievedItem, RetrieverInfo,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;
use tonic::{Code, Request, Response, Status};
use tracing::instrument;

/// A Retrieve call's errors, defined and mapped to status codes in [`crate::error`].
pub use crate::error::ServiceError;

/// What the service answers Info with, fixed when a checkpoint is loaded.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Name, content hash of the weights and label.
    pub version: ModelVersion,
    /// Data set the checkpoint was trained on.
    pub dataset: String,
}

/// Longest checkpoint path a Reload may name, in bytes.
const MAX_CHECKPOINT_PATH_LEN: usize = 4096;

/// The service's state, shared by all requests.
pub struct RetrieverService {
    /// The served model; each request loads it once, at admission, and keeps that one to its
    /// answer, so a reload never mixes two models (or two catalogs) in one request.
    model: Arc<ModelSlot>,
    reloader: Arc<Reloader>,
    /// Who may call Reload; disabled (no admin tokens) means Reload is refused.
    admin: BearerAuth,
    max_k: u32,
    max_history: u32,
    max_item_id_len: usize,
    max_in_flight: usize,
    max_batch: u32,
    in_flight: Arc<Semaphore>,
}

impl RetrieverService {
    /// Wires the service around the model slot its reloader swaps.
    pub fn new(reloader: Arc<Reloader>, admin: BearerAuth, config: &RetrieverServiceConfig) -> Self {
        Self {
            model: reloader.slot(),
            reloader,
            admin,
            max_k: config.max_k,
            max_history: config.max_history,
            max_item_id_len: config.max_item_id_len,
            max_in_flight: config.max_in_flight,
            max_batch: config.max_batch,
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
        }
    }

    /// Dense indices of the request's history (`history` or `history_indices`), after checking
    /// k, the history and the catalog fingerprint against the limits.
    /// Takes `history_indices` out of the request instead of copying it.
    fn validate(&self, model: &LoadedModel, req: &mut RetrieveRequest) -> Result<Vec<u32>, ServiceError> {
        if req.k == 0 || req.k > self.max_k {
            return Err(ServiceError::InvalidArgument(format!("k is {}; it must be within 1..={} ([retriever] max_k)", req.k, self.max_k)));
        }
        let length = req.history.len().max(req.history_indices.len());
        if length > self.max_history as usize {
            return Err(ServiceError::InvalidArgument(format!(
                "history is {length} items; the limit is {} ([retriever] max_history)",
                self.max_history
            )));
        }
        let catalog = model.retriever.catalog();
        if req.catalog_fingerprint != 0 && req.catalog_fingerprint != catalog.fingerprint() {
            return Err(ServiceError::FailedPrecondition(format!(
                "catalog_fingerprint {:016x} is not this retriever's catalog ({:016x}); send external item ids in `history`",
                req.catalog_fingerprint,
                catalog.fingerprint()
            )));
        }
        if req.catalog_fingerprint == 0 && (req.indices_only || !req.history_indices.is_empty()) {
            return Err(ServiceError::InvalidArgument(
                "history_indices and indices_only need catalog_fingerprint (from Info), so that both sides mean the same items".into(),
            ));
        }
        if !req.history_indices.is_empty() {
            if !req.history.is_empty() {
                return Err(ServiceError::InvalidArgument("set either history or history_indices, not both".into()));
            }
            let num_items = catalog.num_items() as u32;
            if let Some((i, index)) = req.history_indices.iter().enumerate().find(|(_, &x)| x == 0 || x > num_items) {
                return Err(ServiceError::InvalidArgument(format!("history_indices[{i}] is {index}; it must be within 1..={num_items}")));
            }
            return Ok(std::mem::take(&mut req.history_indices));
        }
        req.history
            .iter()
            .enumerate()
            .map(|(i, id)| {
                if id.len() > self.max_item_id_len {
                    return Err(ServiceError::InvalidArgument(format!(
                        "history[{i}] is {} bytes; the limit is {} ([retriever] max_item_id_len)",
                        id.len(),
                        self.max_item_id_len
                    )));
                }
                catalog.index_of(id).ok_or_else(|| ServiceError::InvalidArgument(format!("history[{i}]: unknown item id {id:?}")))
            })
            .collect()
    }

    /// Admits and validates one request and answers it here when that is cheap (a returning
    /// user on a small catalog: tens of microseconds); anything that runs the recurrence or
    /// scores a large catalog is handed to the blocking pool. Not async, so that a batch can
    /// start all its requests before awaiting any: its blocking ones then run side by side.
    fn start(&self, mut req: RetrieveRequest) -> Result<Started, ServiceError> {
        let permit = self.in_flight.clone().try_acquire_owned().map_err(|_| ServiceError::Overloaded(self.max_in_flight))?;
        // The one load of the model for this request: validation, compute and the answer's
        // catalog and version all come from it, whatever a reload swaps in meanwhile.
        let model = self.model.load_full();
        tracing::Span::current().record("model_version", model.info.version.version.as_str());
        let history = self.validate(&model, &mut req)?;
        let (k, exclude, indices_only) = (req.k as usize, req.exclude_history, req.indices_only);
        let start = Instant::now();
        let compute = match model.retriever.retrieve_if_cheap(&history, k, exclude) {
            Some(retrieval) => Compute::Done(Ok(retrieval), start.elapsed()),
            None => {
                let model = model.clone();
                Compute::Blocking(tokio::task::spawn_blocking(move || {
                    let start = Instant::now();
                    let retrieval = model.retriever.retrieve(&history, k, exclude);
                    (retrieval, start.elapsed())
                }))
            }
        };
        Ok(Started { model, compute, indices_only, _permit: permit })
    }

    /// Waits for a started request's compute and builds its answer.
    async fn finish(&self, started: Started) -> Result<RetrieveResponse, ServiceError> {
        let (retrieval, compute) = match started.compute {
            Compute::Done(retrieval, compute) => (retrieval, compute),
            Compute::Blocking(task) => task.await.map_err(|e| ServiceError::Internal(e.to_string()))?,
        };
        let retrieval = retrieval.map_err(|e| ServiceError::Internal(e.to_string()))?;
        metrics::histogram!("llamarec_retriever_compute_duration_seconds").record(compute.as_secs_f64());
        let catalog = started.model.retriever.catalog();
        let items = retrieval
            .candidates
            .iter()
            .map(|c| {
                if started.indices_only {
                    // The caller has the catalog: ids and titles would only cost allocations here and there.
                    return RetrievedItem { item_index: c.item, score: c.score, ..Default::default() };
                }
                let item = catalog.item(c.item).expect("candidates come from the catalog");
                RetrievedItem { item_id: item.id.clone(), title: item.title.clone(), score: c.score, item_index: c.item }
            })
            .collect();
        Ok(RetrieveResponse {
            items,
            popularity_fallback: retrieval.source == CandidateSource::Popularity,
            model: Some(started.model.info.version.clone()),
            compute_us: compute.as_micros() as u64,
        })
    }
}

/// A request past admission and validation, its compute done or running on the blocking pool.
struct Started {
    /// The model the request was admitted with.
    model: Arc<LoadedModel>,
    compute: Compute,
    indices_only: bool,
    /// Held until the answer is built: the request counts against `max_in_flight` till then.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

enum Compute {
    Done(crate::error::Result<crate::retriever::Retrieval>, std::time::Duration),
    Blocking(tokio::task::JoinHandle<(crate::error::Result<crate::retriever::Retrieval>, std::time::Duration)>),
}

fn record(method: &'static str, start: Instant, status: Code) {
    metrics::histogram!("llamarec_retriever_request_duration_seconds", "method" => method).record(start.elapsed().as_secs_f64());
    // The code's name as a static label: `format!("{status:?}")` allocated on every request.
    let status: &'static str = match status {
        Code::Ok => "Ok",
        Code::InvalidArgument => "InvalidArgument",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::Internal => "Internal",
        Code::PermissionDenied => "PermissionDenied",
        Code::Unauthenticated => "Unauthenticated",
        _ => "Other",
    };
    metrics::counter!("llamarec_retriever_requests_total", "method" => method, "status" => status).increment(1);
}

#[tonic::async_trait]
impl retriever_server::Retriever for RetrieverService {
    #[instrument(skip_all, fields(request_id, k, history_len, model_version))]
    async fn retrieve(&self, request: Request<RetrieveRequest>) -> Result<Response<RetrieveResponse>, Status> {
        let start = Instant::now();
        let request_id = request_id_of(&request);
        let req = request.into_inner();
        tracing::Span::current().record("request_id", request_id.as_str()).record("k", req.k).record("history_len", req.history.len().max(req.history_indices.len()));
        let result = match self.start(req) {
            Ok(started) => self.finish(started).await.map_err(Status::from),
            Err(e) => Err(Status::from(e)),
        };
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        record("retrieve", start, code);
        if let Err(status) = &result {
            tracing::debug!(code = ?status.code(), message = status.message(), "retrieve rejected");
        }
        result.map(Response::new)
    }

    #[instrument(skip_all, fields(size))]
    async fn retrieve_batch(&self, request: Request<RetrieveBatchRequest>) -> Result<Response<RetrieveBatchResponse>, Status> {
        let start = Instant::now();
        let requests = request.into_inner().requests;
        tracing::Span::current().record("size", requests.len());
        if requests.is_empty() || requests.len() > self.max_batch as usize {
            record("retrieve_batch", start, Code::InvalidArgument);
            return Err(ServiceError::InvalidArgument(format!(
                "the batch holds {} requests; it must hold 1..={} ([retriever] max_batch)",
                requests.len(),
                self.max_batch
            ))
            .into());
        }
        metrics::histogram!("llamarec_retriever_batch_size").record(requests.len() as f64);
        // Start every request before awaiting any, so the blocking ones compute side by side.
        let started: Vec<_> = requests
            .into_iter()
            .map(|mut req| {
                let request_id = std::mem::take(&mut req.request_id);
                (request_id, self.start(req))
            })
            .collect();
        let mut results = Vec::with_capacity(started.len());
        for (request_id, started) in started {
            let outcome = match started {
                Ok(started) => self.finish(started).await,
                Err(e) => Err(e),
            };
            results.push(match outcome {
                Ok(response) => {
                    record("retrieve", start, Code::Ok);
                    RetrieveResult { outcome: Some(retrieve_result::Outcome::Response(response)) }
                }
                Err(e) => {
                    let status = Status::from(e);
                    record("retrieve", start, status.code());
                    tracing::debug!(request_id = %request_id, code = ?status.code(), message = status.message(), "retrieve rejected");
                    RetrieveResult {
                        outcome: Some(retrieve_result::Outcome::Error(RetrieveError { code: status.code() as i32, message: status.message().to_string() })),
                    }
                }
            });
        }
        record("retrieve_batch", start, Code::Ok);
        Ok(Response::new(RetrieveBatchResponse { results }))
    }

    #[instrument(skip_all, fields(request_id))]
    async fn info(&self, request: Request<InfoRequest>) -> Result<Response<RetrieverInfo>, Status> {
        let start = Instant::now();
        tracing::Span::current().record("request_id", request_id_of(&request).as_str());
        let model = self.model.load_full();
        let config = model.retriever.encoder().config();
        let info = RetrieverInfo {
            model: Some(model.info.version.clone()),
            num_items: config.num_items as u32,
            max_k: self.max_k,
            max_history: self.max_history,
            embedding_dim: config.embed_dim as u32,
            dataset: model.info.dataset.clone(),
            catalog_fingerprint: model.retriever.catalog().fingerprint(),
            max_batch: self.max_batch,
        };
        record("info", start, Code::Ok);
        Ok(Response::new(info))
    }

    #[instrument(skip_all, fields(request_id))]
    async fn reload(&self, request: Request<ReloadRequest>) -> Result<Response<ReloadResponse>, Status> {
        let start = Instant::now();
        tracing::Span::current().record("request_id", request_id_of(&request).as_str());
        let result = self.reload_checked(request).await;
        record("reload", start, result.as_ref().map_or_else(Status::code, |_| Code::Ok));
        if let Err(status) = &result {
            tracing::warn!(code = ?status.code(), message = status.message(), "reload refused");
        }
        result.map(Response::new)
    }
}

impl RetrieverService {
    /// Reload behind the admin check: refused outright when no admin token is configured
    /// (secure default: an unconfigured retriever cannot be made to load files).
    async fn reload_checked(&self, request: Request<ReloadRequest>) -> Result<ReloadResponse, Status> {
        if !self.admin.is_enabled() {
            return Err(ReloadError::Disabled { service: "retriever" }.into());
        }
        self.admin.check(request.metadata())?;
        let req = request.into_inner();
        if req.checkpoint.len() > MAX_CHECKPOINT_PATH_LEN {
            return Err(ReloadError::InvalidArgument(format!("checkpoint is {} bytes; the limit is {MAX_CHECKPOINT_PATH_LEN}", req.checkpoint.len())).into());
        }
        let checkpoint = (!req.checkpoint.is_empty()).then(|| PathBuf::from(&req.checkpoint));
        let label = (!req.label.is_empty()).then_some(req.label);
        let reloaded = self.reloader.reload(checkpoint, label).await?;
        Ok(ReloadResponse {
            previous: Some(reloaded.previous),
            current: Some(reloaded.current),
            checkpoint: reloaded.checkpoint.display().to_string(),
            load_ms: reloaded.load.as_millis() as u64,
        })
    }
}
