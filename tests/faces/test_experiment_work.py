"""Unequal local work in the experiment grid (fast, no model): ``site_speed`` gives each site its share of
``local_steps``, ``aggregation`` reaches the cell's aggregator core, ``[variants.<label>]`` runs the grid
once per variant, and the report names the variant of every row. A tiny numpy trainer stands in for ORT."""

from __future__ import annotations

import types
from pathlib import Path

import fed_numpy_trainer as fnt
import numpy as np
import pytest

from fedpeft_edge.faces.experiment import CentralEndpoint, ExperimentConfig, run_cell, write_experiment_report
from fedpeft_edge.faces.experiment.config import FederationSettings
from fedpeft_edge.faces.tasks import SplitConfig, TaskConfig, TaskData
from fedpeft_edge.protocol.codec import encode_global
from fedpeft_edge.runtime.errors import InvalidValueError

GRID = """
[experiment]
name = "work"
rounds = 3
clients = 4
local_steps = 8
batch_size = 8
personalise_steps = 1
[grid]
tasks = ["text"]
splits = ["dirichlet:0.5"]
[tasks.text]
kind = "text"
[variants.equal]
[variants.slow]
site_speed = [1, 1, 1, 0.25]
[variants.slow-fednova]
site_speed = [1, 1, 1, 0.25]
aggregation = "fednova"
"""


def _config(text: str = GRID) -> ExperimentConfig:
    import tomllib

    return ExperimentConfig.from_mapping(tomllib.loads(text))


def test_variants_and_site_speed_parse() -> None:
    config = _config()
    runs = config.runs()
    assert [label for label, _ in runs] == ["equal", "slow", "slow-fednova"]
    equal, slow, nova = (c.settings for _, c in runs)
    assert equal.site_steps() == [8, 8, 8, 8] and equal.aggregation == "fedavg"
    assert slow.site_steps() == [8, 8, 8, 2] and slow.rounds == 3  # [experiment] keys carry over
    assert nova.aggregation == "fednova" and nova.site_speed == (1.0, 1.0, 1.0, 0.25)
    assert FederationSettings(local_steps=3, clients=2, site_speed=[1, 0.1]).site_steps() == [3, 1]
    assert [label for label, _ in _config(GRID.split("[variants.equal]")[0]).runs()] == [""]


@pytest.mark.parametrize("bad", [
    "[experiment]\nsite_speed = [1, 1]\n",  # not one per site (clients = 4)
    "[experiment]\nclients = 2\nsite_speed = [1, 0]\n",
    "[experiment]\nclients = 2\nsite_speed = [1, -1]\n",
    "[experiment]\naggregation = \"fedprox\"\n",
    "[variants.x]\nbogus = 1\n",
    "[variants]\nx = 1\n",
])
def test_bad_work_settings_are_refused(bad: str) -> None:
    with pytest.raises(InvalidValueError):
        _config(bad + '[grid]\ntasks = ["text"]\n[tasks.text]\nkind = "text"\n')


def test_central_endpoint_applies_fednova() -> None:
    rng = np.random.default_rng(0)
    initial = np.zeros(50, np.float32)
    deltas = [rng.standard_normal(50).astype(np.float32) for _ in range(2)]
    central = CentralEndpoint(initial, spec_hash="ab" * 8, sites=2, rounds=1, strategy="fedavg",
                              server_lr=1.0, aggregation="fednova")
    central.submit("site-1", encode_global(deltas[0], "fp32"), 30, {"steps": 8})
    central.submit("site-2", encode_global(deltas[1], "fp32"), 10, {"steps": 2})
    g = central.close_round()
    tau_eff = (30 * 8 + 10 * 2) / 40
    expect = tau_eff * (30 * deltas[0] / 8 + 10 * deltas[1] / 2) / 40
    np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-6)


class _CountingTrainer(fnt.SoftmaxRegressionTrainer):
    def __init__(self) -> None:
        super().__init__(features=fnt.FEATURES)
        self.steps_asked: list[int | None] = []

    def train(self, batches, *, max_steps=None):  # type: ignore[no-untyped-def, override]
        self.steps_asked.append(max_steps)
        return super().train(batches, max_steps=max_steps)


def _task() -> TaskData:
    x, y = fnt.site_data(0, n=400)
    xt, yt = fnt.site_data(0, seed=1, n=80)
    prepared = types.SimpleNamespace(meta={"_param_count": 1000}, feature_dim=fnt.FEATURES)
    classes = [str(c) for c in range(fnt.CLASSES)]
    return TaskData(TaskConfig(), prepared, classes, {"x": x}, y, None, {"x": xt}, yt)


class _Peak:
    peak_mb = 1.0

    def reset(self) -> None:
        pass


@pytest.mark.slow  # ~4 s: real federations of the synthetic model
def test_cells_give_each_site_its_steps_and_report_the_variant(tmp_path: Path) -> None:
    config = _config()
    task = _task()
    bundle = types.SimpleNamespace(spec_hash="cd" * 8)
    cells = []
    for label, run_config in config.runs():
        trainer = _CountingTrainer()
        initial = tmp_path / f"{label}.state"
        trainer.save_state(initial)
        split = SplitConfig.parse("dirichlet:0.5")
        result = run_cell(task, "text", bundle, "lora", split, "fp32", run_config, trainer=trainer,
                          initial_state=initial, work_dir=tmp_path, peak=_Peak(),  # type: ignore[arg-type]
                          log=lambda _msg: None)
        result.variant = label
        rounds = trainer.steps_asked[: 3 * 4]  # then one personalisation call per site
        assert rounds == result.site_steps * 3
        cells.append(result)
    assert [c.site_steps for c in cells] == [[8, 8, 8, 8], [8, 8, 8, 2], [8, 8, 8, 2]]
    assert [c.aggregation for c in cells] == ["fedavg", "fedavg", "fednova"]
    assert cells[1].accuracy_per_round != cells[2].accuracy_per_round or (
        cells[1].loss_per_round != cells[2].loss_per_round)  # FedNova moved the global differently
    summary = {"name": "work", "settings": {**vars(config.settings)}, "tasks": {}, "seconds": 1.0,
               "variants": {label: vars(c.settings) for label, c in config.runs()},
               "cells": [c.to_dict() for c in cells], "failures": []}
    write_experiment_report(summary, tmp_path / "report")
    table = (tmp_path / "report" / "results.md").read_text()
    assert "| variant | task |" in table and "| slow-fednova | text | lora |" in table
    assert "- variant `slow`: site speeds 1, 1, 1, 0.25, aggregation fedavg" in table
