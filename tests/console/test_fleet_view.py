"""The console's fleet model: display states, events from changes, alerts (no broker, a fake clock)."""

from __future__ import annotations

from fedpeft_edge.console.events import EventLog
from fedpeft_edge.console.fleet_view import AlertSettings, FleetView
from fedpeft_edge.protocol import fleet_report as fr
from fedpeft_edge.protocol.notices import StatusMessage


def _view(tmp_path=None, **alerts: float) -> FleetView:
    return FleetView("demo", EventLog(tmp_path), alerts=AlertSettings(**alerts), clock=lambda: 1000.0)  # type: ignore[arg-type]


def _rep(rnd: int, sites: dict[str, fr.SiteRecord], **over: object) -> fr.FederationReport:
    fields = dict(
        fleet="demo",
        time=1000.0,
        round=rnd,
        max_rounds=10,
        finished=False,
        paused=False,
        pause_detail="",
        excluded=(),
        round_started_at=990.0,
        deadline_s=60.0,
        quorum=2,
        min_clients=1,
        late_policy="drop",
        accepted=0,
        participants=(),
        spec="ab",
        bundle=None,
        version="0.1.0",
        n_params=10,
        sites=sites,
        history=tuple(fr.RoundRecord(r, 2) for r in range(rnd)),
    )
    fields.update(over)
    return fr.FederationReport(**fields)  # type: ignore[arg-type]


def _kinds(view: FleetView) -> list[str]:
    return [e.kind for e in reversed(view.events.recent())]


def test_states_map_to_what_the_plant_cares_about() -> None:
    v = _view()
    for site, state in [
        ("a", "training"),
        ("b", "uploading"),
        ("c", "idle"),
        ("d", "paused"),
        ("e", "offline"),
        ("f", "online"),
        ("g", "needs_bundle"),
    ]:
        v.on_status(site, StatusMessage(site, state, 1.0))
    got = {s.id: s.state for s in v.snapshot().sites}
    assert got == {
        "a": "training",
        "b": "training",
        "c": "waiting",
        "d": "paused",
        "e": "offline",
        "f": "online",
        "g": "needs_bundle",
    }


def test_the_retained_burst_is_a_baseline_then_changes_are_events() -> None:
    v = _view(rejection_rate=1.0)
    v.on_status("a", StatusMessage("a", "training", 1.0))
    v.on_report(_rep(1, {"a": fr.SiteRecord(1, 10, 0, 1.0, {"bad_keys": 1})}))
    assert _kinds(v) == []  # before end_sync: what was already so is not news
    v.end_sync()
    v.on_status("a", StatusMessage("a", "offline", 2.0))
    v.on_status("a", StatusMessage("a", "online", 3.0))
    v.on_status("b", StatusMessage("b", "online", 3.0))
    v.on_report(_rep(2, {"a": fr.SiteRecord(2, 20, 1, 2.0, {"bad_keys": 3, "stale_round": 1})}))
    assert _kinds(v) == ["left", "joined", "joined", "round_closed", "rejected", "rejected"]
    rej = {e.data["reason"]: e.data["count"] for e in v.events.recent() if e.kind == "rejected"}
    assert rej == {"bad_keys": 2, "stale_round": 1}  # the increase, not the total


def test_a_confirmation_is_one_event_per_command_and_site() -> None:
    v = _view()
    v.end_sync()
    for _ in range(3):  # re-delivered after reconnects
        v.on_status("a", StatusMessage("a", "paused", 1.0, detail="paused by operator x (cmd 0123456789ab)"))
    v.on_status(
        "aggregator", StatusMessage("aggregator", "paused", 1.0, detail="paused by x (cmd 0123456789ab)")
    )
    assert [(e.kind, e.site) for e in reversed(v.events.recent()) if e.kind == "confirmed"] == [
        ("confirmed", "a"),
        ("confirmed", "aggregator"),
    ]
    assert v.snapshot().aggregator is not None and all(s.id != "aggregator" for s in v.snapshot().sites)


def test_silent_site_alert_raised_once_and_cleared() -> None:
    v = _view(silent_rounds=2)
    v.end_sync()
    v.on_status("a", StatusMessage("a", "training", 1.0))
    v.on_status("b", StatusMessage("b", "training", 1.0))
    for rnd in range(1, 6):
        v.on_report(
            _rep(
                rnd,
                {"a": fr.SiteRecord(rnd, 10 * rnd, rnd - 1, 1.0, {}), "b": fr.SiteRecord(1, 10, 0, 1.0, {})},
            )
        )
    alerts = [e for e in v.events.recent() if e.kind == "alert"]
    assert [(e.site, e.data["alert"]) for e in alerts] == [("b", "silent")]
    assert v.snapshot().alerts == [("b", "silent")]
    v.on_report(_rep(6, {"a": fr.SiteRecord(6, 60, 5, 1.0, {}), "b": fr.SiteRecord(2, 20, 5, 1.0, {})}))
    assert v.snapshot().alerts == [] and _kinds(v)[-1] == "alert_cleared"


def test_no_silence_alert_for_a_paused_or_excluded_site_or_a_paused_federation() -> None:
    v = _view(silent_rounds=1)
    v.end_sync()
    v.on_status("p", StatusMessage("p", "paused", 1.0))
    v.on_status("x", StatusMessage("x", "training", 1.0))
    v.on_report(
        _rep(5, {"p": fr.SiteRecord(1, 1, 0, 1.0, {}), "x": fr.SiteRecord(1, 1, 0, 1.0, {})}, excluded=("x",))
    )
    assert v.snapshot().alerts == []
    v2 = _view(silent_rounds=1)
    v2.on_status("a", StatusMessage("a", "waiting", 1.0))
    v2.on_report(_rep(5, {"a": fr.SiteRecord(1, 1, 0, 1.0, {})}, paused=True))
    assert v2.snapshot().alerts == []


def test_rejection_rate_alert() -> None:
    v = _view(rejection_rate=0.5, min_updates=3)
    v.end_sync()
    v.on_report(_rep(1, {"a": fr.SiteRecord(1, 10, 0, 1.0, {"bad_keys": 1})}))  # 1 of 2: too few to judge
    assert v.snapshot().alerts == []
    v.on_report(_rep(2, {"a": fr.SiteRecord(1, 10, 0, 1.0, {"bad_keys": 3})}))  # 3 of 4 rejected
    assert v.snapshot().alerts == [("a", "rejections")]


def test_a_new_federation_resets_the_charts() -> None:
    v = _view()
    v.end_sync()
    v.on_report(_rep(4, {}))
    assert [h.round for h in v.snapshot().history] == [0, 1, 2, 3]
    v.on_report(_rep(1, {}))
    assert [h.round for h in v.snapshot().history] == [0] and "federation_started" in _kinds(v)


def test_history_outlives_the_reports_window() -> None:
    v = _view()
    v.on_report(_rep(3, {}))
    v.on_report(_rep(5, {}, history=(fr.RoundRecord(3, 2), fr.RoundRecord(4, 2))))
    assert [h.round for h in v.snapshot().history] == [0, 1, 2, 3, 4]


def test_events_survive_a_restart_and_a_torn_line(tmp_path) -> None:
    log = EventLog(tmp_path)
    log.add("action", by="alice", site="a", action="pause", command="c1")
    log.add("login", by="bob")
    with open(tmp_path / "events.jsonl", "a") as fh:
        fh.write('{"kind":"act')  # a kill mid-append
    again = EventLog(tmp_path)
    assert [(e.kind, e.by) for e in again.recent()] == [("login", "bob"), ("action", "alice")]
    assert again.recent()[1].data == {"action": "pause", "command": "c1"}
