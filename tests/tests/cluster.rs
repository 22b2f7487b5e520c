//! The whole cluster as separate processes on loopback, with the real models: Recommend end to
//! end at a fusion weight above 0 (the ranker is called and its scores fused), bad requests,
//! durability across a gateway crash, and the ranker killed and restarted. Weight 0 (the
//! default: no ranker call) and shadow ranking are in `ranker_weight.rs`.

use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::{AppendEventsRequest, DegradedReason, Event, GetHistoryRequest, RecommendOptions, RecommendRequest};
use llamarec_tests::setup::{self, Addrs, Extra, Store};
use llamarec_tests::{binary, wait_serving, Process};
use std::path::Path;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

struct Cluster {
    dir: tempfile::TempDir,
    addrs: Addrs,
    /// The cluster's TOML file.
    config: String,
    /// Held so the retriever lives as long as the cluster.
    _retriever: Process,
    ranker: Process,
    gateway: Process,
}

impl Cluster {
    async fn start(ranker_weight: f32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addrs = Addrs::new();
        let extra = Extra { log_level: Some("warn"), ranker_weight: Some(ranker_weight), ..Default::default() };
        let config = setup::write_config(dir.path(), &addrs, &[&addrs.ranker], &Store::Embedded, &extra);
        let retriever = setup::start("retriever", &config);
        let ranker = setup::start("ranker", &config);
        let gateway = setup::start("gateway", &config);
        for addr in [&addrs.retriever, &addrs.ranker, &addrs.gateway] {
            wait_serving(addr, Duration::from_secs(180)).await.unwrap();
        }
        Self { dir, addrs, config, _retriever: retriever, ranker, gateway }
    }

    async fn client(&self) -> GatewayClient<Channel> {
        GatewayClient::connect(format!("http://{}", self.addrs.gateway)).await.unwrap()
    }
}

fn recommend(user: &str, k: u32) -> tonic::Request<RecommendRequest> {
    let mut r = tonic::Request::new(RecommendRequest { user_id: user.into(), k, ..Default::default() });
    r.set_timeout(Duration::from_secs(60));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_end_to_end() {
    const WEIGHT: f32 = 0.5;
    let mut cluster = Cluster::start(WEIGHT).await;
    let mut client = cluster.client().await;

    // Recommend with the real models: k items, ranked, none from the user's history.
    let history: Vec<String> = client
        .get_history(GetHistoryRequest { user_id: "42".into(), limit: 0 })
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .map(|e| e.item_id)
        .collect();
    assert!(!history.is_empty(), "the store is seeded from the data set");
    let r = client.recommend(recommend("42", 10)).await.unwrap().into_inner();
    assert_eq!(r.items.len(), 10);
    assert!(!r.degraded, "{}", r.degraded_detail);
    assert!(r.ranker_model.is_some());
    // The retriever's label (by default its checkpoint directory's name) is carried through.
    let retriever_model = r.retriever_model.as_ref().map(|m| (m.name.as_str(), m.label.as_str()));
    assert_eq!(retriever_model, Some(("ensemble", "ml-100k-ensemble")), "the shipped retriever checkpoint");
    assert!(r.items.iter().all(|i| i.ranker_log_prob.is_some()), "k <= N: every item was ranked");
    assert!(r.items.iter().all(|i| !history.contains(&i.item_id)), "history items are never recommended");
    assert!(r.items.windows(2).all(|w| w[0].final_score >= w[1].final_score), "sorted by final score");
    assert_eq!(r.history_length as usize, history.len());
    assert!(r.timings.unwrap().rank_us > 0, "the Rank call was timed");

    // All N = 20 candidates: each final score is the fused one, (1 - w) * retriever log-softmax
    // over the candidates + w * the ranker's log-probability, and the order follows it.
    let r = client.recommend(recommend("42", 20)).await.unwrap().into_inner();
    assert!(!r.degraded, "{}", r.degraded_detail);
    assert_eq!(r.items.len(), 20);
    let max = r.items.iter().map(|i| i.retriever_score).fold(f32::NEG_INFINITY, f32::max);
    let log_sum = max + r.items.iter().map(|i| (i.retriever_score - max).exp()).sum::<f32>().ln();
    for item in &r.items {
        let fused = (1.0 - WEIGHT) * (item.retriever_score - log_sum) + WEIGHT * item.ranker_log_prob.unwrap();
        assert!((item.final_score - fused).abs() < 1e-4, "{}: final {} vs fused {fused}", item.item_id, item.final_score);
    }
    assert!(r.items.windows(2).all(|w| w[0].final_score >= w[1].final_score), "sorted by the fused score");
    let ranker_calls = setup::metric(&setup::scrape(cluster.addrs.ranker_metrics), "llamarec_ranker_requests_total{status=\"Ok\"}");
    assert!(ranker_calls >= Some(2.0), "the ranker answered both Recommends: {ranker_calls:?}");

    // Evaluation through the gateway equals the in-process evaluation on a sample of users.
    let via = cluster.dir.path().join("via.json");
    let local = cluster.dir.path().join("local.json");
    let config = cluster.config.clone();
    let gateway_addr = cluster.addrs.gateway.clone();
    for (out, extra) in [(&via, vec!["--via-gateway", gateway_addr.as_str()]), (&local, vec![])] {
        let out_s = out.display().to_string();
        let mut args = vec!["--config", config.as_str(), "eval", "--stage", "two-stage", "--split", "test", "--sample", "12", "--json", out_s.as_str()];
        args.extend(extra);
        let status = std::process::Command::new(binary("llamarec")).args(&args).current_dir(llamarec_tests::repo_root()).status().unwrap();
        assert!(status.success(), "llamarec eval {args:?} failed");
    }
    let read = |p: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let (via, local) = (read(&via), read(&local));
    assert_eq!(via["all_users"], local["all_users"], "via gateway {via} vs in-process {local}");
    assert_eq!(via["valid_subset"], local["valid_subset"]);
    assert_eq!(via["all_users"]["users"], 12);

    // Bad requests name the problem.
    for (req, needle) in [
        (RecommendRequest { user_id: "".into(), k: 10, ..Default::default() }, "user_id"),
        (RecommendRequest { user_id: "42".into(), k: 0, ..Default::default() }, "k"),
        (RecommendRequest { user_id: "42".into(), k: 100_000, ..Default::default() }, "k"),
        (
            RecommendRequest { user_id: "42".into(), k: 5, append_events: vec![Event { item_id: "no-such-item".into(), timestamp_ms: 0 }], ..Default::default() },
            "unknown item",
        ),
        (RecommendRequest { user_id: "42".into(), k: 5, options: Some(RecommendOptions { num_candidates: 50, skip_ranker: false }), ..Default::default() }, "num_candidates"),
    ] {
        let status = client.recommend(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(needle), "{needle}: {}", status.message());
    }

    // Appended history survives a gateway crash (kill -9) and restart.
    let appended = client
        .append_events(AppendEventsRequest { user_id: "new-user".into(), events: vec![Event { item_id: "50".into(), timestamp_ms: 1 }, Event { item_id: "181".into(), timestamp_ms: 2 }] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(appended.history_length, 2);
    cluster.gateway.kill();
    cluster.gateway = setup::start("gateway", &cluster.config);
    wait_serving(&cluster.addrs.gateway, Duration::from_secs(60)).await.unwrap();
    let mut client = cluster.client().await;
    let events = client.get_history(GetHistoryRequest { user_id: "new-user".into(), limit: 0 }).await.unwrap().into_inner().events;
    assert_eq!(events.iter().map(|e| e.item_id.as_str()).collect::<Vec<_>>(), ["50", "181"]);

    // Ranker killed: Recommend still answers, in retriever order, flagged as degraded.
    cluster.ranker.kill();
    let r = client.recommend(recommend("42", 10)).await.unwrap().into_inner();
    assert!(r.degraded);
    assert_eq!(r.degraded_reason(), DegradedReason::RankerFailed, "{}", r.degraded_detail);
    assert_eq!(r.items.len(), 10);
    assert_eq!(r.items.iter().map(|i| i.retriever_rank).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());

    // Ranker restarted: ranking resumes.
    cluster.ranker = setup::start("ranker", &cluster.config);
    wait_serving(&cluster.addrs.ranker, Duration::from_secs(180)).await.unwrap();
    let mut resumed = false;
    for _ in 0..20 {
        let r = client.recommend(recommend("42", 10)).await.unwrap().into_inner();
        if !r.degraded {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(resumed, "ranking did not resume after the ranker restarted");
}
