"""``fedpeft-edge wheelhouse``: an offline, compiler-free device install.

The slow test builds the wheelhouse for this host (x86-64, this Python), then installs it into a fresh venv
with no compiler (CC=/bin/false, PATH = the venv's bin only), no package index (``--no-index``,
PIP_NO_INDEX, no pip configuration) and, as root, no network at all (``unshare -n``), with exactly the
command README.txt gives, and trains two GradientTrainer steps there on a tiny gradient model lowered here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from lowering_cases import make_cache

from fedpeft_edge.faces import wheelhouse
from fedpeft_edge.faces.cli import main as cli_main
from fedpeft_edge.runtime.errors import InvalidValueError

ROOT = Path(__file__).resolve().parents[2]
PY = f"{sys.version_info.major}.{sys.version_info.minor}"
TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"


def _no_network_prefix() -> list[str]:
    unshare = shutil.which("unshare")
    if unshare and os.geteuid() == 0 and subprocess.run([unshare, "-n", "true"]).returncode == 0:
        return [unshare, "-n"]
    return []


def _offline_env(venv: Path) -> dict[str, str]:
    """No compiler, no index, no pip configuration (a global find-links would be another source)."""
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "LC_ALL", "TMPDIR")}
    return {**keep, "PATH": str(venv / "bin"), "CC": "/bin/false", "CXX": "/bin/false",
            "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _check_record(whl: Path) -> None:
    with zipfile.ZipFile(whl) as zf:
        record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        rows = [r.split(",") for r in zf.read(record).decode().splitlines()]
        assert sorted(r[0] for r in rows) == sorted(zf.namelist())
        for name, digest, size in rows:
            if name == record:
                continue
            data = zf.read(name)
            want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={want}" and int(size) == len(data), name


def test_base_dependencies_never_hold_torch_or_the_training_build():
    deps = wheelhouse.base_dependencies(ROOT)
    assert any(d.startswith("onnxruntime") for d in deps)
    assert not [d for d in deps if d.lower().startswith(("torch", "onnxruntime-training"))]


def test_missing_target_headers_fail_with_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPEFT_ARM64_ROOT", str(tmp_path / "no-root"))
    with pytest.raises(InvalidValueError) as err:
        wheelhouse.find_target_headers("aarch64", "3.99", None)
    text = str(err.value)
    assert "no aarch64 headers of Python 3.99" in text and "libpython3.99-dev:arm64" in text
    assert "--python-include" in text and "arm64_gateway.sh" in text


def test_retag_replaces_the_extension_and_rewrites_record(tmp_path):
    src = tmp_path / "demo-1.0-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("fedpeft_edge/_core.abi3.so", b"\x7fELF-x86")
        zf.writestr("fedpeft_edge/__init__.py", b"")
        zf.writestr("demo-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nTag: cp311-cp311-linux_x86_64\n")
        zf.writestr("demo-1.0.dist-info/RECORD", "stale\n")
    out = wheelhouse.retag_wheel(src, tmp_path, "cp311-cp311-linux_aarch64",
                                 {"fedpeft_edge/_core.abi3.so": b"\x7fELF-arm"})
    assert out.name == "demo-1.0-cp311-cp311-linux_aarch64.whl"
    with zipfile.ZipFile(out) as zf:
        assert zf.read("fedpeft_edge/_core.abi3.so") == b"\x7fELF-arm"
        assert "Tag: cp311-cp311-linux_aarch64" in zf.read("demo-1.0.dist-info/WHEEL").decode()
    _check_record(out)


@pytest.mark.slow
def test_offline_install_without_compiler_trains(tmp_path):
    house = tmp_path / "wheelhouse"
    assert cli_main(["wheelhouse", "--platform", "x86_64", "--python", PY, "--out", str(house)]) == 0
    manifest = json.loads((house / "manifest.json").read_text())
    whl = house / manifest["project_wheel"]
    assert whl.name == f"fedpeft_edge-0.1.0-{TAG}-{TAG}-linux_x86_64.whl"
    _check_record(whl)
    with zipfile.ZipFile(whl) as zf:
        assert "fedpeft_edge/_core.abi3.so" in zf.namelist()
    names = [n.lower() for n in manifest["files"]]
    assert not [n for n in names if n.startswith(("torch", "onnxruntime_training"))]
    assert [n for n in names if n.startswith("onnxruntime-")], names
    assert not [p for p in house.iterdir() if p.suffix in (".gz", ".zip")]
    assert "pip install --no-index --find-links" in (house / "README.txt").read_text()

    # the tiny model is lowered here, on the "central side" (ORT Training)
    gm = make_cache(tmp_path / "central")[1]("lora")

    venv = tmp_path / "device"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = _offline_env(venv)
    assert shutil.which("gcc", path=env["PATH"]) is None and shutil.which("cc", path=env["PATH"]) is None
    jail = _no_network_prefix()
    install = subprocess.run([*jail, str(venv / "bin" / "pip"), "install", "--no-index", "--find-links",
                              str(house), "fedpeft-edge"], capture_output=True, text=True, timeout=900,
                             env=env, cwd=tmp_path)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert "Building wheel" not in install.stdout  # nothing was compiled

    listed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format", "json"], capture_output=True,
                            text=True, env=env, check=True)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"fedpeft-edge", "onnxruntime", "numpy"} <= installed
    assert "torch" not in installed and not [n for n in installed if n.startswith("onnxruntime-training")]

    script = f"""
import sys, numpy as np
from fedpeft_edge import _core
from fedpeft_edge import kernels
from fedpeft_edge.training.gradient_trainer import GradientTrainer
assert "site-packages" in _core.__file__, _core.__file__
assert kernels.backend_info()["backend"] == "c", kernels.backend_info()
rng = np.random.default_rng(0)
batch = {{"input_ids": rng.integers(4, 40, (8, 10)).astype(np.int64),
          "attention_mask": np.ones((8, 10), np.int64), "labels": rng.integers(0, 3, 8).astype(np.int64)}}
trainer = GradientTrainer({str(gm.directory)!r})
before = trainer.get_flat()
losses = [trainer.train_step(batch)[0] for _ in range(2)]
assert np.isfinite(losses).all() and not np.array_equal(before, trainer.get_flat())
print("trained", losses, _core.__file__)
"""
    run = subprocess.run([*jail, str(venv / "bin" / "python"), "-c", script], capture_output=True,
                         text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "trained" in run.stdout and str(venv) in run.stdout
    help_run = subprocess.run([*jail, str(venv / "bin" / "fedpeft-edge"), "infer", "--help"],
                              capture_output=True, text=True, timeout=120, env=env)
    assert help_run.returncode == 0 and "--input" in help_run.stdout


@pytest.mark.slow
def test_aarch64_wheelhouse_installs_offline_and_trains_under_qemu(tmp_path):
    """The aarch64 wheelhouse (C core cross-compiled here), installed with the README command into a venv
    of the arm64 root's Python run by qemu-user, offline and without a compiler, then two training steps.

    Uses scripts/arm64_gateway.sh's cached root read-only (its Python and libc; the venv lives in
    tmp_path); skipped without it. /proc is hidden in a private mount namespace: onnxruntime's cpuinfo
    crashes under qemu when it reads the host's (STACK_NOTES)."""
    root = Path(os.environ.get("FEDPEFT_ARM64_ROOT", wheelhouse.ARM64_ROOT_DEFAULT))
    qemu = shutil.which("qemu-aarch64-static")
    unshare, mount = shutil.which("unshare"), shutil.which("mount")
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("no aarch64-linux-gnu-gcc")
    tools = (qemu, unshare, mount)
    if None in tools or os.geteuid() != 0 or not (root / "usr/bin/python3.11").is_file():
        pytest.skip("needs root, unshare, mount, qemu-aarch64-static and scripts/arm64_gateway.sh's root")
    house = tmp_path / "wheelhouse"
    assert cli_main(["wheelhouse", "--platform", "aarch64", "--python", "3.11", "--out", str(house)]) == 0
    manifest = json.loads((house / "manifest.json").read_text())
    whl = house / manifest["project_wheel"]
    assert whl.name == "fedpeft_edge-0.1.0-cp311-cp311-linux_aarch64.whl"
    _check_record(whl)
    assert [n for n in manifest["files"] if n.startswith("onnxruntime-") and "aarch64" in n]
    assert not [n for n in manifest["files"] if n.lower().startswith(("torch", "onnxruntime_training"))]

    gm = make_cache(tmp_path / "central")[1]("lora")
    venv = tmp_path / "arm-venv"
    emu = {"QEMU_LD_PREFIX": str(root), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    qpy = [qemu, "-L", str(root)]
    made = subprocess.run([*qpy, str(root / "usr/bin/python3.11"), "-m", "venv", str(venv)],
                          capture_output=True, text=True, timeout=600, env=emu, cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    offline = {**emu, "PATH": str(venv / "bin"), "CC": "/bin/false", "PIP_NO_INDEX": "1",
               "PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    install = subprocess.run([unshare, "-n", *qpy, str(venv / "bin/python3.11"), "-m", "pip", "install",
                              "--no-index", "--find-links", str(house), "fedpeft-edge"],
                             capture_output=True, text=True, timeout=1800, env=offline, cwd=tmp_path)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    empty = tmp_path / "no-proc"
    empty.mkdir()
    script = f"""
import platform, numpy as np, onnxruntime
from fedpeft_edge import _core, kernels
from fedpeft_edge.training.gradient_trainer import GradientTrainer
assert {str(venv)!r} in _core.__file__, _core.__file__
x = (np.arange(1000, dtype=np.float32) - 500) / 7
assert abs(kernels.l2_norm(x) - float(np.linalg.norm(x.astype(np.float64)))) < 1e-3
rng = np.random.default_rng(0)
batch = {{"input_ids": rng.integers(4, 40, (8, 10)).astype(np.int64),
          "attention_mask": np.ones((8, 10), np.int64), "labels": rng.integers(0, 3, 8).astype(np.int64)}}
trainer = GradientTrainer({str(gm.directory)!r})
losses = [trainer.train_step(batch)[0] for _ in range(2)]
assert np.isfinite(losses).all()
print("trained", platform.machine(), kernels.backend_info()["backend"], onnxruntime.__version__)
"""
    (tmp_path / "train.py").write_text(script)
    inner = (f"{mount} --bind {empty} /proc && exec {' '.join(qpy)} {venv}/bin/python3.11 "
             f"{tmp_path / 'train.py'}")
    run = subprocess.run([unshare, "-m", "-n", "--propagation", "private", "/bin/sh", "-c", inner],
                         capture_output=True, text=True, timeout=900, env=offline, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    words = run.stdout.split()
    assert words[:3] == ["trained", "aarch64", "c"], run.stdout
