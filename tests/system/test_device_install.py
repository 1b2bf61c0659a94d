"""A device install is `pip install .`: stock onnxruntime, no training build, no torch, on each Python.

For each Python of ``requires-python`` that this machine has, a fresh venv is made by scripts/device_venv.sh
(the project's base dependencies only), and ``fedpeft-edge bench`` runs there on the MiniLM LoRA gradient
model that ``fedpeft-edge prepare --gradient-out`` wrote on the central side (this venv). The bench JSON must
name the stock runtime and carry a finite loss, the step time and the peak RSS.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft_edge.faces.cli import main as cli_main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEVICE_PYTHONS = ("3.10", "3.11", "3.12", "3.13")  # keep in step with requires-python in pyproject.toml


def _interpreter(version: str) -> str | None:
    """A working python{version}: pyenv's installs first (its PATH shims refuse versions not selected)."""
    candidates = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
    candidates += sorted(glob.glob(f"/root/.pyenv/versions/{version}.*/bin/python{version}"))
    candidates += [p for p in (shutil.which(f"python{version}"),) if p]
    for candidate in candidates:
        probe = subprocess.run([candidate, "-c", "import sys, venv; print(sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == str(tuple(map(int, version.split(".")))):
            return candidate
    return None


def test_declared_pythons_match_this_test() -> None:
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert declared == ">=3.10,<3.14", "update DEVICE_PYTHONS with requires-python"


@pytest.fixture(scope="module")
def central(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What the central side hands out: `prepare --out --gradient-out` (cached backbone + bundle)."""
    root = tmp_path_factory.mktemp("central")
    bundle, gradient = root / "minilm-lora-bundle", root / "minilm-lora-gradient"
    assert cli_main(["prepare", "--task", "text", "--method", "lora", "--out", str(bundle),
                     "--gradient-out", str(gradient)]) == 0
    assert (gradient / "gradient.json").is_file() and (gradient / "base.data").is_file()
    return {"bundle": bundle, "gradient": gradient}


@pytest.mark.parametrize("version", DEVICE_PYTHONS)
def test_device_install_trains_on_stock_onnxruntime(version: str, central: dict[str, Path], tmp_path: Path
                                                    ) -> None:
    python = _interpreter(version)
    if python is None:
        if os.environ.get("CI"):
            pytest.fail(f"Python {version} is declared in requires-python but CI's machine lacks it")
        pytest.skip(f"no Python {version} on this machine")
    venv = tmp_path / "venv"
    made = subprocess.run(["bash", str(ROOT / "scripts" / "device_venv.sh"), str(venv), python],
                          capture_output=True, text=True, timeout=1200)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-4000:]

    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True)
    installed = {p["name"].lower(): p["version"] for p in json.loads(listed.stdout)}
    assert "onnxruntime" in installed and "fedpeft-edge" in installed
    assert not [n for n in installed if n.startswith("onnxruntime-training") or n == "torch"], installed

    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    bench = subprocess.run([str(venv / "bin" / "fedpeft-edge"), "bench", "--bundle", str(central["gradient"]),
                            "--steps", "2", "--threads", "2", "--kernel-elements", str(1 << 16),
                            "--rss-limit-mb", "4000", "--out", str(out)],
                           capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["system"]["python"].startswith(version + ".")
    training = data["training"]
    assert training["trainer"] == f"onnxruntime {installed['onnxruntime']}"
    assert training["backend"] == "gradient" and training["method"] == "lora"
    assert training["loss_finite"] and training["step_seconds_median"] > 0
    assert training["trainable_params"] > 10_000
    assert data["memory"]["peak_rss_mb"] > 50
    assert data["kernels"]["backend"] == "c"  # the C core compiled for this interpreter
    assert sys.executable not in bench.stdout  # really the device venv's interpreter

    if version == "3.11":  # once: the training backend on a device is a clear error, not a crash
        out_ort = tmp_path / "bench-ort.json"
        ort_run = subprocess.run([str(venv / "bin" / "fedpeft-edge"), "bench", "--backend", "ort", "--bundle",
                                  str(central["bundle"]), "--steps", "1", "--kernel-elements", "4096",
                                  "--out", str(out_ort)], capture_output=True, text=True, timeout=600,
                                 cwd=tmp_path, env=env)
        assert ort_run.returncode == 1, ort_run.stdout[-2000:] + ort_run.stderr[-2000:]
        error = json.loads(out_ort.read_text())["training"]["error"]
        assert "stock build" in error and "[prepare]" in error, error
