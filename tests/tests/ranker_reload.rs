//! Hot reload of the ranker's LoRA adapter (issue 20), against the real `ranker-service` binary
//! with the shipped SmolLM2 model over gRPC on loopback: a Reload under a stream of Rank calls
//! fails none of them and changes the version they report; the history states of the old
//! adapter are never reused; broken adapters and bad requests are refused with the old model
//! still serving; Reload needs an admin token; base-only and back; SIGHUP reloads the re-read
//! configuration; `llamarec reload ranker`.
//!
//! The second adapter is a copy of the shipped one (LoRA on q/v, r 8) with `lora_alpha` halved:
//! another content hash, other scores, the same shapes.

use llamarec_proto::v1::ranker_client::RankerClient;
use llamarec_proto::v1::{InfoRequest, ModelVersion, RankRequest, RankResponse, RankerInfo, RankerReloadRequest, RankerReloadResponse};
use llamarec_tests::setup::series;
use llamarec_tests::{binary, free_port, map_f32_safetensors, repo_root, wait_serving, Process};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Status};

const SHIPPED: &str = "ranker-service/adapters/ml-100k";
const ADMIN_TOKEN: &str = "ranker-admin-token-for-tests";
/// Bounds a hang, never a measured duration.
const PATIENCE: Duration = Duration::from_secs(120);

/// MovieLens-100K titles; the service's warm-up request uses others.
const TITLES: [&str; 24] = [
    "Star Wars (1977)", "Contact (1997)", "Fargo (1996)", "Return of the Jedi (1983)", "Liar Liar (1997)",
    "Scream (1996)", "Toy Story (1995)", "Air Force One (1997)", "Raiders of the Lost Ark (1981)", "Godfather, The (1972)",
    "Pulp Fiction (1994)", "Twelve Monkeys (1995)", "Jerry Maguire (1996)", "Chasing Amy (1997)", "Rock, The (1996)",
    "Back to the Future (1985)", "Titanic (1997)", "Fugitive, The (1993)", "Princess Bride, The (1987)", "Forrest Gump (1994)",
    "Men in Black (1997)", "Braveheart (1995)", "Alien (1979)", "Schindler's List (1993)",
];

/// A request with a history picked by `n` (5 titles) and 8 candidates.
fn request(n: usize) -> RankRequest {
    let history = (0..5).map(|i| TITLES[(n * 5 + i * 7) % TITLES.len()].to_string()).collect();
    let candidates = (0..8).map(|i| TITLES[(n + i * 3 + 1) % TITLES.len()].to_string()).collect();
    RankRequest { history_titles: history, candidate_titles: candidates }
}

/// A request whose history (6 titles) no `request(n)` has, so only the probe itself caches it.
fn probe() -> RankRequest {
    RankRequest { history_titles: TITLES[..6].iter().map(|t| t.to_string()).collect(), candidate_titles: TITLES[6..14].iter().map(|t| t.to_string()).collect() }
}

/// A copy of the shipped adapter in `dir/name`: `config` edits its adapter_config.json text,
/// `weight` maps each f32 weight (with its index).
fn adapter_copy(dir: &Path, name: &str, config: impl Fn(String) -> String, weight: impl Fn(usize, f32) -> f32) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let text = std::fs::read_to_string(repo_root().join(SHIPPED).join("adapter_config.json")).unwrap();
    std::fs::write(out.join("adapter_config.json"), config(text)).unwrap();
    map_f32_safetensors(&repo_root().join(SHIPPED).join("adapter_model.safetensors"), &out.join("adapter_model.safetensors"), weight);
    out
}

/// Another adapter of the same shape: half the shipped one's `lora_alpha`.
fn other_adapter(dir: &Path, name: &str) -> PathBuf {
    adapter_copy(dir, name, |c| c.replace("\"lora_alpha\": 32.0", "\"lora_alpha\": 16.0"), |_, w| w)
}

struct Ranker {
    process: Process,
    addr: String,
    metrics_port: u16,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

/// Writes the ranker's configuration with `[ranker]` keys `extra`.
fn write_config(path: &Path, addr: &str, metrics_port: u16, extra: &str) {
    let assets = repo_root().join("assets");
    std::fs::write(
        path,
        format!(
            "[telemetry]\nlog_level = \"warn\"\n\n[assets]\ndir = \"{}\"\n\n[ranker]\nlisten = \"{addr}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\nthreads = 2\n{extra}\n",
            assets.display()
        ),
    )
    .unwrap();
}

/// Starts a ranker on the shipped model with `extra` `[ranker]` keys; `admin` writes an admin
/// tokens file.
async fn start(admin: bool, extra: &str) -> Ranker {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let metrics_port = free_port();
    let mut extra = extra.to_string();
    if admin {
        let tokens = dir.path().join("admin-tokens");
        std::fs::write(&tokens, format!("# operators\n{ADMIN_TOKEN}\n")).unwrap();
        extra.push_str(&format!("admin_tokens_file = \"{}\"\n", tokens.display()));
    }
    let config = dir.path().join("ranker.toml");
    write_config(&config, &addr, metrics_port, &extra);
    let process = Process::start("ranker-service", &binary("ranker-service"), &["--config", config.to_str().unwrap()], &[]);
    wait_serving(&addr, PATIENCE).await.unwrap();
    Ranker { process, addr, metrics_port, config, _dir: dir }
}

fn shipped_adapter_keys(label: &str) -> String {
    format!("adapter = \"{}\"\nmodel_label = \"{label}\"\n", repo_root().join(SHIPPED).display())
}

impl Ranker {
    async fn client(&self) -> RankerClient<Channel> {
        RankerClient::connect(format!("http://{}", self.addr)).await.unwrap()
    }

    async fn info(&self) -> RankerInfo {
        self.client().await.info(InfoRequest {}).await.unwrap().into_inner()
    }

    async fn version(&self) -> ModelVersion {
        self.info().await.model.unwrap()
    }

    async fn rank(&self, request: RankRequest) -> RankResponse {
        self.client().await.rank(request).await.unwrap().into_inner()
    }

    async fn reload(&self, adapter: &str, label: &str, base_only: bool, token: Option<&str>) -> Result<RankerReloadResponse, Status> {
        let mut request = tonic::Request::new(RankerReloadRequest { adapter: adapter.into(), label: label.into(), base_only });
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        self.client().await.reload(request).await.map(tonic::Response::into_inner)
    }

    /// `llamarec_ranker_model_info{version,label}` lines and values.
    fn model_info(&self) -> Vec<(String, f64)> {
        series(self.metrics_port, "llamarec_ranker_model_info")
    }
}

fn max_abs_diff(a: &RankResponse, b: &RankResponse) -> f32 {
    a.scores.iter().zip(&b.scores).map(|(x, y)| (x.logit - y.logit).abs()).fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_a_stream_of_ranks_fails_none_and_never_reuses_the_old_adapters_history_states() {
    let ranker = start(true, &shipped_adapter_keys("shipped")).await;
    let dir = tempfile::tempdir().unwrap();
    let next = other_adapter(dir.path(), "next");
    let old = ranker.version().await;
    assert_eq!((old.name.as_str(), old.label.as_str()), ("SmolLM2-135M-Instruct.Q4_1+ml-100k", "shipped"));

    // The probe's history state is cached by the old adapter: its second call runs only the
    // candidates.
    let cold = ranker.rank(probe()).await;
    let warm = ranker.rank(probe()).await;
    assert!(warm.cached_tokens > cold.cached_tokens, "history cached: {} then {}", cold.cached_tokens, warm.cached_tokens);

    // Two callers rank in a loop (other histories), noting for each answer whether it was sent
    // after the Reload answered and which version it reports.
    let stop = Arc::new(AtomicBool::new(false));
    let reloaded = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for caller in 0..2usize {
        let (stop, reloaded, mut client) = (stop.clone(), reloaded.clone(), ranker.client().await);
        callers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut n = 1 + caller;
            while !stop.load(Ordering::SeqCst) {
                let after = reloaded.load(Ordering::SeqCst);
                let answer = client.rank(request(n)).await.map(|r| r.into_inner().model.unwrap().version);
                seen.push((after, answer));
                n += 2;
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let response = ranker.reload(next.to_str().unwrap(), "next", false, Some(ADMIN_TOKEN)).await.unwrap();
    reloaded.store(true, Ordering::SeqCst);
    assert_eq!(response.previous.as_ref(), Some(&old));
    let new = response.current.clone().unwrap();
    assert_eq!((new.name.as_str(), new.label.as_str()), ("SmolLM2-135M-Instruct.Q4_1+next", "next"));
    assert_ne!(new.version, old.version, "another adapter, another content hash");
    assert_eq!(response.adapter, next.display().to_string());
    // Let each caller finish at least two calls sent after the swap.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::SeqCst);
    let mut before_and_after = (0, 0);
    for caller in callers {
        for (after, answer) in caller.await.unwrap() {
            let version = answer.unwrap_or_else(|s| panic!("a Rank failed around the reload: {s:?}"));
            if after {
                assert_eq!(version, new.version, "a Rank sent after the reload answered is computed by the new adapter");
                before_and_after.1 += 1;
            } else {
                assert!(version == old.version || version == new.version, "{version}");
                before_and_after.0 += 1;
            }
        }
    }
    assert!(before_and_after.0 > 0 && before_and_after.1 > 0, "calls before and after the reload: {before_and_after:?}");

    // The probe again: the old adapter's history state is gone (only the instruction prefix is
    // cached), the scores are the new adapter's, and its own history state serves the repeat.
    let first = ranker.rank(probe()).await;
    assert_eq!(first.model.as_ref(), Some(&new));
    assert_eq!(first.cached_tokens, cold.cached_tokens, "the old adapter's history state was not reused");
    assert!(max_abs_diff(&first, &warm) > 1e-2, "the new adapter changes the scores");
    let repeat = ranker.rank(probe()).await;
    assert_eq!(repeat.cached_tokens, warm.cached_tokens, "the new adapter caches its own history states");
    assert!(max_abs_diff(&first, &repeat) < 1e-3, "a cached history state gives the scores of the full pass");

    let info = ranker.info().await;
    assert_eq!((info.model.as_ref(), info.adapter.as_str()), (Some(&new), next.to_str().unwrap()));
    let gauges = ranker.model_info();
    let value = |v: &ModelVersion| gauges.iter().find(|(l, _)| l.contains(&format!("version=\"{}\"", v.version))).map(|(_, x)| *x);
    assert_eq!((value(&old), value(&new)), (Some(0.0), Some(1.0)), "{gauges:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_adapters_and_bad_requests_are_refused_with_the_old_model_still_serving() {
    let ranker = start(true, &shipped_adapter_keys("shipped")).await;
    let old = ranker.version().await;
    let dir = tempfile::tempdir().unwrap();
    let before = ranker.rank(request(3)).await;

    let missing = dir.path().join("no-such-adapter");
    let nan = adapter_copy(dir.path(), "nan", |c| c, |i, w| if i == 17 { f32::NAN } else { w });
    let wide = adapter_copy(dir.path(), "wide", |c| c.replace("\"r\": 8", "\"r\": 16"), |_, w| w);
    let truncated = other_adapter(dir.path(), "truncated");
    let weights = truncated.join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    for (adapter, why) in [(&missing, "not found"), (&nan, "damaged"), (&wide, "says r = 16"), (&truncated, "adapter_model.safetensors")] {
        let status = ranker.reload(adapter.to_str().unwrap(), "", false, Some(ADMIN_TOKEN)).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{}: {}", adapter.display(), status.message());
        assert!(status.message().contains("previous model keeps serving"), "{}", status.message());
        assert!(status.message().contains(why), "{}: {}", adapter.display(), status.message());
    }
    let other = other_adapter(dir.path(), "other");
    let status = ranker.reload(other.to_str().unwrap(), "bad\nlabel", false, Some(ADMIN_TOKEN)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    let status = ranker.reload(other.to_str().unwrap(), "", true, Some(ADMIN_TOKEN)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(status.message().contains("base_only"), "{}", status.message());
    let status = ranker.reload(&"x".repeat(5000), "", false, Some(ADMIN_TOKEN)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert_eq!(ranker.reload(other.to_str().unwrap(), "", false, None).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(ranker.reload(other.to_str().unwrap(), "", false, Some("not-the-admin-token")).await.unwrap_err().code(), Code::Unauthenticated);

    // Nothing changed: same version, same scores.
    assert_eq!(ranker.version().await, old);
    let after = ranker.rank(request(3)).await;
    assert_eq!(after.model.as_ref(), Some(&old));
    assert!(max_abs_diff(&before, &after) < 1e-3);

    // Base only, then back to the configured adapter (re-read from disk: the same version).
    let base = ranker.reload("", "", true, Some(ADMIN_TOKEN)).await.unwrap().current.unwrap();
    assert_eq!((base.name.as_str(), base.label.as_str()), ("SmolLM2-135M-Instruct.Q4_1", "base"));
    assert_eq!(ranker.info().await.adapter, "");
    let back = ranker.reload("", "", false, Some(ADMIN_TOKEN)).await.unwrap().current.unwrap();
    assert_eq!(back, old, "the configured adapter and label again");

    // A ranker without admin tokens refuses Reload outright.
    let closed = start(false, "").await;
    let status = closed.reload(other.to_str().unwrap(), "", false, Some(ADMIN_TOKEN)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{}", status.message());
    assert!(status.message().contains("admin_tokens_file"), "{}", status.message());
    assert_eq!(closed.version().await.label, "base");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_reread_adapter_and_the_cli_reloads_too() {
    let ranker = start(true, "").await;
    let old = ranker.version().await;
    let dir = tempfile::tempdir().unwrap();
    let next = other_adapter(dir.path(), "next");
    let mut text = std::fs::read_to_string(&ranker.config).unwrap();
    text.push_str(&format!("adapter = \"{}\"\nmodel_label = \"from sighup\"\n", next.display()));
    std::fs::write(&ranker.config, text).unwrap();
    let status = std::process::Command::new("kill").args(["-HUP", &ranker.process.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let start = Instant::now();
    let new = loop {
        let version = ranker.version().await;
        if version != old {
            break version;
        }
        assert!(start.elapsed() < PATIENCE, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((new.name.as_str(), new.label.as_str()), ("SmolLM2-135M-Instruct.Q4_1+next", "from sighup"));

    let cli = |args: &[&str]| {
        std::process::Command::new(binary("llamarec"))
            .args(["reload", "ranker", "--addr", &ranker.addr])
            .args(args)
            .env("LLAMAREC_ADMIN_TOKEN", ADMIN_TOKEN)
            .current_dir(repo_root())
            .output()
            .unwrap()
    };
    let out = cli(&["--base-only", "--label", "rollback"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("reloaded the base model alone"), "{stdout}");
    assert!(stdout.contains(&format!("-> SmolLM2-135M-Instruct.Q4_1 {} (rollback)", old.version)), "{stdout}");
    // The re-read configuration is the configured one now: no --adapter loads it again.
    let out = cli(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("-> SmolLM2-135M-Instruct.Q4_1+next {} (from sighup)", new.version)), "{stdout}");
    let out = cli(&["--adapter", "x", "--base-only"]);
    assert!(!out.status.success(), "--adapter with --base-only is refused by the CLI");
}
