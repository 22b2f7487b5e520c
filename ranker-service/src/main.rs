//! The ranker binary: configuration in, gRPC out. Everything else lives in the library.

fn main() -> std::process::ExitCode {
    llamarec_common::serving::service_main("ranker-service", |_| Ok(0), |layers| async move {
        ranker_service::server::serve(&layers).await
    })
}
