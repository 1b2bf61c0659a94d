"""A tiny but real LocalTrainer for service tests: softmax regression trained with plain SGD in numpy.

Each site gets its own synthetic data (Gaussian class blobs, shifted per site = a mild non-IID split),
deterministic from (seed, client_index). ``make(cfg)`` is the factory the agent CLI loads with
``[trainer] kind = "factory"``, ``factory = "fed_numpy_trainer:make"`` (tests/ on PYTHONPATH).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from fedpeft_edge.peft.layout import FlatLayout
from fedpeft_edge.runtime.durable import npz_bytes, read_npz
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.site.config import AgentConfig, DataSettings
from fedpeft_edge.site.state import write_file
from fedpeft_edge.site.trainer_setup import TrainerSetup
from fedpeft_edge.training.base import EvalMetrics, TrainMetrics

FEATURES, CLASSES = 8, 3


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class SoftmaxRegressionTrainer:
    def __init__(self, features: int = FEATURES, classes: int = CLASSES, lr: float = 0.2,
                 seed: int = 0) -> None:
        self._layout = FlatLayout.from_shapes([("w", (features, classes)), ("b", (classes,))])
        rng = np.random.default_rng(seed)
        self._flat = (0.01 * rng.standard_normal(self._layout.total)).astype(np.float32)
        self.lr = lr

    @property
    def layout(self) -> FlatLayout:
        return self._layout

    def get_flat(self) -> np.ndarray:
        return self._flat.copy()

    def set_flat(self, flat: np.ndarray) -> None:
        flat = np.asarray(flat, dtype=np.float32)
        if flat.shape != (self._layout.total,):
            raise ValueError(f"expected {self._layout.total} parameters, got {flat.shape}")
        self._flat = flat.copy()

    def _forward(self, x: np.ndarray) -> np.ndarray:
        p = self._layout.split(self._flat)
        return _softmax(x @ p["w"] + p["b"])

    def train(self, batches: Iterable[Mapping[str, np.ndarray]], *, max_steps: int | None = None
              ) -> TrainMetrics:
        t0, steps, samples, loss_sum, correct = time.perf_counter(), 0, 0, 0.0, 0
        for batch in batches:
            if max_steps is not None and steps >= max_steps:
                break
            x, y = batch["x"].astype(np.float32), batch["labels"].astype(np.int64)
            prob = self._forward(x)
            loss_sum += float(-np.log(prob[np.arange(len(y)), y] + 1e-12).sum())
            correct += int((prob.argmax(1) == y).sum())
            grad = prob.copy()
            grad[np.arange(len(y)), y] -= 1.0
            grad /= len(y)
            p = self._layout.split(self._flat)  # views: the update below writes into _flat
            p["w"] -= self.lr * (x.T @ grad).astype(np.float32)
            p["b"] -= self.lr * grad.sum(0).astype(np.float32)
            steps += 1
            samples += len(y)
        n = max(samples, 1)
        return TrainMetrics(loss=loss_sum / n, samples=samples, steps=steps, seconds=time.perf_counter() - t0,
                            accuracy=correct / n)

    def evaluate(self, batches: Iterable[Mapping[str, np.ndarray]]) -> EvalMetrics:
        loss_sum, correct, samples = 0.0, 0, 0
        for batch in batches:
            x, y = batch["x"].astype(np.float32), batch["labels"].astype(np.int64)
            prob = self._forward(x)
            loss_sum += float(-np.log(prob[np.arange(len(y)), y] + 1e-12).sum())
            correct += int((prob.argmax(1) == y).sum())
            samples += len(y)
        n = max(samples, 1)
        return EvalMetrics(loss=loss_sum / n, accuracy=correct / n, samples=samples)

    def save_state(self, path: Path) -> None:
        # Through the site's writer: atomic, and the crash-injection hook of the kill tests applies.
        write_file(Path(path), npz_bytes({"flat": self._flat}))

    def load_state(self, path: Path) -> None:
        flat = read_npz(Path(path))["flat"]  # any damage: InvalidValueError (or KeyError), never EOFError
        if flat.dtype != np.float32 or flat.shape != (self._layout.total,) or not np.isfinite(flat).all():
            raise InvalidValueError(f"trainer state holds {flat.dtype}{flat.shape}, "
                                    f"not finite float32[{self._layout.total}]")
        self.set_flat(flat)


def site_data(client_index: int, seed: int = 0, n: int = 120, features: int = FEATURES
              ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, client_index])
    centers = np.random.default_rng(seed).standard_normal((CLASSES, features)) * 2.0
    y = rng.integers(0, CLASSES, n)
    x = centers[y] + rng.standard_normal((n, features)) + 0.3 * client_index
    return x.astype(np.float32), y.astype(np.int64)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(y), batch_size):
        yield {"x": x[i : i + batch_size], "labels": y[i : i + batch_size]}


def make(cfg: AgentConfig) -> TrainerSetup:
    # The aggregator calls this too, with its own config (no [data]): only the starting vector matters.
    data = getattr(cfg, "data", None) or DataSettings()
    d = data
    opts = cfg.trainer.options
    features = int(opts.get("features", FEATURES))
    x, y = site_data(d.client_index, d.seed, int(d.options.get("samples", 120)), features)
    split = int(0.8 * len(y))
    trainer = SoftmaxRegressionTrainer(features, lr=float(opts.get("lr", 0.2)), seed=d.seed)
    delay = float(opts.get("step_delay_s", 0.0))

    def train_fn() -> Iterator[dict[str, np.ndarray]]:
        for b in batches(x[:split], y[:split], d.batch_size):
            if delay:
                time.sleep(delay)  # stretches a round so fault tests can strike mid-round
            yield b

    return TrainerSetup(trainer, train_fn, lambda: batches(x[split:], y[split:], d.batch_size))
