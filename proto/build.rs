//! Compiles `llamarec/v1/*.proto` with protox (pure Rust, no system `protoc`) and writes the
//! file-descriptor set that the services hand to gRPC server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "llamarec/v1/common.proto",
    "llamarec/v1/retriever.proto",
    "llamarec/v1/ranker.proto",
    "llamarec/v1/gateway.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = protox::compile(PROTOS, ["."])?;
    std::fs::write(
        out_dir.join("llamarec_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
