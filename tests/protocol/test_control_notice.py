"""The operator's control command (protocol/notices.py): strict JSON, size-capped, unknown keys refused."""

from __future__ import annotations

import json

import pytest

from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol.reasons import WireFormatError
from fedpeft_edge.protocol.topics import Topics

CID = "0123456789abcdef0123456789abcdef"


def _obj(**kw: object) -> bytes:
    base = {"v": 1, "t": "control", "id": CID, "action": "pause", "site": None, "by": "alice", "time": 1.5}
    base.update(kw)
    return json.dumps(base).encode()


def test_round_trip_every_action() -> None:
    for action, site in (("pause", None), ("resume", None), ("pause", "site-1"), ("resume", "site-1"),
                         ("exclude", "site-1"), ("include", "site-1"), ("close_round", None)):
        cmd = notices.ControlCommand(CID, action, site, "alice", 1764590000.25)
        assert notices.decode_control(notices.encode_control(cmd)) == cmd
    assert Topics("line-3").control == "fedpeft/line-3/control"


@pytest.mark.parametrize("data", [
    _obj(extra=1),                                   # unknown key
    _obj(action="reboot"),                           # unknown action
    _obj(action="exclude"),                          # exclude names a site
    _obj(action="close_round", site="site-1"),       # close_round is for the whole federation
    _obj(site="a/b"),                                # not a topic-safe site id
    _obj(by=""),                                     # operator name required
    _obj(id="short"),                                # id too short
    _obj(id=7),                                      # id must be a string
    _obj(time=-1),                                   # time >= 0
    _obj(t="status"),                                # wrong kind
    _obj(v=2),                                       # unknown version
    b'{"v":1,"v":1}',                                # duplicate key
    b"[]",                                           # not an object
    b"",                                             # empty
    _obj(by="x" * 600),                              # over the size cap
])
def test_hostile_commands_are_refused(data: bytes) -> None:
    with pytest.raises(WireFormatError):
        notices.decode_control(data)


def test_confirmation_detail_names_the_command() -> None:
    cmd = notices.ControlCommand(CID, "pause", None, "alice", 1.0)
    detail = cmd.note("paused by operator alice")
    assert detail == f"paused by operator alice (cmd {CID})"
    assert notices.command_id_in(detail) == CID
    assert notices.command_id_in("paused: outside training window 22:00-06:00") is None
    notices.encode_status(notices.StatusMessage("aggregator", "paused", 1.0, 0, detail=detail))  # fits
