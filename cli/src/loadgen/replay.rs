//! Open-loop replay of a traffic file against a gateway (`llamarec replay`, `llamarec bench
//! replay`).
//!
//! Every request is spawned at its scheduled instant whatever the earlier ones are doing, and
//! its latency is measured from that instant, not from when it was actually sent: a slow
//! gateway, a full connection or a late scheduler all show up as latency instead of silently
//! thinning the load (no coordinated omission). Requests beyond `max_outstanding` in flight are
//! not queued: they count as errors (`ClientOutstandingLimit`).

use super::report::{histogram, LatencySummary, Report};
use super::schedule::{describe, plan, Schedule};
use gateway::traffic::TrafficRecord;
use hdrhistogram::Histogram;
use llamarec_proto::v1::gateway_client::GatewayClient;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, ClientTlsConfig};

/// Error key of a request refused because `max_outstanding` were already in flight.
pub const OUTSTANDING_LIMIT: &str = "ClientOutstandingLimit";
/// Error key of a request with no answer within its deadline plus a second (client side).
pub const CLIENT_TIMEOUT: &str = "ClientTimeout";

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Gateway address, `host:port`.
    pub gateway: String,
    /// TCP connections (one tonic channel each), used round-robin.
    pub connections: usize,
    /// When requests are sent.
    pub schedule: Schedule,
    /// Requests in flight beyond which a due request is counted as an error instead of sent.
    pub max_outstanding: usize,
    /// gRPC deadline of every request; `None` keeps each record's (and the gateway's default
    /// where the record has none).
    pub deadline: Option<Duration>,
    /// TLS towards the gateway (`[gateway.tls]`); `None`: plaintext.
    pub tls: Option<ClientTlsConfig>,
    /// `authorization` sent with every request (`[gateway.auth]`).
    pub bearer: Option<AsciiMetadataValue>,
}

/// Live counters, for a progress line or for a test watching the load.
#[derive(Debug, Default)]
pub struct Progress {
    /// Requests the schedule holds.
    pub total: AtomicU64,
    /// Requests that came due (sent, or refused by the outstanding bound).
    pub sent: AtomicU64,
    /// Answered OK.
    pub completed: AtomicU64,
    /// Failed, timed out or refused.
    pub errors: AtomicU64,
    /// OK but degraded (retriever order).
    pub degraded: AtomicU64,
    /// In flight now.
    pub outstanding: AtomicU64,
}

#[derive(Default)]
struct Tally {
    latency: Option<Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    degraded: BTreeMap<String, u64>,
}

/// Opens `n` connections to `addr`, with TLS when `tls` is given.
pub async fn connect(addr: &str, n: usize, tls: Option<&ClientTlsConfig>) -> anyhow::Result<Vec<Channel>> {
    use anyhow::Context;
    let mut channels = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        let endpoint = llamarec_common::auth::endpoint(addr, tls)?.tcp_nodelay(true).connect_timeout(Duration::from_secs(5));
        channels.push(endpoint.connect().await.with_context(|| format!("connecting to the gateway at {addr}"))?);
    }
    Ok(channels)
}

/// Replays `traffic` as `options` say; `progress` is updated as it goes. Returns when every
/// request has been answered, failed or refused.
pub async fn run(traffic: &[TrafficRecord], options: &ReplayOptions, progress: Arc<Progress>) -> anyhow::Result<Report> {
    let plan = plan(traffic, &options.schedule)?;
    let channels = connect(&options.gateway, options.connections, options.tls.as_ref()).await?;
    let requests: Arc<Vec<TrafficRecord>> = Arc::new(traffic.to_vec());
    let tally = Arc::new(Mutex::new(Tally { latency: Some(histogram()), ..Default::default() }));
    let mut lag = histogram();
    let permits = Arc::new(Semaphore::new(options.max_outstanding.max(1)));
    let max_seen = Arc::new(AtomicU64::new(0));
    progress.total.store(plan.len() as u64, Ordering::Relaxed);

    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now() + Duration::from_millis(20);
    for (n, &(offset, index)) in plan.iter().enumerate() {
        let at = start + offset;
        if Instant::now() < at {
            tokio::time::sleep_until(at).await;
        }
        let _ = lag.record((Instant::now().saturating_duration_since(at).as_micros() as u64).max(1));
        progress.sent.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            *tally.lock().unwrap().errors.entry(OUTSTANDING_LIMIT.into()).or_default() += 1;
            progress.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let now_out = progress.outstanding.fetch_add(1, Ordering::Relaxed) + 1;
        max_seen.fetch_max(now_out, Ordering::Relaxed);
        let mut client = GatewayClient::new(channels[n % channels.len()].clone());
        let (requests, tally, progress) = (requests.clone(), tally.clone(), progress.clone());
        let deadline = options.deadline.or(requests[index].deadline_ms.map(Duration::from_millis));
        let bearer = options.bearer.clone();
        tasks.spawn(async move {
            let mut request = tonic::Request::new(requests[index].to_request());
            if let Some(d) = deadline {
                request.set_timeout(d);
            }
            if let Some(value) = bearer {
                request.metadata_mut().insert(llamarec_common::auth::AUTHORIZATION, value);
            }
            // A client-side cap, so a gateway that never answers cannot hang the replay.
            let cap = deadline.unwrap_or(Duration::from_secs(60)) + Duration::from_secs(1);
            let outcome = tokio::time::timeout(cap, client.recommend(request)).await;
            let latency = Instant::now().saturating_duration_since(at);
            progress.outstanding.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
            let mut t = tally.lock().unwrap();
            match outcome {
                Ok(Ok(response)) => {
                    let r = response.into_inner();
                    if let Some(h) = t.latency.as_mut() {
                        let _ = h.record((latency.as_micros() as u64).max(1));
                    }
                    progress.completed.fetch_add(1, Ordering::Relaxed);
                    if r.degraded {
                        let reason = r.degraded_reason().as_str_name().trim_start_matches("DEGRADED_REASON_").to_string();
                        *t.degraded.entry(reason).or_default() += 1;
                        progress.degraded.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Err(status)) => {
                    *t.errors.entry(format!("{:?}", status.code())).or_default() += 1;
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    *t.errors.entry(CLIENT_TIMEOUT.into()).or_default() += 1;
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        // Reap finished tasks as we go, so a long replay does not hold every handle.
        while tasks.try_join_next().is_some() {}
    }
    let span = plan.last().map_or(Duration::ZERO, |p| p.0);
    while tasks.join_next().await.is_some() {}
    let duration = Instant::now().saturating_duration_since(start).max(Duration::from_millis(1));

    let mut t = tally.lock().unwrap();
    let latency = t.latency.take().unwrap_or_else(histogram);
    let errors: u64 = t.errors.values().sum();
    let sent = plan.len() as u64;
    let completed = latency.len();
    Ok(Report {
        gateway: options.gateway.clone(),
        connections: channels.len(),
        schedule: describe(&options.schedule),
        max_outstanding: options.max_outstanding,
        sent,
        completed,
        errors,
        errors_by_code: std::mem::take(&mut t.errors),
        degraded: t.degraded.values().sum(),
        degraded_by_reason: std::mem::take(&mut t.degraded),
        duration_s: duration.as_secs_f64(),
        offered_rate: if span.is_zero() { sent as f64 } else { sent.saturating_sub(1).max(1) as f64 / span.as_secs_f64() },
        throughput: completed as f64 / duration.as_secs_f64(),
        latency: LatencySummary::of(&latency),
        send_lag: LatencySummary::of(&lag),
        max_outstanding_seen: max_seen.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::schedule::tests::records;

    /// A gateway that holds every Recommend until released, then answers: users "fail" with
    /// UNAVAILABLE, users "slow" degraded (ranker timeout), the others OK.
    struct Held(tokio::sync::watch::Receiver<bool>);

    #[tonic::async_trait]
    impl llamarec_proto::v1::gateway_server::Gateway for Held {
        async fn recommend(
            &self,
            request: tonic::Request<llamarec_proto::v1::RecommendRequest>,
        ) -> Result<tonic::Response<llamarec_proto::v1::RecommendResponse>, tonic::Status> {
            let mut open = self.0.clone();
            let _ = open.wait_for(|&o| o).await;
            let mut response = llamarec_proto::v1::RecommendResponse::default();
            match request.get_ref().user_id.as_str() {
                "fail" => return Err(tonic::Status::unavailable("down")),
                "slow" => {
                    response.degraded = true;
                    response.degraded_reason = llamarec_proto::v1::DegradedReason::RankerTimeout as i32;
                }
                _ => {}
            }
            Ok(tonic::Response::new(response))
        }
        async fn append_events(
            &self,
            _: tonic::Request<llamarec_proto::v1::AppendEventsRequest>,
        ) -> Result<tonic::Response<llamarec_proto::v1::AppendEventsResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
        async fn get_history(
            &self,
            _: tonic::Request<llamarec_proto::v1::GetHistoryRequest>,
        ) -> Result<tonic::Response<llamarec_proto::v1::GetHistoryResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
        async fn get_split(
            &self,
            _: tonic::Request<llamarec_proto::v1::GetSplitRequest>,
        ) -> Result<tonic::Response<llamarec_proto::v1::GetSplitResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
        async fn set_split(
            &self,
            _: tonic::Request<llamarec_proto::v1::SetSplitRequest>,
        ) -> Result<tonic::Response<llamarec_proto::v1::SetSplitResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_sends_on_schedule_and_refuses_beyond_the_bound() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (release, held) = tokio::sync::watch::channel(false);
        let server = tonic::transport::Server::builder()
            .add_service(llamarec_proto::v1::gateway_server::GatewayServer::new(Held(held)))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        tokio::spawn(server);

        // Six requests; the gateway answers none until all six came due, so with a bound of
        // four the last two are refused instead of waiting: open loop, not closed.
        let mut traffic = records(6);
        traffic[1].user_id = "fail".into();
        traffic[2].user_id = "slow".into();
        let options = ReplayOptions {
            gateway: addr,
            connections: 3,
            schedule: Schedule::Recorded { speed: 50.0 },
            max_outstanding: 4,
            deadline: Some(Duration::from_secs(30)),
            tls: None,
            bearer: None,
        };
        let progress = Arc::new(Progress::default());
        let watch = {
            let progress = progress.clone();
            tokio::spawn(async move {
                while progress.sent.load(Ordering::Relaxed) < 6 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                release.send(true).unwrap();
            })
        };
        let report = run(&traffic, &options, progress.clone()).await.unwrap();
        watch.await.unwrap();
        assert_eq!(report.sent, 6);
        assert_eq!(report.completed, 3, "{report:?}");
        assert_eq!(report.errors, 3);
        assert_eq!(report.errors_by_code, BTreeMap::from([(OUTSTANDING_LIMIT.to_string(), 2), ("Unavailable".to_string(), 1)]));
        assert_eq!(report.degraded, 1);
        assert_eq!(report.degraded_by_reason, BTreeMap::from([("RANKER_TIMEOUT".to_string(), 1)]));
        assert_eq!(report.latency.count, 3);
        assert_eq!(report.max_outstanding_seen, 4);
        assert_eq!(report.connections, 3);
        assert_eq!(progress.outstanding.load(Ordering::Relaxed), 0);
        // Latency runs from the scheduled instant: the held answers waited at least until the
        // sixth request was due, 5 x 250 ms / 50 = 25 ms after the first.
        assert!(report.latency.max_ms >= 25.0, "{:?}", report.latency);
    }
}
