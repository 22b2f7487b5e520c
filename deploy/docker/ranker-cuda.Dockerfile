# syntax=docker/dockerfile:1
# The ranker for NVIDIA GPUs: the same service built with `--features ranker-service/cuda`
# (candle's CUDA kernels), run with LLAMAREC_RANKER__DEVICE=cuda:0. gRPC :50052, metrics :9092.
# Build from the repository root (no GPU is needed to build; CUDA_COMPUTE_CAP picks the GPU
# generation the kernels are compiled for: 80 = A100, 86 = A10/RTX 30xx, 89 = L4/L40, 90 = H100):
#   docker build -f deploy/docker/ranker-cuda.Dockerfile --build-arg CUDA_COMPUTE_CAP=80 \
#     -t llamarec/ranker-cuda:0.1.0 .
# Run with the NVIDIA container toolkit (`docker run --gpus all ...`; on Kubernetes the NVIDIA
# device plugin and a `nvidia.com/gpu` limit, see deploy/k8s/overlays/gpu). The GGUF model comes
# from the assets volume, as for the CPU image.
ARG CUDA_VERSION=12.6.3
ARG UBUNTU=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS chef
ARG RUST_VERSION=1.95
# nvcc comes with the devel image; Rust comes from rustup (Ubuntu's rustc is too old).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/*
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --no-modify-path --profile minimal --default-toolchain ${RUST_VERSION} \
 && cargo install cargo-chef --locked --version ^0.1
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# No GPU during `docker build`, so nvidia-smi cannot tell the compute capability: say it here.
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
COPY --from=planner /src/recipe.json recipe.json
# Dependency layer, cached until Cargo.toml / Cargo.lock change: candle with its CUDA kernels.
# (`cook` takes one -p; llamarec-cli depends on ranker-service, so this covers both.)
RUN cargo chef cook --release --locked --recipe-path recipe.json \
      -p llamarec-cli --features ranker-service/cuda
COPY . .
# The `llamarec` command is built in the same invocation (features unify), so the health check
# binary links the same CUDA libraries as the service.
RUN cargo build --release --locked -p ranker-service -p llamarec-cli --features ranker-service/cuda \
      --bin ranker-service --bin llamarec

# The runtime image has cuBLAS, cuRAND and NVRTC (candle links them dynamically); libcuda comes
# from the host driver through the NVIDIA container toolkit.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS runtime
RUN groupadd --system --gid 10001 llamarec \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/llamarec --shell /usr/sbin/nologin llamarec \
 && mkdir -p /var/lib/llamarec/assets /etc/llamarec \
 && chown -R 10001:10001 /var/lib/llamarec
COPY deploy/docker/llamarec.toml /etc/llamarec/llamarec.toml
# LLAMAREC_TLS_*: HEALTHCHECK's `llamarec health` trusts the shipped TLS certificates' CA.
ENV LLAMAREC_CONFIG=/etc/llamarec/llamarec.toml \
    LLAMAREC_TLS_CA=/run/secrets/llamarec/ca.crt \
    LLAMAREC_TLS_DOMAIN=localhost \
    LLAMAREC_RANKER__DEVICE=cuda:0 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /var/lib/llamarec
COPY --from=builder /src/target/release/llamarec /usr/local/bin/llamarec
COPY --from=builder /src/target/release/ranker-service /usr/local/bin/ranker-service
# The shipped LoRA adapter (~2 MB, committed under ranker-service/adapters).
COPY ranker-service/adapters /opt/llamarec/adapters
USER 10001:10001
EXPOSE 50052 9092
HEALTHCHECK --interval=10s --timeout=8s --start-period=180s --retries=3 \
  CMD ["llamarec", "health", "--timeout-s", "5", "127.0.0.1:50052"]
ENTRYPOINT ["ranker-service"]
