//! `llamarec up` as a supervisor: the real command on a generated configuration, its ranker
//! child and then its retriever child killed (SIGKILL, found among the children of the `up`
//! process in /proc) under a stream of Recommends. Every Recommend answers (degraded while a
//! stage is down), each killed service is started again by `up` and reports SERVING, ranked
//! answers resume, and SIGTERM still stops `up` and all its children. Assertions are on status
//! codes, flags and processes, never on times; time limits only bound a hang.

use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::{DegradedReason, RecommendOptions, RecommendRequest};
use llamarec_tests::setup::{self, Addrs, Extra, Store};
use llamarec_tests::{binary, wait_serving, Process};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bounds every wait for something that should happen; reaching it means a hang.
const HANG: Duration = Duration::from_secs(300);

/// The children of `parent` (pid, command line), read from /proc.
fn children(parent: u32) -> Vec<(u32, Vec<String>)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| ppid(*pid) == Some(parent) && alive(*pid))
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            Some((pid, args))
        })
        .collect()
}

/// The parent pid from /proc/PID/stat ("pid (comm) state ppid ..."; comm may hold spaces).
fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// Running: present in /proc and not a zombie waiting to be reaped.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| stat.rfind(')').is_some_and(|at| stat[at + 1..].split_whitespace().next() != Some("Z")))
}

/// `llamarec up` and every service pid seen under it. Dropping it stops `up` and kills any of
/// those that outlived it, so a failed test leaves no service running.
struct Up {
    process: Process,
    seen: Vec<u32>,
}

impl Up {
    /// The running `llamarec serve NAME` child, if there is one now.
    fn find(&mut self, name: &str) -> Option<u32> {
        let (pid, _) = children(self.process.child.id()).into_iter().find(|(_, args)| args.windows(2).any(|w| w[0] == "serve" && w[1] == name))?;
        if !self.seen.contains(&pid) {
            self.seen.push(pid);
        }
        Some(pid)
    }

    /// The running `llamarec serve NAME` child, other than `not`, waiting for it to appear.
    async fn service_pid(&mut self, name: &str, not: Option<u32>) -> u32 {
        let start = Instant::now();
        loop {
            if let Some(pid) = self.find(name).filter(|p| Some(*p) != not) {
                return pid;
            }
            assert!(self.process.child.try_wait().unwrap().is_none(), "`llamarec up` exited while {name} was looked for");
            assert!(start.elapsed() < HANG, "no new `serve {name}` child under `llamarec up`");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the service (SIGKILL, as a crash) and returns once `up` has started another one
    /// and it reports SERVING.
    async fn kill_and_see_restart(&mut self, name: &str, address: &str) {
        let old = self.service_pid(name, None).await;
        let _ = std::process::Command::new("kill").arg("-KILL").arg(old.to_string()).status();
        self.service_pid(name, Some(old)).await;
        assert!(!alive(old), "{name} pid {old} was killed");
        wait_serving(address, HANG).await.unwrap_or_else(|e| panic!("{name} restarted by `up` never served: {e}"));
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let running = matches!(self.process.child.try_wait(), Ok(None));
        if running && self.process.terminate(Duration::from_secs(30)).is_none() {
            self.process.kill();
        }
        for pid in self.seen.iter().filter(|p| alive(**p)) {
            let _ = std::process::Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
        }
    }
}

/// What the stream of Recommends saw, by the phase a request was sent in.
#[derive(Default)]
struct Seen {
    ranked: [usize; 5],
    degraded: Vec<(u8, DegradedReason)>,
    errors: Vec<(u8, tonic::Status)>,
}

// Phases of the test.
const BEFORE: u8 = 0;
const RANKER_KILLED: u8 = 1;
const RANKER_BACK: u8 = 2;
const RETRIEVER_KILLED: u8 = 3;
const RETRIEVER_BACK: u8 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_restarts_killed_services_while_recommend_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = Addrs::new();
    // Weight 1: every Recommend calls the ranker, so a dead ranker shows (degraded RANKER_FAILED).
    // reserve_ms: a degraded answer reaches the caller before its own deadline on a busy machine.
    let config = setup::write_config(dir.path(), &addrs, &[&addrs.ranker], &Store::Embedded, &Extra { gateway: "reserve_ms = 400", ranker_weight: Some(1.0), ..Default::default() });
    let process = Process::start("llamarec up", &binary("llamarec"), &["up", "--config", &config, "--restart-delay-ms", "500", "--grace-s", "20"], &[]);
    let mut up = Up { process, seen: Vec::new() };
    for addr in [&addrs.retriever, &addrs.ranker, &addrs.gateway] {
        wait_serving(addr, HANG).await.unwrap();
    }
    for name in ["retriever", "ranker"] {
        up.service_pid(name, None).await;
    }
    let gateway = up.service_pid("gateway", None).await;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let phase = Arc::new(AtomicU8::new(BEFORE));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..3 {
        let (seen, phase, stop, addr) = (seen.clone(), phase.clone(), stop.clone(), addrs.gateway.clone());
        workers.push(tokio::spawn(async move {
            // One channel for the whole run: the gateway never goes away, so its callers keep
            // their connection while the stages behind it die and return.
            let mut client = GatewayClient::connect(format!("http://{addr}")).await.unwrap();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let user = ["42", "7", "100"][(w + n) % 3];
                n += 1;
                let options = Some(RecommendOptions { num_candidates: 0, skip_ranker: false });
                let mut request = tonic::Request::new(RecommendRequest { user_id: user.into(), k: 10, options, ..Default::default() });
                request.set_timeout(Duration::from_secs(60));
                let sent_in = phase.load(Ordering::SeqCst);
                let outcome = client.recommend(request).await;
                {
                    let mut s = seen.lock().unwrap();
                    match outcome {
                        Ok(r) if r.get_ref().degraded => s.degraded.push((sent_in, r.get_ref().degraded_reason())),
                        Ok(_) => s.ranked[sent_in as usize] += 1,
                        Err(status) => s.errors.push((sent_in, status)),
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    let wait_for = |what: &'static str, cond: Box<dyn Fn(&Seen) -> bool + Send>| {
        let seen = seen.clone();
        async move {
            let start = Instant::now();
            while !cond(&seen.lock().unwrap()) {
                assert!(start.elapsed() < HANG, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    wait_for("a ranked answer with every service up", Box::new(|s| s.ranked[BEFORE as usize] >= 1)).await;
    phase.store(RANKER_KILLED, Ordering::SeqCst);
    up.kill_and_see_restart("ranker", &addrs.ranker).await;
    phase.store(RANKER_BACK, Ordering::SeqCst);
    wait_for("ranked answers again after `up` restarted the ranker", Box::new(|s| s.ranked[RANKER_BACK as usize] >= 1)).await;

    phase.store(RETRIEVER_KILLED, Ordering::SeqCst);
    up.kill_and_see_restart("retriever", &addrs.retriever).await;
    phase.store(RETRIEVER_BACK, Ordering::SeqCst);
    wait_for("ranked answers again after `up` restarted the retriever", Box::new(|s| s.ranked[RETRIEVER_BACK as usize] >= 1)).await;

    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    {
        let s = seen.lock().unwrap();
        assert!(s.errors.is_empty(), "every Recommend answers while services die and return under `up`: {:?}", s.errors);
        for (phase, reason) in &s.degraded {
            let expected: &[DegradedReason] = match *phase {
                RANKER_KILLED => &[DegradedReason::RankerFailed, DegradedReason::RankerTimeout],
                RETRIEVER_KILLED => &[DegradedReason::RetrieverFallback],
                // A request sent just before a kill may meet the dead process; a loaded machine
                // may time a Rank out.
                _ => &[DegradedReason::RankerFailed, DegradedReason::RankerTimeout, DegradedReason::RetrieverFallback],
            };
            assert!(expected.contains(reason), "phase {phase}: degraded {reason:?}");
        }
        let count = |p: u8| s.degraded.iter().filter(|(q, _)| *q == p).count();
        eprintln!(
            "under `up`: ranked {:?} by phase; degraded while the ranker was down {}, while the retriever was down {}",
            s.ranked,
            count(RANKER_KILLED),
            count(RETRIEVER_KILLED)
        );
    }
    // The gateway was never restarted: it kept serving throughout.
    assert_eq!(up.service_pid("gateway", None).await, gateway);
    assert_eq!(up.seen.len(), 5, "three services and two restarts, nothing else: {:?}", up.seen);

    // SIGTERM still stops `up` and every child, cleanly.
    let status = up.process.terminate(HANG).expect("`llamarec up` stops on SIGTERM");
    assert!(status.success(), "`llamarec up` exit status after SIGTERM: {status}");
    let left: Vec<u32> = up.seen.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "services still running after `up` stopped: {left:?}");
}
