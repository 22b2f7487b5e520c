//! Overload with real processes and tiny capacities: the gateway admits `max_in_flight = 4`
//! requests, sends each ranker at most `max_in_flight_per_endpoint = 2` calls, and the ranker
//! queues at most `queue_capacity = 2`. At ~10x capacity: beyond the rankers' capacity
//! Recommend degrades (OVERLOAD, ranker skipped), beyond the gateway's own limit it is refused
//! with RESOURCE_EXHAUSTED, and admitted requests succeed. A ranker that answers
//! RESOURCE_EXHAUSTED also degrades to OVERLOAD. Latencies are printed (BENCHMARKS.md,
//! "Overload"), never asserted: `cargo test --release -p llamarec-tests --test overload -- --nocapture`.

use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::ranker_client::RankerClient;
use llamarec_proto::v1::{DegradedReason, RankRequest, RecommendRequest};
use llamarec_tests::setup::{self, Addrs, Extra, Store};
use llamarec_tests::wait_serving;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

const GATEWAY_MAX_IN_FLIGHT: usize = 4;
const CLIENTS: usize = 10 * GATEWAY_MAX_IN_FLIGHT;

#[derive(Debug)]
enum Outcome {
    Ranked(Duration),
    Degraded(Duration, DegradedReason, String),
    Refused(Duration),
    Failed(tonic::Status),
}

async fn call(mut c: GatewayClient<Channel>, user: String) -> Outcome {
    let mut r = tonic::Request::new(RecommendRequest { user_id: user, k: 10, ..Default::default() });
    r.set_timeout(Duration::from_secs(120));
    let start = Instant::now();
    let outcome = c.recommend(r).await;
    let t = start.elapsed();
    match outcome {
        Ok(r) if !r.get_ref().degraded => Outcome::Ranked(t),
        Ok(r) => Outcome::Degraded(t, r.get_ref().degraded_reason(), r.into_inner().degraded_detail),
        Err(s) if s.code() == Code::ResourceExhausted => Outcome::Refused(t),
        Err(s) => Outcome::Failed(s),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn summary(name: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!("{name}: n={} p50={:.1} ms p99={:.1} ms max={:.1} ms", v.len(), ms(percentile(&v, 0.5)), ms(percentile(&v, 0.99)), ms(percentile(&v, 1.0)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_capacity_degrade_then_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = Addrs::new();
    let extra = Extra {
        ranker: "queue_capacity = 2",
        gateway: &format!("max_in_flight = {GATEWAY_MAX_IN_FLIGHT}"),
        gateway_rankers: "max_in_flight_per_endpoint = 2",
        ranker_weight: Some(1.0),
        ..Default::default()
    };
    let config = setup::write_config(dir.path(), &addrs, &[&addrs.ranker], &Store::Embedded, &extra);
    let _retriever = setup::start("retriever", &config);
    let _ranker = setup::start("ranker", &config);
    let _gateway = setup::start("gateway", &config);
    for addr in [&addrs.retriever, &addrs.gateway, &addrs.ranker] {
        wait_serving(addr, Duration::from_secs(180)).await.unwrap();
    }
    let client = GatewayClient::connect(format!("http://{}", addrs.gateway)).await.unwrap();
    assert!(matches!(call(client.clone(), "42".into()).await, Outcome::Ranked(_)), "one request alone is ranked");

    // 1. The ranker's own queue full (two direct Rank calls: one computing, one queued): the
    // gateway's call is refused by the ranker, and Recommend degrades to OVERLOAD.
    let ranker = RankerClient::connect(format!("http://{}", addrs.ranker)).await.unwrap();
    let titles = |p: &str| (1..=20).map(|i| format!("{p} movie number {i} (1995)")).collect::<Vec<_>>();
    let direct: Vec<_> = (0..2)
        .map(|_| {
            let mut c = ranker.clone();
            let req = RankRequest { history_titles: titles("Seen"), candidate_titles: titles("Candidate") };
            tokio::spawn(async move { c.rank(req).await })
        })
        .collect();
    let start = Instant::now();
    while setup::metric(&setup::scrape(addrs.ranker_metrics), "llamarec_ranker_queue_depth").unwrap_or(0.0) < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the direct Rank calls never filled the ranker's queue");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match call(client.clone(), "42".into()).await {
        Outcome::Degraded(_, DegradedReason::Overload, detail) => assert!(detail.contains("at capacity"), "the ranker's refusal: {detail}"),
        other => panic!("expected degraded OVERLOAD while the ranker is full, got {other:?}"),
    }
    for d in direct {
        d.await.unwrap().expect("the direct Rank calls themselves succeed");
    }

    // 2. A burst of 10x the gateway's capacity at once.
    let users: Vec<String> = (1..=CLIENTS).map(|u| u.to_string()).collect();
    let burst: Vec<_> = users.iter().map(|u| tokio::spawn(call(client.clone(), u.clone()))).collect();
    let mut outcomes = Vec::new();
    for b in burst {
        outcomes.push(b.await.unwrap());
    }
    let failed: Vec<_> = outcomes.iter().filter(|o| matches!(o, Outcome::Failed(_))).collect();
    assert!(failed.is_empty(), "admitted requests succeed: {failed:?}");
    let refused = outcomes.iter().filter(|o| matches!(o, Outcome::Refused(_))).count();
    let ranked = outcomes.iter().filter(|o| matches!(o, Outcome::Ranked(_))).count();
    let degraded: Vec<_> = outcomes.iter().filter_map(|o| if let Outcome::Degraded(_, r, d) = o { Some((*r, d.clone())) } else { None }).collect();
    eprintln!("burst of {CLIENTS}: {refused} refused, {} degraded, {ranked} ranked", degraded.len());
    assert!(refused > 0, "beyond the gateway's limit: RESOURCE_EXHAUSTED");
    assert!(refused <= CLIENTS - GATEWAY_MAX_IN_FLIGHT, "the first {GATEWAY_MAX_IN_FLIGHT} are admitted");
    assert!(!degraded.is_empty(), "beyond the rankers' capacity: degraded");
    for (reason, detail) in &degraded {
        assert_eq!(*reason, DegradedReason::Overload, "{detail}");
        assert!(detail.contains("max_in_flight_per_endpoint"), "the gateway skipped the ranker itself (it never sends more than the ranker queues): {detail}");
    }
    assert!(ranked >= 1 && ranked <= CLIENTS - refused - degraded.len());

    // 3. Figures: CLIENTS closed-loop clients for a while (a refused client waits 100 ms).
    let run_for = Duration::from_secs(15);
    let start = Instant::now();
    let loops: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut n = 0;
                while start.elapsed() < run_for {
                    n += 1;
                    let o = call(client.clone(), ((i * 37 + n) % 900 + 1).to_string()).await;
                    if matches!(o, Outcome::Refused(_)) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    seen.push(o);
                }
                seen
            })
        })
        .collect();
    let mut all = Vec::new();
    for l in loops {
        all.extend(l.await.unwrap());
    }
    let pick = |f: fn(&Outcome) -> Option<Duration>| all.iter().filter_map(f).collect::<Vec<_>>();
    let refused = pick(|o| if let Outcome::Refused(t) = o { Some(*t) } else { None });
    let ranked = pick(|o| if let Outcome::Ranked(t) = o { Some(*t) } else { None });
    let degraded = pick(|o| if let Outcome::Degraded(t, ..) = o { Some(*t) } else { None });
    let admitted: Vec<Duration> = ranked.iter().chain(&degraded).copied().collect();
    let failed: Vec<&tonic::Status> = all.iter().filter_map(|o| if let Outcome::Failed(s) = o { Some(s) } else { None }).collect();
    eprintln!("overload figures, {CLIENTS} closed-loop clients for {run_for:?}, gateway max_in_flight {GATEWAY_MAX_IN_FLIGHT}, 2 per ranker, ranker queue 2:");
    eprintln!("  {}", summary("refused (RESOURCE_EXHAUSTED)", refused));
    eprintln!("  {}", summary("admitted (all)", admitted));
    eprintln!("  {}", summary("admitted, ranked", ranked));
    eprintln!("  {}", summary("admitted, degraded OVERLOAD", degraded));
    eprintln!("  failed: {}", failed.len());
    assert!(failed.is_empty(), "admitted requests succeed: {failed:?}");
}
