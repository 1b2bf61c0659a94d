"""Small line charts as inline SVG, drawn on the server: no chart library, no script, nothing fetched —
the console works on a plant network with no internet and in any browser.

Every text goes through XML escaping; numbers are formatted here, so a template only places the markup.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

COLOURS = ("#1f6feb", "#d9480f", "#2f9e44", "#7048e8")


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float]]  # (x, y); y may be NaN for a gap


def _nice_step(span: float, ticks: int = 4) -> float:
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / ticks
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def compact(value: float) -> str:
    """1234 → 1.2k, 2500000 → 2.5M, 0.734 → 0.734."""
    a = abs(value)
    if a >= 1e6:
        return f"{value / 1e6:.1f}M"
    if a >= 1e3:
        return f"{value / 1e3:.1f}k"
    if a >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.3g}"


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    chart_id: str,
    width: int = 560,
    height: int = 220,
    y_min: float | None = None,
    y_max: float | None = None,
    fmt: Callable[[float], str] = compact,
) -> str:
    """An SVG line chart (x = round) with axes, gridlines, a legend and a point marker per value."""
    pts = [(x, y) for s in series for x, y in s.points if math.isfinite(y)]
    left, right, top, bottom = 52, 12, 46, 26
    w, h = width - left - right, height - top - bottom
    out = [
        f'<svg class="chart" id="{escape(chart_id)}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f'<text class="chart-title" x="{left}" y="16">{escape(title)}</text>',
    ]
    if not pts:
        out.append(
            f'<text class="chart-empty" x="{left + w / 2}" y="{top + h / 2}" text-anchor="middle">–</text>'
        )
        out.append("</svg>")
        return "".join(out)
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    lo = min(ys) if y_min is None else y_min
    hi = max(ys) if y_max is None else y_max
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    step = _nice_step(hi - lo)
    lo, hi = math.floor(lo / step) * step, math.ceil(hi / step) * step

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def sy(y: float) -> float:
        return top + h - (y - lo) / (hi - lo) * h

    tick = lo
    while tick <= hi + step / 2:
        y = sy(tick)
        out.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{left + w}" y2="{y:.1f}"/>')
        out.append(
            f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(fmt(tick))}</text>'
        )
        tick += step
    xstep = max(1, math.ceil((x1 - x0) / 10))
    xt = math.ceil(x0)
    while xt <= x1:
        out.append(
            f'<text class="tick" x="{sx(xt):.1f}" y="{top + h + 16}" text-anchor="middle">{xt:.0f}</text>'
        )
        xt += xstep
    for i, s in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        good = [(x, y) for x, y in s.points if math.isfinite(y)]
        if not good:
            continue
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(good))
        out.append(f'<path class="series" d="{path}" stroke="{colour}" fill="none" stroke-width="2"/>')
        for x, y in good:
            out.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}">'
                f"<title>{escape(s.label)}: {escape(fmt(y))} ({x:.0f})</title></circle>"
            )
        lx = left + i * 170
        out.append(f'<rect x="{lx}" y="{top - 18}" width="10" height="3" fill="{colour}"/>')
        out.append(f'<text class="legend" x="{lx + 14}" y="{top - 14}">{escape(s.label)}</text>')
    out.append("</svg>")
    return "".join(out)


__all__ = ["Series", "compact", "line_chart"]
