"""What the page templates need beyond the snapshot: formatted times and sizes, state labels, the
federation page's charts and deadline. Kept out of the templates so they stay markup, and testable."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from markupsafe import Markup

from fedpeft_edge.console.charts import Series, line_chart
from fedpeft_edge.console.fleet_view import FleetSnapshot

T = Callable[..., str]


def page_helpers(t: T, snap: FleetSnapshot) -> dict[str, Any]:
    now = snap.taken_at

    def ago(ts: float | None) -> str:
        if ts is None:
            return t("never")
        s = max(0.0, now - ts)
        if s < 90:
            return t("ago_s", n=int(s))
        if s < 5400:
            return t("ago_min", n=int(s / 60))
        if s < 172800:
            return t("ago_h", n=int(s / 3600))
        return t("ago_d", n=int(s / 86400))

    def clock(ts: float | None) -> str:
        return "" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))

    def state_label(state: str) -> str:
        key = f"state_{state}"
        label = t(key)
        return state if label == key else label

    def number(n: int | float | None) -> str:
        return "–" if n is None else f"{n:,}"

    def short(h: str | None, n: int = 12) -> str:
        return "" if not h else (h if len(h) <= n else h[:n] + "…")

    return {"ago": ago, "clock": clock, "state_label": state_label, "number": number, "short": short}


def fleet_context(snap: FleetSnapshot) -> dict[str, Any]:
    counts = snap.counts()
    states = ("online", "training", "waiting", "paused", "offline")
    return {"sites": snap.sites, "state_counts": {s: counts.get(s, 0) for s in states}}


def _finite(v: float | None) -> float:
    return float("nan") if v is None or not math.isfinite(v) else float(v)


def federation_context(snap: FleetSnapshot, t: T) -> dict[str, Any]:
    rep = snap.report
    hist = snap.history
    acc = line_chart(
        [
            Series(t("series_train_acc"), [(h.round, _finite(h.accuracy)) for h in hist]),
            Series(t("series_eval_acc"), [(h.round, _finite(h.eval_accuracy)) for h in hist]),
        ],
        title=t("chart_accuracy"),
        chart_id="chart-accuracy",
        y_min=0.0,
        y_max=1.0,
    )
    loss = line_chart(
        [Series(t("series_loss"), [(h.round, _finite(h.loss)) for h in hist])],
        title=t("chart_loss"),
        chart_id="chart-loss",
        y_min=0.0,
    )
    nbytes = line_chart(
        [Series(t("series_bytes_in"), [(h.round, float(h.bytes_in)) for h in hist])],
        title=t("chart_bytes"),
        chart_id="chart-bytes",
        y_min=0.0,
    )
    deadline: dict[str, Any] | None = None
    if rep is not None and not rep.finished:
        deadline = {"at": rep.deadline_at, "left": rep.deadline_at - snap.taken_at, "paused": rep.paused}
    late = None
    if rep is not None:
        key = f"late_{rep.late_policy}"
        late = t(key) if t(key) != key else rep.late_policy
    aggregation = []  # the report's tokens in the reader's language; an unknown one as it came
    for token in rep.aggregation if rep is not None else ():
        aggregation.append(t(f"agg_{token}") if t(f"agg_{token}") != f"agg_{token}" else token)
    # Charts are SVG markup from charts.py, which escapes every text it places.
    return {
        "report": rep,
        "aggregation": aggregation,
        "history": list(reversed(hist)),
        "late_label": late,
        "deadline": deadline,
        "charts": [Markup(acc), Markup(loss), Markup(nbytes)],
    }


__all__ = ["federation_context", "fleet_context", "page_helpers"]
