//! The retriever binary: configuration in, gRPC out. Everything else lives in the library.

fn main() -> std::process::ExitCode {
    llamarec_common::serving::service_main(
        "retriever-service",
        |layers| Ok(layers.section::<retriever_service::service_config::RetrieverServiceConfig>()?.worker_threads),
        |layers| async move { retriever_service::server::serve(&layers).await },
    )
}
