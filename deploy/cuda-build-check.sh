#!/usr/bin/env bash
# Compiles the CUDA ranker (`--features ranker-service/cuda`, what deploy/docker/ranker-cuda.Dockerfile
# and the gpu overlay ship) on a machine with the CUDA toolkit, and when a GPU is visible, checks
# that the binary serves a Rank on it. CI does not run this (deploy/k8s/README.md, "GPU", says why,
# with the measured times); run it before publishing a ranker-cuda image or after a candle update.
#
#   bash deploy/cuda-build-check.sh              # build only (no GPU needed)
#   CUDA_COMPUTE_CAP=90 bash deploy/cuda-build-check.sh
#
# The toolkit: nvcc on PATH (or CUDA_HOME/bin). On Debian 12 it is in the non-free component
# (CUDA 11.8, known to build this crate):
#   echo 'deb http://deb.debian.org/debian bookworm non-free' > /etc/apt/sources.list.d/non-free.list
#   apt-get update && apt-get install -y --no-install-recommends nvidia-cuda-toolkit   # ~1.6 GB
# or NVIDIA's own packages / the nvidia/cuda:*-devel images (the Dockerfile uses 12.6).
#
# Builds into target/cuda (CARGO_TARGET_DIR overrides), never target/release: the CUDA binaries
# need libcuda at run time and must not replace the CPU ones the tests start.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'cuda-build-check: %s\n' "$*"; }

if ! command -v nvcc >/dev/null 2>&1; then
  if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    export PATH="$CUDA_HOME/bin:$PATH"
  else
    say "nvcc not found: install the CUDA toolkit first (see the comment at the top of this script)"
    exit 1
  fi
fi
say "$(nvcc --version | tail -1)"

# candle's kernels are compiled for one compute capability; without a GPU to ask, say which
# (80: A100; 86: A10/RTX 30xx; 89: L4/RTX 40xx; 90: H100/H200). The Dockerfile's default is 80.
if [[ -z "${CUDA_COMPUTE_CAP:-}" ]]; then
  CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.' || true)
  CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
fi
export CUDA_COMPUTE_CAP
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
say "compute capability $CUDA_COMPUTE_CAP, target dir $CARGO_TARGET_DIR"

start=$(date +%s)
cargo build --release --locked -p ranker-service -p llamarec-cli --features ranker-service/cuda
say "built in $(( $(date +%s) - start )) s: $CARGO_TARGET_DIR/release/{ranker-service,llamarec}"

if ! nvidia-smi -L >/dev/null 2>&1; then
  say "no GPU visible: build checked, nothing run"
  exit 0
fi

# A GPU: the real model ranking one history on cuda:0 (needs `llamarec fetch` assets).
say "GPU: $(nvidia-smi -L | head -1)"
LLAMAREC="$CARGO_TARGET_DIR/release/llamarec"
"$LLAMAREC" fetch
# This build has CUDA: the check accepts cuda:0 without the note a CPU build prints.
"$LLAMAREC" config check deploy/local/llamarec.toml --env LLAMAREC_RANKER__DEVICE=cuda:0
say "on the GPU: llamarec rank with LLAMAREC_RANKER__DEVICE=cuda:0"
LLAMAREC_RANKER__DEVICE=cuda:0 "$LLAMAREC" rank \
  --history "Toy Story (1995)|Heat (1995)|Casino (1995)" \
  --candidates "Jumanji (1995)|GoldenEye (1995)|Sabrina (1995)|Balto (1995)"
say "ok"
