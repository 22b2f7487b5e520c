//! The request queue in front of the model: admission, dynamic batching, and a dedicated model
//! thread.
//!
//! One owner task holds the waiting requests; callers send it commands over an mpsc channel and
//! get their answer on a oneshot. The model runs on its own OS thread, never on the async
//! runtime, one batch at a time. A semaphore bounds the requests queued or computing and fails
//! fast when full. A batch is dispatched when the model thread is idle and either the batch is
//! full (by requests or tokens) or its oldest request has waited `max_wait`; requests whose
//! caller has gone away (its oneshot receiver dropped, e.g. a passed deadline) are skipped.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::metrics as m;

/// The model side of the queue: runs one batch at a time on the model thread.
pub trait Backend: Send + 'static {
    /// One request's input.
    type Job: Send + 'static;
    /// One request's result.
    type Output: Send + 'static;

    /// Runs a batch; one output per job, in order, or one error for the whole batch.
    fn run(&mut self, jobs: Vec<Self::Job>) -> Result<Vec<Self::Output>, String>;
}

/// Limits of the queue and its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most requests in one batch.
    pub max_batch_size: usize,
    /// Most tokens in one batch (a single larger request still runs alone).
    pub max_batch_tokens: usize,
    /// How long the oldest request may wait for a batch to fill.
    pub max_wait: Duration,
    /// Requests queued or computing at once.
    pub capacity: usize,
}

/// Why a request got no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue is full.
    #[error("ranker at capacity ({capacity} requests queued or computing); retry with backoff")]
    Overloaded {
        /// The configured capacity.
        capacity: usize,
    },
    /// The model failed on the request's batch.
    #[error("model failure: {0}")]
    Backend(String),
    /// The queue or its model thread has stopped.
    #[error("the ranker's queue has stopped")]
    Closed,
}

/// A computed request with its timings.
#[derive(Debug)]
pub struct Completed<O> {
    /// The backend's output.
    pub output: O,
    /// From submission to the start of its batch.
    pub queue_time: Duration,
    /// The whole batch's compute time.
    pub compute_time: Duration,
    /// Requests in its batch.
    pub batch_size: usize,
}

type Reply<O> = oneshot::Sender<Result<Completed<O>, QueueError>>;

struct Entry<J, O> {
    job: J,
    tokens: usize,
    enqueued: Instant,
    reply: Reply<O>,
    _permit: OwnedSemaphorePermit,
}

/// A handle to a running queue; cheap to clone.
pub struct Queue<J, O> {
    entries: mpsc::UnboundedSender<Entry<J, O>>,
    permits: Arc<Semaphore>,
    capacity: usize,
}

impl<J, O> Clone for Queue<J, O> {
    fn clone(&self) -> Self {
        Self {
            entries: self.entries.clone(),
            permits: self.permits.clone(),
            capacity: self.capacity,
        }
    }
}

/// A place in the queue, taken before a request's (costly) tokenization.
pub struct Reservation<J, O> {
    entries: mpsc::UnboundedSender<Entry<J, O>>,
    permit: OwnedSemaphorePermit,
}

impl<J: Send + 'static, O: Send + 'static> Queue<J, O> {
    /// Starts the owner task (on the current Tokio runtime) and the model thread `thread_name`
    /// running `backend`. Both stop when every handle is dropped.
    pub fn start<B: Backend<Job = J, Output = O>>(
        backend: B,
        limits: BatchLimits,
        thread_name: &str,
    ) -> std::io::Result<Self> {
        let (entries, entries_rx) = mpsc::unbounded_channel();
        let (batches, batches_rx) = std::sync::mpsc::sync_channel::<Vec<Entry<J, O>>>(1);
        let (idle, idle_rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name(thread_name.to_string())
            .spawn(move || model_thread(backend, batches_rx, idle))?;
        tokio::spawn(own_queue(entries_rx, idle_rx, batches, limits));
        Ok(Self {
            entries,
            permits: Arc::new(Semaphore::new(limits.capacity)),
            capacity: limits.capacity,
        })
    }

    /// Takes a place in the queue, or fails at once when it is full.
    pub fn reserve(&self) -> Result<Reservation<J, O>, QueueError> {
        let permit =
            self.permits
                .clone()
                .try_acquire_owned()
                .map_err(|_| QueueError::Overloaded {
                    capacity: self.capacity,
                })?;
        Ok(Reservation {
            entries: self.entries.clone(),
            permit,
        })
    }

    /// Requests queued or computing now.
    pub fn in_flight(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }
}

impl<J: Send + 'static, O: Send + 'static> Reservation<J, O> {
    /// Queues `job`, which runs `tokens` tokens, and resolves to its result. The job is queued
    /// before this returns; dropping the future withdraws it (it is skipped, not computed).
    pub fn submit(
        self,
        job: J,
        tokens: usize,
    ) -> impl Future<Output = Result<Completed<O>, QueueError>> {
        let (reply, answer) = oneshot::channel();
        let entry = Entry {
            job,
            tokens,
            enqueued: Instant::now(),
            reply,
            _permit: self.permit,
        };
        let sent = self.entries.send(entry).is_ok();
        async move {
            if !sent {
                return Err(QueueError::Closed);
            }
            answer.await.unwrap_or(Err(QueueError::Closed))
        }
    }
}

/// How many of the waiting requests (front first) the next batch takes, and whether that batch
/// is full: the size limit or the token budget is reached, or the next request does not fit.
fn batch_extent<J, O>(waiting: &VecDeque<Entry<J, O>>, limits: &BatchLimits) -> (usize, bool) {
    let mut n = 0;
    let mut tokens = 0;
    for e in waiting {
        if n == limits.max_batch_size || (n > 0 && tokens + e.tokens > limits.max_batch_tokens) {
            return (n, true);
        }
        tokens += e.tokens;
        n += 1;
    }
    (
        n,
        n == limits.max_batch_size || tokens >= limits.max_batch_tokens,
    )
}

async fn own_queue<J, O>(
    mut entries: mpsc::UnboundedReceiver<Entry<J, O>>,
    mut idle: mpsc::UnboundedReceiver<()>,
    batches: std::sync::mpsc::SyncSender<Vec<Entry<J, O>>>,
    limits: BatchLimits,
) {
    let mut waiting: VecDeque<Entry<J, O>> = VecDeque::new();
    let mut busy = false;
    let far = Duration::from_secs(86_400);
    loop {
        let deadline = match (busy, waiting.front()) {
            (false, Some(oldest)) => Some(oldest.enqueued + limits.max_wait),
            _ => None,
        };
        tokio::select! {
            entry = entries.recv() => match entry {
                Some(e) => waiting.push_back(e),
                None => break,
            },
            ready = idle.recv(), if busy => match ready {
                Some(()) => busy = false,
                None => break,
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(|| Instant::now() + far)), if deadline.is_some() => {}
        }
        if !busy {
            let before = waiting.len();
            waiting.retain(|e| !e.reply.is_closed());
            metrics::counter!(m::SKIPPED_TOTAL).increment((before - waiting.len()) as u64);
            let (n, full) = batch_extent(&waiting, &limits);
            let waited_enough = waiting
                .front()
                .is_some_and(|e| e.enqueued + limits.max_wait <= Instant::now());
            if n > 0 && (full || waited_enough) {
                let batch: Vec<_> = waiting.drain(..n).collect();
                metrics::histogram!(m::BATCH_SIZE).record(n as f64);
                if batches.send(batch).is_err() {
                    break;
                }
                busy = true;
            }
        }
        metrics::gauge!(m::QUEUE_DEPTH).set(waiting.len() as f64);
    }
    metrics::gauge!(m::QUEUE_DEPTH).set(0.0);
}

fn model_thread<B: Backend>(
    mut backend: B,
    batches: std::sync::mpsc::Receiver<Vec<Entry<B::Job, B::Output>>>,
    idle: mpsc::UnboundedSender<()>,
) {
    while let Ok(batch) = batches.recv() {
        let start = Instant::now();
        let size = batch.len();
        let mut jobs = Vec::with_capacity(size);
        let mut waiters = Vec::with_capacity(size);
        for e in batch {
            let queue_time = start - e.enqueued;
            metrics::histogram!(m::QUEUE_DURATION).record(queue_time.as_secs_f64());
            jobs.push(e.job);
            waiters.push((e.reply, queue_time, e._permit));
        }
        // A panic in the model must fail the batch, not silently stop the thread.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend.run(jobs)))
            .unwrap_or_else(|panic| Err(panic_message(&*panic)))
            .and_then(|outputs| {
                if outputs.len() == size {
                    Ok(outputs)
                } else {
                    Err(format!(
                        "backend returned {} results for {size} requests",
                        outputs.len()
                    ))
                }
            });
        let compute_time = start.elapsed();
        metrics::histogram!(m::FORWARD_DURATION).record(compute_time.as_secs_f64());
        match result {
            Ok(outputs) => {
                for ((reply, queue_time, permit), output) in waiters.into_iter().zip(outputs) {
                    // Free the place before answering: a caller that sees its answer and
                    // submits again at once must find its place free.
                    drop(permit);
                    let _ = reply.send(Ok(Completed {
                        output,
                        queue_time,
                        compute_time,
                        batch_size: size,
                    }));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, batch_size = size, "model failure");
                for (reply, _, permit) in waiters {
                    drop(permit);
                    let _ = reply.send(Err(QueueError::Backend(e.clone())));
                }
            }
        }
        if idle.send(()).is_err() {
            break;
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned());
    format!("panic in the model thread: {}", text.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records the jobs of every batch; each batch first waits for one message on `gate`.
    struct Recorder {
        batches: Arc<Mutex<Vec<Vec<u32>>>>,
        gate: std::sync::mpsc::Receiver<()>,
        fail: bool,
    }

    impl Backend for Recorder {
        type Job = u32;
        type Output = u32;
        fn run(&mut self, jobs: Vec<u32>) -> Result<Vec<u32>, String> {
            self.gate.recv().map_err(|e| e.to_string())?;
            self.batches.lock().unwrap().push(jobs.clone());
            if self.fail {
                return Err("boom".into());
            }
            Ok(jobs.into_iter().map(|j| j * 10).collect())
        }
    }

    struct Harness {
        queue: Queue<u32, u32>,
        batches: Arc<Mutex<Vec<Vec<u32>>>>,
        gate: std::sync::mpsc::Sender<()>,
    }

    fn start(limits: BatchLimits, fail: bool) -> Harness {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let (gate, gate_rx) = std::sync::mpsc::channel();
        let queue = Queue::start(
            Recorder {
                batches: batches.clone(),
                gate: gate_rx,
                fail,
            },
            limits,
            "test-model",
        )
        .unwrap();
        Harness {
            queue,
            batches,
            gate,
        }
    }

    fn limits(
        max_batch_size: usize,
        max_batch_tokens: usize,
        wait_ms: u64,
        capacity: usize,
    ) -> BatchLimits {
        BatchLimits {
            max_batch_size,
            max_batch_tokens,
            max_wait: Duration::from_millis(wait_ms),
            capacity,
        }
    }

    /// Submits job 0, alone a full batch by its tokens, and waits until the model thread holds
    /// it (blocked on the gate), so later submissions queue up behind it.
    async fn occupy_model(h: &Harness) -> impl Future<Output = Result<Completed<u32>, QueueError>> {
        let first = h.queue.reserve().unwrap().submit(0, 1_000_000);
        // The (current-thread) runtime runs the owner task, which hands job 0 to the model.
        tokio::time::sleep(Duration::from_millis(5)).await;
        first
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_frees_places_as_requests_finish() {
        let h = start(limits(1, 100, 0, 2), false);
        let first = occupy_model(&h).await;
        let second = h.queue.reserve().unwrap().submit(1, 1);
        // `reserve` is synchronous: a full queue refuses without waiting for a place.
        let refused = h.queue.reserve().map(|_| ()).unwrap_err();
        assert_eq!(refused, QueueError::Overloaded { capacity: 2 });
        assert!(refused.to_string().contains("at capacity (2 requests"));
        h.gate.send(()).unwrap();
        h.gate.send(()).unwrap();
        assert_eq!(first.await.unwrap().output, 0);
        assert_eq!(second.await.unwrap().output, 10);
        assert_eq!(h.queue.in_flight(), 0);
        assert!(h.queue.reserve().is_ok());
    }

    #[tokio::test]
    async fn requests_whose_caller_went_away_are_skipped() {
        let h = start(limits(1, 100, 0, 8), false);
        let first = occupy_model(&h).await;
        let gone = h.queue.reserve().unwrap().submit(1, 1);
        let kept = h.queue.reserve().unwrap().submit(2, 1);
        drop(gone);
        tokio::time::sleep(Duration::from_millis(20)).await;
        for _ in 0..3 {
            h.gate.send(()).unwrap();
        }
        first.await.unwrap();
        let done = kept.await.unwrap();
        assert_eq!((done.output, done.batch_size), (20, 1));
        assert_eq!(*h.batches.lock().unwrap(), vec![vec![0], vec![2]]);
        assert!(done.queue_time >= Duration::from_millis(15));
    }

    #[tokio::test]
    async fn batches_respect_the_token_and_size_limits() {
        let h = start(limits(3, 100, 1_000, 16), false);
        let first = occupy_model(&h).await;
        // The budget of 100 tokens closes the first three batches, the size limit of 3 the last.
        let tokens = [40, 40, 40, 10, 90, 20, 1, 1];
        let pending: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| h.queue.reserve().unwrap().submit(i as u32 + 1, t))
            .collect();
        for _ in 0..5 {
            h.gate.send(()).unwrap();
        }
        first.await.unwrap();
        for (i, p) in pending.into_iter().enumerate() {
            assert_eq!(p.await.unwrap().output, (i as u32 + 1) * 10);
        }
        assert_eq!(
            *h.batches.lock().unwrap(),
            vec![vec![0], vec![1, 2], vec![3, 4], vec![5], vec![6, 7, 8]]
        );
    }

    #[tokio::test]
    async fn a_partial_batch_waits_at_most_max_wait() {
        let h = start(limits(4, 100, 50, 16), false);
        h.gate.send(()).unwrap();
        h.gate.send(()).unwrap();
        let t = std::time::Instant::now();
        let a = h.queue.reserve().unwrap().submit(1, 1);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let b = h.queue.reserve().unwrap().submit(2, 1);
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "{:?}",
            t.elapsed()
        );
        assert_eq!((a.batch_size, b.batch_size), (2, 2));
        // A full batch does not wait.
        let h = start(limits(2, 100, 10_000, 16), false);
        h.gate.send(()).unwrap();
        let t = std::time::Instant::now();
        let (a, b) = (
            h.queue.reserve().unwrap().submit(1, 1),
            h.queue.reserve().unwrap().submit(2, 1),
        );
        assert_eq!(a.await.unwrap().batch_size, 2);
        b.await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_model_failure_fails_its_batch_and_the_queue_goes_on() {
        let h = start(limits(1, 100, 0, 4), true);
        h.gate.send(()).unwrap();
        h.gate.send(()).unwrap();
        let e = h.queue.reserve().unwrap().submit(1, 1).await.unwrap_err();
        assert_eq!(e, QueueError::Backend("boom".into()));
        assert!(h.queue.reserve().unwrap().submit(2, 1).await.is_err());
        assert_eq!(h.batches.lock().unwrap().len(), 2);
    }
}
