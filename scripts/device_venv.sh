#!/usr/bin/env bash
# Makes a device venv: `pip install .` with the base dependencies only, as a site gateway has them
# (stock onnxruntime; no onnxruntime-training, no torch). Used by the device-install tests and the
# side-by-side training bench.
#   scripts/device_venv.sh DIR [PYTHON]      (PYTHON defaults to python3)
# Prints the venv's python path last. Re-running on an existing DIR reinstalls the project only.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:?usage: device_venv.sh DIR [PYTHON]}"
py="${2:-python3}"
if [ ! -x "$dir/bin/python" ]; then
    "$py" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade "pip>=23"
fi
# A non-editable install builds the C core for this interpreter; --no-cache-dir would rebuild from scratch.
"$dir/bin/python" -m pip install -q --force-reinstall --no-deps . >/dev/null
"$dir/bin/python" -m pip install -q . >/dev/null
"$dir/bin/python" - <<'PYCHECK'
import importlib.metadata as md
names = {d.metadata["Name"].lower() for d in md.distributions()}
unwanted = sorted(n for n in names if n.startswith("onnxruntime-training") or n == "torch")
if unwanted or "onnxruntime" not in names:
    raise SystemExit(f"device venv is wrong: unwanted {unwanted}, onnxruntime present: {'onnxruntime' in names}")
from fedpeft_edge import _core  # noqa: F401  (the C core was built for this interpreter)
PYCHECK
echo "$dir/bin/python"
