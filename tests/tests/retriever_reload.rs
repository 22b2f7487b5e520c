//! Hot reload of the retriever checkpoint (issue 20), against the real `retriever-service`
//! binary over gRPC on loopback: a Reload under a stream of Retrieve calls fails none of them and
//! changes the version they report; broken checkpoints, another catalog and bad labels are
//! refused with the old model still serving; Reload needs an admin token; concurrent reloads run
//! one after the other; SIGHUP reloads the re-read configuration; `llamarec reload retriever`.
//!
//! The second and third checkpoints are copies of the shipped one with every weight perturbed
//! (another content hash, other scores, the same catalog).

use llamarec_proto::v1::retriever_client::RetrieverClient;
use llamarec_proto::v1::{InfoRequest, ModelVersion, ReloadRequest, ReloadResponse, RetrieveRequest};
use llamarec_tests::setup::series;
use llamarec_tests::{binary, free_port, map_f32_safetensors, repo_root, wait_serving, Process};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Status};

const SHIPPED: &str = "retriever-service/checkpoints/ml-100k";
const ADMIN_TOKEN: &str = "admin-token-for-tests";
const BACKEND_TOKEN: &str = "backend-token-for-tests";
/// Bounds a hang, never a measured duration.
const PATIENCE: Duration = Duration::from_secs(60);

/// A copy of the shipped checkpoint in `dir/name` with each f32 weight `w` changed by `f(i, w)`.
fn perturbed_copy(dir: &Path, name: &str, f: impl Fn(usize, f32) -> f32) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    for file in ["config.json", "items.json", "report.json"] {
        std::fs::copy(repo_root().join(SHIPPED).join(file), out.join(file)).unwrap();
    }
    map_f32_safetensors(&repo_root().join(SHIPPED).join("model.safetensors"), &out.join("model.safetensors"), f);
    out
}

/// Another trained-looking model: each weight moved by a few percent of noise.
fn other_model(dir: &Path, name: &str, seed: f32) -> PathBuf {
    perturbed_copy(dir, name, |i, w| w + 0.02 * ((i as f32) * seed).sin())
}

struct Retriever {
    process: Process,
    addr: String,
    metrics_port: u16,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

/// Writes the retriever's configuration: `checkpoint`, `label`, and extra `[retriever]` keys.
fn write_config(path: &Path, addr: &str, metrics_port: u16, checkpoint: &Path, label: Option<&str>, extra: &str) {
    let label = label.map(|l| format!("model_label = \"{l}\"\n")).unwrap_or_default();
    std::fs::write(
        path,
        format!(
            "[telemetry]\nlog_level = \"warn\"\n\n[retriever]\nlisten = \"{addr}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\ncheckpoint = \"{}\"\n{label}{extra}\n",
            checkpoint.display()
        ),
    )
    .unwrap();
}

/// Starts a retriever on the shipped checkpoint; `admin` writes an admin tokens file.
async fn start(admin: bool, extra: &str, label: Option<&str>) -> Retriever {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let metrics_port = free_port();
    let mut extra = extra.to_string();
    if admin {
        let tokens = dir.path().join("admin-tokens");
        std::fs::write(&tokens, format!("# operators\n{ADMIN_TOKEN}\n")).unwrap();
        extra.push_str(&format!("admin_tokens_file = \"{}\"\n", tokens.display()));
    }
    let config = dir.path().join("retriever.toml");
    write_config(&config, &addr, metrics_port, &repo_root().join(SHIPPED), label, &extra);
    let process = Process::start("retriever-service", &binary("retriever-service"), &["--config", config.to_str().unwrap()], &[]);
    wait_serving(&addr, PATIENCE).await.unwrap();
    Retriever { process, addr, metrics_port, config, _dir: dir }
}

impl Retriever {
    async fn client(&self) -> RetrieverClient<Channel> {
        RetrieverClient::connect(format!("http://{}", self.addr)).await.unwrap()
    }

    async fn version(&self) -> ModelVersion {
        self.client().await.info(InfoRequest {}).await.unwrap().into_inner().model.unwrap()
    }

    async fn reload(&self, checkpoint: &Path, label: &str, token: Option<&str>) -> Result<ReloadResponse, Status> {
        let mut request = tonic::Request::new(ReloadRequest { checkpoint: checkpoint.display().to_string(), label: label.into() });
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        self.client().await.reload(request).await.map(tonic::Response::into_inner)
    }

    /// `llamarec_retriever_model_info{version,label}` values.
    fn model_info(&self) -> Vec<(String, f64)> {
        series(self.metrics_port, "llamarec_retriever_model_info")
    }
}

/// Histories of MovieLens-100K item ids; `n` picks one of many, so that most requests miss the
/// state cache and run the recurrence on the blocking pool (the path a swap could break).
fn history(n: usize) -> Vec<String> {
    const ITEMS: [&str; 20] = ["1", "50", "181", "258", "100", "127", "174", "7", "98", "56", "172", "121", "117", "222", "234", "25", "268", "237", "204", "69"];
    (0..3 + n % 15).map(|i| ITEMS[(n * 7 + i * 3) % ITEMS.len()].to_string()).collect()
}

fn retrieve(history: Vec<String>) -> RetrieveRequest {
    RetrieveRequest { history, k: 20, exclude_history: true, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_a_stream_of_retrieves_fails_none_and_switches_the_version() {
    let retriever = start(true, "", Some("shipped")).await;
    let dir = tempfile::tempdir().unwrap();
    let next = other_model(dir.path(), "next", 0.37);
    let old = retriever.version().await;
    assert_eq!(old.label, "shipped", "model_label is reported");
    let fingerprint = retriever.client().await.info(InfoRequest {}).await.unwrap().into_inner().catalog_fingerprint;

    // The answer for one history before the reload: its state is now in the old model's cache.
    let probe = history(1);
    let mut client = retriever.client().await;
    let before = client.retrieve(retrieve(probe.clone())).await.unwrap().into_inner();

    // Four callers retrieve in a loop (ids and dense indices, mostly uncached histories), each
    // noting whether a request was sent after the Reload answered and the version it got.
    let stop = Arc::new(AtomicBool::new(false));
    let reloaded = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for caller in 0..4usize {
        let (stop, reloaded, mut client) = (stop.clone(), reloaded.clone(), retriever.client().await);
        callers.push(tokio::spawn(async move {
            let mut seen: Vec<(bool, String)> = Vec::new();
            let mut failures: Vec<Status> = Vec::new();
            let mut n = caller * 1000;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let after = reloaded.load(Ordering::SeqCst);
                let request = if n % 2 == 0 {
                    retrieve(history(n))
                } else {
                    RetrieveRequest { history_indices: vec![1 + (n % 1000) as u32, 2, 3], catalog_fingerprint: fingerprint, indices_only: true, ..retrieve(Vec::new()) }
                };
                match client.retrieve(request).await {
                    Ok(r) => seen.push((after, r.into_inner().model.unwrap().version)),
                    Err(status) => failures.push(status),
                }
            }
            (seen, failures)
        }));
    }
    // Let the stream run, then reload in the middle of it.
    let start = Instant::now();
    while retriever.model_info().is_empty() || start.elapsed() < Duration::from_millis(300) {
        assert!(start.elapsed() < PATIENCE, "metrics never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let response = retriever.reload(&next, "perturbed", Some(ADMIN_TOKEN)).await.unwrap();
    reloaded.store(true, Ordering::SeqCst);
    let new = response.current.clone().unwrap();
    assert_eq!(response.previous, Some(old.clone()));
    assert_ne!(new.version, old.version, "another checkpoint, another content hash");
    assert_eq!((new.name.as_str(), new.label.as_str()), ("lrurec", "perturbed"));
    assert_eq!(response.checkpoint, next.display().to_string());
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);

    let (mut on_old, mut on_new) = (0, 0);
    for caller in callers {
        let (seen, failures) = tokio::time::timeout(PATIENCE, caller).await.unwrap().unwrap();
        assert!(failures.is_empty(), "requests failed during the reload: {failures:?}");
        for (after, version) in seen {
            if version == old.version {
                assert!(!after, "a request sent after the Reload answered was served by the old model");
                on_old += 1;
            } else {
                assert_eq!(version, new.version);
                on_new += 1;
            }
        }
    }
    assert!(on_old > 0 && on_new > 0, "the stream ran across the swap ({on_old} old, {on_new} new)");
    assert_eq!(retriever.version().await, new, "Info reports the new model");

    // The new model answers from its own states: the history cached under the old model gets the
    // new model's answer, the same as a retriever started on the new checkpoint gives.
    let after = client.retrieve(retrieve(probe.clone())).await.unwrap().into_inner();
    let fresh = start_on(&next).await;
    let reference = fresh.client().await.retrieve(retrieve(probe)).await.unwrap().into_inner();
    let scores = |r: &llamarec_proto::v1::RetrieveResponse| r.items.iter().map(|i| (i.item_id.clone(), i.score)).collect::<Vec<_>>();
    assert_ne!(scores(&after), scores(&before), "the perturbation changes the answer");
    assert_eq!(scores(&after), scores(&reference), "the reloaded model answers as a fresh start on it would");

    let info = retriever.model_info();
    let gauge = |version: &str, label: &str| {
        info.iter().find(|(l, _)| l.contains(&format!("version=\"{version}\"")) && l.contains(&format!("label=\"{label}\""))).map(|(_, v)| *v)
    };
    assert_eq!(gauge(&new.version, "perturbed"), Some(1.0), "{info:?}");
    assert_eq!(gauge(&old.version, "shipped"), Some(0.0), "{info:?}");
}

/// A retriever on `checkpoint`, without reload.
async fn start_on(checkpoint: &Path) -> Retriever {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let metrics_port = free_port();
    let config = dir.path().join("retriever.toml");
    write_config(&config, &addr, metrics_port, checkpoint, None, "");
    let process = Process::start("retriever-service", &binary("retriever-service"), &["--config", config.to_str().unwrap()], &[]);
    wait_serving(&addr, PATIENCE).await.unwrap();
    Retriever { process, addr, metrics_port, config, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_checkpoints_are_refused_and_the_old_model_keeps_serving() {
    let retriever = start(true, "", None).await;
    let old = retriever.version().await;
    assert_eq!(old.label, "ml-100k", "the default label is the checkpoint directory's name");
    let dir = tempfile::tempdir().unwrap();

    let truncated = other_model(dir.path(), "truncated", 0.5);
    let weights = truncated.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&weights).unwrap().set_len(len / 2).unwrap();

    let damaged = perturbed_copy(dir.path(), "damaged", |_, _| f32::NAN);

    let other_catalog = other_model(dir.path(), "other-catalog", 0.9);
    let items = std::fs::read_to_string(other_catalog.join("items.json")).unwrap();
    let mut items: serde_json::Value = serde_json::from_str(&items).unwrap();
    items[1]["id"] = serde_json::Value::String("renamed-item".into());
    std::fs::write(other_catalog.join("items.json"), items.to_string()).unwrap();

    let cases: [(&Path, &str, Code, &[&str]); 5] = [
        (&truncated, "", Code::FailedPrecondition, &["truncated", "model.safetensors", "the previous model keeps serving"]),
        (&dir.path().join("missing"), "", Code::FailedPrecondition, &["missing", "the previous model keeps serving"]),
        (&damaged, "", Code::FailedPrecondition, &["damaged", "warm-up"]),
        (&other_catalog, "", Code::FailedPrecondition, &["another catalog", "catalog_fingerprint"]),
        (&repo_root().join(SHIPPED), "bad\nlabel", Code::InvalidArgument, &["label"]),
    ];
    for (checkpoint, label, code, words) in cases {
        let status = retriever.reload(checkpoint, label, Some(ADMIN_TOKEN)).await.unwrap_err();
        assert_eq!(status.code(), code, "{}: {}", checkpoint.display(), status.message());
        for word in words {
            assert!(status.message().contains(word), "{:?} should name {word:?}", status.message());
        }
        assert_eq!(retriever.version().await, old, "the old model still serves after {}", checkpoint.display());
        let answer = retriever.client().await.retrieve(retrieve(history(3))).await.unwrap().into_inner();
        assert_eq!((answer.items.len(), answer.model), (20, Some(old.clone())));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_needs_an_admin_token_and_is_off_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let next = other_model(dir.path(), "next", 0.61);

    // Secure default: no admin tokens configured, no reload, whatever the caller sends.
    let closed = start(false, "", None).await;
    let status = closed.reload(&next, "", Some(ADMIN_TOKEN)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{}", status.message());
    assert!(status.message().contains("admin_tokens_file"), "{}", status.message());

    // With a backend token and admin tokens: the backend token serves Retrieve but not Reload;
    // an admin token passes both checks.
    let retriever = start(true, &format!("auth_token = \"{BACKEND_TOKEN}\"\n"), None).await;
    let old = {
        let mut request = tonic::Request::new(InfoRequest {});
        request.metadata_mut().insert("authorization", format!("Bearer {BACKEND_TOKEN}").parse().unwrap());
        retriever.client().await.info(request).await.unwrap().into_inner().model.unwrap()
    };
    for token in [None, Some(BACKEND_TOKEN), Some("wrong-token")] {
        let status = retriever.reload(&next, "", token).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}: {}", status.message());
    }
    let response = retriever.reload(&next, "", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(response.previous, Some(old.clone()));
    assert_eq!(response.current.as_ref().unwrap().label, "next", "the label defaults to the directory's name");

    // `llamarec reload retriever` prints previous -> current.
    let third = other_model(dir.path(), "third", 1.3);
    let output = std::process::Command::new(binary("llamarec"))
        .args(["reload", "retriever", "--addr", &retriever.addr, "--checkpoint", third.to_str().unwrap(), "--label", "cli"])
        .env("LLAMAREC_ADMIN_TOKEN", ADMIN_TOKEN)
        .current_dir(repo_root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    let now = {
        let mut request = tonic::Request::new(InfoRequest {});
        request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
        retriever.client().await.info(request).await.unwrap().into_inner().model.unwrap()
    };
    let current = response.current.unwrap();
    assert_eq!(now.label, "cli");
    assert!(stdout.contains(&format!("lrurec {} (next) -> lrurec {} (cli)", current.version, now.version)), "{stdout}");

    let output = std::process::Command::new(binary("llamarec"))
        .args(["reload", "retriever", "--addr", &retriever.addr, "--admin-token", "wrong-token"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("Unauthenticated"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reloads_run_one_after_the_other() {
    let retriever = start(true, "", None).await;
    let dir = tempfile::tempdir().unwrap();
    let (b, c) = (other_model(dir.path(), "b", 0.21), other_model(dir.path(), "c", 0.83));
    let old = retriever.version().await;
    let (rb, rc) = tokio::join!(retriever.reload(&b, "", Some(ADMIN_TOKEN)), retriever.reload(&c, "", Some(ADMIN_TOKEN)));
    let (rb, rc) = (rb.unwrap(), rc.unwrap());
    // Serialized: one replaced the old model, the other replaced that one. Interleaved, both
    // would report the old model as previous.
    let chained = (rb.previous.as_ref() == Some(&old) && rc.previous == rb.current) || (rc.previous.as_ref() == Some(&old) && rb.previous == rc.current);
    assert!(chained, "b: {rb:?}\nc: {rc:?}");
    let last = if rc.previous == rb.current { rc.current } else { rb.current };
    assert_eq!(Some(retriever.version().await), last, "Info reports the reload that ran last");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_configured_checkpoint_and_label() {
    let retriever = start(true, "", Some("first")).await;
    let old = retriever.version().await;
    let dir = tempfile::tempdir().unwrap();
    let next = other_model(dir.path(), "next", 0.44);
    let text = std::fs::read_to_string(&retriever.config).unwrap();
    let text = text.replace(&repo_root().join(SHIPPED).display().to_string(), &next.display().to_string()).replace("\"first\"", "\"second\"");
    std::fs::write(&retriever.config, text).unwrap();
    let status = std::process::Command::new("kill").args(["-HUP", &retriever.process.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let start = Instant::now();
    let new = loop {
        let version = retriever.version().await;
        if version != old {
            break version;
        }
        assert!(start.elapsed() < PATIENCE, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(new.label, "second");
    assert_ne!(new.version, old.version);
    // The re-read configuration is now the configured one: a Reload without a path loads it.
    let response = retriever.reload(Path::new(""), "", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!((response.current, response.checkpoint), (Some(new), next.display().to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_in_an_ensemble_refuses_a_broken_one_and_swaps_back() {
    let retriever = start(true, "", None).await;
    let shipped = retriever.version().await;
    let dir = tempfile::tempdir().unwrap();
    let ensemble = dir.path().join("ensemble");
    other_model(&ensemble, "a", 0.37);
    other_model(&ensemble, "b", 0.61);
    std::fs::write(ensemble.join("ensemble.json"), r#"{"members": ["a", "b"]}"#).unwrap();

    let swapped = retriever.reload(&ensemble, "two-seeds", Some(ADMIN_TOKEN)).await.unwrap();
    let current = swapped.current.unwrap();
    assert_eq!((current.name.as_str(), current.label.as_str()), ("ensemble", "two-seeds"));
    let info = retriever.client().await.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.model, info.embedding_dim, info.num_items), (Some(current.clone()), 128, 1349));
    let answer = retriever.client().await.retrieve(retrieve(history(5))).await.unwrap().into_inner();
    assert_eq!((answer.items.len(), answer.model), (20, Some(current.clone())));

    // A manifest naming a member that is not there: refused, the ensemble keeps serving.
    let broken = dir.path().join("broken");
    other_model(&broken, "a", 0.37);
    std::fs::write(broken.join("ensemble.json"), r#"{"members": ["a", "gone"]}"#).unwrap();
    let status = retriever.reload(&broken, "", Some(ADMIN_TOKEN)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{}", status.message());
    assert!(status.message().contains("gone") && status.message().contains("the previous model keeps serving"), "{}", status.message());
    assert_eq!(retriever.version().await, current);

    // Back to the single model: the version it started with.
    let back = retriever.reload(&repo_root().join(SHIPPED), "", Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(back.current.unwrap(), shipped);
}
