//! Open-loop replay of a traffic file against a gateway (`llamarec replay`, and tests that need
//! load while they break things).
//!
//! Every request is spawned at its scheduled instant whatever the earlier ones are doing, and
//! its latency is measured from that instant, not from when it was actually sent: a slow
//! gateway, a full connection or a late scheduler all show up as latency instead of silently
//! thinning the load (no coordinated omission). Requests beyond `max_outstanding` in flight are
//! not queued: they count as errors (`ClientOutstandingLimit`).

use crate::traffic::TrafficRecord;
use hdrhistogram::Histogram;
use llamarec_proto::v1::gateway_client::GatewayClient;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

/// Error key of a request refused because `max_outstanding` were already in flight.
pub const OUTSTANDING_LIMIT: &str = "ClientOutstandingLimit";
/// Error key of a request with no answer within its deadline plus a second (client side).
pub const CLIENT_TIMEOUT: &str = "ClientTimeout";

/// When requests are sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// The recorded arrival gaps divided by `speed` (2.0 = twice as fast), from the first record.
    Recorded { speed: f64 },
    /// `rate` requests per second for `duration`, cycling through the records in order.
    Fixed { rate: f64, duration: Duration, arrivals: Arrivals },
}

/// Arrival process of a fixed-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// Evenly spaced, `1 / rate` apart.
    Uniform,
    /// Poisson: exponential gaps with mean `1 / rate`, from a seeded generator.
    Poisson { seed: u64 },
}

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

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1e3;
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean_ms: h.mean() / 1e3,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// The outcome of a replay. `sent == completed + errors`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub gateway: String,
    pub connections: usize,
    /// The schedule, in words.
    pub schedule: String,
    pub max_outstanding: usize,
    /// Requests that came due.
    pub sent: u64,
    /// Answered OK (degraded ones included).
    pub completed: u64,
    /// Everything else: gRPC errors, client timeouts, refused by the outstanding bound.
    pub errors: u64,
    /// By gRPC code (`tonic::Code` names) or client-side reason.
    pub errors_by_code: BTreeMap<String, u64>,
    /// Answered OK but in the retriever's order.
    pub degraded: u64,
    /// By `DegradedReason` (without its prefix).
    pub degraded_by_reason: BTreeMap<String, u64>,
    /// From the first scheduled instant to the last answer.
    pub duration_s: f64,
    /// Requests per second the schedule asked for (sent over its span).
    pub offered_rate: f64,
    /// Completed per second over `duration_s`.
    pub throughput: f64,
    /// Of completed requests, from their scheduled send time.
    pub latency: LatencySummary,
    /// How late the scheduler sent requests (the load generator keeping up, or not).
    pub send_lag: LatencySummary,
    /// Most requests in flight at once.
    pub max_outstanding_seen: u64,
}

impl Report {
    /// A text table for people.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "replay against {} over {} connection(s): {}", self.gateway, self.connections, self.schedule);
        let _ = writeln!(s, "{:<22} {:>12}", "sent", self.sent);
        let _ = writeln!(s, "{:<22} {:>12}", "completed", self.completed);
        let _ = writeln!(s, "{:<22} {:>12}", "errors", self.errors);
        let _ = writeln!(s, "{:<22} {:>12}", "degraded", self.degraded);
        let _ = writeln!(s, "{:<22} {:>12.1}", "offered (req/s)", self.offered_rate);
        let _ = writeln!(s, "{:<22} {:>12.1}", "throughput (req/s)", self.throughput);
        let _ = writeln!(s, "{:<22} {:>12.2}", "duration (s)", self.duration_s);
        let _ = writeln!(s, "{:<22} {:>12}", "max in flight", self.max_outstanding_seen);
        let _ = writeln!(s, "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}", "latency (ms)", "mean", "p50", "p90", "p99", "p99.9", "max");
        for (name, l) in [("  from schedule", &self.latency), ("  send lag", &self.send_lag)] {
            let _ = writeln!(s, "{name:<22} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}", l.mean_ms, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms);
        }
        for (title, map) in [("errors by code", &self.errors_by_code), ("degraded by reason", &self.degraded_by_reason)] {
            if !map.is_empty() {
                let _ = writeln!(s, "{title}:");
                for (k, v) in map {
                    let _ = writeln!(s, "  {k:<20} {v:>12}");
                }
            }
        }
        s
    }
}

/// Arrival offsets of a Poisson process of `rate` per second over `duration`.
pub fn poisson_offsets(rate: f64, duration: Duration, seed: u64) -> Vec<Duration> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = 0.0;
    let mut out = Vec::new();
    if rate <= 0.0 {
        return out;
    }
    loop {
        let u: f64 = rng.gen(); // [0, 1)
        t += -(1.0 - u).ln() / rate;
        if t >= duration.as_secs_f64() {
            return out;
        }
        out.push(Duration::from_secs_f64(t));
    }
}

/// The send plan: (offset from the start, index into `traffic`), in time order.
pub fn plan(traffic: &[TrafficRecord], schedule: &Schedule) -> anyhow::Result<Vec<(Duration, usize)>> {
    anyhow::ensure!(!traffic.is_empty(), "the traffic file holds no requests");
    Ok(match schedule {
        Schedule::Recorded { speed } => {
            anyhow::ensure!(speed.is_finite() && *speed > 0.0, "speed must be > 0");
            let first = traffic.iter().map(|r| r.offset_ms).fold(f64::INFINITY, f64::min);
            let mut plan: Vec<_> = traffic.iter().enumerate().map(|(i, r)| (Duration::from_secs_f64(((r.offset_ms - first) / 1e3 / speed).max(0.0)), i)).collect();
            plan.sort_by_key(|p| p.0);
            plan
        }
        Schedule::Fixed { rate, duration, arrivals } => {
            anyhow::ensure!(rate.is_finite() && *rate > 0.0, "rate must be > 0");
            let offsets = match arrivals {
                Arrivals::Uniform => (0..(rate * duration.as_secs_f64()).ceil() as u64).map(|i| Duration::from_secs_f64(i as f64 / rate)).filter(|d| d < duration).collect(),
                Arrivals::Poisson { seed } => poisson_offsets(*rate, *duration, *seed),
            };
            offsets.into_iter().enumerate().map(|(i, d)| (d, i % traffic.len())).collect()
        }
    })
}

fn describe(schedule: &Schedule) -> String {
    match schedule {
        Schedule::Recorded { speed } => format!("recorded arrivals at {speed}x speed"),
        Schedule::Fixed { rate, duration, arrivals } => {
            let kind = match arrivals {
                Arrivals::Uniform => "uniform".to_string(),
                Arrivals::Poisson { seed } => format!("Poisson (seed {seed})"),
            };
            format!("{rate} req/s for {:.1} s, {kind} arrivals", duration.as_secs_f64())
        }
    }
}

#[derive(Default)]
struct Tally {
    latency: Option<Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    degraded: BTreeMap<String, u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Opens `n` connections to `addr`.
pub async fn connect(addr: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    use anyhow::Context;
    let mut channels = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true).connect_timeout(Duration::from_secs(5));
        channels.push(endpoint.connect().await.with_context(|| format!("connecting to the gateway at {addr}"))?);
    }
    Ok(channels)
}

/// Replays `traffic` as `options` say; `progress` is updated as it goes. Returns when every
/// request has been answered, failed or refused.
pub async fn run(traffic: &[TrafficRecord], options: &ReplayOptions, progress: Arc<Progress>) -> anyhow::Result<Report> {
    let plan = plan(traffic, &options.schedule)?;
    let channels = connect(&options.gateway, options.connections).await?;
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
        tasks.spawn(async move {
            let mut request = tonic::Request::new(requests[index].to_request());
            if let Some(d) = deadline {
                request.set_timeout(d);
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

    fn records(n: usize) -> Vec<TrafficRecord> {
        (0..n)
            .map(|i| TrafficRecord {
                offset_ms: 1000.0 + 250.0 * i as f64,
                unix_ms: None,
                user_id: i.to_string(),
                k: 10,
                candidates: 0,
                skip_ranker: true,
                inline_history: None,
                events: vec![],
                deadline_ms: None,
            })
            .collect()
    }

    #[test]
    fn recorded_schedule_keeps_gaps_scaled_by_speed() {
        let t = records(4);
        let p = plan(&t, &Schedule::Recorded { speed: 2.0 }).unwrap();
        assert_eq!(p.iter().map(|x| x.1).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(p.iter().map(|x| x.0.as_millis()).collect::<Vec<_>>(), [0, 125, 250, 375]);
        assert!(plan(&t, &Schedule::Recorded { speed: 0.0 }).is_err());
        assert!(plan(&[], &Schedule::Recorded { speed: 1.0 }).is_err());
    }

    #[test]
    fn fixed_schedule_cycles_the_records() {
        let t = records(3);
        let p = plan(&t, &Schedule::Fixed { rate: 10.0, duration: Duration::from_secs(1), arrivals: Arrivals::Uniform }).unwrap();
        assert_eq!(p.len(), 10);
        assert_eq!(p.iter().map(|x| x.1).collect::<Vec<_>>(), [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(p[9].0.as_millis(), 900);
        let poisson = Schedule::Fixed { rate: 200.0, duration: Duration::from_secs(50), arrivals: Arrivals::Poisson { seed: 3 } };
        let p = plan(&t, &poisson).unwrap();
        // 10,000 expected; the count of a Poisson process has standard deviation 100.
        assert!((9_500..10_500).contains(&p.len()), "{}", p.len());
        assert!(p.windows(2).all(|w| w[0].0 <= w[1].0) && p.last().unwrap().0 < Duration::from_secs(50));
        assert_eq!(p, plan(&t, &poisson).unwrap(), "seeded");
    }

    #[test]
    fn poisson_gaps_are_exponential() {
        let offsets = poisson_offsets(100.0, Duration::from_secs(200), 11);
        let gaps: Vec<f64> = std::iter::once(offsets[0].as_secs_f64()).chain(offsets.windows(2).map(|w| (w[1] - w[0]).as_secs_f64())).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        assert!((mean - 0.01).abs() < 0.0005, "mean gap {mean}");
        // Exponential: about e^-1 of the gaps exceed the mean.
        let above = gaps.iter().filter(|&&g| g > 0.01).count() as f64 / gaps.len() as f64;
        assert!((above - (-1f64).exp()).abs() < 0.02, "{above}");
    }

    /// A gateway that holds every Recommend until released, then answers: users "fail" with
    /// UNAVAILABLE, users "slow" degraded (ranker timeout), the others OK.
    struct Held(tokio::sync::watch::Receiver<bool>);

    #[tonic::async_trait]
    impl llamarec_proto::v1::gateway_server::Gateway for Held {
        async fn recommend(&self, request: tonic::Request<llamarec_proto::v1::RecommendRequest>) -> Result<tonic::Response<llamarec_proto::v1::RecommendResponse>, tonic::Status> {
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
        async fn append_events(&self, _: tonic::Request<llamarec_proto::v1::AppendEventsRequest>) -> Result<tonic::Response<llamarec_proto::v1::AppendEventsResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
        async fn get_history(&self, _: tonic::Request<llamarec_proto::v1::GetHistoryRequest>) -> Result<tonic::Response<llamarec_proto::v1::GetHistoryResponse>, tonic::Status> {
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

    #[test]
    fn report_table_names_everything() {
        let mut r = Report { sent: 5, completed: 3, errors: 2, ..Default::default() };
        r.errors_by_code.insert("Unavailable".into(), 2);
        r.degraded_by_reason.insert("OVERLOAD".into(), 1);
        let text = r.table();
        for needle in ["sent", "completed", "p99.9", "Unavailable", "OVERLOAD"] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
