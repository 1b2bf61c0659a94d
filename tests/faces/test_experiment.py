"""The small experiment grid runs in one process and its table has every cell; config errors are typed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedpeft_edge.faces.experiment import ExperimentConfig, main_experiment
from fedpeft_edge.runtime.errors import InvalidValueError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SMALL = REPO / "configs" / "experiment-small.toml"


@pytest.mark.slow  # long end-to-end run; the fast tier leaves it to the full suite
def test_small_grid_has_every_cell(tmp_path: Path) -> None:
    config = ExperimentConfig.load(SMALL)
    expected = {(t, m, s.label, c) for t, m, s, c, _ in config.cells()}
    assert len(expected) >= 8
    summary = main_experiment(SMALL, tmp_path)
    assert summary["failures"] == []
    cells = {(c["task"], c["method"], c["split"], c["compression"]): c for c in summary["cells"]}
    assert set(cells) == expected

    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert len(on_disk["cells"]) == len(expected)
    table = (tmp_path / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| task")]
    assert len(rows) == len(expected)
    for task, method, split, compression in expected:
        assert any(f"| {task} | {method} | {split} | {compression} |" in row for row in rows), (task, method)
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())

    s = config.settings
    for key, c in cells.items():
        assert 0.0 <= c["global_accuracy"] <= 1.0, key
        assert len(c["accuracy_per_round"]) == s.rounds
        assert len(c["site_accuracy_personalised"]) == s.clients
        assert all(0.0 <= a <= 1.0 for a in c["site_accuracy_personalised"])
        assert c["personalised_worst"] <= c["personalised_mean"] + 1e-12
        assert c["step_ms"] > 0 and c["peak_rss_mb"] > 50
        assert not math.isnan(c["loss_per_round"][-1])
        if c["compression"] == "fp32":
            # the codec's accounting: a dense fp32 update is exactly 4 bytes per trainable parameter
            assert c["bytes_up_per_client_update"] == 4 * c["trainable_params"]
    for (task, method, split, compression), c in cells.items():
        if compression == "topk_int8":
            dense = cells[(task, method, split, "fp32")]
            assert c["bytes_up_per_client_update"] < 0.05 * dense["bytes_up_per_client_update"]
            assert c["trainable_params"] == dense["trainable_params"]
    # Same start for every cell of a (task, method): the initial accuracy is the same.
    for task in config.tasks:
        for method in config.methods:
            starts = {round(c["initial_accuracy"], 6) for k, c in cells.items() if k[:2] == (task, method)}
            assert len(starts) == 1


def test_config_errors_are_typed(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    tail = '[grid]\ntasks = ["text"]\n[tasks.text]\nkind = "text"\n'
    bad.write_text("[experiment]\nrounds = 2\nbogus = 1\n" + tail)
    with pytest.raises(InvalidValueError, match="bogus"):
        ExperimentConfig.load(bad)
    bad.write_text('[grid]\ntasks = ["text"]\ncompressions = ["zip"]\n[tasks.text]\nkind = "text"\n')
    with pytest.raises(InvalidValueError, match="zip"):
        ExperimentConfig.load(bad)
    bad.write_text('[grid]\ntasks = ["text"]\nsplits = ["dirichlet:x"]\n[tasks.text]\nkind = "text"\n')
    with pytest.raises(InvalidValueError):
        ExperimentConfig.load(bad)
    bad.write_text('[grid]\ntasks = ["audio"]\n')
    with pytest.raises(InvalidValueError, match="audio"):
        ExperimentConfig.load(bad)
    bad.write_text("not toml [")
    with pytest.raises(InvalidValueError):
        ExperimentConfig.load(bad)
    with pytest.raises(InvalidValueError):
        ExperimentConfig.load(tmp_path / "missing.toml")


def test_full_config_parses() -> None:
    config = ExperimentConfig.load(REPO / "configs" / "experiment-full.toml")
    assert {"text", "image"} <= set(config.tasks)
    assert {"lora", "ffa_lora", "adapter", "bitfit", "head_only"} <= set(config.methods)
    assert {s.label for s in config.splits} == {"iid", "dirichlet 1", "dirichlet 0.1"}
    assert set(config.compressions) == {"fp32", "int8", "topk_int8"}
