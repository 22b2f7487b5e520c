//! The shipped fusion weight, 0, across processes: Recommend answers in the retriever's order
//! without calling the ranker (and without flagging the answer degraded), and shadow ranking
//! scores a sampled share of requests beside the answer without changing it, adding to its
//! latency or degrading it when the ranker is slow or gone. Weight > 0 is in `cluster.rs`.

use gateway::shadow::ShadowRecord;
use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::{RecommendOptions, RecommendRequest, RecommendResponse};
use llamarec_tests::proxy::DelayProxy;
use llamarec_tests::setup::{self, Addrs, Extra, Store};
use llamarec_tests::{free_port, wait_serving};
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const USERS: [&str; 4] = ["1", "42", "300", "943"];

fn recommend(user: &str, k: u32, skip_ranker: bool, request_id: Option<&str>) -> tonic::Request<RecommendRequest> {
    let options = Some(RecommendOptions { num_candidates: 0, skip_ranker });
    let mut r = tonic::Request::new(RecommendRequest { user_id: user.into(), k, options, ..Default::default() });
    r.set_timeout(Duration::from_secs(30));
    if let Some(id) = request_id {
        r.metadata_mut().insert("x-request-id", id.parse().unwrap());
    }
    r
}

async fn client(addr: &str) -> GatewayClient<Channel> {
    GatewayClient::connect(format!("http://{addr}")).await.unwrap()
}

/// The items as (id, final score, retriever rank): what a caller sees of the order.
fn order(r: &RecommendResponse) -> Vec<(String, f32, u32)> {
    r.items.iter().map(|i| (i.item_id.clone(), i.final_score, i.retriever_rank)).collect()
}

/// An answer that did not use the ranker and says so: retriever order, no ranker evidence, no
/// Rank time, not degraded.
fn assert_retriever_only(r: &RecommendResponse, k: usize) {
    assert!(!r.degraded, "nothing was lost at weight 0: {:?} {}", r.degraded_reason(), r.degraded_detail);
    assert_eq!(r.degraded_reason, 0);
    assert!(r.degraded_detail.is_empty());
    assert_eq!(r.items.len(), k);
    assert_eq!(r.items.iter().map(|i| i.retriever_rank).collect::<Vec<_>>(), (1..=k as u32).collect::<Vec<_>>(), "the retriever's order");
    assert!(r.ranker_model.is_none(), "no ranker model: the ranker was not used");
    assert!(r.items.iter().all(|i| i.ranker_log_prob.is_none() && i.ranker_logit.is_none()));
    assert_eq!(r.timings.unwrap().rank_us, 0);
}

/// The shadow record of `request_id` once the file holds it.
async fn shadow_record(path: &Path, request_id: &str) -> ShadowRecord {
    for _ in 0..1500 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(r) = text.lines().filter_map(|l| serde_json::from_str::<ShadowRecord>(l).ok()).find(|r| r.request_id == request_id) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no shadow record for {request_id} in {}", path.display());
}

/// The shipped default (no `ranker_weight` in the file: the compiled-in 0, shadow off): the
/// gateway never opens a connection to its ranker endpoint (a proxy that counts connections, in
/// front of an address where nothing listens, so a call would also fail and degrade the answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_zero_by_default_never_calls_the_ranker() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = Addrs::new();
    let dead_ranker = DelayProxy::start(&format!("127.0.0.1:{}", free_port()), Duration::ZERO).await;
    let extra = Extra { log_level: Some("warn"), ..Default::default() };
    let config = setup::write_config(dir.path(), &addrs, &[&dead_ranker.addr], &Store::Embedded, &extra);
    assert!(!std::fs::read_to_string(&config).unwrap().contains("ranker_weight"), "the compiled-in default is under test");
    let _retriever = setup::start("retriever", &config);
    let _gateway = setup::start("gateway", &config);
    for addr in [&addrs.retriever, &addrs.gateway] {
        wait_serving(addr, Duration::from_secs(180)).await.unwrap();
    }
    let mut c = client(&addrs.gateway).await;
    for user in USERS {
        let r = c.recommend(recommend(user, 10, false, None)).await.unwrap().into_inner();
        assert_retriever_only(&r, 10);
        // The same answer as a request that asks to skip the ranker.
        let skipped = c.recommend(recommend(user, 10, true, None)).await.unwrap().into_inner();
        assert_retriever_only(&skipped, 10);
        assert_eq!(order(&r), order(&skipped), "user {user}");
    }
    // All N candidates too (k = N = 20).
    assert_retriever_only(&c.recommend(recommend("42", 20, false, None)).await.unwrap().into_inner(), 20);

    assert_eq!(dead_ranker.connections(), 0, "no Rank call (not even a connection) at weight 0");
    let page = setup::scrape(addrs.gateway_metrics);
    let count = |stage: &str| setup::metric(&page, &format!("llamarec_gateway_stage_duration_seconds_count{{stage=\"{stage}\"}}")).unwrap_or(0.0);
    assert_eq!(count("total"), 9.0, "{page}");
    assert_eq!(count("rank"), 0.0, "no Rank stage was timed: {page}");
    assert!(!page.contains("llamarec_gateway_degraded_total"), "nothing degraded: {page}");
    assert!(!page.contains("llamarec_gateway_shadow_rank_total"), "shadow ranking is off by default: {page}");
}

/// Weight 0 with every request shadowed (`fraction = 1.0`): the ranker scores each request's
/// candidates after the answer, recorded with the request id; the answer is the weight-0 answer
/// whatever the ranker does: slow (no added latency), or killed (not degraded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_ranking_scores_beside_an_unchanged_answer() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = Addrs::new();
    let proxy = DelayProxy::start(&addrs.ranker, Duration::ZERO).await;
    let shadow_path = dir.path().join("shadow/scores.jsonl");
    let shadow = format!("shadow_ranker = {{ fraction = 1.0, path = \"{}\", timeout_ms = 30000 }}", shadow_path.display());
    let extra = Extra { log_level: Some("warn"), gateway: &shadow, ranker_weight: Some(0.0), ..Default::default() };
    let config = setup::write_config(dir.path(), &addrs, &[&proxy.addr], &Store::Embedded, &extra);
    let _retriever = setup::start("retriever", &config);
    let mut ranker = setup::start("ranker", &config);
    let _gateway = setup::start("gateway", &config);
    for addr in [&addrs.retriever, &addrs.ranker, &addrs.gateway] {
        wait_serving(addr, Duration::from_secs(180)).await.unwrap();
    }
    let mut c = client(&addrs.gateway).await;
    // skip_ranker is never shadowed: the caller opted out of the LLM.
    let baseline = c.recommend(recommend("42", 10, true, Some("baseline"))).await.unwrap().into_inner();
    assert_retriever_only(&baseline, 10);

    // Shadowed: the answer is the weight-0 answer; the record holds the ranker's scores.
    let r = c.recommend(recommend("42", 10, false, Some("shadow-1"))).await.unwrap().into_inner();
    assert_retriever_only(&r, 10);
    assert_eq!(order(&r), order(&baseline));
    let record = shadow_record(&shadow_path, "shadow-1").await;
    assert_eq!(record.outcome, "ok", "{:?}", record.error);
    assert_eq!(record.user_id, "42");
    assert!(record.ranker_model.is_some());
    assert_eq!(record.candidates.len(), 20, "the N candidates the ranker would re-order");
    assert!(record.candidates.iter().all(|c| c.ranker_log_prob.is_some_and(|lp| lp <= 0.0) && c.ranker_logit.is_some()));
    let total: f32 = record.candidates.iter().map(|c| c.ranker_log_prob.unwrap().exp()).sum();
    assert!((total - 1.0).abs() < 1e-3, "log-probabilities over the candidates: {total}");
    let served: Vec<&str> = r.items.iter().map(|i| i.item_id.as_str()).collect();
    assert_eq!(record.candidates.iter().take(10).map(|c| c.item_id.as_str()).collect::<Vec<_>>(), served, "in served order");
    assert!(proxy.connections() >= 1);
    let ranker_ok = setup::metric(&setup::scrape(addrs.ranker_metrics), "llamarec_ranker_requests_total{status=\"Ok\"}");
    assert_eq!(ranker_ok, Some(1.0), "one Rank call: the shadow one, not the baseline's");

    // A slow ranker (1 s each way through the proxy) does not slow the answer: it is sent
    // before the shadow call ends.
    proxy.set_delay(Duration::from_secs(1));
    let t = Instant::now();
    let r = c.recommend(recommend("42", 10, false, Some("shadow-slow"))).await.unwrap().into_inner();
    let answered = t.elapsed();
    assert_retriever_only(&r, 10);
    assert_eq!(order(&r), order(&baseline));
    let record = shadow_record(&shadow_path, "shadow-slow").await;
    assert_eq!(record.outcome, "ok", "{:?}", record.error);
    assert!(record.latency_ms >= 2000.0, "the shadow call went through the delay: {} ms", record.latency_ms);
    assert!(answered.as_secs_f64() * 1e3 < record.latency_ms, "answered in {answered:?}, before the {} ms shadow call ended", record.latency_ms);
    proxy.set_delay(Duration::ZERO);

    // The ranker killed: same answer, not degraded; the shadow call's failure is recorded.
    ranker.kill();
    let r = c.recommend(recommend("42", 10, false, Some("shadow-dead"))).await.unwrap().into_inner();
    assert_retriever_only(&r, 10);
    assert_eq!(order(&r), order(&baseline));
    let record = shadow_record(&shadow_path, "shadow-dead").await;
    assert_ne!(record.outcome, "ok");
    assert!(record.error.is_some() && record.ranker_model.is_none());
    assert!(record.candidates.iter().all(|c| c.ranker_log_prob.is_none()));

    let page = setup::scrape(addrs.gateway_metrics);
    assert!(page.contains("llamarec_gateway_shadow_rank_total{outcome=\"ok\"} 2"), "{page}");
    let failed = page.lines().filter(|l| l.starts_with("llamarec_gateway_shadow_rank_total{") && !l.contains("\"ok\"")).collect::<Vec<_>>();
    assert_eq!(failed.len(), 1, "one failed shadow call: {failed:?}");
    assert!(failed[0].ends_with(" 1"), "{failed:?}");
    assert!(page.contains("llamarec_gateway_shadow_rank_duration_seconds_count 3"), "{page}");
    assert!(!page.contains("llamarec_gateway_degraded_total"), "a shadow failure degrades nothing: {page}");
}
