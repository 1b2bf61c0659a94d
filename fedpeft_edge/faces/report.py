"""Report writing shared by the demo, the experiment and the bench: JSON, Markdown tables, PNG plots.

Plots need matplotlib, an optional extra (``pip install 'fedpeft-edge[report]'``). Callers that can live
without plots use :func:`plots_available` and record that plots were skipped; asking for a plot without
matplotlib raises :class:`MissingDependencyError` naming the install command.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedpeft_edge.runtime.durable import atomic_file
from fedpeft_edge.runtime.errors import InvalidValueError, MissingDependencyError, ensure

REPORT_INSTALL_HINT = "pip install 'fedpeft-edge[report]'"


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (temp file + rename); NaN/Inf become null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(data), indent=2, sort_keys=False)
    # 0o644: mkstemp makes files private; reports are meant to be read and shared
    with atomic_file(path, "w", durable=False, file_mode=0o644) as fh:
        fh.write(text + "\n")
    return path


def _json_safe(value: Any) -> Any:
    """Plain JSON types only: numpy scalars/arrays, Paths and tuples converted; non-finite floats -> None."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalar or array
        return _json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def format_cell(value: Any, *, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** (-digits)):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned."""
    ensure(len(headers) > 0, "a table needs at least one column")
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise InvalidValueError(f"row {i} has {len(row)} cells, the table has {len(headers)} columns")
    numeric = [
        all(isinstance(r[c], (int, float)) or r[c] is None for r in rows) and len(rows) > 0
        for c in range(len(headers))
    ]
    lines = ["| " + " | ".join(str(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    for row in rows:
        lines.append("| " + " | ".join(format_cell(v, digits=digits) for v in row) + " |")
    return "\n".join(lines) + "\n"


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"  # pragma: no cover


# ------------------------------------------------------------------------------------------------ plots


def plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window (servers, CI, gateways)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError(
            f"plots need matplotlib; install it with `{REPORT_INSTALL_HINT}`"
        ) from exc
    return plt


def line_plot(
    path: Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float | None]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
    hline: tuple[float, str] | None = None,
) -> Path:
    """One PNG with a line per series (``name -> (xs, ys)``); ``None`` points are skipped."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    try:
        for name, (xs, ys) in series.items():
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if hline is not None:
            ax.axhline(hline[0], color="grey", linestyle="--", linewidth=1, label=hline[1])
        if log_y:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if series or hline:
            ax.legend(fontsize=8)
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


def _save_figure(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")  # room for long rotated labels
    return path


def bar_plot(
    path: Path,
    labels: Sequence[str],
    groups: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    ylabel: str,
    log_y: bool = False,
) -> Path:
    """Grouped bars: one group per label, one bar per entry of ``groups``."""
    plt = _pyplot()
    n_groups = max(len(groups), 1)
    width = 0.8 / n_groups
    fig_width = min(24.0, max(6.4, 0.18 * len(labels) * n_groups + 2.0))  # readable, never a banner
    fig, ax = plt.subplots(figsize=(fig_width, 4.8), dpi=100)
    try:
        for j, (name, values) in enumerate(groups.items()):
            xs = [i + (j - (n_groups - 1) / 2) * width for i in range(len(labels))]
            ys = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
            ax.bar(xs, ys, width=width, label=name)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        if log_y:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
        if groups:
            ax.legend(fontsize=8)
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


__all__ = [
    "REPORT_INSTALL_HINT",
    "bar_plot",
    "format_cell",
    "human_bytes",
    "line_plot",
    "markdown_table",
    "plots_available",
    "write_json",
]
