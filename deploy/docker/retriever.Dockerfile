# syntax=docker/dockerfile:1
# The retriever image (LRURec on CPU): gRPC on :50051, Prometheus metrics on :9091.
# Build from the repository root:
#   docker build -f deploy/docker/retriever.Dockerfile -t llamarec/retriever:0.1.0 .
# The checkpoints committed under retriever-service/checkpoints are baked in (the served
# ensemble ml-100k-ensemble, 3.7 MB, and the single LRURec ml-100k, 1 MB); serve another one by
# mounting it and setting LLAMAREC_RETRIEVER__CHECKPOINT.

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
COPY --from=builder /src/target/release/retriever-service /usr/local/bin/retriever-service
COPY retriever-service/checkpoints /opt/llamarec/checkpoints
USER 10001:10001
EXPOSE 50051 9091
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["llamarec", "health", "--timeout-s", "3", "127.0.0.1:50051"]
ENTRYPOINT ["retriever-service"]
