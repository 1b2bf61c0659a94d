"""A 4-site federation with one lying site, through the real AggregatorCore with its DEFAULT policy.

Task: scikit-learn's 8×8 digits (10 classes), softmax regression (tests/support/fed_numpy_trainer.py),
450 held-out images; four sites with a quarter of the rest each, 2 local epochs per round, 5 rounds. Each
site encodes its delta with the site's own ``UpdateEncoder`` (top-25 % + int8, error feedback: sparse
updates) and sends the ``UpdateMessage`` an agent would (as faces/experiment/cell.py does); the global is
read back by decoding the core's ``GlobalMessage``.

The liar is site 3:

* ``claims_1e9``: trains honestly, but its data hold only the digits 0-2 (a site unlike the others) and it
  claims 10^9 samples, so that the global fits its data;
* ``sign_flip_x20``: sends its delta × -20;
* ``norm_1e6``: sends its delta scaled to L2 norm 10^6.

With the defaults the global's accuracy stays within 5 points of a clean run (four honest sites, same
defaults); with the bounds off each attack costs more than 20 points, so the test can fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fed_numpy_trainer import SoftmaxRegressionTrainer, batches

from fedpeft_edge.central.core import AggregatorConfig, AggregatorCore
from fedpeft_edge.protocol.codec import CodecConfig, decode_global
from fedpeft_edge.protocol.wire import UpdateMessage
from fedpeft_edge.site.encoder import UpdateEncoder

FLEET, SPEC = "digits", "d1917500" * 4
SITES, ROUNDS, EPOCHS, LR, BATCH = 4, 5, 2, 0.5, 32
LIAR = 3
FEATURES, CLASSES = 64, 10
BOUNDS_OFF = {"norm_median_multiplier": 0, "samples_median_multiplier": 0}
Data = tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]


@pytest.fixture(scope="module")
def digits() -> Data:
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn (the [data] extra) has digits")
    d = datasets.load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm], y[perm]
    parts = np.array_split(np.arange(450, len(y)), SITES)
    return [(x[p], y[p]) for p in parts], (x[:450], y[:450])


def _accuracy(flat: np.ndarray, test: tuple[np.ndarray, np.ndarray]) -> float:
    model = SoftmaxRegressionTrainer(FEATURES, CLASSES)
    model.set_flat(flat)
    return float(model.evaluate(batches(*test, 256)).accuracy)


Attack = Callable[[np.ndarray, int], tuple[np.ndarray, int]]  # (delta, samples) -> what the liar sends

ATTACKS: dict[str, Attack] = {
    "claims_1e9": lambda delta, samples: (delta, 10**9),
    "sign_flip_x20": lambda delta, samples: (-20.0 * delta, samples),
    "norm_1e6": lambda delta, samples: (delta * np.float32(1e6 / np.linalg.norm(delta)), samples),
}


def federate(data: Data, attack: str | None, **policy: Any) -> tuple[list[float], list[dict[str, Any]]]:
    """Accuracy of the global after each round, and the core's round metrics."""
    sites, test = data
    if attack == "claims_1e9":  # the liar's own data: digits 0-2 only
        x, y = sites[LIAR]
        keep = y <= 2
        sites = [*sites[:LIAR], (x[keep], y[keep]), *sites[LIAR + 1 :]]
    start = SoftmaxRegressionTrainer(FEATURES, CLASSES, seed=0).get_flat()
    n = start.size
    config = AggregatorConfig(fleet=FLEET, n_params=n, spec_hash=SPEC, min_clients=SITES, quorum=SITES,
                              max_rounds=ROUNDS, **policy)
    core = AggregatorCore(config, None, initial_global=start)
    encoders = [UpdateEncoder(CodecConfig(mode="topk_int8", topk_ratio=0.25, block=64), n, seed=i)
                for i in range(SITES)]
    accuracy: list[float] = []
    for _ in range(ROUNDS):
        g = decode_global(core.global_message().vector, n)  # what a site receives
        for i, (x, y) in enumerate(sites):
            local = SoftmaxRegressionTrainer(FEATURES, CLASSES, lr=LR)
            local.set_flat(g)
            for _ in range(EPOCHS):
                metrics = local.train(batches(x, y, BATCH))
            delta, samples = local.get_flat() - g, len(y)
            if attack is not None and i == LIAR:
                delta, samples = ATTACKS[attack](delta, samples)
            msg = UpdateMessage(FLEET, core.round, f"site-{i}", SPEC, int(samples),
                                {"loss": metrics.loss, "accuracy": metrics.accuracy},
                                encoders[i].encode(delta.astype(np.float32)))
            assert core.offer(msg, sender=f"site-{i}").accepted
        assert core.ready_to_close()
        core.close_round()
        accuracy.append(_accuracy(decode_global(core.global_message().vector, n), test))
    return accuracy, core.history


@pytest.fixture(scope="module")
def clean(digits: Data) -> float:
    accuracy, history = federate(digits, None)
    assert accuracy[-1] > 0.85  # the task is learnt in a few rounds
    assert all(h["clipped"] == h["excluded"] == h["weight_capped"] == 0 for h in history)
    return accuracy[-1]


@pytest.mark.slow  # > 1 s: the full suite runs it, the fast tier leaves it out
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_defaults_keep_the_global_within_5_points_of_a_clean_run(digits: Data, clean: float,
                                                                 attack: str) -> None:
    defended, history = federate(digits, attack)
    undefended, _ = federate(digits, attack, **BOUNDS_OFF)
    print(f"{attack}: clean {clean:.3f}, defaults {defended[-1]:.3f}, bounds off {undefended[-1]:.3f}")
    assert defended[-1] >= clean - 0.05, (defended, clean)
    assert undefended[-1] < clean - 0.20, (undefended, clean)  # the attack is real: the test could fail
    # and it is the expected bound that acted, in every round
    if attack == "claims_1e9":
        assert all(h["weight_capped"] == 1 and h["excluded"] == 0 for h in history)
    else:
        assert all(h["excluded"] == 1 for h in history)  # beyond 10 × the median norm: left out
