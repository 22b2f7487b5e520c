//! The gateway sends histories to the retriever as dense catalog indices. With real processes on
//! loopback: the answers equal those of the external-id path, and a retriever serving another
//! catalog gets ids instead, with no request failing.

use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::{RecommendOptions, RecommendRequest};
use llamarec_tests::setup::{self, Addrs, Extra, Store};
use llamarec_tests::{repo_root, wait_serving, Process};
use std::path::Path;
use std::time::Duration;

const USERS: [&str; 12] = ["1", "2", "3", "7", "42", "100", "250", "301", "500", "700", "900", "943"];
const REFUSED: &str = "llamarec_gateway_dense_indices_refused_total";

/// (item id, title, retriever score) of each user's retriever-only answer.
async fn answers(gateway: &str) -> Vec<Vec<(String, String, f32)>> {
    let mut client = GatewayClient::connect(format!("http://{gateway}")).await.unwrap();
    let mut all = Vec::new();
    for user in USERS {
        let options = Some(RecommendOptions { num_candidates: 0, skip_ranker: true });
        let request = RecommendRequest { user_id: user.into(), k: 20, options, ..Default::default() };
        let response = client.recommend(request).await.unwrap_or_else(|s| panic!("user {user}: {s:?}")).into_inner();
        assert_eq!(response.items.len(), 20, "user {user}");
        assert!(response.items.iter().all(|i| !i.item_id.is_empty() && !i.title.is_empty()), "user {user}: ids and titles filled in");
        all.push(response.items.into_iter().map(|i| (i.item_id, i.title, i.retriever_score)).collect());
    }
    all
}

/// A gateway in its own directory (its own history store), calling `retriever`, no ranker.
async fn gateway(dir: &Path, retriever: &str, extra: &str) -> (Process, Addrs) {
    let mut addrs = Addrs::new();
    addrs.retriever = retriever.to_string();
    let config = setup::write_config(dir, &addrs, &[], &Store::Embedded, &Extra { gateway: extra, ..Default::default() });
    let process = setup::start("gateway", &config);
    wait_serving(&addrs.gateway, Duration::from_secs(120)).await.unwrap();
    (process, addrs)
}

async fn retriever(dir: &Path, extra: &str) -> (Process, String) {
    let addrs = Addrs::new();
    let config = setup::write_config(dir, &addrs, &[], &Store::Embedded, &Extra { retriever: extra, ..Default::default() });
    let process = setup::start("retriever", &config);
    wait_serving(&addrs.retriever, Duration::from_secs(60)).await.unwrap();
    (process, addrs.retriever)
}

fn refused(addrs: &Addrs) -> f64 {
    setup::metric(&setup::scrape(addrs.gateway_metrics), REFUSED).unwrap_or(0.0)
}

#[tokio::test]
async fn indices_give_the_same_answers_as_ids_and_another_catalog_gets_ids() {
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let (_shipped, shipped_addr) = retriever(dirs[0].path(), "").await;
    let (_dense, dense) = gateway(dirs[1].path(), &shipped_addr, "").await;
    let (_ids, ids) = gateway(dirs[2].path(), &shipped_addr, "retrieve_dense_indices = false").await;
    assert_eq!(answers(&dense.gateway).await, answers(&ids.gateway).await, "both paths give the same candidates and scores");
    assert_eq!(refused(&dense), 0.0, "the shipped retriever shares the gateway's catalog: {REFUSED}");
    // Stage histograms are registered once at start; they must still reach the exporter.
    let page = setup::scrape(dense.gateway_metrics);
    let total = format!("llamarec_gateway_stage_duration_seconds_count{{stage=\"total\"}} {}", USERS.len());
    assert!(page.contains(&total), "{total} missing from the gateway's metrics");

    // The shipped checkpoint with two items' ids swapped: another catalog (fingerprint) for the
    // same weights. The gateway's indices are refused once; it sends ids from then on.
    let checkpoint = dirs[3].path().join("checkpoint");
    std::fs::create_dir(&checkpoint).unwrap();
    for entry in std::fs::read_dir(repo_root().join("retriever-service/checkpoints/ml-100k")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), checkpoint.join(entry.file_name())).unwrap();
    }
    let items_path = checkpoint.join("items.json");
    let mut items: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&items_path).unwrap()).unwrap();
    let (first, second) = (items[1]["id"].clone(), items[2]["id"].clone());
    items[1]["id"] = second;
    items[2]["id"] = first;
    std::fs::write(&items_path, serde_json::to_string(&items).unwrap()).unwrap();
    let (_other, other_addr) = retriever(dirs[3].path(), &format!("checkpoint = \"{}\"", checkpoint.display())).await;
    let (_fallback, fallback) = gateway(dirs[4].path(), &other_addr, "").await;
    answers(&fallback.gateway).await;
    assert_eq!(refused(&fallback), 1.0, "refused once, then ids for a while");
}
