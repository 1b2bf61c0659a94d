"""FedBuff over the real path: the CLI aggregator (``round_mode = "fedbuff"``, K = 2) and four CLI agents of
different speeds (numpy trainer factory; one site 6x slower per step than the others) over a real
Mosquitto started by the test.

What must hold: the aggregator stepped exactly every K accepted updates (every step in its state and its
metrics file holds K updates, the steps are consecutive), the slow site was counted while others were
ahead of it (some update counted with staleness >= 1), every counted (site, round) pair is one the site
really sent and is counted once, and the final global equals FedBuff recomputed offline from the
envelopes the sites sent: per step ``g += Σ n_i·s(τ_i)·Δ_i / Σ n_i`` with ``s(τ) = 1/sqrt(1+τ)``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import mqtt_fixtures as mf
import numpy as np
import pytest

from fedpeft_edge.central.broker import BrokerHandle, die_with_parent
from fedpeft_edge.central.store import RoundState
from fedpeft_edge.protocol import wire
from fedpeft_edge.protocol.codec import decode_dense

FLEET = "fedbuff"
SITES = 4
K = 2
STEPS = 16  # server steps (<= the state's history of 20: every step stays checkable)
FEATURES = 8
N_PARAMS = FEATURES * 3 + 3
DELAYS = [0.01, 0.01, 0.01, 0.06]  # seconds per local step (5-8 steps per round): site-3 is the straggler


def _base(port: int, tmp: Path) -> str:
    return f"""
[connection]
port = {port}
reconnect_max_s = 1
[fleet]
name = "{FLEET}"
[aggregator]
state_dir = "{tmp}/agg"
max_rounds = {STEPS}
round_mode = "fedbuff"
buffer_k = {K}
max_staleness = 16
initial_global = "{tmp}/initial.npy"
final_linger_s = 10
# the lying-site bounds off, so the offline recomputation below is plain FedBuff
norm_median_multiplier = 0
norm_reject_multiplier = 0
samples_median_multiplier = 0
[codec]
mode = "fp32"
"""


def _agent_toml(i: int, tmp: Path) -> str:
    return f"""
[trainer]
kind = "factory"
factory = "fed_numpy_trainer:make"
options = {{ features = {FEATURES}, step_delay_s = {DELAYS[i]} }}
[agent]
client_id = "site-{i}"
state_dir = "{tmp}/site-{i}"
dump_updates = true
idle_exit_s = 60
drain_timeout_s = 10
exit_after_final = true
[data]
client_index = {i}
batch_size = 16
options = {{ samples = {100 + 20 * i} }}
"""


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "fedpeft_edge.faces.cli", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=mf.service_env(),
            cwd=str(mf.REPO_DIR),
            preexec_fn=die_with_parent,
        )


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@pytest.mark.slow  # real processes over Mosquitto, about 10-20 s
def test_fedbuff_aggregator_steps_every_k_and_counts_each_update_once(
    mosquitto_broker: BrokerHandle, tmp_path: Path
) -> None:
    initial = (0.01 * np.random.default_rng(5).standard_normal(N_PARAMS)).astype(np.float32)
    np.save(tmp_path / "initial.npy", initial)
    base = _base(mosquitto_broker.port, tmp_path)
    agg = _spawn(
        ["aggregate", "--config", str(mf.write_toml(tmp_path / "agg.toml", base))], tmp_path / "agg.log"
    )
    sites = [
        _spawn(
            [
                "agent",
                "--config",
                str(mf.write_toml(tmp_path / f"site-{i}.toml", base + _agent_toml(i, tmp_path))),
            ],
            tmp_path / f"site-{i}.log",
        )
        for i in range(SITES)
    ]
    procs = [agg, *sites]
    logs = "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted(tmp_path.glob("*.log")))
    try:
        deadline = time.monotonic() + 120
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted(tmp_path.glob("*.log")))
                pytest.fail(f"federation did not finish in time:\n{logs}")
            time.sleep(0.1)
    finally:
        mf.stop_all(procs)
    logs = "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted(tmp_path.glob("*.log")))
    assert [p.returncode for p in procs] == [0] * (SITES + 1), logs

    state = RoundState.load(tmp_path / "agg")
    assert state is not None and state.round == STEPS
    # The server stepped exactly every K accepted updates, in its state and in its metrics file.
    assert len(state.history) == STEPS
    assert [h["round"] for h in state.history] == list(range(STEPS))
    assert all(h["num_updates"] == K and len(h["staleness"]) == K for h in state.history), state.history
    lines = mf.read_metrics(tmp_path / "agg" / "metrics.jsonl")
    assert [m["round"] for m in lines] == list(range(STEPS)) and {m["num_updates"] for m in lines} == {K}
    assert state.counters["accepted"] == K * STEPS and state.counters["rounds_closed"] == STEPS

    # Which (site, round trained from) each step counted, from its participants and their staleness.
    counted = [
        (site, h["round"] - tau)
        for h in state.history
        for site, tau in zip(h["participants"], h["staleness"], strict=True)
    ]
    assert len(counted) == len(set(counted)), "an update was counted twice"
    sent = {
        (f"site-{i}", rnd): env
        for i in range(SITES)
        for rnd, env in mf.sent_updates(tmp_path / f"site-{i}").items()
    }
    assert set(counted) <= set(sent), set(counted) - set(sent)
    # Asynchrony was real: the straggler was counted, behind the others at least once.
    assert any(site == "site-3" for site, _ in counted)
    assert max(max(h["staleness"]) for h in state.history) >= 1
    # Fast sites trained again from the newest global at once: they sent more rounds than the straggler.
    per_site = {i: sum(1 for (s, _) in sent if s == f"site-{i}") for i in range(SITES)}
    assert min(per_site[i] for i in range(3)) > per_site[3], per_site

    # The final global is FedBuff recomputed offline from the sent envelopes (fp32, FedAvg server, lr 1).
    g = initial.astype(np.float64)
    for h in state.history:
        msgs = [
            wire.decode_update(sent[(site, h["round"] - tau)])
            for site, tau in zip(h["participants"], h["staleness"], strict=True)
        ]
        total = sum(m.num_samples for m in msgs)
        g = (
            g
            + sum(
                m.num_samples / np.sqrt(1 + tau) * decode_dense(m.update, g.size).astype(np.float64)
                for m, tau in zip(msgs, h["staleness"], strict=True)
            )
            / total
        )
    np.testing.assert_allclose(state.global_vec, g, rtol=1e-5, atol=1e-6)
    # Updates that came after the final step were answered, not counted (late, from the final state).
    agg_log = (tmp_path / "agg.log").read_text(errors="replace")
    assert "Traceback" not in agg_log, _tail(tmp_path / "agg.log")
