//! SIGTERM to each service, as separate processes: health turns NOT_SERVING, new connections
//! are refused, requests in flight finish, and the process exits 0 within its configured
//! grace period. The slow in-flight Recommend goes to a real ranker behind a delaying proxy.
//! No timed assertions: time limits only bound a hang.

use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::ranker_client::RankerClient;
use llamarec_proto::v1::{RankRequest, RecommendRequest};
use llamarec_tests::proxy::DelayProxy;
use llamarec_tests::setup::{self, Addrs, Extra, Store};
use llamarec_tests::{wait_serving, Process};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::HealthCheckRequest;

/// Each service's `shutdown_grace_ms` in this test.
const GRACE: Duration = Duration::from_secs(20);

async fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_timeout(Duration::from_secs(2)).connect().await
}

/// Opens a health Watch on its own connection; returns it after the first answer (SERVING).
async fn watch_health(addr: &str) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let mut health = HealthClient::new(channel(addr).await.unwrap());
    let mut stream = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    stream
}

/// SIGTERMs `process` and checks the drain from outside: the watch sees NOT_SERVING, a fresh
/// connection is refused.
async fn terminate_and_check_refusal(process: &Process, addr: &str, mut watch: tonic::Streaming<tonic_health::pb::HealthCheckResponse>) {
    process.sigterm();
    let next = tokio::time::timeout(Duration::from_secs(30), watch.message()).await.expect("health changed after SIGTERM");
    match next {
        Ok(Some(r)) => assert_eq!(r.status(), ServingStatus::NotServing, "{} health after SIGTERM", process.name),
        other => panic!("{}: the health watch ended without NOT_SERVING: {other:?}", process.name),
    }
    // An open watch would hold the connection until the grace period ends; drop it.
    drop(watch);
    let start = Instant::now();
    loop {
        match channel(addr).await {
            Err(_) => break, // refused: the listener is closed
            Ok(ch) => {
                let status = HealthClient::new(ch).check(HealthCheckRequest { service: String::new() }).await;
                assert!(!matches!(&status, Ok(r) if r.get_ref().status() == ServingStatus::Serving), "{} still SERVING after NOT_SERVING", process.name);
            }
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{}: new connections still accepted", process.name);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_exit(mut process: Process) -> std::process::ExitStatus {
    let limit = GRACE + Duration::from_secs(10);
    let name = process.name.clone();
    let (status, _p) = tokio::task::spawn_blocking(move || (process.wait_exit(limit), process)).await.unwrap();
    status.unwrap_or_else(|| panic!("{name} still running {limit:?} after SIGTERM"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_each_service() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = Addrs::new();
    let proxy = DelayProxy::start(&addrs.ranker, Duration::ZERO).await;
    let grace = format!("shutdown_grace_ms = {}", GRACE.as_millis());
    let extra = Extra {
        retriever: &grace,
        ranker: &format!("{grace}\nqueue_capacity = 4"),
        gateway: &format!("{grace}\nreserve_ms = 400"),
        ranker_weight: Some(1.0),
        ..Default::default()
    };
    let config = setup::write_config(dir.path(), &addrs, &[&proxy.addr], &Store::Embedded, &extra);
    let retriever = setup::start("retriever", &config);
    let ranker = setup::start("ranker", &config);
    let gateway = setup::start("gateway", &config);
    for addr in [&addrs.retriever, &addrs.gateway, &addrs.ranker] {
        wait_serving(addr, Duration::from_secs(180)).await.unwrap();
    }

    // Gateway: a slow Recommend in flight (2 s each way to the ranker) when SIGTERM arrives.
    let mut client = GatewayClient::new(channel(&addrs.gateway).await.unwrap());
    let watch = watch_health(&addrs.gateway).await;
    proxy.set_delay(Duration::from_secs(2));
    let before = proxy.bytes_to_upstream();
    let in_flight = tokio::spawn(async move {
        let mut r = tonic::Request::new(RecommendRequest { user_id: "42".into(), k: 10, ..Default::default() });
        r.set_timeout(Duration::from_secs(60));
        client.recommend(r).await
    });
    let start = Instant::now();
    while proxy.bytes_to_upstream() == before {
        assert!(start.elapsed() < Duration::from_secs(30), "the Recommend never reached the ranker stage");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    terminate_and_check_refusal(&gateway, &addrs.gateway, watch).await;
    let answer = in_flight.await.unwrap().expect("the in-flight Recommend completes after SIGTERM").into_inner();
    assert!(!answer.degraded, "and is ranked: {}", answer.degraded_detail);
    assert_eq!(answer.items.len(), 10);
    let status = wait_exit(gateway).await;
    assert!(status.success(), "gateway exit status {status:?}");

    // Ranker: two Rank calls in flight (one computing, one queued) when SIGTERM arrives.
    let mut ranker_client = RankerClient::new(channel(&addrs.ranker).await.unwrap());
    let watch = watch_health(&addrs.ranker).await;
    let rank = |c: &mut RankerClient<Channel>| {
        let mut c = c.clone();
        let titles = |p: &str| (1..=20).map(|i| format!("{p} movie number {i} (1995)")).collect::<Vec<_>>();
        tokio::spawn(async move { c.rank(RankRequest { history_titles: titles("Seen"), candidate_titles: titles("Candidate") }).await })
    };
    let calls = [rank(&mut ranker_client), rank(&mut ranker_client)];
    let start = Instant::now();
    while setup::metric(&setup::scrape(addrs.ranker_metrics), "llamarec_ranker_queue_depth").unwrap_or(0.0) < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the Rank calls never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    terminate_and_check_refusal(&ranker, &addrs.ranker, watch).await;
    for call in calls {
        let scores = call.await.unwrap().expect("Rank in flight at SIGTERM completes").into_inner().scores;
        assert_eq!(scores.len(), 20);
    }
    let status = wait_exit(ranker).await;
    assert!(status.success(), "ranker exit status {status:?}");

    // Retriever, idle.
    let watch = watch_health(&addrs.retriever).await;
    terminate_and_check_refusal(&retriever, &addrs.retriever, watch).await;
    let status = wait_exit(retriever).await;
    assert!(status.success(), "retriever exit status {status:?}");
}
