//! `llamarec up`: the whole cluster on loopback, one process per service, on the shipped
//! configuration. Fetches what is missing first, waits for every service to report SERVING,
//! prints the endpoints and an example, then supervises them as an orchestrator would: a service
//! that exits is started again after a back-off delay while the others keep serving (the gateway
//! answers degraded meanwhile: retriever order without the ranker, its popular items without the
//! retriever). Ctrl-C or SIGTERM stops all of them cleanly.

use anyhow::{bail, Context, Result};
use gateway::config::GatewayConfig;
use llamarec_common::assets::{fetch_all, SHIPPED};
use llamarec_common::config::{AssetsConfig, ConfigLayers};
use llamarec_common::serving::{shutdown_signal, wait_serving};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::time::Instant;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// How long to wait for each service to report SERVING (the ranker warms up first).
    #[arg(long, default_value_t = 300)]
    ready_timeout_s: u64,
    /// How long each service gets to drain on shutdown before it is killed.
    #[arg(long, default_value_t = 15)]
    grace_s: u64,
    /// Delay before a service that exited is started again; doubled after each exit that
    /// follows a short run, up to `--max-restart-delay-s`.
    #[arg(long, default_value_t = 1000)]
    restart_delay_ms: u64,
    /// Longest delay between restarts of a service that keeps exiting.
    #[arg(long, default_value_t = 30)]
    max_restart_delay_s: u64,
}

/// A service that stayed up this long before it exited is treated as healthy: its next restart
/// comes after the initial delay again, not after the doubled one (Kubernetes resets its
/// CrashLoopBackOff the same way, after a run of some minutes).
const STABLE_RUN: Duration = Duration::from_secs(60);

/// How often exited services and due restarts are looked at.
const POLL: Duration = Duration::from_millis(200);

/// Restart delays of one service: `initial`, doubled after every short run, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.min(max);
        Self { initial, max, next: initial }
    }

    /// The delay before the restart that follows a run of `ran`.
    fn after_exit(&mut self, ran: Duration) -> Duration {
        if ran >= STABLE_RUN {
            self.next = self.initial;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// One service process of the cluster and what its supervisor knows about it.
struct Service {
    name: &'static str,
    address: String,
    /// `LLAMAREC_*` overrides that put it on the address the gateway calls.
    env: Vec<(&'static str, String)>,
    /// Running, or `None` while it waits for its restart.
    child: Option<Child>,
    started: Instant,
    restart_at: Option<Instant>,
    restarts: u32,
    backoff: Backoff,
}

impl Service {
    fn new(name: &'static str, address: &str, env: Vec<(&'static str, String)>, backoff: Backoff) -> Self {
        Self { name, address: address.to_string(), env, child: None, started: Instant::now(), restart_at: None, restarts: 0, backoff }
    }

    /// Starts the process (`llamarec serve NAME`), logging its pid.
    fn spawn(&mut self, config: Option<&PathBuf>) -> Result<()> {
        let exe = std::env::current_exe().context("locating the llamarec binary")?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve").arg(self.name).stdin(Stdio::null()).kill_on_drop(true);
        if let Some(path) = config {
            cmd.arg("--config").arg(path);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", self.name))?;
        eprintln!("{:<9} started (pid {})", self.name, child.id().map(|p| p.to_string()).unwrap_or_else(|| "?".into()));
        self.child = Some(child);
        self.started = Instant::now();
        Ok(())
    }

    /// The exit status when the process has exited since the last look.
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }
}

async fn stop_all(services: &mut [Service], grace: Duration) {
    for s in services.iter_mut() {
        s.restart_at = None;
        if let Some(pid) = s.child.as_ref().and_then(Child::id) {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
    }
    for s in services.iter_mut() {
        let Some(child) = s.child.as_mut() else { continue };
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(Ok(status)) => eprintln!("{:<9} stopped ({status})", s.name),
            _ => {
                eprintln!("{:<9} did not stop within {grace:?}; killing it", s.name);
                let _ = child.kill().await;
            }
        }
        s.child = None;
    }
}

pub async fn run(layers: &ConfigLayers, args: UpArgs) -> Result<()> {
    let assets = layers.section::<AssetsConfig>()?;
    let gateway = layers.section::<GatewayConfig>()?;
    fetch_all(&assets.dir, "python3", &SHIPPED).context("fetching the shipped assets")?;

    let Some(ranker_address) = gateway.rankers.addresses.first().cloned() else {
        bail!("gateway.rankers.addresses is empty: `llamarec up` starts one ranker at the first address");
    };
    let config = layers.file().map(PathBuf::from);
    let retriever_listen = gateway.retriever.clone();
    let gateway_listen = gateway.listen.to_string();
    let backoff = Backoff::new(Duration::from_millis(args.restart_delay_ms), Duration::from_secs(args.max_restart_delay_s));
    // The gateway's view of where the others listen is the single source of truth here.
    let mut services = vec![
        Service::new("retriever", &retriever_listen, vec![("LLAMAREC_RETRIEVER__LISTEN", retriever_listen.clone())], backoff),
        Service::new("ranker", &ranker_address, vec![("LLAMAREC_RANKER__LISTEN", ranker_address.clone())], backoff),
        Service::new("gateway", &gateway_listen, vec![], backoff),
    ];
    let grace = Duration::from_secs(args.grace_s);
    for i in 0..services.len() {
        if let Err(e) = services[i].spawn(config.as_ref()) {
            stop_all(&mut services, grace).await;
            return Err(e);
        }
    }

    // A service that cannot come up at all (a bad config, a port in use) is a mistake to report,
    // not something to retry: supervision starts once all three have served.
    let timeout = Duration::from_secs(args.ready_timeout_s);
    for i in 0..services.len() {
        eprintln!("waiting for {} on {} ...", services[i].name, services[i].address);
        let addr = services[i].address.clone();
        let Some(child) = services[i].child.as_mut() else { continue };
        let ready = tokio::select! {
            r = wait_serving(&addr, timeout) => r,
            status = child.wait() => Err(format!("exited during start-up ({})", status.map(|s| s.to_string()).unwrap_or_default())),
        };
        if let Err(e) = ready {
            stop_all(&mut services, grace).await;
            bail!("{} did not become ready: {e}", services[i].name);
        }
    }

    println!("\nllamarec cluster is up:");
    for s in &services {
        println!("  {:<9} {}  (grpc.health.v1, reflection)", s.name, s.address);
    }
    if let Some(m) = gateway.metrics_listen {
        println!("  metrics   http://{m}/metrics (gateway)");
    }
    println!("\ntry:  cargo llamarec recommend --user 42\n      grpcurl -plaintext -d '{{\"user_id\":\"42\",\"k\":10}}' {gateway_listen} llamarec.v1.Gateway/Recommend");
    println!("\nA service that exits is restarted (the gateway answers degraded meanwhile). Ctrl-C stops all three.");

    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            // Ctrl-C also reaches the services themselves (same process group), which then
            // exit: see the signal first, so that their exits are not taken for crashes.
            biased;
            _ = &mut signal => break,
            _ = tokio::time::sleep(POLL) => supervise(&mut services, config.as_ref(), timeout),
        }
    }
    stop_all(&mut services, grace).await;
    Ok(())
}

/// One look at every service: schedules the restart of those that exited and starts those whose
/// delay is over.
fn supervise(services: &mut [Service], config: Option<&PathBuf>, ready_timeout: Duration) {
    let now = Instant::now();
    for s in services.iter_mut() {
        if let Some(status) = s.exited() {
            let ran = now.saturating_duration_since(s.started);
            let delay = s.backoff.after_exit(ran);
            s.restart_at = Some(now + delay);
            eprintln!("{:<9} exited ({status}) after {:.1} s; restarting in {:.1} s (restart {})", s.name, ran.as_secs_f64(), delay.as_secs_f64(), s.restarts + 1);
        }
        if s.restart_at.is_some_and(|at| at <= now) {
            s.restart_at = None;
            s.restarts += 1;
            match s.spawn(config) {
                Ok(()) => {
                    let (name, addr, n) = (s.name, s.address.clone(), s.restarts);
                    tokio::spawn(async move {
                        match wait_serving(&addr, ready_timeout).await {
                            Ok(()) => eprintln!("{name:<9} SERVING again on {addr} (restart {n})"),
                            Err(e) => eprintln!("{name:<9} not SERVING after restart {n}: {e}"),
                        }
                    });
                }
                Err(e) => {
                    // Could not even start the process: try again after the next delay.
                    let delay = s.backoff.after_exit(Duration::ZERO);
                    s.restart_at = Some(now + delay);
                    eprintln!("{:<9} {e:#}; retrying in {:.1} s", s.name, delay.as_secs_f64());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_after_short_runs_up_to_the_cap_and_resets_after_a_stable_one() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let short = Duration::from_secs(2);
        let delays: Vec<u64> = (0..5).map(|_| b.after_exit(short).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 5, 5]);
        assert_eq!(b.after_exit(STABLE_RUN).as_secs(), 1, "a run of STABLE_RUN starts over");
        assert_eq!(b.after_exit(short).as_secs(), 2);
        // An initial delay above the cap is the cap.
        assert_eq!(Backoff::new(Duration::from_secs(9), Duration::from_secs(3)).after_exit(short).as_secs(), 3);
    }
}
