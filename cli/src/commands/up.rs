//! `llamarec up`: the whole cluster on loopback, one process per service, on the shipped
//! configuration. Fetches what is missing first, waits for every service to report SERVING,
//! prints the endpoints and an example, and on Ctrl-C stops all of them cleanly.

use anyhow::{bail, Context, Result};
use gateway::config::GatewayConfig;
use llamarec_common::assets::{fetch_all, SHIPPED};
use llamarec_common::config::{AssetsConfig, ConfigLayers};
use llamarec_common::serving::{shutdown_signal, wait_serving};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// How long to wait for each service to report SERVING (the ranker warms up first).
    #[arg(long, default_value_t = 300)]
    ready_timeout_s: u64,
    /// How long each service gets to drain on shutdown before it is killed.
    #[arg(long, default_value_t = 15)]
    grace_s: u64,
}

/// One service process of the cluster.
struct Service {
    name: &'static str,
    address: String,
    child: Child,
}

fn spawn(name: &'static str, address: &str, config: Option<&PathBuf>, env: &[(&str, &str)]) -> Result<Service> {
    let exe = std::env::current_exe().context("locating the llamarec binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve").arg(name).stdin(Stdio::null()).kill_on_drop(true);
    if let Some(path) = config {
        cmd.arg("--config").arg(path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    Ok(Service { name, address: address.to_string(), child })
}

async fn stop_all(services: &mut [Service], grace: Duration) {
    for s in services.iter() {
        if let Some(pid) = s.child.id() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
    }
    for s in services.iter_mut() {
        match tokio::time::timeout(grace, s.child.wait()).await {
            Ok(Ok(status)) => eprintln!("{:<9} stopped ({status})", s.name),
            _ => {
                eprintln!("{:<9} did not stop within {grace:?}; killing it", s.name);
                let _ = s.child.kill().await;
            }
        }
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
    // The gateway's view of where the others listen is the single source of truth here.
    let mut services = vec![
        spawn("retriever", &retriever_listen, config.as_ref(), &[("LLAMAREC_RETRIEVER__LISTEN", &retriever_listen)])?,
        spawn("ranker", &ranker_address, config.as_ref(), &[("LLAMAREC_RANKER__LISTEN", &ranker_address)])?,
        spawn("gateway", &gateway_listen, config.as_ref(), &[])?,
    ];

    let timeout = Duration::from_secs(args.ready_timeout_s);
    for i in 0..services.len() {
        eprintln!("waiting for {} on {} ...", services[i].name, services[i].address);
        let addr = services[i].address.clone();
        let ready = tokio::select! {
            r = wait_serving(&addr, timeout) => r,
            status = services[i].child.wait() => Err(format!("exited during start-up ({})", status.map(|s| s.to_string()).unwrap_or_default())),
        };
        if let Err(e) = ready {
            stop_all(&mut services, Duration::from_secs(args.grace_s)).await;
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
    println!("\nCtrl-C stops all three.");

    let signal = shutdown_signal();
    tokio::pin!(signal);
    let exited = loop {
        tokio::select! {
            _ = &mut signal => break None,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                let finished = services.iter_mut().find_map(|s| s.child.try_wait().ok().flatten().map(|status| (s.name, status)));
                if finished.is_some() {
                    break finished;
                }
            }
        }
    };
    if let Some((name, status)) = exited {
        eprintln!("{name} exited unexpectedly ({status}); stopping the others");
    }
    stop_all(&mut services, Duration::from_secs(args.grace_s)).await;
    if exited.is_some() {
        bail!("a service exited unexpectedly");
    }
    Ok(())
}
