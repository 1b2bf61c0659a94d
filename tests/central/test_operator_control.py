"""Operator actions on the aggregator (central/control.py) and the agent (site/control.py), without MQTT:
pause holds the round (deadline clock paused), resume continues, exclude/include, close_round, the audit
log, idempotence by command id, and the state surviving a restart. The MQTT runs are in
test_operator_control_service.py."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from fedpeft_edge.central import core as R
from fedpeft_edge.central.acks import AckQueue
from fedpeft_edge.central.control import FederationControl
from fedpeft_edge.protocol import codec as C
from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol import wire as W
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.site.encoder import UpdateEncoder

N, SPEC, FLEET = 50, "feedc0de" * 4, "plant-a"
_ids = iter(f"{i:032x}" for i in range(1, 10_000))


def _cmd(action: str, site: str | None = None, by: str = "alice") -> bytes:
    return notices.encode_control(notices.ControlCommand(next(_ids), action, site, by, 1.0))


def _msg(client: str, rnd: int = 0) -> W.UpdateMessage:
    enc = UpdateEncoder(C.CodecConfig(mode="fp32"), N).encode(np.full(N, 0.1, np.float32))
    return W.UpdateMessage(FLEET, rnd, client, SPEC, 10, {}, enc)


def _service(tmp: Path, **cfg: object) -> SimpleNamespace:
    conf = R.AggregatorConfig(**{"fleet": FLEET, "n_params": N, "spec_hash": SPEC, "min_clients": 1,
                                 "quorum": 2, "round_deadline_s": 10.0, **cfg})  # type: ignore[arg-type]
    core = R.AggregatorCore(conf, tmp, initial_global=np.zeros(N, np.float32), now=0.0)
    svc = SimpleNamespace(core=core, rejections=Counter(), acks=AckQueue(Topics(FLEET), W.DEFAULT_LIMITS),
                          transport=None, paused=False)
    svc.control = FederationControl(tmp, Topics(FLEET), "aggregator")
    return svc


def _offer(svc: SimpleNamespace, client: str, rnd: int = 0, now: float = 1.0) -> str:
    upd = _msg(client, rnd)
    if svc.control.excluded_update(svc.core, client, upd):
        return svc.control.reject_excluded(svc, client, upd, 100)
    return svc.core.offer(upd, sender=client, now=now).status


def _events(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "events.jsonl").read_text().splitlines()]


def test_pause_holds_the_round_and_resume_keeps_the_time_left(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    ctl = svc.control
    assert _offer(svc, "a", now=1.0) == "accepted"
    assert ctl.take(svc, _cmd("pause"), now=4.0) == "control"
    assert svc.control.status(0).state == "paused" and "paused by operator alice" in ctl.note
    assert _offer(svc, "b", now=5.0) == "accepted"  # still counted (and acked) while paused
    assert not ctl.should_close(svc, 100.0) and svc.paused  # quorum and deadline both reached: held
    assert ctl.take(svc, _cmd("resume", by="bob"), now=100.0) == "control"
    # Paused at 4 with 6 s left: the round's start moves by the 96 s paused, so the deadline is at 106.
    assert svc.core.round_started_at == 96.0
    assert ctl.should_close(svc, 100.0)  # quorum: closes at once now
    ev = _events(tmp_path)
    assert [(e["action"], e["by"], e["result"]) for e in ev] == [("pause", "alice", "applied"),
                                                                 ("resume", "bob", "applied")]


def test_exclude_rejects_until_include(tmp_path: Path) -> None:
    svc = _service(tmp_path, quorum=3)
    svc.control.take(svc, _cmd("exclude", "b"), now=1.0)
    assert _offer(svc, "b") == "rejected"
    assert svc.core.counters["rejected:excluded"] == 1 and svc.rejections["excluded"] == 1
    acks = [(a.site, a.status, a.reason) for a in svc.acks._pending.values()]
    assert acks == [("b", "rejected", "excluded")]
    assert _offer(svc, "a") == "accepted"
    svc.control.take(svc, _cmd("include", "b"), now=2.0)
    assert _offer(svc, "b") == "accepted" and svc.core.accepted_this_round == 2


def test_close_round_needs_min_clients(tmp_path: Path) -> None:
    svc = _service(tmp_path, quorum=5, min_clients=2)
    assert svc.control.take(svc, _cmd("close_round"), now=1.0) == "control_refused"
    assert "refused" in svc.control.note and "min_clients is 2" in svc.control.note
    assert not svc.control.should_close(svc, 2.0)
    _offer(svc, "a")
    _offer(svc, "b")
    assert svc.control.take(svc, _cmd("close_round"), now=3.0) == "control"
    assert svc.control.should_close(svc, 3.0)  # now, well before the deadline
    assert not svc.control.should_close(svc, 3.0)  # once
    assert [e["result"] for e in _events(tmp_path)] == ["refused", "applied"]


def test_a_replayed_command_is_applied_once_and_state_survives_a_restart(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    pause, exclude = _cmd("pause"), _cmd("exclude", "b")
    svc.control.take(svc, pause, now=1.0)
    svc.control.take(svc, exclude, now=2.0)
    svc.control.take(svc, _cmd("include", "b"), now=3.0)
    assert svc.control.take(svc, exclude, now=4.0) == "control_duplicate"  # a redelivered copy
    assert "b" not in svc.control.excluded and len(_events(tmp_path)) == 3
    svc.control.take(svc, _cmd("exclude", "c"), now=5.0)

    again = FederationControl(tmp_path, Topics(FLEET), "aggregator")  # a restart
    assert again.paused is not None and again.paused["by"] == "alice"
    assert again.excluded == {"c": "alice"}
    assert again.status(0).state == "paused"
    svc.control = again
    assert again.take(svc, pause, now=6.0) == "control_duplicate"
    assert len(_events(tmp_path)) == 4


def test_unreadable_state_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / "control.json").write_text("{not json")
    ctl = FederationControl(tmp_path, Topics(FLEET), "aggregator")
    assert ctl.paused is None and not (tmp_path / "control.json").exists()
