"""Live progress of a demo run: the progress bar, one line per closed round, the aggregator's metrics file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpeft_edge.faces import report as rep


class Progress:
    """Live display: rich progress bar + one line per closed round, or plain lines without rich/TTY."""

    def __init__(self, rounds: int, plain: bool) -> None:
        self.rounds = rounds
        self._rich: Any = None
        if not plain:
            try:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                self.console = Console()
                self._rich = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TextColumn("{task.fields[status]}"),
                    console=self.console,
                    transient=False,
                )
            except ImportError:
                self._rich = None

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.__enter__()
            self._task = self._rich.add_task("rounds", total=self.rounds, status="starting services ...")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def status(self, text: str) -> None:
        if self._rich is not None:
            self._rich.update(self._task, status=text)

    def line(self, text: str) -> None:
        if self._rich is not None:
            self._rich.console.print(text, highlight=False)
        else:
            print(text, flush=True)

    def advance(self, done: int) -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=done)


def say(text: str) -> None:
    print(text, flush=True)


def new_lines(path: Path, already: int) -> list[dict[str, Any]]:
    """The aggregator's metrics lines (one JSON object per closed round) after the first ``already``."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for text in lines[already:]:
        try:
            out.append(json.loads(text))
        except json.JSONDecodeError:
            break  # a line being written; read it next time
    return out


def round_line(m: Mapping[str, Any], rounds: int, agents: int, full_params: int) -> str:
    """One closed round as a progress line, from its aggregator metrics."""
    parts = [
        f"round {int(m.get('round', 0)) + 1}/{rounds}",
        f"{len(m.get('participants', []))}/{agents} sites",
    ]
    if "loss" in m:
        parts.append(f"loss {m['loss']:.3f}")
    if "global_eval_accuracy" in m:
        parts.append(f"sites' acc of incoming global {m['global_eval_accuracy']:.3f}")
    if "accuracy" in m:
        parts.append(f"train acc {m['accuracy']:.3f}")
    bytes_in = m.get("bytes_in")
    if bytes_in:
        per = bytes_in / max(1, len(m.get("participants", [])) or 1)
        parts.append(
            f"up {rep.human_bytes(bytes_in)} ({100 * per / (4 * full_params):.3f} % of full FT/site)"
        )
    if "train_seconds" in m:
        parts.append(f"local train {m['train_seconds']:.1f} s")
    if isinstance(m.get("epsilon"), int | float):
        parts.append(f"ε spent {m['epsilon']:.2f} (δ {m.get('delta', 0):g})")
    return " · ".join(parts)


def live_status(done: int, sent: int) -> str:
    return f"round {done + 1}: {sent} updates sent so far"
