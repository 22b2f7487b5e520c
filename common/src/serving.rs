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

/// Health reporting plus the health service to mount.
pub fn health() -> (HealthReporter, tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>) {
    tonic_health::server::health_reporter()
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
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let start = std::time::Instant::now();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?;
    let mut last = String::from("never connected");
    while start.elapsed() < timeout {
        match endpoint.connect().await {
            Ok(channel) => match HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await {
                Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => return Ok(()),
                Ok(r) => last = format!("health status {}", r.get_ref().status().as_str_name()),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{addr} not SERVING after {timeout:?}: {last}"))
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
