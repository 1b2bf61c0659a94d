"""Secure aggregation over the real path: the CLI aggregator with ``[secagg] enabled`` and four CLI agents
(numpy trainer factory) over a real Mosquitto started by the test.

What must hold:

- every round closes on a secure session (its id in the history and the global's meta), its participants
  are the survivors, and the final global equals FedAvg recomputed from the plain updates the sites
  audited (``sent/r<round>.secagg.npy``) over exactly those survivors — so each survivor's update was
  counted once and nobody else's;
- nothing the aggregator keeps on disk or receives holds a site's update in the clear (its journal and
  state hold masked vectors and the sums only);
- kill -9 of the aggregator at random moments of the four phases (>= 20 trials): each restart resumes the
  journalled session, and the same equality holds at the end (nothing lost, nothing counted twice);
- kill -9 of sites at random moments (>= 20 trials): a killed site drops out of its session (its update is
  counted only if its masked input got in), the rounds go on, and the same equality holds.
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import mqtt_fixtures as mf
import numpy as np
import pytest

from fedpeft_edge.central.broker import BrokerHandle
from fedpeft_edge.central.store import RoundState
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig

FLEET = "secure"  # + the test's own suffix: the broker is shared by the session, and retained messages
# of one test's fleet (its final global, its statuses) must not reach the next test's sites
SITES = 4
FEATURES = 8
N_PARAMS = FEATURES * 3 + 3
CLIP = 4.0  # SGD on softmax regression moves a weight by up to about 1 per round: nothing is clipped


def _fleet(tmp: Path) -> str:
    return f"{FLEET}-{abs(hash(str(tmp))) % 10**8}"


def _base(port: int, tmp: Path, rounds: int, phase_timeout_s: float = 20.0) -> str:
    sites = ", ".join(f'"site-{i}"' for i in range(SITES))
    return f"""
[connection]
port = {port}
reconnect_max_s = 1
[fleet]
name = "{_fleet(tmp)}"
[aggregator]
state_dir = "{tmp}/agg"
max_rounds = {rounds}
quorum = {SITES}
min_clients = 3
round_deadline_s = 30
initial_global = "{tmp}/initial.npy"
final_linger_s = 10
[secagg]
enabled = true
sites = [{sites}]
clip = {CLIP}
phase_timeout_s = {phase_timeout_s}
[codec]
mode = "fp32"
"""


def _agent_toml(i: int, tmp: Path, delay: float) -> str:
    return f"""
[trainer]
kind = "factory"
factory = "fed_numpy_trainer:make"
options = {{ features = {FEATURES}, step_delay_s = {delay} }}
[agent]
client_id = "site-{i}"
state_dir = "{tmp}/site-{i}"
dump_updates = true
idle_exit_s = 120
drain_timeout_s = 20
exit_after_final = true
[data]
client_index = {i}
batch_size = 16
options = {{ samples = {100 + 20 * i} }}
"""


def _logs(tmp: Path) -> str:
    def tail(p: Path) -> str:
        return "\n".join(p.read_text(errors="replace").splitlines()[-25:])

    return "\n".join(f"--- {p.name}\n{tail(p)}" for p in sorted(tmp.glob("*.log")))


def _start(tmp: Path, base: str, delay: float = 0.01) -> tuple[list, list[Path]]:
    agg_cfg = mf.write_toml(tmp / "agg.toml", base)
    site_cfgs = [mf.write_toml(tmp / f"site-{i}.toml", base + _agent_toml(i, tmp, delay))
                 for i in range(SITES)]
    agg = mf.spawn_cli(["aggregate", "--config", str(agg_cfg)], tmp / "agg.log")
    sites = [mf.spawn_cli(["agent", "--config", str(c)], tmp / f"site-{i}.log")
             for i, c in enumerate(site_cfgs)]
    return [agg, *sites], [agg_cfg, *site_cfgs]


def _check_recomputed(tmp: Path, initial: np.ndarray, rounds: int) -> RoundState:
    """The final global is FedAvg (server lr 1) over each round's survivors' audited plain updates."""
    state = RoundState.load(tmp / "agg")
    assert state is not None and state.round == rounds, _logs(tmp)
    assert [h["round"] for h in state.history] == list(range(rounds))
    g = initial.astype(np.float64)
    for h in state.history:
        if h.get("skipped"):
            assert h["num_updates"] == 0
            continue
        survivors = h["participants"]
        assert len(survivors) == len(set(survivors)) >= 3, h  # counted once each; never a sum of two
        assert h["secagg_session"] and not set(h["secagg_dropped"]) & set(survivors)
        plain = [np.load(tmp / s / "sent" / f"r{h['round']}.secagg.npy") for s in survivors]
        g += np.mean([np.clip(d.astype(np.float64), -CLIP, CLIP) for d in plain], axis=0)
    np.testing.assert_allclose(state.global_vec, g, rtol=0, atol=1e-5)
    return state


def _no_plain_update_at_the_aggregator(tmp: Path) -> None:
    """No file of the aggregator holds a site's plain update (as float32 bytes)."""
    blobs = [p.read_bytes() for p in (tmp / "agg").rglob("*") if p.is_file()]
    for site_dir in tmp.glob("site-*"):
        for f in (site_dir / "sent").glob("r*.secagg.npy"):
            raw = np.load(f).astype("<f4").tobytes()
            for blob in blobs:
                assert raw[:64] not in blob, f"{f} found in the aggregator's files"


def _wait(procs: list, tmp: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            pytest.fail(f"federation did not finish in time:\n{_logs(tmp)}")
        time.sleep(0.1)


@pytest.mark.slow  # real processes over Mosquitto, about 15 s
def test_secure_rounds_count_each_survivor_once_and_the_aggregator_sees_only_sums(
        mosquitto_broker: BrokerHandle, tmp_path: Path) -> None:
    rounds = 6
    initial = (0.01 * np.random.default_rng(7).standard_normal(N_PARAMS)).astype(np.float32)
    np.save(tmp_path / "initial.npy", initial)
    procs, _ = _start(tmp_path, _base(mosquitto_broker.port, tmp_path, rounds))
    # An attacker with site-1's credentials sends garbage and a forged message on site-1's secagg topic
    attacker = MqttTransport(TransportConfig(host="127.0.0.1", port=mosquitto_broker.port,
                                             client_id="attacker", clean_start=True))
    attacker.connect(10)
    try:
        topics = Topics(_fleet(tmp_path))
        agg_log = tmp_path / "agg.log"
        mf.wait_for(lambda: "secure round 1: session" in agg_log.read_text(errors="replace"), 60,
                    "the second round's session")  # the aggregator is subscribed and mid-federation
        for junk in (b"\x00" * 64, b"\x81\xa1t\xa6sa_adv", bytes(range(256)) * 40):
            assert attacker.publish(topics.secagg_up("site-1"), junk, qos=1).wait(5)
        _wait(procs, tmp_path, 180)
    finally:
        attacker.close()
        mf.stop_all(procs)
    assert [p.returncode for p in procs] == [0] * (SITES + 1), _logs(tmp_path)
    state = _check_recomputed(tmp_path, initial, rounds)
    agg_log = (tmp_path / "agg.log").read_text(errors="replace")
    refused = sum(v for k, v in state.counters.items() if k.startswith("rejected:secagg_"))
    assert "rejected (secagg_" in agg_log and refused == 3, state.counters
    assert all(h["participants"] == [f"site-{i}" for i in range(SITES)] for h in state.history)
    assert len({h["secagg_session"] for h in state.history}) == rounds
    _no_plain_update_at_the_aggregator(tmp_path)
    for i in range(SITES):  # every site learnt from the globals' meta that its update was counted
        log = (tmp_path / f"site-{i}.log").read_text(errors="replace")
        assert log.count("our update was counted") >= rounds - 1, log[-2000:]
    assert "Traceback" not in (tmp_path / "agg.log").read_text(errors="replace")


def _kill_trials(tmp: Path, procs: list, cfgs: list[Path], victims: list[int], trials: int,
                 rng: random.Random, wait_s: tuple[float, float]) -> int:
    """SIGKILL a random victim after a random delay, restart it from its config; returns the kills made.
    The delay counts from the restarted process's connection (its log says so), not from its spawn: on a
    loaded machine the start-up alone can outlast the delay, and kills must hit the protocol, not imports."""
    kills = 0
    while kills < trials and procs[0].poll() is None:
        time.sleep(rng.uniform(*wait_s))
        v = rng.choice(victims)
        if procs[v].poll() is not None:  # finished (an agent after the final round)
            continue
        procs[v].kill()
        procs[v].wait(10)
        kills += 1
        cmd = "aggregate" if v == 0 else "agent"
        log = tmp / ("agg.log" if v == 0 else f"site-{v - 1}.log")
        connected = log.read_text(errors="replace").count("connected to")
        procs[v] = mf.spawn_cli([cmd, "--config", str(cfgs[v])], log)
        def back(log: Path = log, before: int = connected, proc: subprocess.Popen = procs[v]) -> bool:
            return log.read_text(errors="replace").count("connected to") > before or proc.poll() is not None

        mf.wait_for(back, 120, f"{log.name}'s restart to connect")
    return kills


def _kill_run(tmp: Path, port: int, *, seed: int, victims: list[int], wait_s: tuple[float, float],
              delay: float, phase_timeout_s: float = 20.0) -> RoundState:
    """18 secure rounds with 22 random kill -9 of ``victims`` (0: the aggregator, i: site i - 1); checks
    that the kills happened and the federation ended cleanly and exactly; returns the final state."""
    rounds = 18  # <= the aggregator's history (20): every round stays checkable
    initial = (0.01 * np.random.default_rng(seed).standard_normal(N_PARAMS)).astype(np.float32)
    np.save(tmp / "initial.npy", initial)
    procs, cfgs = _start(tmp, _base(port, tmp, rounds, phase_timeout_s), delay=delay)
    try:
        kills = _kill_trials(tmp, procs, cfgs, victims, 22, random.Random(20261200 + seed), wait_s)
        _wait(procs, tmp, 300)
    finally:
        mf.stop_all(procs)
    assert kills >= 20, f"only {kills} kills before the federation ended:\n{_logs(tmp)}"
    assert procs[0].returncode == 0, _logs(tmp)
    assert "Traceback" not in (tmp / "agg.log").read_text(errors="replace")
    return _check_recomputed(tmp, initial, rounds)


@pytest.mark.slow  # real processes, 20+ aggregator kills: about 1 minute
def test_kill9_of_the_aggregator_mid_protocol_resumes_without_loss_or_double_count(
        mosquitto_broker: BrokerHandle, tmp_path: Path) -> None:
    # 0.25 s per local step: a round lasts 2-3 s, so the 22 kills land before the 18 rounds are done
    state = _kill_run(tmp_path, mosquitto_broker.port, seed=8, victims=[0], wait_s=(0.3, 2.0), delay=0.25)
    agg_log = (tmp_path / "agg.log").read_text(errors="replace")
    assert agg_log.count("resumed session") >= 5, "the kills never hit an open session"
    assert sum(1 for h in state.history if not h.get("skipped")) >= len(state.history) - 2, state.history


@pytest.mark.slow  # real processes, 20+ site kills: about 1 minute
def test_kill9_of_sites_drops_them_from_their_session_and_counts_each_update_at_most_once(
        mosquitto_broker: BrokerHandle, tmp_path: Path) -> None:
    state = _kill_run(tmp_path, mosquitto_broker.port, seed=9, victims=[1, 2, 3, 4], wait_s=(0.5, 2.5),
                      delay=0.15, phase_timeout_s=3.0)
    assert any(h.get("secagg_dropped") or len(h["participants"]) < SITES for h in state.history), \
        "no kill ever hit a session"
