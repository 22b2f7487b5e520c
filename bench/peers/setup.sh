#!/usr/bin/env bash
# One command to build the PyTorch peer benchmark's virtual environment:
#
#   bash bench/peers/setup.sh
#
# Creates target/peer-venv (git-ignored) and installs the hash-pinned bench/peers/requirements.txt
# with --no-deps, so exactly the locked wheels land (no resolver, no GPU-only extras). Idempotent:
# a venv whose stamp matches the current requirements.txt is left as it is; otherwise it is
# rebuilt from scratch. PYTHON=/path/to/python3.11 picks the interpreter (default python3).
# Not part of the test command: it downloads ~2.5 GB of wheels (torch's PyPI wheel is the CUDA
# build and cannot import without its CUDA libraries) and takes ~4.3 GB on disk.
#
#   bash bench/peers/setup.sh recbole
#
# does the above, then layers the hash-pinned bench/peers/requirements-recbole.txt (RecBole 1.2.1,
# pandas, scipy, scikit-learn, tensorboard, ...) into the same venv for recbole_sasrec.py, with
# its own stamp (over both requirement files), so it is redone whenever either changes.
set -euo pipefail
layer="${1:-}"
if [[ -n "$layer" && "$layer" != recbole ]]; then
    echo "usage: bash bench/peers/setup.sh [recbole]" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
req="$root/bench/peers/requirements.txt"
venv="$root/target/peer-venv"
stamp="$venv/.peer-requirements.sha256"
python="${PYTHON:-python3}"

want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "[peer-setup] $venv is up to date with requirements.txt (sha256 ${want:0:12})"
    [[ "$layer" == recbole ]] || exit 0
else  # (re)build the torch peer's venv; the body is left unindented for the heredoc below

ver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$ver" != "3.11" ]]; then
    echo "[peer-setup] $python is Python $ver; the lock holds CPython 3.11 wheels (set PYTHON=python3.11)" >&2
    exit 1
fi
if [[ "$(uname -sm)" != "Linux x86_64" ]]; then
    echo "[peer-setup] the lock holds Linux x86_64 wheels; this is $(uname -sm)" >&2
    exit 1
fi

start=$SECONDS
echo "[peer-setup] (re)creating $venv with $("$python" --version)"
rm -rf "$venv"
mkdir -p "$root/target"
"$python" -m venv "$venv"

echo "[peer-setup] installing $(grep -c '==' "$req") pinned wheels (torch + CUDA libraries are ~2.5 GB to download)"
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input \
    --no-deps --require-hashes --only-binary=:all: --progress-bar on -r "$req"

echo "[peer-setup] smoke test"
"$venv/bin/python" - <<'EOF'
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch, transformers, peft, gguf  # noqa: F401
x = torch.ones(4, 4, requires_grad=True)
(x @ x).sum().backward()
assert x.grad is not None and float(x.grad.sum()) == 128.0  # d sum(x@x)/dx = 8 per element
print(f"[peer-setup] torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}),"
      f" transformers {transformers.__version__}, peft {peft.__version__}: OK")
EOF

echo "$want" > "$stamp"
echo "[peer-setup] done in $((SECONDS - start)) s; $(du -sh "$venv" | cut -f1) in $venv"
echo "[peer-setup] run: nice target/peer-venv/bin/python bench/peers/torch_peer.py --json target/peer-bench.json"
fi  # torch peer venv

[[ "$layer" == recbole ]] || exit 0

# RecBole layer: installed into the same venv (it needs the torch above), stamped separately.
rreq="$root/bench/peers/requirements-recbole.txt"
rstamp="$venv/.peer-recbole.sha256"
rwant="$(cat "$req" "$rreq" | sha256sum | cut -d' ' -f1)"
if [[ -f "$rstamp" && "$(cat "$rstamp")" == "$rwant" ]]; then
    echo "[peer-setup] RecBole layer is up to date with requirements-recbole.txt (sha256 ${rwant:0:12})"
    exit 0
fi
rstart=$SECONDS
echo "[peer-setup] installing the RecBole layer: $(grep -c '==' "$rreq") pinned wheels (~60 MB)"
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input \
    --no-deps --require-hashes --only-binary=:all: --progress-bar on -r "$rreq"
echo "[peer-setup] RecBole smoke test"
"$venv/bin/python" "$root/bench/peers/recbole_sasrec.py" --check-imports
echo "$rwant" > "$rstamp"
echo "[peer-setup] RecBole layer done in $((SECONDS - rstart)) s"
echo "[peer-setup] run: nice target/peer-venv/bin/python bench/peers/recbole_sasrec.py --json target/recbole-sasrec.json"
