# syntax=docker/dockerfile:1
# The ranker image (LLM verbalizer on CPU): gRPC on :50052, Prometheus metrics on :9092.
# Build from the repository root:
#   docker build -f deploy/docker/ranker.Dockerfile -t llamarec/ranker:0.1.0 .
# The GGUF model is not in the image: `llamarec fetch` (llamarec/tools image) writes it into the
# volume mounted at /var/lib/llamarec/assets. For NVIDIA GPUs see ranker-cuda.Dockerfile.

# ---- shared builder (keep this block byte-identical in gateway, retriever, ranker and tools
# ---- .Dockerfile: BuildKit then builds the workspace once and reuses it for all four images;
# ---- deploy/validate.sh checks that the blocks match) ----
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-slim-bookworm AS chef
# cargo-chef turns the workspace (every member of Cargo.toml: proto, common, retriever-service,
# ranker-service, gateway, cli, tests) into a recipe of its dependencies, so that the dependency
# layer is rebuilt only when Cargo.toml or Cargo.lock change, not on every source edit.
RUN cargo install cargo-chef --locked --version ^0.1
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# The cached dependency layer (candle, tonic, tokenizers, ...): the slow part of a cold build.
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
# proto/ compiles with protox (pure Rust): no system protoc is needed.
RUN cargo build --release --locked --bin llamarec --bin gateway --bin retriever-service --bin ranker-service
# ---- end of shared builder ----

FROM debian:bookworm-slim AS runtime
# The binaries need only glibc and libgcc_s, both in debian-slim (same Debian release as the
# builder, so the same glibc). One non-root user; the assets volume is mounted at
# /var/lib/llamarec/assets and the configuration at /etc/llamarec.
RUN groupadd --system --gid 10001 llamarec \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/llamarec --shell /usr/sbin/nologin llamarec \
 && mkdir -p /var/lib/llamarec/assets /etc/llamarec \
 && chown -R 10001:10001 /var/lib/llamarec
COPY deploy/docker/llamarec.toml /etc/llamarec/llamarec.toml
# The shipped configs serve TLS (certificates under /run/secrets/llamarec, all naming
# `localhost`): HEALTHCHECK's `llamarec health` trusts their CA through these.
ENV LLAMAREC_CONFIG=/etc/llamarec/llamarec.toml \
    LLAMAREC_TLS_CA=/run/secrets/llamarec/ca.crt \
    LLAMAREC_TLS_DOMAIN=localhost
WORKDIR /var/lib/llamarec
# `llamarec health ADDR` is the grpc.health.v1 check (exit 0 on SERVING), used by HEALTHCHECK.
COPY --from=builder /src/target/release/llamarec /usr/local/bin/llamarec
COPY --from=builder /src/target/release/ranker-service /usr/local/bin/ranker-service
# The shipped LoRA adapter (~2 MB, committed under ranker-service/adapters).
COPY ranker-service/adapters /opt/llamarec/adapters
USER 10001:10001
EXPOSE 50052 9092
# SERVING only once the model is loaded and warmed (tens of seconds on CPU): a long start period.
HEALTHCHECK --interval=10s --timeout=8s --start-period=180s --retries=3 \
  CMD ["llamarec", "health", "--timeout-s", "5", "127.0.0.1:50052"]
ENTRYPOINT ["ranker-service"]
