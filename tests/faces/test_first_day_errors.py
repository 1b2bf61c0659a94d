"""First-day errors of the services, as a plant engineer meets them: real processes, real Mosquitto.

- SIGTERM and SIGINT stop an agent or the aggregator within 5 s in every state: connecting to a broker
  that is not there, and connected but waiting for work;
- a missing file (config, password, CA) or a busy port is one line naming it, with exit code 2;
- ``fedpeft-edge status`` shows the services of a fleet from their retained status topics.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mqtt_fixtures import service_env, spawn_cli, wait_for, write_toml

from fedpeft_edge.central.broker import free_port

STOP_WITHIN_S = 5.0


def _agent_toml(tmp: Path, port: int, *, extra_connection: str = "", fleet: str = "firstday") -> Path:
    return write_toml(tmp / "site.toml", f"""
[connection]
host = "127.0.0.1"
port = {port}
reconnect_max_s = 1
{extra_connection}
[fleet]
name = "{fleet}"
[agent]
client_id = "site-1"
state_dir = "{tmp}/site-1"
[data]
client_index = 0
batch_size = 16
[trainer]
kind = "factory"
factory = "fed_numpy_trainer:make"
""")


def _aggregator_toml(tmp: Path, port: int, fleet: str = "firstday") -> Path:
    return write_toml(tmp / "aggregator.toml", f"""
[connection]
host = "127.0.0.1"
port = {port}
reconnect_max_s = 1
[fleet]
name = "{fleet}"
[aggregator]
state_dir = "{tmp}/agg"
max_rounds = 3
quorum = 1
round_deadline_s = 300
[trainer]
kind = "factory"
factory = "fed_numpy_trainer:make"
""")


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedpeft_edge.faces.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=service_env())


def _stop_and_time(proc: subprocess.Popen[bytes], sig: int) -> float:
    started = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(STOP_WITHIN_S + 5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        pytest.fail(f"still running {STOP_WITHIN_S + 5} s after signal {sig}")
    return time.monotonic() - started


@pytest.mark.slow  # > 1.4 s: the full suite runs it, the fast tier leaves it out
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("service", ["agent", "aggregate"])
def test_a_service_that_cannot_connect_stops_on_a_signal_and_says_why(service: str, sig: int,
                                                                       tmp_path: Path) -> None:
    port = free_port()  # nothing listens: the service keeps retrying
    config = (_agent_toml if service == "agent" else _aggregator_toml)(tmp_path, port)
    log = tmp_path / f"{service}.log"
    proc = spawn_cli([service, "--config", str(config)], log)
    wait_for(lambda: "cannot connect to" in log.read_text(errors="replace"), 60, "the first failure logged",
             procs=[proc], logs=tmp_path)
    took = _stop_and_time(proc, sig)
    text = log.read_text(errors="replace")
    assert took < STOP_WITHIN_S, f"{service} took {took:.1f} s to stop"
    assert proc.returncode == 0, text[-2000:]
    line = next(ln for ln in text.splitlines() if "cannot connect to" in ln)
    assert f"127.0.0.1:{port}" in line and "plain TCP" in line and "connection refused" in line
    assert "Traceback" not in text


@pytest.mark.slow  # > 1.4 s: the full suite runs it, the fast tier leaves it out
def test_a_waiting_agent_stops_on_sigterm_within_5_s(mosquitto_broker, tmp_path: Path) -> None:
    config = _agent_toml(tmp_path, mosquitto_broker.port, fleet="firstday-waiting")
    log = tmp_path / "agent.log"
    proc = spawn_cli(["agent", "--config", str(config)], log)
    wait_for(lambda: "connected to" in log.read_text(errors="replace"), 60, "the agent connected",
             procs=[proc], logs=tmp_path)
    time.sleep(0.5)
    assert _stop_and_time(proc, signal.SIGTERM) < STOP_WITHIN_S
    assert proc.returncode == 0


def test_missing_config_file_is_one_line_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "site.toml"
    result = _run(["agent", "--config", str(missing)])
    assert result.returncode == 2
    errors = [ln for ln in result.stderr.splitlines() if "ERROR" in ln]
    assert len(errors) == 1 and str(missing) in errors[0] and "not found" in errors[0]
    assert "Traceback" not in result.stderr


def test_missing_password_file_is_one_line_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "secrets" / "site-1.pw"
    config = _agent_toml(tmp_path, free_port(), extra_connection=f'username = "site-1"\n'
                                                                  f'password_file = "{missing}"')
    result = _run(["agent", "--config", str(config)])
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [ln for ln in result.stderr.splitlines() if "ERROR" in ln]
    assert len(errors) == 1 and str(missing) in errors[0] and "password file" in errors[0]
    assert "Traceback" not in result.stderr


def test_missing_ca_file_is_one_line_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "pki" / "ca.crt"
    config = _agent_toml(tmp_path, free_port(), extra_connection=f'tls_ca = "{missing}"')
    result = _run(["agent", "--config", str(config)])
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [ln for ln in result.stderr.splitlines() if "ERROR" in ln]
    assert len(errors) == 1 and str(missing) in errors[0] and "TLS CA file" in errors[0]


def test_broker_on_a_busy_port_is_one_line_exit_2(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        result = _run(["broker", "--port", str(port), "--prefer", "mosquitto"], timeout=60)
    finally:
        busy.close()
    assert result.returncode == 2
    errors = [ln for ln in result.stderr.splitlines() if "ERROR" in ln]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "already in use" in errors[0]
    assert "running" not in result.stderr  # it never claims to be up


def test_plant_broker_with_a_missing_key_file_is_one_line_exit_2(plant_pki, tmp_path: Path) -> None:
    missing = tmp_path / "server.key"
    result = _run(["broker", "--kind", "plant", "--port", "0", "--cafile", str(plant_pki.ca), "--certfile",
                   str(plant_pki.server_cert), "--keyfile", str(missing), "--password-file",
                   str(plant_pki.password_file)], timeout=60)
    assert result.returncode == 2
    errors = [ln for ln in result.stderr.splitlines() if "ERROR" in ln]
    assert len(errors) == 1 and str(missing) in errors[0] and "--keyfile" in errors[0]


@pytest.mark.slow  # starts and stops a real agent twice
def test_status_shows_the_fleet(mosquitto_broker, tmp_path: Path) -> None:
    fleet = "firstday-status"
    agent_log, agg_log = tmp_path / "agent.log", tmp_path / "agg.log"
    procs = [spawn_cli(["agent", "--config", str(_agent_toml(tmp_path, mosquitto_broker.port, fleet=fleet))],
                       agent_log)]
    try:
        wait_for(lambda: "connected to" in agent_log.read_text(errors="replace"), 60, "the agent connected",
                 procs=procs, logs=tmp_path)
        result = _run(["status", "--port", str(mosquitto_broker.port), "--fleet", fleet, "--wait", "1.5"])
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"fleet {fleet}: 1 service(s)" in result.stdout
        line = next(ln for ln in result.stdout.splitlines() if "site-1" in ln)
        assert "online" in line or "waiting" in line or "idle" in line
        procs[0].send_signal(signal.SIGTERM)
        procs[0].wait(10)
        result = _run(["status", "--port", str(mosquitto_broker.port), "--fleet", fleet, "--wait", "1.5",
                       "--json"])
        assert '"state": "offline"' in result.stdout and '"id": "site-1"' in result.stdout
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    assert "Traceback" not in agent_log.read_text(errors="replace") + agg_log.read_text(errors="replace") \
        if agg_log.exists() else "Traceback" not in agent_log.read_text(errors="replace")


def test_a_broker_that_mosquitto_refuses_is_one_line_exit_2(plant_pki, tmp_path: Path) -> None:
    """A certificate file that is not a certificate: Mosquitto exits at start; its reason, on one line."""
    bogus = tmp_path / "server.crt"
    bogus.write_text("not a certificate\n")
    result = _run(["broker", "--kind", "plant", "--port", "0", "--prefer", "mosquitto", "--cafile",
                   str(plant_pki.ca), "--certfile", str(bogus), "--keyfile", str(plant_pki.server_key),
                   "--password-file", str(plant_pki.password_file)], timeout=60)
    assert result.returncode == 2
    errors = [ln for ln in result.stderr.splitlines() if "ERROR" in ln]
    # Mosquitto may open its port before it reads the certificate: then the launcher saw it listening
    # and reports it exiting on its own; either way one line, with Mosquitto's reason
    assert len(errors) == 1, result.stderr[-2000:]
    assert "mosquitto exited with code" in errors[0] or "exited on its own" in errors[0], errors[0]
    assert "Error" in errors[0]  # Mosquitto's own reason is in the line
