"""The agent under its governor and across federations, through a real Mosquitto and in-process.

Real broker, scripted aggregator (plain clients): a training window closed by a fake clock → the site's
retained status is "paused" with the reason and no update is sent; the window opens → it trains and the
update is delivered once. The final global does not end the agent (``exit_after_final = false``, the
default): it says "done", trains a continuation round, and after another final joins a new federation
whose rounds start again at 0. Then it stops within 5 s. The CLI agent stops within 5 s of SIGTERM while
paused and while training.

In-process (a fake transport): a round paused after some steps ends with them and its update is committed
before the site sits paused, so a restart from the state dir (what kill -9 leaves) finds everything; a
round paused before its first step waits; the outbox and sent/ stay bounded; forgetting a finished
federation survives a kill in the middle.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import signal
import threading
import time
from pathlib import Path

import fed_numpy_trainer as fnt
import mqtt_fixtures as mf
import numpy as np
import pytest

from fedpeft_edge.central.broker import BrokerHandle
from fedpeft_edge.protocol import notices, wire
from fedpeft_edge.protocol.codec import encode_global
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig
from fedpeft_edge.site.agent import WAITING_DETAIL, EdgeAgent
from fedpeft_edge.site.config import load_agent_config
from fedpeft_edge.site.governor import Governor

SPEC = "00112233aabbccdd"
N = fnt.FEATURES * fnt.CLASSES + fnt.CLASSES


class FakeClock:
    def __init__(self, hh: int) -> None:
        self.t = dt.datetime(2025, 3, 14, hh, 0)

    def set(self, hh: int) -> None:
        self.t = self.t.replace(hour=hh)

    def __call__(self) -> dt.datetime:
        return self.t


WINDOW = 'windows = ["22:00-06:00"]\n'


def _config(tmp: Path, fleet: str, port: int = 1883, extra_agent: str = "",
            governor: str = WINDOW + "check_interval_s = 0.05"):
    return load_agent_config(text=f"""
[connection]
port = {port}
[fleet]
name = "{fleet}"
[agent]
client_id = "site-0"
state_dir = "{tmp}/site-0"
resend_after_s = 30
drain_timeout_s = 2
{extra_agent}
[codec]
mode = "fp32"
[governor]
{governor}
""")


def _global(fleet: str, rnd: int, final: bool = False) -> wire.GlobalMessage:
    return wire.GlobalMessage(fleet, rnd, SPEC, encode_global(np.full(N, 0.01 * rnd, np.float32)),
                              {"final": final})


class ScriptedAggregator:
    """Publishes globals, collects updates and the site's statuses, acks what it is told to."""

    def __init__(self, broker: BrokerHandle, fleet: str) -> None:
        self.topics = Topics(fleet)
        self.fleet = fleet
        self.t = MqttTransport(TransportConfig(host=broker.host, port=broker.port,
                                               client_id=f"agg-{fleet}", clean_start=True))
        self.t.subscribe(self.topics.updates_filter)
        self.t.subscribe(self.topics.status("site-0"))
        self.t.connect(10)
        self.updates: list[wire.UpdateMessage] = []
        self.statuses: list[notices.StatusMessage] = []

    def publish_global(self, rnd: int, final: bool = False) -> None:
        assert self.t.publish(self.topics.global_, wire.encode_global(_global(self.fleet, rnd, final)),
                              retain=True).wait(5)

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            m = self.t.get(0.02)
            if m is None:
                continue
            if m.topic == self.topics.status("site-0"):
                if m.payload:
                    self.statuses.append(notices.decode_status(m.payload))
            else:
                self.updates.append(wire.decode_update(m.payload))

    def wait(self, cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            self.pump(0.05)
        raise AssertionError(f"timed out waiting for {what}; statuses "
                             f"{[(s.state, s.round, s.detail) for s in self.statuses[-8:]]}, "
                             f"updates {[u.round for u in self.updates]}")

    def ack(self, rnd: int) -> None:
        ack = notices.AckMessage(self.fleet, "site-0", rnd, "accepted", "", time.time())
        assert self.t.publish(self.topics.ack("site-0"), notices.encode_ack(ack)).wait(5)

    def last_status(self) -> tuple[str, str] | None:
        return (self.statuses[-1].state, self.statuses[-1].detail) if self.statuses else None

    def close(self) -> None:
        self.t.publish(self.topics.global_, b"", retain=True).wait(5)
        self.t.publish(self.topics.status("site-0"), b"", retain=True).wait(5)
        self.t.close()


@pytest.mark.slow  # a federation over real Mosquitto
def test_closed_window_pauses_open_window_trains_once_and_the_agent_outlives_its_federation(
        mosquitto_broker: BrokerHandle, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fleet = "governed"
    agg = ScriptedAggregator(mosquitto_broker, fleet)
    cfg = _config(tmp_path, fleet, mosquitto_broker.port)
    assert cfg.agent.exit_after_final is False  # the default: a service outlives its federation
    s = fnt.make(cfg)
    agent = EdgeAgent(cfg, s.trainer, s.train_batches_fn, s.eval_batches_fn)
    clock = FakeClock(12)  # noon: outside 22:00-06:00
    agent.governor = Governor.from_settings(cfg.governor, clock=clock)  # the injected clock
    caplog.set_level(logging.INFO, logger="fedpeft_edge.site.agent")
    result: list[object] = []
    runner = threading.Thread(target=lambda: result.append(agent.run(connect_timeout=10)), daemon=True)
    agg.publish_global(0)
    runner.start()
    try:
        agg.wait(lambda: agg.last_status() == ("paused", "outside training window 22:00-06:00"), 10,
                 "status paused")
        agg.pump(1.0)
        assert agg.updates == [] and agent.rounds_sent == [] and runner.is_alive()
        assert not any((tmp_path / "site-0" / "outbox").iterdir())

        clock.set(23)  # the window opens: training resumes by itself
        agg.wait(lambda: len(agg.updates) == 1, 10, "the round-0 update")
        assert agg.updates[0].round == 0 and [s.state for s in agg.statuses][-3:] == [
            "online", "training", "uploading"]
        agg.ack(0)
        agg.pump(1.0)
        assert len(agg.updates) == 1 and agent.resends == 0  # delivered once
        assert not any((tmp_path / "site-0" / "outbox").iterdir())

        # The final round: the agent says so and stays.
        agg.publish_global(1, final=True)
        agg.wait(lambda: agg.last_status() == ("done", WAITING_DETAIL), 10, "status done")
        agg.pump(0.5)
        assert runner.is_alive() and agent.rounds_sent == [0]
        state = json.loads((tmp_path / "site-0" / "state.json").read_text())
        assert state["final_round"] == 1

        # The aggregator goes on (more rounds): a continuation round is trained.
        agg.publish_global(2)
        agg.wait(lambda: [u.round for u in agg.updates] == [0, 2], 10, "the round-2 update")
        agg.ack(2)
        agg.publish_global(3, final=True)
        agg.wait(lambda: agg.last_status() == ("done", WAITING_DETAIL), 10, "done again")

        # A new federation (a fresh aggregator run): rounds start again at 0, and the site joins it.
        agg.publish_global(0)
        agg.wait(lambda: [u.round for u in agg.updates] == [0, 2, 0], 10, "the new federation's round 0")
        assert "a new federation starts at round 0 (the last one ended at round 3)" in caplog.text
        agg.ack(0)
        agg.pump(0.5)
        assert runner.is_alive() and agent.rounds_sent == [0, 2, 0]
        t_stop = time.monotonic()
        agent.stop()
        runner.join(10)
        stop_s = time.monotonic() - t_stop
        assert not runner.is_alive() and stop_s < 5, stop_s
        print(f"\nin-process agent stopped {stop_s:.2f} s after stop()")
    finally:
        agent.stop()
        runner.join(10)
        agg.close()
    assert result and result[0].reason == "stopped" and result[0].final_seen  # type: ignore[attr-defined]


@pytest.mark.slow  # two CLI agents started and stopped
@pytest.mark.parametrize("phase", ["paused", "training"])
def test_cli_agent_stops_within_5_s_of_sigterm(mosquitto_broker: BrokerHandle, tmp_path: Path,
                                                phase: str) -> None:
    """The number behind the units' TimeoutStopSec: SIGTERM → process gone, "offline" published."""
    fleet = f"sigterm-{phase}"
    agg = ScriptedAggregator(mosquitto_broker, fleet)
    now = dt.datetime.now()
    closed = f"{(now.hour + 3) % 24:02d}:00-{(now.hour + 4) % 24:02d}:00"  # a window hours away
    window = f'windows = ["{closed}"]' if phase == "paused" else ""
    cfg = mf.write_toml(tmp_path / "site.toml", f"""
[connection]
port = {mosquitto_broker.port}
[fleet]
name = "{fleet}"
[agent]
client_id = "site-0"
state_dir = "{tmp_path}/site-0"
evaluate = false
[codec]
mode = "fp32"
[trainer]
kind = "factory"
factory = "fed_numpy_trainer:make"
options = {{ step_delay_s = 0.5 }}
[governor]
{window}
check_interval_s = 0.5
""")
    agg.publish_global(0)
    proc = mf.spawn_cli(["agent", "--config", str(cfg)], tmp_path / "site.log")
    try:
        agg.wait(lambda: agg.last_status() is not None and agg.last_status()[0] == phase, 60, phase)
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        took = time.monotonic() - t0
        agg.wait(lambda: agg.last_status() is not None and agg.last_status()[0] == "offline", 5, "offline")
    finally:
        mf.stop_all([proc])
        agg.close()
    log_text = (tmp_path / "site.log").read_text()
    assert proc.returncode == 0, log_text[-2000:]
    assert took < 5.0, (took, log_text[-2000:])
    print(f"\nCLI agent ({phase}): exited {took:.2f} s after SIGTERM")


# --- in-process: pausing mid-round, kill -9 while paused, bounded disk, forgetting a federation -----------
class _Handle:
    def is_published(self) -> bool:
        return True


class _FakeTransport:
    connected = True
    connect_count = 1

    def __init__(self) -> None:
        self.statuses: list[notices.StatusMessage] = []

    def max_payload(self, topic: str) -> int:
        return 1 << 20

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> _Handle:
        if "/status/" in topic:
            self.statuses.append(notices.decode_status(payload))
        return _Handle()


def _local_agent(tmp: Path, extra_agent: str = "", governor: str = "") -> EdgeAgent:
    cfg = _config(tmp, "local", extra_agent=extra_agent, governor=governor)
    s = fnt.make(cfg)
    agent = EdgeAgent(cfg, s.trainer, s.train_batches_fn, s.eval_batches_fn, spec_hash=SPEC)
    agent.transport = _FakeTransport()  # type: ignore[assignment]
    return agent


def test_pause_mid_round_commits_the_steps_done_and_a_restart_loses_nothing(tmp_path: Path) -> None:
    agent = _local_agent(tmp_path, "local_steps = 6", WINDOW + "check_interval_s = 0")
    calls = [0]

    def clock() -> dt.datetime:  # open for the first 3 checks (3 steps), then closed
        calls[0] += 1
        return dt.datetime(2025, 3, 14, 23 if calls[0] <= 3 else 12, 0)

    agent.governor = Governor.from_settings(agent.cfg.governor, clock=clock)
    agent._train_round(_global("local", 0))
    assert agent._governed(0) is True
    t = agent.transport
    assert [(s.state, s.detail.split(" 0.")[0]) for s in t.statuses] == [  # type: ignore[attr-defined]
        ("training", ""), ("uploading", "held-out accuracy"),
        ("paused", "outside training window 22:00-06:00")]
    [out] = agent._outgoing
    msg = wire.decode_update(out.data)
    assert msg.round == 0 and msg.metrics["steps"] == 3 and msg.num_samples == 3 * 16

    # What kill -9 while paused leaves: a new agent from the same state dir finds the update and the round.
    again = _local_agent(tmp_path, "local_steps = 6")
    assert again.last_sent_round == 0 and [e.data for e in again._outgoing] == [out.data]
    np.testing.assert_array_equal(again.encoder.residual, agent.encoder.residual)


def test_pause_before_the_first_step_waits_then_trains_the_whole_round(tmp_path: Path) -> None:
    agent = _local_agent(tmp_path, "local_steps = 4", WINDOW + "check_interval_s = 0")
    clock = FakeClock(12)
    agent.governor = Governor.from_settings(agent.cfg.governor, clock=clock)
    agent._train_round(_global("local", 0))  # closed at the first step: nothing sent, nothing on disk
    assert agent._outgoing == [] and agent.last_sent_round == -1
    assert not any((tmp_path / "site-0" / "outbox").iterdir())
    clock.set(2)
    assert agent._governed(0) is False
    agent._train_round(_global("local", 0))
    assert wire.decode_update(agent._outgoing[0].data).metrics["steps"] == 4


def test_outbox_and_sent_stay_bounded(tmp_path: Path) -> None:
    agent = _local_agent(tmp_path, "max_outbox_updates = 3\nmax_sent_updates = 2\ndump_updates = true")
    for r in range(6):  # no aggregator acknowledges anything
        agent._train_round(_global("local", r))
    names = sorted(f.name for f in (tmp_path / "site-0" / "outbox").iterdir())
    assert names == ["r00000003.msg", "r00000004.msg", "r00000005.msg"]
    assert [e.round for e in agent._outgoing] == [3, 4, 5]
    assert sorted(f.name for f in (tmp_path / "site-0" / "sent").iterdir()) == ["r00000004.msg",
                                                                              "r00000005.msg"]
    assert _local_agent(tmp_path).last_sent_round == 5  # the newest files stay: nothing is retrained


def test_forgetting_a_finished_federation_survives_a_kill_in_the_middle(tmp_path: Path) -> None:
    agent = _local_agent(tmp_path, "dump_updates = true")
    for r in (0, 1):
        agent._train_round(_global("local", r))
    agent._federation_done(_global("local", 2, final=True))
    new = _global("local", 0)
    # Killed after the files were forgotten, before state.json: the restart still sees the old federation...
    agent._files.forget_federation(agent.outbox_dir, agent.sent_dir)
    restarted = _local_agent(tmp_path, "dump_updates = true")
    assert restarted._final_round == 2 and restarted.last_sent_round == 1
    assert restarted._opens_federation(new)  # ...so it forgets it again when the new global comes
    restarted._start_federation(new)
    fresh = _local_agent(tmp_path, "dump_updates = true")
    assert fresh.last_sent_round == -1 and fresh._final_round is None and fresh._outgoing == []
    assert (tmp_path / "site-0" / "sent.previous").is_dir() and not (tmp_path / "site-0" / "sent").exists()
    assert not fresh._opens_federation(new)
