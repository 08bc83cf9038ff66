#!/usr/bin/env bash
# Create a virtual environment and install the pinned stack into it (CPU build of torch).
# Usage: PYTHON=python3.11 bash scripts/install.sh .venv
set -euo pipefail
venv="${1:-.venv}"
python="${PYTHON:-python3.11}"
here="$(cd "$(dirname "$0")/.." && pwd)"
start=$(date +%s)

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip uv

# torch first, through pip: pip's configuration may point at a local folder with the
# CPU wheel (find-links); uv does not read pip's configuration, so pass it on as well.
"$venv/bin/python" -m pip install -q "torch==2.13.0"
find_links=()
for fl in $("$venv/bin/python" -m pip config get global.find-links 2>/dev/null || true); do
  find_links+=(--find-links "$fl")
done

extras="cpu,dev"
"$venv/bin/uv" pip install --python "$venv/bin/python" "${find_links[@]}" \
  -c "$here/requirements/constraints.txt" -e "$here[$extras]"

# Guard: a CPU machine must never get the CUDA build of torch (GBs of nvidia-* wheels).
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda is None or torch.cuda.is_available() else 1)"; then
  echo "install.sh: a CUDA build of torch was installed on a machine without a GPU" >&2
  exit 1
fi
echo "install.sh: environment ready in $(( $(date +%s) - start )) s ($venv)"
