"""Experiment grid options added for issue 13: codec variants of their own name, running a grid's
compressions in parts, and FedPer's private tensors as a variant."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft_edge.faces.experiment.config import ExperimentConfig
from fedpeft_edge.faces.experiment.runner import main_experiment
from fedpeft_edge.runtime.errors import InvalidValueError

REPO = Path(__file__).resolve().parents[2]
TASKS = {"text": {"kind": "text", "dataset": "reuters_r8", "train_size": 40, "test_size": 20}}


def test_a_codec_variant_of_its_own_name() -> None:
    cfg = ExperimentConfig.from_mapping({
        "tasks": TASKS, "grid": {"compressions": ["fp32", "mine"]},
        "compression": {"mine": {"mode": "topk_int8", "topk_ratio": 0.05, "warmup_rounds": 2,
                                 "warmup_start_ratio": 1.0, "topk_scope": "tensor", "momentum": 0.5}}})
    codec = cfg.codec_config("mine")
    got = (codec.topk_ratio, codec.warmup_rounds, codec.topk_scope, codec.momentum)
    assert got == (0.05, 2, "tensor", 0.5)
    with pytest.raises(InvalidValueError, match="define"):
        ExperimentConfig.from_mapping({"tasks": TASKS, "grid": {"compressions": ["nameless"]}})
    with pytest.raises(InvalidValueError):  # a bad codec value fails when the codec is built
        ExperimentConfig.from_mapping({"tasks": TASKS, "grid": {"compressions": ["bad"]},
                                       "compression": {"bad": {"mode": "topk_int8", "momentum": 2.0}}}
                                      ).codec_config("bad")


def test_private_tensors_as_a_variant() -> None:
    cfg = ExperimentConfig.load(REPO / "configs" / "experiment-fedper.toml")
    assert [(label, v.private_tensors, v.fedrep_head_steps) for label, v in cfg.variants] == [
        ("fedavg", (), 0), ("fedper_head", ("head.*",), 0), ("fedrep_head", ("head.*",), 4)]
    with pytest.raises(InvalidValueError, match="private_tensors"):
        ExperimentConfig.from_mapping({"tasks": TASKS, "experiment": {"private_tensors": "head.*"}})
    with pytest.raises(InvalidValueError, match="FedRep"):  # a head to train first is needed
        ExperimentConfig.from_mapping({"tasks": TASKS, "experiment": {"fedrep_head_steps": 4}})


def test_compressions_filter_refuses_names_not_in_the_grid(tmp_path: Path) -> None:
    with pytest.raises(InvalidValueError, match="--compressions"):
        main_experiment(REPO / "configs" / "experiment-compression-tools.toml", tmp_path,
                        compressions=["topk_int8", "zip"])


def test_the_compression_tools_grid_parses() -> None:
    cfg = ExperimentConfig.load(REPO / "configs" / "experiment-compression-tools.toml")
    assert cfg.codec_config("topk10_warmup").ratio_at(0) == 1.0
    assert cfg.codec_config("topk1_warmup").ratio_at(6) == pytest.approx(0.01)


def test_demo_codec_warmup_default_flag_and_off(tmp_path: Path) -> None:
    """The demo's default codec is the best measured one (top-k 10 % + int8 with a 3-round warm-up from a
    dense first update); --codec-warmup-rounds 0 turns the warm-up off; the agents' configs carry it."""
    from fedpeft_edge.faces.cli import build_parser
    from fedpeft_edge.faces.demo import DemoOptions
    from fedpeft_edge.faces.demo.fleet import LocalFleet
    from fedpeft_edge.site.config import load_agent_config

    def agent_codec(argv: list[str]):  # type: ignore[no-untyped-def]
        opts = DemoOptions.from_args(build_parser().parse_args(["demo", *argv])).resolved()
        fleet = LocalFleet.__new__(LocalFleet)
        fleet.opts, fleet.work, fleet.connection = opts, tmp_path, {"host": "127.0.0.1", "port": 1883}
        fleet.bundle_dir, fleet.gradient_dir, fleet.shard_paths = tmp_path, None, [tmp_path / "s.npz"]
        fleet.privacy = {}  # no --dp
        return load_agent_config(fleet._agent_config(0, "site-1", tmp_path / "site-1")).codec

    default = agent_codec([])
    assert (default.mode, default.topk_ratio, default.warmup_rounds, default.warmup_start_ratio) == (
        "topk_int8", 0.1, 5, 1.0)
    assert agent_codec(["--codec-warmup-rounds", "0"]).warmup_rounds == 0
    assert agent_codec(["--codec", "fp32"]).warmup_rounds == 0


def test_grid_settings_for_poisoning_and_privacy(tmp_path: Path) -> None:
    """[experiment] / [variants.<label>] keys of issue 14: attackers, the robust rule, DP; and --variants."""
    import numpy as np

    from fedpeft_edge.faces.experiment.cell import ATTACK_FACTORS, _labels, _privacy
    from fedpeft_edge.faces.experiment.config import ExperimentConfig, FederationSettings
    from fedpeft_edge.runtime.errors import InvalidValueError

    cfg = ExperimentConfig.load(Path(__file__).resolve().parents[2] / "configs" / "experiment-poisoning.toml")
    labels = [label for label, _ in cfg.variants]
    assert len(labels) == 31 and labels[0] == "none"
    krum = dict(cfg.variants)["labelflip-2-krum"]
    assert (krum.attack, krum.malicious, krum.robust_rule, krum.bounds) == (
        "labelflip", 2, "multi_krum", False)
    assert dict(cfg.variants)["scaled-1-bounds"].bounds is True
    for bad in ({"attack": "flood"}, {"malicious": 4}, {"robust_rule": "mean"}, {"dp_epsilon": -1.0},
                {"dp_mode": "local"}):
        with pytest.raises(InvalidValueError):
            FederationSettings(clients=4, **bad)  # type: ignore[arg-type]
    np.testing.assert_array_equal(_labels(np.array([0, 3, 7]), 8, True), [1, 4, 0])
    assert ATTACK_FACTORS == {"signflip": -10.0, "scaled": 20.0}
    off = _privacy(FederationSettings(), 1000, 3e-3)
    assert not off.enabled
    settings = FederationSettings(dp_epsilon=4.0, dp_mode="distributed", clients=4, rounds=3)
    dp = _privacy(settings, 10_000, 3e-3)
    assert dp.mode == "distributed" and dp.expected_sites == 4 and dp.noise_multiplier > 1.0
    assert dp.clip_norm == pytest.approx(0.5 * 3e-3 * 5 * 100)  # lr·local_steps·√n / 2
