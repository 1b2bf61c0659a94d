"""``fedpeft-edge experiment``: the PEFT × split × compression × task grid, in one process.

Each cell (:mod:`.cell`) runs a whole federation in-process (no broker, for speed) through the real site
and central code: every site trains its adapter locally from the current global, encodes the delta with
its own :class:`~fedpeft_edge.site.encoder.UpdateEncoder` (error-feedback residual kept per site across
rounds) and offers it, as the :class:`~fedpeft_edge.protocol.wire.UpdateMessage` an agent sends, to an
in-memory :class:`~fedpeft_edge.central.core.AggregatorCore`, which weights it by sample count, closes the
round with its server optimizer and hands back the new global as a ``GlobalMessage``. Measured per cell:
global accuracy per round, per-site accuracy of the global model and after local personalisation (a few
local steps from the global adapter, tested on the site's own held-out data), bytes up per round (the
codec's exact payload accounting), client step time and peak RSS.

Artifacts are generated once per (task, method) and shared by all cells (:mod:`.runner`); one trainer
serves all sites of a cell, each site's adapter and optimizer state being swapped in and out through
``save_state`` / ``load_state`` (exactly what a long-running agent keeps between rounds). The grid's
config is :mod:`.config`, the report :mod:`.results`.
"""

from __future__ import annotations

from fedpeft_edge.faces.experiment.cell import CellResult, CentralEndpoint, evaluate, make_trainer, run_cell
from fedpeft_edge.faces.experiment.config import (
    COMPRESSIONS,
    MINILM_PARAMS,
    ExperimentConfig,
    FederationSettings,
)
from fedpeft_edge.faces.experiment.results import RESULT_COLUMNS, result_rows, write_experiment_report
from fedpeft_edge.faces.experiment.runner import main_experiment, merge_summaries, run_experiment

__all__ = [
    "COMPRESSIONS",
    "MINILM_PARAMS",
    "RESULT_COLUMNS",
    "CellResult",
    "CentralEndpoint",
    "ExperimentConfig",
    "FederationSettings",
    "evaluate",
    "main_experiment",
    "make_trainer",
    "merge_summaries",
    "result_rows",
    "run_cell",
    "run_experiment",
    "write_experiment_report",
]
