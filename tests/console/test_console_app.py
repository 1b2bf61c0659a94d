"""The console over real HTTP (uvicorn) and a real Mosquitto: login, sessions, CSRF, roles, actions.

Each test starts a ConsoleService on a free port, following a fleet of its own on the session's
Mosquitto; retained statuses, info cards and a federation report are published first, as the aggregator
and the agents would.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from console_client import ConsoleClient
from mqtt_fixtures import drain

from fedpeft_edge.console.auth import UserStore
from fedpeft_edge.console.config import load_console_config
from fedpeft_edge.console.server import ConsoleService
from fedpeft_edge.protocol import fleet_report as fr
from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig
from fedpeft_edge.runtime.errors import InvalidValueError

pytestmark = pytest.mark.slow  # ~1 s each (a server, a broker session, argon2); the fast tier has the units

OPERATOR = ("alice", "alice-password-1")
VIEWER = ("bob", "bob-password-12")
ACTIONS = [
    ("pause", None),
    ("resume", None),
    ("close_round", None),
    ("pause", "site-1"),
    ("resume", "site-1"),
    ("exclude", "site-2"),
    ("include", "site-2"),
]


def _users(path: Path) -> Path:
    store = UserStore(path, memory_cost=1024, time_cost=1)
    store.add(*OPERATOR, "operator")
    store.add(*VIEWER, "viewer")
    return path


def _report(fleet: str, now: float, rnd: int = 3, **over: object) -> fr.FederationReport:
    hist = tuple(
        fr.RoundRecord(r, 2, 1.0 / (r + 1), 0.5 + 0.1 * r, 0.45 + 0.1 * r, 60_000, 300_000, 40.0, now)
        for r in range(rnd)
    )
    fields = dict(
        fleet=fleet,
        time=now,
        round=rnd,
        max_rounds=5,
        finished=False,
        paused=False,
        pause_detail="",
        excluded=(),
        round_started_at=now - 20,
        deadline_s=600.0,
        quorum=2,
        min_clients=1,
        late_policy="drop",
        accepted=1,
        participants=("site-1",),
        spec="4f1c2d3e4f5a6b7c",
        bundle=None,
        version="0.1.0",
        n_params=74504,
        sites={
            "site-1": fr.SiteRecord(rnd, 1200, rnd - 1, now - 30, {}),
            "site-2": fr.SiteRecord(1, 400, 0, now - 300, {"stale_round": 2}, lora_rank=4),
        },
        history=hist,
        aggregation=("fedavg", "secagg"),
    )
    fields.update(over)
    return fr.FederationReport(**fields)  # type: ignore[arg-type]


class Fleet:
    """Publishes what the aggregator and agents would, retained, on one fleet of the test broker."""

    def __init__(self, port: int, fleet: str) -> None:
        self.topics = Topics(fleet)
        self.t = MqttTransport(
            TransportConfig(host="127.0.0.1", port=port, client_id=f"pub-{fleet}", clean_start=True)
        )
        self.t.connect(10)

    def status(self, site: str, state: str, rnd: int | None = 3, detail: str = "") -> None:
        msg = notices.StatusMessage(site, state, time.time(), rnd, detail=detail)
        assert self.t.publish(self.topics.status(site), notices.encode_status(msg), retain=True).wait(5)

    def info(self, site: str) -> None:
        card = fr.SiteInfo(
            site,
            None,
            "4f1c2d3e4f5a6b7c",
            "onnxruntime 1.32.0",
            "0.1.0",
            "Linux x86_64",
            "3.11.7",
            time.time(),
        )
        assert self.t.publish(self.topics.info(site), fr.encode_info(card), retain=True).wait(5)

    def report(self, rep: fr.FederationReport) -> None:
        assert self.t.publish(self.topics.federation, fr.encode_report(rep), retain=True).wait(5)

    def clear(self) -> None:  # retained messages must not leak into another test
        for topic in (
            self.topics.federation,
            *(
                f(s)
                for s in ("site-1", "site-2", "aggregator")
                for f in (self.topics.status, self.topics.info)
            ),
        ):
            self.t.publish(topic, b"", retain=True).wait(5)
        self.t.close()


@pytest.fixture
def console(mosquitto_broker, tmp_path: Path) -> Iterator[tuple[ConsoleService, Fleet, ConsoleClient]]:
    fleet_name = f"console-{secrets.token_hex(3)}"
    fleet = Fleet(mosquitto_broker.port, fleet_name)
    fleet.status("site-1", "training")
    fleet.status("site-2", "offline")
    fleet.status("aggregator", "online")
    fleet.info("site-1")
    fleet.report(_report(fleet_name, time.time()))
    cfg = load_console_config(
        text=(
            f'[connection]\nport = {mosquitto_broker.port}\n[fleet]\nname = "{fleet_name}"\n'
            f'[console]\nport = 0\nusers_file = "{_users(tmp_path / "users.json")}"\n'
            f'state_dir = "{tmp_path / "state"}"\n'
        )
    )
    svc = ConsoleService(cfg, sync_s=0.3)
    svc.start(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (svc.view.synced and len(svc.view.snapshot().sites) == 2):
        time.sleep(0.05)
    try:
        yield svc, fleet, ConsoleClient(svc.url.rstrip("/"))
    finally:
        svc.stop()
        fleet.clear()


def test_pages_need_a_login_and_show_the_fleet(console) -> None:
    _svc, _, client = console
    for path in ("/fleet", "/federation", "/events"):
        r = client.get(path)
        assert r.status == 303 and r.location.startswith("/login"), path
    assert client.get("/api/fleet").status == 401
    r = client.login(*OPERATOR)
    assert r.status == 303 and r.location == "/fleet"
    page = client.get("/fleet")
    assert page.status == 200
    assert re.search(r'data-site="site-1" data-state="training"', page.body)
    assert re.search(r'data-site="site-2" data-state="offline"', page.body)
    assert "onnxruntime 1.32.0" in page.body and "stale_round" in page.body
    assert page.body.count("LoRA rank 4") == 1  # site-2 trains rank 4; site-1 reported no rank
    fed = client.get("/federation").body
    assert 'data-round="3"' in fed and 'id="countdown"' in fed and 'id="chart-accuracy"' in fed
    assert re.search(r'id="aggregation">FedAvg \(weighted mean\) · secure aggregation: the aggregator sees '
                     r'only the sum<', fed)
    api = json.loads(client.get("/api/fleet").body)
    assert api["round"] == 3 and {s["id"] for s in api["sites"]} == {"site-1", "site-2"}


def test_session_cookie_is_httponly_secure_samesite_strict(console) -> None:
    _, _, client = console
    r = client.login(*OPERATOR)
    cookie = next(c for c in r.set_cookies if c.startswith("fedpeft_session="))
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite"} <= attrs and "samesite=strict" in cookie.lower()
    headers = client.get("/fleet").headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"


def test_wrong_password_is_refused_logged_and_throttled(console) -> None:
    svc, _, client = console
    for _ in range(5):
        r = client.login(OPERATOR[0], "not-the-password")
        assert r.status == 401 and "fedpeft_session" not in client.cookies
    r = client.login(*OPERATOR)  # even the right password waits out the lockout
    assert r.status == 429 and "fedpeft_session" not in client.cookies
    failed = [e for e in svc.events.recent(50) if e.kind == "login_failed"]
    assert len(failed) == 6 and all(e.by == OPERATOR[0] for e in failed)


def test_a_viewer_gets_403_on_every_action_and_nothing_reaches_the_broker(console, mosquitto_broker) -> None:
    svc, fleet, client = console
    spy = MqttTransport(
        TransportConfig(host="127.0.0.1", port=mosquitto_broker.port, client_id="spy", clean_start=True)
    )
    spy.subscribe(fleet.topics.control, qos=1)
    spy.connect(10)
    try:
        assert client.login(*VIEWER).status == 303
        csrf = client.csrf()
        for action, site in ACTIONS:
            form = {"csrf": csrf, "action": action, "back": "/fleet", **({"site": site} if site else {})}
            r = client.post("/action", form)
            assert r.status == 403, (action, site)
            assert 'id="forbidden"' in r.body
        assert drain(spy, 1.0) == []
    finally:
        spy.close()
    refused = [e for e in svc.events.recent(50) if e.kind == "action_refused"]
    assert len(refused) == len(ACTIONS) and {e.by for e in refused} == {VIEWER[0]}


def test_an_operator_action_is_published_audited_and_confirmed(console, mosquitto_broker) -> None:
    svc, fleet, client = console
    spy = MqttTransport(
        TransportConfig(host="127.0.0.1", port=mosquitto_broker.port, client_id="spy2", clean_start=True)
    )
    spy.subscribe(fleet.topics.control, qos=1)
    spy.connect(10)
    try:
        client.login(*OPERATOR)
        r = client.post(
            "/action", {"csrf": client.csrf(), "action": "pause", "site": "site-1", "back": "/fleet"}
        )
        assert r.status == 303 and "sent=" in r.location
        got = drain(spy, 1.0)
    finally:
        spy.close()
    assert len(got) == 1
    cmd = notices.decode_control(got[0][1])
    assert (cmd.action, cmd.site, cmd.by) == ("pause", "site-1", OPERATOR[0])
    audit = [e for e in svc.events.recent(50) if e.kind == "action"]
    assert audit and audit[0].data["command"] == cmd.id and audit[0].by == OPERATOR[0]
    # the events file has it too, written before the answer
    lines = [
        json.loads(x) for x in (Path(svc.cfg.console.state_dir) / "events.jsonl").read_text().splitlines()
    ]
    assert any(x["kind"] == "action" and x["data"]["command"] == cmd.id for x in lines)
    # the site confirms on its status: the view turns it into an event and the page shows it paused
    fleet.status("site-1", "paused", detail=cmd.note(f"paused by operator {cmd.by}"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(e.kind == "confirmed" for e in svc.events.recent(50)):
        time.sleep(0.05)
    assert any(e.kind == "confirmed" and e.site == "site-1" for e in svc.events.recent(50))
    assert re.search(r'data-site="site-1" data-state="paused"', client.get("/fleet").body)


def test_actions_need_the_csrf_token_and_the_same_origin(console, mosquitto_broker) -> None:
    svc, _fleet, client = console
    client.login(*OPERATOR)
    csrf = client.csrf()
    assert client.post("/action", {"action": "pause", "back": "/fleet"}).status == 400
    assert client.post("/action", {"csrf": "x" + csrf, "action": "pause", "back": "/fleet"}).status == 400
    cross = client.post(
        "/action",
        {"csrf": csrf, "action": "pause", "back": "/fleet"},
        headers={"Origin": "http://evil.example"},
    )
    assert cross.status == 400
    assert not [e for e in svc.events.recent(50) if e.kind == "action"]
    # a malformed action or site is refused before anything is sent
    r = client.post("/action", {"csrf": csrf, "action": "format_disk", "back": "/fleet"})
    assert r.status == 303 and "failed=" in r.location
    r = client.post("/action", {"csrf": csrf, "action": "exclude", "site": "a/b#", "back": "/fleet"})
    assert r.status == 303 and "failed=" in r.location


def test_no_open_redirect_after_login_or_language_switch(console) -> None:
    _, _, client = console
    page = client.get("/login?next=//evil.example/x")
    assert 'name="next" value="/fleet"' in page.body
    r = client.get("/lang/ja?back=https://evil.example/")
    assert r.status == 303 and r.location == "/fleet" and client.cookies.get("fedpeft_lang") == "ja"


def test_language_follows_the_browser_then_the_switch(console) -> None:
    _, _, client = console
    client.login(*OPERATOR)
    ja = client.get("/fleet", headers={"Accept-Language": "ja-JP,ja;q=0.9,en;q=0.5"}).body
    assert "拠点一覧" in ja and "LoRA ランク 4" in ja
    assert "Fleet" in client.get("/fleet", headers={"Accept-Language": "en-US"}).body
    client.get("/lang/ja?back=/fleet")
    assert 'lang="ja"' in client.get("/fleet", headers={"Accept-Language": "en-US"}).body


def test_removing_a_user_ends_their_session(console) -> None:
    svc, _, client = console
    client.login(*VIEWER)
    assert client.get("/fleet").status == 200
    UserStore(svc.cfg.console.users_file, memory_cost=1024, time_cost=1).remove(VIEWER[0])
    time.sleep(0.05)
    assert client.get("/fleet").status == 303


def test_logout_needs_csrf_and_ends_the_session(console) -> None:
    _, _, client = console
    client.login(*OPERATOR)
    csrf = client.csrf()
    client.post("/logout", {})  # no token: the session survives (a cross-site logout is refused)
    assert client.get("/fleet").status == 200
    client.post("/logout", {"csrf": csrf})
    assert client.get("/fleet").status == 303


def test_a_malformed_retained_message_is_counted_not_shown(console) -> None:
    svc, fleet, _client = console
    fleet.t.publish(fleet.topics.status("site-9"), b'{"v":1,"t":"status","site":"site-9"}', retain=True).wait(
        5
    )
    fleet.t.publish(
        fleet.topics.status("site-8"),
        notices.encode_status(notices.StatusMessage("site-1", "training", time.time())),
        retain=True,
    ).wait(5)  # another site's name
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and svc.view.snapshot().malformed < 2:
        time.sleep(0.05)
    snap = svc.view.snapshot()
    assert snap.malformed == 2 and {s.id for s in snap.sites} == {"site-1", "site-2"}
    for site in ("site-8", "site-9"):
        fleet.t.publish(fleet.topics.status(site), b"", retain=True).wait(5)


def test_plain_http_beyond_loopback_is_refused(tmp_path: Path) -> None:
    cfg = load_console_config(
        text=f'[console]\nbind = "0.0.0.0"\nusers_file = "{_users(tmp_path / "u.json")}"\n'
    )
    with pytest.raises(InvalidValueError, match="plain HTTP"):
        ConsoleService(cfg)


def test_no_users_is_a_clear_error(tmp_path: Path) -> None:
    cfg = load_console_config(text=f'[console]\nusers_file = "{tmp_path / "none.json"}"\n')
    with pytest.raises(InvalidValueError, match="console-user add"):
        ConsoleService(cfg)
