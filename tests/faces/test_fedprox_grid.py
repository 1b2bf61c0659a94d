"""FedProx in the experiment grid and the demo: ``[grid] prox_mus`` is an axis (parsed, checked, one cell
per value, named in results.json / results.md / the plots like the other axes, and applied to the cell's
trainer), ``configs/experiment-fedprox.toml`` parses, and the demo's ``--prox-mu`` reaches every agent's
``[trainer] prox_mu`` and the trainer its factory builds.

The grid run here is the real runner and cell code on the synthetic transformer with LoRA (ORT Training),
standing in for MiniLM through the task loader, so it takes a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from lowering_cases import case_data, make_cache

from fedpeft_edge.faces.experiment import ExperimentConfig, run_experiment
from fedpeft_edge.faces.experiment import runner as experiment_runner
from fedpeft_edge.faces.experiment.results import cell_label, result_rows
from fedpeft_edge.faces.tasks import TaskConfig, TaskData
from fedpeft_edge.runtime.errors import InvalidValueError

REPO = Path(__file__).resolve().parents[2]


def _grid(**grid: Any) -> dict[str, Any]:
    return {"experiment": {"rounds": 2, "clients": 2, "local_steps": 3, "batch_size": 8,
                           "eval_batch_size": 16, "personalise_steps": 1},
            "grid": {"tasks": ["text"], **grid},
            "tasks": {"text": {"kind": "text", "train_size": 96, "test_size": 32, "lr": 0.05}}}


# --- the axis -----------------------------------------------------------------------------------------------
def test_prox_mus_is_a_grid_axis() -> None:
    config = ExperimentConfig.from_mapping(_grid(splits=["iid", "dirichlet:0.1"], prox_mus=[0, 0.01, 0.1]))
    assert config.prox_mus == (0.0, 0.01, 0.1) and all(isinstance(m, float) for m in config.prox_mus)
    cells = config.cells()
    assert len(cells) == 2 * 3
    assert {(s.label, mu) for _, _, s, _, mu in cells} == {
        (s, m) for s in ("iid", "dirichlet 0.1") for m in (0.0, 0.01, 0.1)}
    # Without the key: one value, 0 (plain local training), as before.
    assert ExperimentConfig.from_mapping(_grid()).prox_mus == (0.0,)
    assert [c[4] for c in ExperimentConfig.from_mapping(_grid()).cells()] == [0.0]


@pytest.mark.parametrize(("values", "message"), [
    ([-0.1], "finite number >= 0"),
    (["0.1"], "finite number >= 0"),
    ([True], "finite number >= 0"),
    ([float("nan")], "finite number >= 0"),
    ([0.1, 0.1], "repeats"),
    ([], "at least one value"),
])
def test_bad_prox_mus_are_refused(values: list[Any], message: str) -> None:
    with pytest.raises(InvalidValueError, match=message):
        ExperimentConfig.from_mapping(_grid(prox_mus=values))


def test_the_fedprox_config_parses() -> None:
    config = ExperimentConfig.load(REPO / "configs" / "experiment-fedprox.toml")
    assert [s.label for s in config.splits] == ["dirichlet 0.1"]
    assert config.compressions == ("fp32",) and config.methods == ("lora",)
    assert config.prox_mus[0] == 0.0 and len(config.prox_mus) >= 3
    assert config.settings.clients == 4 and config.settings.rounds >= 6


def test_results_name_the_axis() -> None:
    base = {"task": "text", "method": "lora", "split": "dirichlet 0.1", "compression": "fp32",
            "trainable_params": 10, "global_accuracy": 0.5, "site_accuracy_global": [0.5],
            "personalised_mean": 0.6, "personalised_worst": 0.4, "bytes_up_per_client_update": 40,
            "bytes_ratio_vs_full_fp32": 0.1, "step_ms": 1.0, "peak_rss_mb": 100.0}
    rows = result_rows([{**base, "prox_mu": 0.0}, {**base, "prox_mu": 0.01}, base])  # base: an older file
    assert [r[4] for r in rows] == ["0", "0.01", "0"]
    assert cell_label({**base, "prox_mu": 0.01}) == "lora/dirichlet 0.1/fp32/prox 0.01"
    assert cell_label({**base, "prox_mu": 0.0}) == cell_label(base) == "lora/dirichlet 0.1/fp32"


# --- a grid run: the runner and the cell apply the axis -----------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("fedprox_grid"))


def _synthetic_task(config: TaskConfig, **_: Any) -> TaskData:
    train, test = case_data("lora", n=96, seed=1), case_data("lora", n=32, seed=2)
    prepared = SimpleNamespace(meta={"_param_count": 5000}, feature_dim=16)
    return TaskData(config=config, prepared=prepared, classes=["a", "b", "c"],
                    train_inputs={k: v for k, v in train.items() if k != "labels"},
                    train_labels=train["labels"], train_groups=None,
                    test_inputs={k: v for k, v in test.items() if k != "labels"}, test_labels=test["labels"])


def test_a_grid_run_applies_and_reports_each_mu(cache, tmp_path: Path, monkeypatch) -> None:
    from fedpeft_edge.faces import report
    from fedpeft_edge.training.flat_trainer import FlatVectorTrainer

    monkeypatch.setattr(experiment_runner, "load_task", _synthetic_task)
    monkeypatch.setattr(experiment_runner, "method_spec", lambda *a, **k: None)
    monkeypatch.setattr(experiment_runner, "get_bundle", lambda *a, **k: cache[0]("lora"))
    monkeypatch.setattr(report, "plots_available", lambda: False)  # the table is what is checked here
    seen: list[float] = []
    train = FlatVectorTrainer.train

    def spy(self, batches, *, max_steps=None):
        seen.append(self.prox_mu)
        return train(self, batches, max_steps=max_steps)

    monkeypatch.setattr(FlatVectorTrainer, "train", spy)
    config = ExperimentConfig.from_mapping(_grid(prox_mus=[0.0, 0.5]))
    summary = run_experiment(config, tmp_path, log=lambda _: None)
    assert summary["failures"] == [] and summary["grid"]["prox_mus"] == [0.0, 0.5]
    cells = {c["prox_mu"]: c for c in json.loads((tmp_path / "results.json").read_text())["cells"]}
    assert set(cells) == {0.0, 0.5}
    # Every local training of a cell (2 sites x 2 rounds, then 2 personalisations) ran with its mu.
    assert seen == [0.0] * 6 + [0.5] * 6
    table = (tmp_path / "results.md").read_text()
    assert "| task | method | split | compression | prox mu |" in table
    assert "| text | lora | iid | fp32 | 0 |" in table and "| text | lora | iid | fp32 | 0.5 |" in table
    # Same start and data: with mu the sites' round losses differ from plain local training.
    assert cells[0.0]["initial_accuracy"] == cells[0.5]["initial_accuracy"]
    assert cells[0.0]["loss_per_round"][-1] != cells[0.5]["loss_per_round"][-1]


# --- the demo -----------------------------------------------------------------------------------------------
def test_demo_prox_mu_flag_reaches_every_agent(cache, tmp_path: Path) -> None:
    from fedpeft_edge.faces.cli import build_parser
    from fedpeft_edge.faces.demo import DemoOptions
    from fedpeft_edge.faces.demo.fleet import LocalFleet
    from fedpeft_edge.faces.demo.site import save_shard, site_trainer_setup
    from fedpeft_edge.site.config import load_agent_config

    args = build_parser().parse_args(["demo", "--prox-mu", "0.01"])
    opts = DemoOptions.from_args(args).resolved()
    assert opts.prox_mu == pytest.approx(0.01)
    assert DemoOptions.from_args(build_parser().parse_args(["demo"])).resolved().prox_mu == 0.0
    with pytest.raises(InvalidValueError, match="prox_mu"):
        DemoOptions(prox_mu=-1.0).resolved()

    # The agent's config the fleet writes (no broker needed for it), then its factory's trainer.
    data = case_data("lora", n=32)
    x = {k: v for k, v in data.items() if k != "labels"}
    save_shard(tmp_path / "shard.npz", x, data["labels"], x, data["labels"])
    fleet = LocalFleet.__new__(LocalFleet)
    fleet.opts, fleet.work, fleet.connection = opts, tmp_path, {"host": "127.0.0.1", "port": 1883}
    fleet.bundle_dir, fleet.gradient_dir = cache[0]("lora").directory, cache[1]("lora").directory
    fleet.shard_paths = [tmp_path / "shard.npz"]
    fleet.privacy = {}  # no --dp
    cfg = load_agent_config(fleet._agent_config(0, "site-1", tmp_path / "site-1"))
    assert cfg.trainer.prox_mu == pytest.approx(0.01)
    setup = site_trainer_setup(cfg)
    assert setup.trainer.prox_mu == pytest.approx(0.01)
    np.testing.assert_array_equal(setup.trainer.get_flat(), cache[1]("lora").initial_vector())
