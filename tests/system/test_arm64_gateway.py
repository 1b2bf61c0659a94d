"""An ARM64 gateway, for real, under emulation: scripts/arm64_gateway.sh end to end.

The script builds (or reuses) a Debian bookworm arm64 root with debootstrap + qemu-user-static, installs
the project there from an offline wheelhouse (C core compiled by the root's own gcc, stock onnxruntime),
and runs one federation round on this x86-64 machine: Mosquitto, an x86-64 aggregator, an x86-64 site
and a site agent inside the arm64 root, both training MiniLM LoRA on Reuters R8. Here we check its JSON
result: the agent ran as aarch64 under qemu and the aggregator accepted its update.

Needs root, apt-get and a few minutes (a cold root: about 6 more for debootstrap), so it runs only when
asked — ``.ci/run`` runs it as its own step::

    FEDPEFT_EDGE_ARM64=1 python3 -m pytest tests/system/test_arm64_gateway.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "arm64_gateway.sh"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("FEDPEFT_EDGE_ARM64") != "1",
        reason="ARM64 gateway under emulation runs only when asked: FEDPEFT_EDGE_ARM64=1 "
        "python3 -m pytest tests/system/test_arm64_gateway.py (root, apt-get, minutes)"),
]


@pytest.mark.timeout(3600)
def test_arm64_gateway_trains_and_is_accepted(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("FEDPEFT_EDGE_ARM64=1 needs root (apt-get, binfmt_misc, debootstrap, chroot)")
    work, result_file = tmp_path / "work", tmp_path / "result.json"
    env = {**os.environ, "FEDPEFT_ARM64_WORK": str(work), "FEDPEFT_ARM64_RESULT": str(result_file),
           "FEDPEFT_ARM64_PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=3500, check=False)
    sys.stdout.write(proc.stdout)  # the script's summary, shown with -s or on failure
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(result_file.read_text())
    assert result["ok"] and all(result["checks"].values()), result["checks"]

    # The site really was an aarch64 process: its Python said so, and the kernel ran it through qemu.
    device = result["arm64_device"]
    assert device["machine"] == "aarch64"
    assert device["platform_tag"] == "linux-aarch64"
    assert "qemu-aarch64" in result["arm64_agent_executable"]
    assert device["onnxruntime"] and device["core"].endswith(".so")

    # It trained and the aggregator accepted its update: counted in round 0, acknowledged as accepted.
    update = result["arm64_update"]
    assert update["samples"] > 0 and update["metrics"]["steps"] == result["steps"]
    assert result["emulated_step_s"] > 0
    assert "site-arm64" in result["round"]["participants"]
    assert sorted(result["round"]["participants"]) == ["site-arm64", "site-x86"]
    from fedpeft_edge.central.store import RoundState

    state = RoundState.load(work / "agg")
    assert state is not None and state.round == 1
    assert state.counters.get("accepted") == 2 and not state.counters.get("rejected")
    assert "acknowledged by the aggregator: accepted" in (work / "site-arm64.log").read_text()
