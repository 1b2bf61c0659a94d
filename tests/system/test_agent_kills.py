"""kill -9 of site agents at random moments through a whole federation, and crashes injected in the middle
of their state writes; every site is restarted from its state dir each time.

Real processes (the CLI aggregator and three CLI agents with the numpy trainer factory) over a real
Mosquitto. Two kinds of trial:

- kill: SIGKILL of a running agent after a random delay (whatever it was doing: training, writing its
  outbox, committing its state, waiting);
- injected: the agent is started with ``FEDPEFT_EDGE_TEST_CRASH`` (site/state.py) and ends itself with
  ``os._exit(9)`` half-way through, or right after, its n-th write of state.json / encoder.next.npz /
  trainer.state / its sent/ copy — windows too short to hit by timing — leaving a temp file, a torn file
  or an empty file behind.

What must hold: every agent comes back (no exit other than our kill or the injected one: no crash loop),
the run completes, every round is made of an update from every site, each (site, round) was published
with one set of bytes only (a site never re-makes a round it already sent, whatever file it lost), and
the aggregator counted each (site, round) exactly once: its global equals FedAvg recomputed from those
bytes.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import mqtt_fixtures as mf
import numpy as np
import pytest

from fedpeft_edge.central.broker import BrokerHandle, die_with_parent
from fedpeft_edge.central.store import RoundState
from fedpeft_edge.protocol import chunking, wire
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig
from fedpeft_edge.site.state import CRASH_ENV, CRASH_EXIT_CODE, KEEP_CORRUPT

FLEET = "kills"
SITES = 3
ROUNDS = 18  # <= the aggregator's history length (20): every round's participants stay checkable
MIN_TRIALS = 20
TARGET_TRIALS = 40  # disruption stops here so the run can finish
FEATURES = 8
N_PARAMS = FEATURES * 3 + 3
# (file glob, how, writes of that file before the crash); sent/ copies exist on site-0 only (dump_updates).
PLANS = [(f, how, n) for f, n in (("state.json", 2), ("encoder.next.npz", 1), ("trainer.state", 1))
         for how in ("mid", "torn", "empty", "after")] + [("r*.msg", "mid", 1), ("r*.msg", "after", 1)]


def _base(port: int, tmp: Path) -> str:
    return f"""
[connection]
port = {port}
reconnect_max_s = 1
[fleet]
name = "{FLEET}"
[aggregator]
state_dir = "{tmp}/agg"
max_rounds = {ROUNDS}
quorum = {SITES}
min_clients = {SITES}
round_deadline_s = 300
late_policy = "drop"
max_staleness = 4
initial_global = "{tmp}/initial.npy"
[codec]
mode = "topk_int8"
topk_ratio = 0.5
block = 16
[trainer]
kind = "factory"
factory = "fed_numpy_trainer:make"
options = {{ features = {FEATURES}, step_delay_s = 0.08 }}
"""


def _agent_toml(i: int, tmp: Path) -> str:
    # Only site-0 keeps sent/ copies: the others must find their last round without them.
    return f"""
[agent]
client_id = "site-{i}"
state_dir = "{tmp}/site-{i}"
dump_updates = {"true" if i == 0 else "false"}
idle_exit_s = 150
drain_timeout_s = 5
exit_after_final = true
[data]
client_index = {i}
batch_size = 16
"""


def _spawn(args: list[str], log_path: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = mf.service_env()
    env.pop(CRASH_ENV, None)
    env.update(extra_env or {})
    with open(log_path, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "fedpeft_edge.faces.cli", *args], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=str(mf.REPO_DIR),
                                preexec_fn=die_with_parent)


@dataclass
class _Site:
    index: int
    config: Path
    log: Path
    proc: subprocess.Popen | None = None
    plan: tuple[str, str, int] | None = None
    killed: bool = False
    done: bool = False
    starts: int = 0

    def start(self, plan: tuple[str, str, int] | None) -> None:
        self.plan, self.killed, self.starts = plan, False, self.starts + 1
        env = {CRASH_ENV: f"{plan[0]}:{plan[2]}:{plan[1]}"} if plan else None
        with open(self.log, "ab") as fh:
            fh.write(f"=== start {self.starts} plan={plan}\n".encode())
        self.proc = _spawn(["agent", "--config", str(self.config)], self.log, env)


@dataclass
class _Observer:
    """A passive subscriber to every site's update topic: what was really published, copies included."""

    broker: BrokerHandle
    payloads: dict[tuple[str, int], set[str]] = field(default_factory=lambda: defaultdict(set))
    envelopes: dict[tuple[str, int], bytes] = field(default_factory=dict)
    copies: int = 0
    chunked: int = 0

    def __post_init__(self) -> None:
        self._t = MqttTransport(TransportConfig(host=self.broker.host, port=self.broker.port,
                                                client_id="kill-test-observer", clean_start=True))
        self._t.subscribe(Topics(FLEET).updates_filter, qos=1)
        self._t.connect(10)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._t.get(0.1)
            if msg is None:
                continue
            if chunking.is_chunk(msg.payload):
                self.chunked += 1
                continue
            m = wire.decode_update(msg.payload)
            key = (m.client_id, m.round)
            self.payloads[key].add(hashlib.sha256(msg.payload).hexdigest())
            self.envelopes[key] = bytes(msg.payload)
            self.copies += 1

    def close(self) -> None:
        time.sleep(0.5)  # the last copies in flight
        self._stop.set()
        self._thread.join(5)
        self._t.close()


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@pytest.mark.slow  # about a minute of real processes; the fast tier leaves it to the full suite
def test_agents_killed_at_random_moments_keep_contributing(mosquitto_broker: BrokerHandle, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    seed = int(os.environ.get("KILL_TEST_SEED", "20240917"))
    rng = random.Random(seed)
    initial = (0.01 * np.random.default_rng(3).standard_normal(N_PARAMS)).astype(np.float32)
    np.save(tmp_path / "initial.npy", initial)
    base = _base(mosquitto_broker.port, tmp_path)
    agg_cfg = mf.write_toml(tmp_path / "agg.toml", base)
    observer = _Observer(mosquitto_broker)
    agg = _spawn(["aggregate", "--config", str(agg_cfg)], tmp_path / "agg.log")
    sites = [_Site(i, mf.write_toml(tmp_path / f"site-{i}.toml", base + _agent_toml(i, tmp_path)),
                   tmp_path / f"site-{i}.log") for i in range(SITES)]
    plans = list(PLANS)
    rng.shuffle(plans)
    kills, fired, planned = 0, Counter[str](), 0

    def next_plan(site: _Site) -> tuple[str, str, int] | None:
        nonlocal planned
        if agg.poll() is not None or kills + sum(fired.values()) >= TARGET_TRIALS or rng.random() < 0.4:
            return None
        for _ in range(len(plans)):
            plan = plans[planned % len(plans)]
            planned += 1
            if plan[0] != "r*.msg" or site.index == 0:
                return plan
        return None

    try:
        for s in sites:
            s.start(None)
        deadline = time.monotonic() + 300
        next_kill = time.monotonic() + rng.uniform(1.0, 2.0)
        while True:
            assert time.monotonic() < deadline, "federation did not finish in time:\n" + "\n".join(
                f"--- {p.name}\n{_tail(p)}" for p in sorted(tmp_path.glob("*.log")))
            agg_done = agg.poll() is not None
            for s in sites:
                assert s.proc is not None
                rc = s.proc.poll()
                if rc is None or s.done:
                    continue
                if rc == 0:
                    s.done = True
                    continue
                if s.killed and rc == -9:
                    pass
                elif s.plan is not None and rc == CRASH_EXIT_CODE:
                    fired[f"{s.plan[0]}:{s.plan[1]}"] += 1
                else:  # any other exit is a site that cannot start again
                    pytest.fail(f"site-{s.index} exited with {rc} (plan {s.plan}):\n{_tail(s.log)}")
                s.start(next_plan(s))
            if agg_done and all(s.done for s in sites):
                break
            now = time.monotonic()
            if now >= next_kill and not agg_done and kills + sum(fired.values()) < TARGET_TRIALS:
                live = [s for s in sites if s.proc is not None and s.proc.poll() is None and s.plan is None]
                if live:
                    victim = rng.choice(live)
                    victim.killed = True
                    victim.proc.kill()  # type: ignore[union-attr]
                    victim.proc.wait(10)  # type: ignore[union-attr]
                    kills += 1
                next_kill = now + rng.uniform(0.2, 1.0)
            time.sleep(0.05)
    finally:
        mf.stop_all([agg, *[s.proc for s in sites if s.proc is not None]])
        observer.close()

    assert agg.returncode == 0, _tail(tmp_path / "agg.log")
    trials = kills + sum(fired.values())
    state = RoundState.load(tmp_path / "agg")
    assert state is not None and state.round == ROUNDS
    names = [f"site-{i}" for i in range(SITES)]
    # Every site kept contributing: each round closed with an update from every site.
    assert len(state.history) == ROUNDS
    for m in state.history:
        assert sorted(m["participants"]) == names, m
    # Nothing twice, nothing re-made: one set of bytes per (site, round), each counted once.
    pairs = set(observer.payloads)
    assert pairs == {(n, r) for n in names for r in range(ROUNDS)}
    remade = {k: len(v) for k, v in observer.payloads.items() if len(v) > 1}
    assert not remade, f"(site, round) published with different bytes: {remade}"
    assert observer.chunked == 0
    assert state.counters["accepted"] == len(pairs) == SITES * ROUNDS
    ref = mf.reference_fedavg(initial, [[observer.envelopes[(n, r)] for n in names] for r in range(ROUNDS)])
    np.testing.assert_allclose(state.global_vec, ref, rtol=1e-5, atol=1e-6)

    logs = {s.index: s.log.read_text(errors="replace") for s in sites}
    assert not any("Traceback" in text for text in logs.values()), [i for i, t in logs.items()
                                                                      if "Traceback" in t]
    set_aside = sum(text.count("is unusable") for text in logs.values())
    assert trials >= MIN_TRIALS and kills >= 5, (kills, fired)
    by_file = Counter(k.split(":")[0] for k in fired)
    assert all(by_file[f] >= 1 for f in ("state.json", "encoder.next.npz", "trainer.state")), fired
    if any(k.endswith((":torn", ":empty")) and not k.startswith("encoder.next") for k in fired):
        assert set_aside >= 1  # a torn or empty state file was found, set aside, and the site went on
    for i in range(SITES):
        sdir = tmp_path / f"site-{i}"
        kept = Counter(p.name.split(".corrupt-")[0] for p in sdir.glob("*.corrupt-*"))
        assert all(v <= KEEP_CORRUPT for v in kept.values()), kept
        assert not list(sdir.glob(".*.tmp-*")), "a killed write's temp file was not cleared on restart"
    with capsys.disabled():
        print(f"\nagent kill trials: {trials} ({kills} kill -9 at random moments, {sum(fired.values())} "
              f"crashes injected in state writes: {dict(sorted(fired.items()))}); "
              f"{sum(s.starts for s in sites)} agent starts, {set_aside} damaged files set aside; "
              f"{ROUNDS} rounds x {SITES} sites, accepted {state.counters['accepted']}, duplicates "
              f"{state.counters.get('duplicate', 0)}, {observer.copies} update copies seen; seed {seed}")
