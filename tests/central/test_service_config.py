"""The aggregator's one config dataclass: TOML keys reach the service, the round policy and the chunk
reassembler; typos and bad values are refused with the section named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedpeft_edge.central.config import load_aggregator_config
from fedpeft_edge.central.service import AggregatorService
from fedpeft_edge.runtime.errors import InvalidValueError


def _service(tmp_path: Path, extra: str) -> AggregatorService:
    tmp_path.mkdir(parents=True, exist_ok=True)
    np.save(tmp_path / "initial.npy", np.zeros(16, np.float32))
    cfg = load_aggregator_config(text=f"""
[aggregator]
state_dir = "{tmp_path}/agg"
initial_global = "{tmp_path}/initial.npy"
{extra}
""")
    return AggregatorService(cfg)


def test_chunk_memory_caps_are_config_keys(tmp_path: Path) -> None:
    svc = _service(tmp_path, "max_pending_chunk_bytes = 100000\nmax_pending_chunk_bytes_per_site = 30000\n"
                             "max_update_bytes = 50000\n")
    assert svc.reassembler.max_pending_bytes == 100_000
    assert svc.reassembler.max_pending_bytes_per_sender == 30_000
    default = _service(tmp_path / "d", "max_update_bytes = 50000\n")
    assert default.reassembler.max_pending_bytes_per_sender == 50_000  # one whole update per site


def test_policy_keys_reach_the_core(tmp_path: Path) -> None:
    svc = _service(tmp_path, "quorum = 3\nmin_clients = 2\nmax_samples_weight = 500\n"
                             "norm_median_multiplier = 3.0\nserver_optimizer = \"fedadam\"\n")
    c = svc.core_config
    assert (c.quorum, c.min_clients, c.max_samples_weight, c.norm_median_multiplier, c.server_optimizer) == (
        3, 2, 500, 3.0, "fedadam")


@pytest.mark.parametrize("extra, words", [
    ("quorom = 3\n", "unknown key"),
    ("quorum = 1\nmin_clients = 2\n", "quorum must be >= min_clients"),
    ("server_optimizer = \"sgd\"\n", "server_optimizer must be one of"),
    ("max_pending_chunk_bytes = \"lots\"\n",
     r"\[aggregator\] max_pending_chunk_bytes = 'lots' has the wrong type"),
    ("client_id = 7\n", "wrong type"),
])
def test_bad_aggregator_keys_are_refused(tmp_path: Path, extra: str, words: str) -> None:
    with pytest.raises(InvalidValueError, match=words):
        _service(tmp_path, extra)
