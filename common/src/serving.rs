//! What every gRPC service of the cluster does the same way: grpc.health.v1, server
//! reflection, and a graceful drain on SIGTERM or Ctrl-C (health goes NOT_SERVING, in-flight
//! requests finish, new connections are refused, and the process gives up after a grace
//! period).

use crate::config::ConfigLayers;
use crate::telemetry::{init_tracing, TelemetryConfig};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::server::Router;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// The grpc.health.v1 service as mounted (cheap to clone: clones share one status table).
pub type HealthServer = tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>;

/// Health reporting plus the health service to mount.
pub fn health() -> (HealthReporter, HealthServer) {
    // `health_reporter()` hides the service type; built by hand so it can be named (and the
    // server cloned onto a second, health-only listener).
    let reporter = HealthReporter::new();
    let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
    (reporter, tonic_health::pb::health_server::HealthServer::new(service))
}

/// Binds `listen` and serves only grpc.health.v1 there, in plaintext, for as long as the process
/// runs (the status is the main listener's: NOT_SERVING while it drains). For probes that cannot
/// speak TLS, e.g. Kubernetes' native gRPC probes, when the main listener has TLS on: this port
/// answers nothing but SERVING / NOT_SERVING, so it needs neither TLS nor a token.
pub async fn spawn_health_listener(listen: std::net::SocketAddr, health: HealthServer) -> anyhow::Result<()> {
    let listener = bind(listen).await.map_err(|e| anyhow::anyhow!("health_listen: {e:#}"))?;
    tracing::info!(%listen, "grpc.health.v1 only, plaintext");
    tokio::spawn(async move {
        let server = tonic::transport::Server::builder().add_service(health).serve_with_incoming(nodelay_incoming(listener));
        if let Err(e) = server.await {
            tracing::error!(%listen, error = %e, "health listener stopped");
        }
    });
    Ok(())
}

/// The reflection service over `descriptor_set` (grpcurl and friends use it).
pub fn reflection(
    descriptor_set: &'static [u8],
) -> Result<tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>, tonic_reflection::server::Error> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(descriptor_set)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The connections accepted on `listener`, each with TCP_NODELAY set. Without it a response's
/// trailing HTTP/2 frames wait for the client's delayed ACK: about 40 ms added to every small
/// unary call.
pub fn nodelay_incoming(listener: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |conn| {
        conn.and_then(|socket| socket.set_nodelay(true).map(|()| socket))
    })
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains: every service is
/// marked NOT_SERVING, in-flight requests get up to `grace` to finish.
pub async fn serve_until(
    router: Router,
    listener: TcpListener,
    health: HealthReporter,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let drain = async move {
        shutdown.await;
        tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down: NOT_SERVING, draining in-flight requests");
        health.set_service_status("", ServingStatus::NotServing).await;
        let _ = draining_tx.send(());
    };
    let incoming = nodelay_incoming(listener);
    // tonic drops `incoming` (closing the listening socket: new connections are refused) as
    // soon as `drain` resolves, sends GOAWAY on open connections (new calls on them are refused,
    // calls in flight continue) and resolves once every connection has closed.
    let server = router.serve_with_incoming_shutdown(incoming, drain);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => {
            if result.is_ok() {
                tracing::info!("drained: every in-flight request finished");
            }
            result
        }
        _ = async {
            if draining_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!("grace period over with requests still in flight; exiting");
            Ok(())
        }
    }
}

/// Waits until the gRPC server at `addr` (`host:port`) reports SERVING for the overall service
/// (""), polling every 100 ms; the error says what the last attempt saw.
pub async fn wait_serving(addr: &str, timeout: Duration) -> Result<(), String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?;
    wait_serving_at(addr, endpoint, timeout).await
}

/// [`wait_serving`] over a prepared endpoint (TLS, timeouts); `addr` names it in the error.
pub async fn wait_serving_at(addr: &str, endpoint: tonic::transport::Endpoint, timeout: Duration) -> Result<(), String> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let start = std::time::Instant::now();
    let mut last = String::from("never connected");
    while let Some(left) = timeout.checked_sub(start.elapsed()).filter(|d| !d.is_zero()) {
        // Bounded by what is left, so that a handshake that never completes (TLS against a
        // plaintext port, or the reverse) cannot outlast `timeout`.
        let attempt = async {
            let channel = endpoint.connect().await.map_err(|e| error_chain(&e))?;
            HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.map_err(|e| error_chain(&e))
        };
        match tokio::time::timeout(left, attempt).await {
            Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32 => return Ok(()),
            Ok(Ok(r)) => last = format!("health status {}", r.get_ref().status().as_str_name()),
            Ok(Err(e)) => last = e,
            Err(_) => last = "no answer (a TLS client against a plaintext port, or the reverse?)".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{addr} not SERVING after {timeout:?}: {last}"))
}

/// An error and its causes on one line ("transport error: invalid peer certificate: ...").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        source = s.source();
    }
    text
}

/// How long the runtime waits for its tasks when `serve` has returned.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(1);

/// Command line of every service binary.
#[derive(clap::Parser)]
struct ServiceArgs {
    /// TOML configuration file (else $LLAMAREC_CONFIG, else deploy/local/llamarec.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// A multi-threaded tokio runtime with `worker_threads` event-loop threads (0: one per core).
/// A service sharing a small machine with others (the local cluster on 2 cores) does better
/// with one: each hop between worker threads is a wake-up across cores.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    builder.enable_all().build()
}

/// The whole `main` of a service binary: parses `--config`, loads the layers, sets up tracing,
/// runs `serve` on a multi-threaded runtime of `worker_threads(&layers)` workers (0: one per
/// core) and turns an error into a message and exit code 1.
pub fn service_main<Fut>(
    name: &str,
    worker_threads: impl FnOnce(&ConfigLayers) -> anyhow::Result<usize>,
    serve: impl FnOnce(ConfigLayers) -> Fut,
) -> std::process::ExitCode
where
    Fut: Future<Output = anyhow::Result<()>>,
{
    let args = <ServiceArgs as clap::Parser>::parse();
    let start = || -> anyhow::Result<_> {
        let layers = ConfigLayers::discover(args.config.as_deref())?;
        let runtime = runtime(worker_threads(&layers)?)?;
        Ok((layers, runtime))
    };
    let result = start().and_then(|(layers, runtime)| {
        let result = runtime.block_on(async {
            init_tracing(&layers.section::<TelemetryConfig>()?);
            serve(layers).await
        });
        // Dropping a runtime waits for every blocking task still running; after the grace
        // period the process must exit even if one is stuck.
        runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
        result
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Binds `listen`, naming the address when that fails.
pub async fn bind(listen: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("binding {listen}: {e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn runtime_has_the_configured_workers_and_one_per_core_for_zero() {
        assert_eq!(super::runtime(1).unwrap().metrics().num_workers(), 1);
        assert_eq!(super::runtime(3).unwrap().metrics().num_workers(), 3);
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(super::runtime(0).unwrap().metrics().num_workers(), cores);
    }
}
