//! The gateway's calls to the retriever, coalesced into RetrieveBatch calls under load.
//!
//! For a returning user the retriever's own work is tens of microseconds; most of a
//! retriever-only Recommend's CPU on both ends is the gRPC call around it (HTTP/2 frames, a
//! task per stream, syscalls and wake-ups; see BENCHMARKS.md "The floor of two gRPC hops"). So
//! the gateway keeps at most `max_calls` retriever calls in flight. A request that finds a slot
//! free goes out at once, alone: no added latency when the gateway is not busy. Requests that
//! arrive while every slot is taken would have waited anyway; they queue, and the next free slot
//! takes all of them (up to `max_batch`) in one RetrieveBatch call. There is no timer: batches
//! form only from requests that were already waiting.
//!
//! Each request keeps its own deadline (its caller stops waiting when it passes, and a request
//! whose caller left is dropped before the call), its own request id (in the request, as the
//! call's metadata cannot name each one) and its own outcome (one bad request fails alone).
//! A retriever without RetrieveBatch (UNIMPLEMENTED: older than the method) turns batching off
//! for good; the requests of that batch and all later ones go as plain Retrieve calls.

use crate::config::RetrieveBatching;
use crate::error::RetrieverCallError;
use llamarec_common::request_id::set_request_id;
use llamarec_proto::v1::retrieve_result::Outcome;
use llamarec_proto::v1::retriever_client::RetrieverClient;
use llamarec_proto::v1::{RetrieveBatchRequest, RetrieveRequest, RetrieveResponse};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// The connection to the retriever, with its batching dispatcher when enabled.
pub struct RetrieverCalls {
    client: RetrieverClient<Channel>,
    token: Option<String>,
    queue: Option<mpsc::UnboundedSender<Pending>>,
    unsupported: Arc<AtomicBool>,
}

struct Pending {
    request: RetrieveRequest,
    deadline: Instant,
    reply: oneshot::Sender<Answer>,
}

enum Answer {
    Done(Result<RetrieveResponse, Status>),
    /// The retriever has no RetrieveBatch: send this one as a plain Retrieve.
    Unsupported(RetrieveRequest),
}

impl RetrieverCalls {
    /// Starts the batching dispatcher (a task on the current runtime) when `batching.enabled`.
    /// `token`: the bearer token the retriever wants, if any.
    pub fn new(client: RetrieverClient<Channel>, token: Option<String>, batching: &RetrieveBatching) -> Self {
        let unsupported = Arc::new(AtomicBool::new(false));
        let queue = batching.enabled.then(|| {
            // Unbounded, but never long: the gateway admits at most `max_in_flight` requests.
            let (tx, rx) = mpsc::unbounded_channel();
            let dispatcher = Dispatcher {
                client: client.clone(),
                token: token.clone(),
                slots: Arc::new(Semaphore::new(batching.max_calls.max(1))),
                max_batch: batching.max_batch.max(1),
                unsupported: unsupported.clone(),
            };
            tokio::spawn(dispatcher.run(rx));
            tx
        });
        Self { client, token, queue, unsupported }
    }

    /// One Retrieve, answered within `budget` (the caller also enforces it), batched with
    /// others when the dispatcher is busy.
    pub async fn retrieve(&self, mut request: RetrieveRequest, budget: Duration, request_id: &str) -> Result<RetrieveResponse, Status> {
        let Some(queue) = self.queue.as_ref().filter(|_| !self.unsupported.load(Ordering::Relaxed)) else {
            return unary(self.client.clone(), request, budget, request_id, self.token.as_deref()).await;
        };
        request.request_id = request_id.to_string();
        let (reply, answer) = oneshot::channel();
        if queue.send(Pending { request, deadline: Instant::now() + budget, reply }).is_err() {
            return Err(RetrieverCallError::DispatcherStopped.into());
        }
        match answer.await {
            Ok(Answer::Done(result)) => result,
            Ok(Answer::Unsupported(mut request)) => {
                request.request_id.clear();
                unary(self.client.clone(), request, budget, request_id, self.token.as_deref()).await
            }
            Err(_) => Err(RetrieverCallError::DispatcherDropped.into()),
        }
    }
}

async fn unary(
    mut client: RetrieverClient<Channel>,
    request: RetrieveRequest,
    budget: Duration,
    request_id: &str,
    token: Option<&str>,
) -> Result<RetrieveResponse, Status> {
    let mut request = Request::new(request);
    request.set_timeout(budget);
    set_request_id(&mut request, request_id);
    llamarec_common::auth::set_bearer(request.metadata_mut(), token);
    client.retrieve(request).await.map(tonic::Response::into_inner)
}

struct Dispatcher {
    client: RetrieverClient<Channel>,
    token: Option<String>,
    slots: Arc<Semaphore>,
    max_batch: usize,
    unsupported: Arc<AtomicBool>,
}

impl Dispatcher {
    async fn run(self, mut queue: mpsc::UnboundedReceiver<Pending>) {
        let batch_size = metrics::histogram!("llamarec_gateway_retrieve_batch_size");
        loop {
            // A slot first, then whatever is waiting: while every slot is busy, requests pile up
            // in the queue and leave together.
            let Ok(slot) = self.slots.clone().acquire_owned().await else { return };
            let Some(first) = queue.recv().await else { return };
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match queue.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            // Callers that stopped waiting (deadline passed) are not sent.
            batch.retain(|p| !p.reply.is_closed());
            if batch.is_empty() {
                continue;
            }
            batch_size.record(batch.len() as f64);
            tokio::spawn(call(self.client.clone(), self.token.clone(), batch, self.unsupported.clone(), slot));
        }
    }
}

/// One RetrieveBatch call for `batch`, each caller answered with its own outcome.
async fn call(mut client: RetrieverClient<Channel>, token: Option<String>, batch: Vec<Pending>, unsupported: Arc<AtomicBool>, _slot: OwnedSemaphorePermit) {
    if unsupported.load(Ordering::Relaxed) {
        return answer_unsupported(batch);
    }
    let latest = batch.iter().map(|p| p.deadline).max().expect("batches are not empty");
    // Cloned, not moved: they go out again as plain calls if the retriever lacks the method.
    let mut request = Request::new(RetrieveBatchRequest { requests: batch.iter().map(|p| p.request.clone()).collect() });
    request.set_timeout(latest.saturating_duration_since(Instant::now()));
    llamarec_common::auth::set_bearer(request.metadata_mut(), token.as_deref());
    match client.retrieve_batch(request).await {
        Ok(response) => {
            let results = response.into_inner().results;
            if results.len() != batch.len() {
                let status = RetrieverCallError::BatchLength { answered: results.len(), sent: batch.len() }.into();
                return answer_all(batch, &status);
            }
            for (pending, result) in batch.into_iter().zip(results) {
                let outcome = match result.outcome {
                    Some(Outcome::Response(response)) => Ok(response),
                    Some(Outcome::Error(e)) => Err(Status::new(Code::from_i32(e.code), e.message)),
                    None => Err(RetrieverCallError::EmptyBatchResult.into()),
                };
                let _ = pending.reply.send(Answer::Done(outcome));
            }
        }
        Err(status) if status.code() == Code::Unimplemented => {
            if !unsupported.swap(true, Ordering::Relaxed) {
                tracing::warn!(message = status.message(), "the retriever has no RetrieveBatch; sending plain Retrieve calls from now on");
            }
            answer_unsupported(batch);
        }
        Err(status) => answer_all(batch, &status),
    }
}

fn answer_unsupported(batch: Vec<Pending>) {
    for p in batch {
        let _ = p.reply.send(Answer::Unsupported(p.request));
    }
}

fn answer_all(batch: Vec<Pending>, status: &Status) {
    for p in batch {
        let _ = p.reply.send(Answer::Done(Err(status.clone())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llamarec_proto::v1::retriever_server::{Retriever, RetrieverServer};
    use llamarec_proto::v1::{InfoRequest, RetrieveBatchResponse, RetrieveError, RetrieveResult, RetrievedItem, RetrieverInfo};
    use std::sync::Mutex;

    /// A retriever on loopback that answers each request with one item whose index is the
    /// request's k (so every answer names the request it belongs to), refuses k = 0 like the
    /// real one, and takes 20 ms per call so that concurrent callers pile up.
    #[derive(Clone, Default)]
    struct Echo {
        batches: Arc<Mutex<Vec<usize>>>,
        unary_calls: Arc<Mutex<usize>>,
        has_batch: bool,
    }

    fn answer(req: &RetrieveRequest) -> Result<RetrieveResponse, Status> {
        if req.k == 0 {
            return Err(Status::invalid_argument("k is 0"));
        }
        Ok(RetrieveResponse { items: vec![RetrievedItem { item_index: req.k, ..Default::default() }], ..Default::default() })
    }

    #[tonic::async_trait]
    impl Retriever for Echo {
        async fn retrieve(&self, request: Request<RetrieveRequest>) -> Result<tonic::Response<RetrieveResponse>, Status> {
            *self.unary_calls.lock().unwrap() += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
            answer(request.get_ref()).map(tonic::Response::new)
        }

        async fn retrieve_batch(&self, request: Request<RetrieveBatchRequest>) -> Result<tonic::Response<RetrieveBatchResponse>, Status> {
            if !self.has_batch {
                return Err(Status::unimplemented(""));
            }
            let requests = request.into_inner().requests;
            self.batches.lock().unwrap().push(requests.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
            let results = requests
                .iter()
                .map(|r| RetrieveResult {
                    outcome: Some(match answer(r) {
                        Ok(response) => Outcome::Response(response),
                        Err(s) => Outcome::Error(RetrieveError { code: s.code() as i32, message: s.message().into() }),
                    }),
                })
                .collect();
            Ok(tonic::Response::new(RetrieveBatchResponse { results }))
        }

        async fn reload(&self, _: Request<llamarec_proto::v1::ReloadRequest>) -> Result<tonic::Response<llamarec_proto::v1::ReloadResponse>, Status> {
            Err(Status::unimplemented("no models to reload here"))
        }

        async fn info(&self, _: Request<InfoRequest>) -> Result<tonic::Response<RetrieverInfo>, Status> {
            Ok(tonic::Response::new(RetrieverInfo::default()))
        }
    }

    async fn serve(echo: Echo) -> RetrieverClient<Channel> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = llamarec_common::serving::nodelay_incoming(listener);
        tokio::spawn(tonic::transport::Server::builder().add_service(RetrieverServer::new(echo)).serve_with_incoming(incoming));
        RetrieverClient::new(tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy())
    }

    /// Sends k = 0..n at once through `calls`; returns each caller's outcome (Ok(k) when it got
    /// the answer to its own request).
    async fn fan_out(calls: Arc<RetrieverCalls>, n: u32) -> Vec<Result<u32, Code>> {
        let tasks: Vec<_> = (0..n)
            .map(|k| {
                let calls = calls.clone();
                tokio::spawn(async move {
                    let request = RetrieveRequest { k, ..Default::default() };
                    calls.retrieve(request, Duration::from_secs(5), &format!("req-{k}")).await.map(|r| r.items[0].item_index).map_err(|s| s.code())
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn concurrent_calls_coalesce_and_each_caller_gets_its_own_outcome() {
        let echo = Echo { has_batch: true, ..Default::default() };
        let client = serve(echo.clone()).await;
        let calls = Arc::new(RetrieverCalls::new(client, None, &RetrieveBatching { enabled: true, max_calls: 1, max_batch: 8 }));
        let outcomes = fan_out(calls, 20).await;
        assert_eq!(outcomes[0], Err(Code::InvalidArgument), "k = 0 fails alone");
        for (k, outcome) in outcomes.iter().enumerate().skip(1) {
            assert_eq!(*outcome, Ok(k as u32), "request {k} got another request's answer");
        }
        let batches = echo.batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 20, "every request sent exactly once: {batches:?}");
        assert!(batches.iter().all(|&b| b <= 8), "max_batch respected: {batches:?}");
        // One call in flight at a time for 20 ms each: the first goes alone, the rest wait and
        // leave together, so 20 requests need far fewer than 20 calls.
        assert!(batches.len() <= 5, "requests were not coalesced: {batches:?}");
        assert_eq!(*echo.unary_calls.lock().unwrap(), 0);
    }

    #[tokio::test]
    async fn a_retriever_without_retrieve_batch_gets_plain_calls() {
        let echo = Echo { has_batch: false, ..Default::default() };
        let client = serve(echo.clone()).await;
        let calls = Arc::new(RetrieverCalls::new(client, None, &RetrieveBatching::default()));
        let outcomes = fan_out(calls.clone(), 10).await;
        assert_eq!(outcomes[0], Err(Code::InvalidArgument));
        for (k, outcome) in outcomes.iter().enumerate().skip(1) {
            assert_eq!(*outcome, Ok(k as u32), "request {k} lost when batching was refused");
        }
        assert!(calls.unsupported.load(Ordering::Relaxed));
        assert_eq!(*echo.unary_calls.lock().unwrap(), 10, "each request sent once as a plain call");
    }

    #[tokio::test]
    async fn batching_off_sends_one_plain_call_per_request() {
        let echo = Echo { has_batch: true, ..Default::default() };
        let client = serve(echo.clone()).await;
        let calls = Arc::new(RetrieverCalls::new(client, None, &RetrieveBatching { enabled: false, ..Default::default() }));
        let outcomes = fan_out(calls, 5).await;
        assert_eq!(&outcomes[1..], &[Ok(1), Ok(2), Ok(3), Ok(4)]);
        assert!(echo.batches.lock().unwrap().is_empty());
        assert_eq!(*echo.unary_calls.lock().unwrap(), 5);
    }
}
