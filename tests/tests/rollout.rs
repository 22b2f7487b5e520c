//! A model rollout under traffic (issue 20), across real processes on loopback: `llamarec
//! replay` drives a gateway whose Recommends are ranked (weight 0.5) while `llamarec reload`
//! swaps the ranker's adapter and the retriever's checkpoint; the replay report shows no error,
//! and the answers' versions change from the old models to the new ones.

use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::{ModelVersion, RecommendRequest};
use llamarec_tests::setup::{self, Addrs, Extra, Store};
use llamarec_tests::{binary, map_f32_safetensors, repo_root, wait_serving};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const ADMIN_TOKEN: &str = "rollout-admin-token-for-tests";

/// `llamarec ARGS` with the admin token in the environment; panics with its output on failure.
fn llamarec(args: &[&str]) -> String {
    let out = std::process::Command::new(binary("llamarec")).args(args).env("LLAMAREC_ADMIN_TOKEN", ADMIN_TOKEN).current_dir(repo_root()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "llamarec {args:?} failed:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// A copy of the shipped adapter with half its `lora_alpha`: another version, other scores.
fn other_adapter(dir: &Path) -> String {
    let (shipped, out) = (repo_root().join("ranker-service/adapters/ml-100k"), dir.join("adapter-next"));
    std::fs::create_dir_all(&out).unwrap();
    let config = std::fs::read_to_string(shipped.join("adapter_config.json")).unwrap();
    std::fs::write(out.join("adapter_config.json"), config.replace("\"lora_alpha\": 32.0", "\"lora_alpha\": 16.0")).unwrap();
    std::fs::copy(shipped.join("adapter_model.safetensors"), out.join("adapter_model.safetensors")).unwrap();
    out.display().to_string()
}

/// A copy of the shipped retriever checkpoint with every weight nudged: another version.
fn other_checkpoint(dir: &Path) -> String {
    let (shipped, out) = (repo_root().join("retriever-service/checkpoints/ml-100k"), dir.join("checkpoint-next"));
    std::fs::create_dir_all(&out).unwrap();
    for file in ["config.json", "items.json", "report.json"] {
        std::fs::copy(shipped.join(file), out.join(file)).unwrap();
    }
    map_f32_safetensors(&shipped.join("model.safetensors"), &out.join("model.safetensors"), |i, w| w + 0.01 * (i as f32 * 0.37).sin());
    out.display().to_string()
}

/// The (retriever, ranker) versions of a ranked Recommend. On a busy machine a Rank may run
/// out of its deadline (the answer is then the retriever's order, degraded, with no ranker
/// version): ask again.
async fn versions(client: &mut GatewayClient<tonic::transport::Channel>) -> (ModelVersion, ModelVersion) {
    for _ in 0..20 {
        let answer = client.recommend(RecommendRequest { user_id: "7".into(), k: 5, ..Default::default() }).await.unwrap().into_inner();
        if !answer.degraded {
            return (answer.retriever_model.unwrap(), answer.ranker_model.expect("a ranked answer names its ranker"));
        }
    }
    panic!("no ranked answer in 20 tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_during_a_replay_fail_no_request_and_switch_the_answers_versions() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("admin-tokens");
    std::fs::write(&tokens, format!("{ADMIN_TOKEN}\n")).unwrap();
    let admin = format!("admin_tokens_file = \"{}\"", tokens.display());
    let ranker = format!("{admin}\nthreads = 2\nadapter = \"{}\"", repo_root().join("ranker-service/adapters/ml-100k").display());
    let assets = format!("\n[assets]\ndir = \"{}\"\n", repo_root().join("assets").display());
    let addrs = Addrs::new();
    let extra = Extra { log_level: Some("warn"), retriever: &admin, ranker: &ranker, ranker_weight: Some(0.5), ..Default::default() };
    let config = setup::write_config(dir.path(), &addrs, &[&addrs.ranker], &Store::Embedded, &extra);
    std::fs::write(&config, std::fs::read_to_string(&config).unwrap() + &assets).unwrap();
    let _processes = ["retriever", "ranker", "gateway"].map(|s| setup::start(s, &config));
    for addr in [&addrs.retriever, &addrs.ranker, &addrs.gateway] {
        wait_serving(addr, Duration::from_secs(180)).await.unwrap();
    }
    let mut client = GatewayClient::connect(format!("http://{}", addrs.gateway)).await.unwrap();
    let (old_retriever, old_ranker) = versions(&mut client).await;

    // Ranked traffic for ~8 s at ~1 Recommend per second (one 2-core ranker sustains ~1.5).
    let traffic = dir.path().join("traffic.jsonl").display().to_string();
    llamarec(&["--config", &config, "traffic", "synth", "--out", &traffic, "--rate", "1", "--duration", "8", "--skip-ranker-share", "0", "--seed", "11"]);
    let report = dir.path().join("report.json").display().to_string();
    let replay = {
        let (config, traffic, report, gateway) = (config.clone(), traffic.clone(), report.clone(), addrs.gateway.clone());
        std::thread::spawn(move || llamarec(&["--config", &config, "replay", "--traffic", &traffic, "--gateway", &gateway, "--json", &report]))
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = llamarec(&["reload", "ranker", "--addr", &addrs.ranker, "--adapter", &other_adapter(dir.path()), "--label", "next"]);
    assert!(out.contains("(next)"), "{out}");
    let out = llamarec(&["reload", "retriever", "--addr", &addrs.retriever, "--checkpoint", &other_checkpoint(dir.path()), "--label", "next"]);
    assert!(out.contains("(next)"), "{out}");
    replay.join().unwrap();
    let (new_retriever, new_ranker) = versions(&mut client).await;

    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(r["sent"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["errors"].as_u64(), Some(0), "no Recommend failed during the reloads: {}", r["errors_by_code"]);
    assert_eq!(r["completed"], r["sent"], "{r}");
    assert_ne!(new_ranker.version, old_ranker.version);
    assert_ne!(new_retriever.version, old_retriever.version);
    assert_eq!((new_ranker.label.as_str(), new_retriever.label.as_str()), ("next", "next"));
}
