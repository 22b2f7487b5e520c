//! A retriever ensemble end to end on the real ML-100K data: `llamarec train retriever --seeds 1
//! --recipe-seeds lrurec.toml=1` trains a SASRec and an LRURec member side by side (child
//! processes, two epochs each to stay quick), writes the manifest and the ensemble's report; the
//! real `retriever-service` binary serves the directory over gRPC, and each item's score is the
//! mean of what the members, served on their own, score it.

use llamarec_proto::v1::retriever_client::RetrieverClient;
use llamarec_proto::v1::{InfoRequest, RetrieveRequest};
use llamarec_tests::{binary, free_port, repo_root, wait_serving, Process};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A two-epoch SASRec recipe (the overrides of retriever-service/training/sasrec-d03-h2).
const RECIPE: [(&str, &str); 6] = [
    ("LLAMAREC_RETRIEVER__TRAIN__MODEL__KIND", "sasrec"),
    ("LLAMAREC_RETRIEVER__TRAIN__MODEL__MAX_LEN", "50"),
    ("LLAMAREC_RETRIEVER__TRAIN__MODEL__NUM_HEADS", "2"),
    ("LLAMAREC_RETRIEVER__TRAIN__FIRST_ITEM_TARGET", "false"),
    ("LLAMAREC_RETRIEVER__TRAIN__GROUP_BY_LENGTH", "true"),
    ("LLAMAREC_RETRIEVER__TRAIN__MAX_EPOCHS", "2"),
];

async fn serve(checkpoint: &Path, dir: &Path, name: &str) -> (Process, RetrieverClient<tonic::transport::Channel>) {
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!("[telemetry]\nlog_level = \"warn\"\n\n[retriever]\nlisten = \"{addr}\"\ncheckpoint = \"{}\"\nmax_k = 100\n", checkpoint.display()),
    )
    .unwrap();
    let process = Process::start(name, &binary("retriever-service"), &["--config", config.to_str().unwrap()], &[]);
    wait_serving(&addr, Duration::from_secs(60)).await.unwrap();
    (process, RetrieverClient::connect(format!("http://{addr}")).await.unwrap())
}

async fn scores(client: &mut RetrieverClient<tonic::transport::Channel>, history: &[&str]) -> HashMap<String, f32> {
    let request = RetrieveRequest { history: history.iter().map(|s| s.to_string()).collect(), k: 100, exclude_history: true, ..Default::default() };
    let response = client.retrieve(request).await.unwrap().into_inner();
    assert_eq!(response.items.len(), 100);
    response.items.into_iter().map(|i| (i.item_id, i.score)).collect()
}

#[tokio::test]
async fn members_of_two_recipes_train_side_by_side_and_the_ensemble_serves_their_mean_score() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ensemble");
    // The configured recipe (RECIPE: SASRec) with one key changed: the second member is LRURec.
    let lrurec = dir.path().join("lrurec.toml");
    std::fs::write(&lrurec, "[retriever.train.model]\nkind = \"lrurec\"\n").unwrap();
    let run = Command::new(binary("llamarec"))
        .current_dir(repo_root())
        .args(["train", "retriever", "--seeds", "1", "--recipe-seeds"])
        .arg(format!("{}=1", lrurec.display()))
        .arg("--out")
        .arg(&out)
        .envs(RECIPE)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    // Progress from both members while they ran, then the ensemble's validation table.
    for (label, member) in [("  seed 1", "seed-1"), ("  lrurec seed 1", "lrurec-seed-1")] {
        assert!(stderr.contains(&format!("{label}: epoch   2")), "no progress line for {label}: {stderr}");
        assert!(out.join(format!("{member}/train.log")).is_file());
    }
    assert!(String::from_utf8_lossy(&run.stdout).contains("ensemble of 2"));
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("ensemble.json")).unwrap()).unwrap();
    assert_eq!(manifest["members"], serde_json::json!(["seed-1", "lrurec-seed-1"]));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["members"].as_array().unwrap().len(), 2);
    assert!(report["members"][1]["recipe"].as_str().unwrap().ends_with("lrurec.toml"), "{}", report["members"]);
    assert!(report["members"][0].get("recipe").is_none());
    assert_eq!(report["data"]["users"], 943);
    let (val, test) = (report["validation"]["users"].as_u64(), report["test"]["users"].as_u64());
    assert_eq!((val, test), (Some(943), Some(943)), "the ensemble is evaluated on every user");

    let (_e, mut ensemble) = serve(&out, dir.path(), "ensemble").await;
    let (_a, mut first) = serve(&out.join("seed-1"), dir.path(), "seed-1").await;
    let (_b, mut second) = serve(&out.join("lrurec-seed-1"), dir.path(), "lrurec-seed-1").await;
    let info = ensemble.info(InfoRequest {}).await.unwrap().into_inner();
    let model = info.model.unwrap();
    assert_eq!((model.name.as_str(), info.embedding_dim), ("ensemble", 128), "two 64-wide members side by side");
    let member = first.info(InfoRequest {}).await.unwrap().into_inner().model.unwrap();
    assert_eq!(member.name, "sasrec");
    assert_ne!(member.version, model.version);
    assert_eq!(second.info(InfoRequest {}).await.unwrap().into_inner().model.unwrap().name, "lrurec", "the recipe file's kind");

    // User 1's first ratings (external ids).
    let history = ["1", "50", "181", "258", "100", "127", "174", "7", "98", "56", "172", "121"];
    let (mean, a, b) = (scores(&mut ensemble, &history).await, scores(&mut first, &history).await, scores(&mut second, &history).await);
    let mut compared = 0;
    for (item, score) in &mean {
        if let (Some(x), Some(y)) = (a.get(item), b.get(item)) {
            assert!((score - (x + y) / 2.0).abs() < 1e-3, "item {item}: ensemble {score}, members {x} and {y}");
            compared += 1;
        }
    }
    assert!(compared >= 20, "the members' top 100 share only {compared} items with the ensemble's");
    assert!(mean.keys().all(|item| !history.contains(&item.as_str())));

    // A manifest that points outside its directory is refused at start, by name.
    std::fs::write(out.join("ensemble.json"), r#"{"members": ["seed-1", "../elsewhere"]}"#).unwrap();
    let refused = Command::new(binary("llamarec"))
        .current_dir(repo_root())
        .args(["eval", "--stage", "retriever", "--split", "validation"])
        .env("LLAMAREC_RETRIEVER__CHECKPOINT", &out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && text.contains("../elsewhere") && text.contains("relative path inside"), "{text}");
}

#[test]
fn a_failing_member_fails_the_run_by_name_and_stops_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ensemble");
    // Seed 2 would resume from a damaged trainer state; seed 1 trains normally until stopped.
    std::fs::create_dir_all(out.join("seed-2")).unwrap();
    std::fs::write(out.join("seed-2/trainer_state.json"), "garbage").unwrap();
    std::fs::write(out.join("seed-2/last.safetensors"), "garbage").unwrap();
    let run = Command::new(binary("llamarec"))
        .current_dir(repo_root())
        .args(["train", "retriever", "--seeds", "1,2", "--out"])
        .arg(&out)
        .envs(RECIPE)
        .env("LLAMAREC_RETRIEVER__TRAIN__MAX_EPOCHS", "20")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("member seed 2 failed") && stderr.contains("trainer_state.json"), "{stderr}");
    assert!(!out.join("ensemble.json").exists(), "no manifest for a failed ensemble");
    // Seed 1 was stopped at once: a member left running would write its first epoch's state
    // within seconds (an epoch of this recipe takes ~5 s on one core).
    std::thread::sleep(Duration::from_secs(15));
    assert!(!out.join("seed-1/trainer_state.json").exists(), "seed 1 kept training after the run failed");
}

/// A recipe file with a misspelt key, one that sets more than `[retriever.train]`, a member
/// listed twice and two recipe files with one stem are refused by name before any member
/// starts (nothing is written).
#[test]
fn bad_members_are_refused_before_any_starts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ensemble");
    let misspelt = dir.path().join("misspelt.toml");
    std::fs::write(&misspelt, "[retriever.train.model]\ndropuot = 0.3\n").unwrap();
    let serving = dir.path().join("serving.toml");
    std::fs::write(&serving, "[retriever.train]\nseed = 3\n\n[retriever]\nmax_k = 5\n").unwrap();
    // Two valid recipe files with one stem: different models, one directory.
    let (first, second) = (dir.path().join("a/sasrec.toml"), dir.path().join("b/sasrec.toml"));
    for file in [&first, &second] {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, "[retriever.train]\nmax_epochs = 1\n").unwrap();
    }
    let cases: [(Vec<String>, &[&str]); 4] = [
        (vec!["--recipe-seeds".into(), format!("{}=1", misspelt.display())], &["misspelt.toml", "dropuot"]),
        (vec!["--recipe-seeds".into(), format!("{}=1", serving.display())], &["serving.toml", "only [retriever.train]", "retriever.max_k"]),
        (vec!["--seeds".into(), "2,2".into()], &["seed-2 is listed twice"]),
        (
            vec!["--recipe-seeds".into(), format!("{}=1", first.display()), "--recipe-seeds".into(), format!("{}=1", second.display())],
            &["a/sasrec.toml", "b/sasrec.toml", "sasrec-seed-1", "rename one"],
        ),
    ];
    for (args, expected) in cases {
        let run = Command::new(binary("llamarec"))
            .current_dir(repo_root())
            .args(["train", "retriever", "--out"])
            .arg(&out)
            .args(&args)
            .envs(RECIPE)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{args:?} was accepted");
        for text in expected {
            assert!(stderr.contains(text), "{args:?}: no {text:?} in {stderr}");
        }
        assert!(!out.exists(), "{args:?}: something was written before the refusal");
    }
}
