"""deploy/systemd/: every unit passes ``systemd-analyze verify`` and keeps the policies the deployment
relies on (restart limits, hardening, the agent's resource limits, journal-only logs, /etc/fedpeft-edge).

``systemd-analyze verify`` checks that ExecStart's program exists, so each unit is verified as a copy in a
temporary directory where the install path ``/opt/fedpeft-edge/venv/bin/fedpeft-edge`` is replaced by the
``fedpeft-edge`` this test environment has (and ``/usr/sbin/mosquitto`` by the Mosquitto found here) — the
same substitution an operator makes when installing elsewhere (deploy/systemd/README.md). The tool comes
from Debian's ``systemd`` package: missing, the test fails under CI (env CI set) and is skipped otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parents[1] / "deploy" / "systemd"
UNITS = ("fedpeft-edge-agent.service", "fedpeft-edge-aggregator.service", "fedpeft-edge-broker.service",
         "fedpeft-edge-console.service")
INSTALLED_CLI = "/opt/fedpeft-edge/venv/bin/fedpeft-edge"
INSTALLED_MOSQUITTO = "/usr/sbin/mosquitto"


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        message = "systemd-analyze is missing (Debian package `systemd`; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


def _keys(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit (every section), each key with all its values in order."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, val = line.split("=", 1)
            out.setdefault(key.strip(), []).append(val.strip())
    return out


def test_the_units_are_there() -> None:
    assert sorted(p.name for p in UNIT_DIR.glob("*.service")) == sorted(UNITS)
    assert (UNIT_DIR / "README.md").is_file()


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    exe = _systemd_analyze()
    text = (UNIT_DIR / unit).read_text()
    cli = shutil.which("fedpeft-edge") or str(Path(sys.executable).with_name("fedpeft-edge"))
    mosquitto = shutil.which("mosquitto") or INSTALLED_MOSQUITTO
    for installed, here in ((INSTALLED_CLI, cli), (INSTALLED_MOSQUITTO, mosquitto)):
        if installed in text:
            if not os.access(here, os.X_OK):
                pytest.fail(f"{here} (standing in for {installed}) is not an executable here")
            text = text.replace(installed, here)
    copy = tmp_path / unit
    copy.write_text(text)
    proc = subprocess.run([exe, "verify", str(copy)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"))
    # verify exits 0 on unknown keys and unparsable values, only saying so on stderr: both count.
    about_unit = [ln for ln in proc.stderr.splitlines() if unit in ln]
    assert proc.returncode == 0 and not about_unit, proc.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_unit_policies(unit: str) -> None:
    k = _keys((UNIT_DIR / unit).read_text())
    one = {key: vals[-1] for key, vals in k.items()}
    assert one["Restart"] in ("on-failure", "always") and float(one["RestartSec"]) > 0
    assert int(one["StartLimitBurst"]) > 0 and int(one["StartLimitIntervalSec"]) > 0
    for key, val in (("DynamicUser", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                     ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"), ("StandardError", "journal")):
        assert one[key] == val, (key, one.get(key))
    assert one["StateDirectory"].startswith("fedpeft-edge/")
    assert set(one["RestrictAddressFamilies"].split()) <= {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "ReadWritePaths" not in one  # the state dir (StateDirectory=) is the only writable path
    exec_start = one["ExecStart"]
    assert "--log-file" not in exec_start  # logs go to the journal only
    configs = re.findall(r"(?:--config|-c) (\S+)", exec_start)
    assert configs and all(c.startswith("/etc/fedpeft-edge/") for c in configs)
    assert all(src.split(":", 1)[1].startswith("/etc/fedpeft-edge/") for src in k.get("LoadCredential", []))


def test_agent_unit_leaves_the_machine_to_the_plant() -> None:
    one = {key: vals[-1] for key, vals in _keys((UNIT_DIR / UNITS[0]).read_text()).items()}
    assert one["Restart"] == "always"  # a service agent never exits on purpose (exit_after_final = false)
    assert one["CPUQuota"].endswith("%") and one["MemoryMax"]
    assert int(one["Nice"]) >= 10 and one["IOSchedulingClass"] == "idle"
    assert one["CPUSchedulingPolicy"] in ("idle", "batch")
    # The agent stops within 5 s of SIGTERM (tests/site/test_governor_agent.py): the unit waits longer.
    assert one["KillSignal"] == "SIGTERM" and 5 < float(one["TimeoutStopSec"].rstrip("s")) <= 60
    assert "--state-dir ${STATE_DIRECTORY}" in one["ExecStart"]
    assert "ProcSubset" not in one  # the governor reads /proc/stat and /proc/meminfo
