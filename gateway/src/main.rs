//! The gateway binary: configuration in, gRPC out. Everything else lives in the library.

fn main() -> std::process::ExitCode {
    llamarec_common::serving::service_main(
        "gateway",
        |layers| Ok(layers.section::<gateway::config::GatewayConfig>()?.worker_threads),
        |layers| async move { gateway::server::serve(&layers).await },
    )
}
