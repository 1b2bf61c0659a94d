"""Operator actions through a real Mosquitto: an aggregator and two numpy-trainer agents in-process, the
commands sent with the function behind ``fedpeft-edge control`` (faces/operator_control.py)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import fed_numpy_trainer as fnt
import mqtt_fixtures as mf
import numpy as np
import pytest

from fedpeft_edge.central.config import load_aggregator_config
from fedpeft_edge.central.service import AggregatorService
from fedpeft_edge.faces.fleet_status import StatusConfig
from fedpeft_edge.faces.operator_control import ControlOutcome, make_command, send_command
from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol.config import ConnectionSettings, FleetSettings
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig
from fedpeft_edge.site.agent import EdgeAgent
from fedpeft_edge.site.config import load_agent_config

N = fnt.FEATURES * fnt.CLASSES + fnt.CLASSES


def _base(port: int, fleet: str) -> str:
    return f'[connection]\nport = {port}\n[fleet]\nname = "{fleet}"\n'


def _aggregator(port: int, fleet: str, tmp: Path, policy: str) -> AggregatorService:
    cfg = load_aggregator_config(text=_base(port, fleet) + f'[aggregator]\nstate_dir = "{tmp}/agg"\n{policy}')
    return AggregatorService(cfg, initial_global=np.zeros(N, np.float32))


def _agent(port: int, fleet: str, tmp: Path, i: int) -> EdgeAgent:
    cfg = load_agent_config(text=_base(port, fleet) + f'[agent]\nclient_id = "site-{i}"\n'
                            f'state_dir = "{tmp}/site-{i}"\nidle_exit_s = 60\nexit_after_final = true\n'
                            f'drain_timeout_s = 5\n[data]\nclient_index = {i}\n')
    s = fnt.make(cfg)
    return EdgeAgent(cfg, s.trainer, s.train_batches_fn, s.eval_batches_fn)


def _start(target) -> threading.Thread:  # type: ignore[no-untyped-def]
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def _send(port: int, fleet: str, action: str, site: str | None = None, wait_s: float = 10.0
          ) -> ControlOutcome:
    cfg = StatusConfig(ConnectionSettings(port=port), FleetSettings(fleet))
    return send_command(cfg, make_command(action, site, "alice"), wait_s=wait_s)


def _events(tmp: Path) -> list[dict]:
    path = tmp / "agg" / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow  # ~10 s: a paused deadline, then a resumed round
def test_pause_holds_rounds_and_agents_resume_continues(mosquitto_broker, tmp_path: Path) -> None:
    port, fleet = mosquitto_broker.port, "opctl-pause"
    svc = _aggregator(port, fleet, tmp_path, "max_rounds = 1\nquorum = 3\nmin_clients = 1\n"
                                             "round_deadline_s = 3\n")
    agg = _start(svc.run)
    mf.wait_for(svc.serving.is_set, 15, "aggregator serving")
    opened = time.time()
    agents = [_agent(port, fleet, tmp_path, i) for i in range(2)]
    threads = [_start(a.run) for a in agents]
    try:
        mf.wait_for(lambda: all(a.transport is not None and a.transport.connected for a in agents), 15,
                    "agents connected")
        time.sleep(0.3)  # their SUBSCRIBE
        out = _send(port, fleet, "pause")
        assert out.complete and not out.refused
        assert out.confirmations[0].state == "paused"
        assert out.confirmations[0].detail.startswith("paused by operator alice (cmd ")
        detail = f"paused by operator alice (cmd {out.command.id})"
        mf.wait_for(lambda: all(a._status_now == ("paused", detail) for a in agents), 15, "agents paused")
        mf.wait_for(lambda: svc.core.accepted_this_round == 2, 15, "both updates kept while paused")
        time.sleep(4.0)  # past the 3 s deadline and min_clients reached: still no close
        assert svc.core.round == 0 and not svc.core.history and svc.control.paused is not None
        assert all(a.ack_counts["accepted"] == 1 for a in agents)  # acknowledged while paused
        out = _send(port, fleet, "resume")
        assert out.complete and out.confirmations[0].state == "online"
        agg.join(30)
        assert svc.core.finished and len(svc.core.history) == 1
        assert sorted(svc.core.history[0]["participants"]) == ["site-0", "site-1"]
        # The deadline clock stood still while paused (>= 4 s): the round closed after ~3 s unpaused.
        wall = time.time() - opened
        assert 2.9 <= svc.core.history[0]["duration_s"] <= wall - 3.5, (svc.core.history[0], wall)
        for t in threads:
            t.join(30)
        assert all(a.rounds_sent == [0] for a in agents)
        assert [e["action"] for e in _events(tmp_path)] == ["pause", "resume"]
    finally:
        svc.stop()
        for a in agents:
            a.stop()


@pytest.mark.slow  # an aggregator and agents over real Mosquitto
def test_exclude_include_close_round_and_replay(mosquitto_broker, tmp_path: Path) -> None:
    port, fleet = mosquitto_broker.port, "opctl-excl"
    svc = _aggregator(port, fleet, tmp_path, "max_rounds = 2\nquorum = 3\nmin_clients = 1\n"
                                             "round_deadline_s = 120\n")
    agg = _start(svc.run)
    mf.wait_for(svc.serving.is_set, 15, "aggregator serving")
    agents: list[EdgeAgent] = []
    replayer = MqttTransport(TransportConfig(host=mosquitto_broker.host, port=port, client_id="replayer"))
    replayer.connect(10)
    try:
        out = _send(port, fleet, "close_round")  # nothing accepted yet
        assert out.complete and out.refused and "min_clients is 1" in out.confirmations[0].detail
        exclude = make_command("exclude", "site-1", "alice")
        cfg = StatusConfig(ConnectionSettings(port=port), FleetSettings(fleet))
        assert send_command(cfg, exclude).complete
        agents = [_agent(port, fleet, tmp_path, i) for i in range(2)]
        threads = [_start(a.run) for a in agents]
        mf.wait_for(lambda: svc.core.accepted_this_round == 1 and agents[1].ack_counts["rejected"] == 1, 20,
                    "site-0 counted, site-1 rejected as excluded")
        assert svc.core.counters["rejected:excluded"] == 1
        assert _send(port, fleet, "include", "site-1").complete
        # The exclude again, byte for byte (a redelivered or retained copy): applied once only.
        assert replayer.publish(Topics(fleet).control, notices.encode_control(exclude)).wait(5)
        mf.wait_for(lambda: len(svc.control.seen) == 3 and "site-1" not in svc.control.excluded, 10,
                    "the replay ignored")
        time.sleep(0.3)
        assert "site-1" not in svc.control.excluded and len(_events(tmp_path)) == 3
        out = _send(port, fleet, "close_round")  # quorum (3) not reached: close now with one update
        assert out.complete and not out.refused
        mf.wait_for(lambda: svc.core.round == 1, 10, "round 0 closed now")
        assert svc.core.history[0]["participants"] == ["site-0"]
        mf.wait_for(lambda: svc.core.accepted_this_round == 2, 20, "both sites counted in round 1")
        assert _send(port, fleet, "close_round").complete
        agg.join(30)
        assert svc.core.finished and sorted(svc.core.history[1]["participants"]) == ["site-0", "site-1"]
        for t in threads:
            t.join(30)
        assert agents[1].rounds_sent == [0, 1] and agents[1].ack_counts["accepted"] == 1
        ev = _events(tmp_path)
        assert [(e["action"], e["result"]) for e in ev] == [
            ("close_round", "refused"), ("exclude", "applied"), ("include", "applied"),
            ("close_round", "applied"), ("close_round", "applied")]
        assert all(e["by"] == "alice" and e["time"] > 0 for e in ev)
    finally:
        replayer.close()
        svc.stop()
        for a in agents:
            a.stop()


@pytest.mark.slow  # ~5 s: two aggregator runs
def test_aggregator_restart_keeps_paused_and_excluded(mosquitto_broker, tmp_path: Path) -> None:
    port, fleet = mosquitto_broker.port, "opctl-restart"
    policy = "max_rounds = 1\nquorum = 1\nround_deadline_s = 1\n"
    svc = _aggregator(port, fleet, tmp_path, policy)
    agg = _start(svc.run)
    mf.wait_for(svc.serving.is_set, 15, "aggregator serving")
    assert _send(port, fleet, "pause").complete
    assert _send(port, fleet, "exclude", "site-1").complete
    svc.stop()
    agg.join(15)

    again = _aggregator(port, fleet, tmp_path, policy)
    assert again.control.paused is not None and again.control.excluded == {"site-1": "alice"}
    agg = _start(again.run)
    agents = [_agent(port, fleet, tmp_path, 0)]
    try:
        mf.wait_for(again.serving.is_set, 15, "aggregator serving again")
        st = {s.client_id: s for s in mf_statuses(port, fleet)}
        assert st["aggregator"].state == "paused"  # announced as paused after the restart
        threads = [_start(agents[0].run)]
        mf.wait_for(lambda: again.core.accepted_this_round == 1, 20, "site-0's update kept")
        time.sleep(1.5)  # quorum 1 and past the deadline: still held
        assert again.core.round == 0
        assert _send(port, fleet, "resume").complete
        agg.join(20)
        assert again.core.finished
        threads[0].join(30)
    finally:
        again.stop()
        agents[0].stop()


def mf_statuses(port: int, fleet: str) -> list[notices.StatusMessage]:
    from fedpeft_edge.faces.fleet_status import collect

    statuses, _ = collect(StatusConfig(ConnectionSettings(port=port), FleetSettings(fleet)), wait_s=1.0)
    return statuses


def test_agent_operator_pause_survives_a_restart(tmp_path: Path) -> None:
    """In-process: a pause persisted in the site's state dir holds after a restart; a resume lifts it."""
    agent = _agent(1883, "opctl-site", tmp_path, 0)
    cmd = make_command("pause", "site-0", "alice")
    agent.operator.take(notices.encode_control(cmd))
    agent.operator.take(notices.encode_control(make_command("pause", "site-9", "bob")))  # another site's
    assert agent.operator.check() == f"paused by operator alice (cmd {cmd.id})"
    again = _agent(1883, "opctl-site", tmp_path, 0)
    assert again.operator.check() == f"paused by operator alice (cmd {cmd.id})"
    assert again._governed(0) and again._status_now[0] == "paused"
    again.operator.take(notices.encode_control(make_command("resume", None, "carol")))  # federation only
    assert again.operator.check() is not None  # the site's own pause still holds
    again.operator.take(notices.encode_control(cmd))  # a replayed pause: ignored
    resume = make_command("resume", "site-0", "carol")
    again.operator.take(notices.encode_control(resume))
    assert again.operator.check() is None and not again._governed(0)
    assert again._status_now == ("online", f"resumed by operator carol (cmd {resume.id})")


def test_cli_control_reports_a_missing_confirmation(mosquitto_broker, capsys) -> None:
    from fedpeft_edge.faces.cli import main

    args = ["--port", str(mosquitto_broker.port), "--fleet", "opctl-cli", "--wait", "0.3"]
    assert main(["control", "pause", *args]) == 3  # published, but no aggregator runs to confirm it
    assert "sent pause as operator (cmd " in capsys.readouterr().out
    assert main(["control", "exclude", *args]) == 2  # exclude names a site
