"""The site side of the demo: the agent's trainer factory and the shard file each site reads."""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.faces.tasks import iterate
from fedpeft_edge.runtime.errors import InvalidValueError, ensure

# What an agent's ``trainer.factory`` names; the agent imports it in its own process.
FACTORY = "fedpeft_edge.faces.demo.site:site_trainer_setup"


def site_trainer_setup(cfg: Any) -> Any:
    """Agent factory (``trainer.kind = "factory"``): the site's trainer and its own shard.

    The trainer is a GradientTrainer (stock onnxruntime) over ``trainer.gradient_dir`` when it is set,
    else an OrtTrainer (ORT Training) over ``trainer.bundle_dir``. ``trainer.options``: ``shard`` (npz
    written by the demo), ``lr``, ``batch_size``, ``seed``; ``trainer.prox_mu`` is FedProx's term. The
    shard holds ``train/<input>``, ``train/labels``, ``test/<input>``, ``test/labels`` arrays.
    """
    from fedpeft_edge.site.trainer_setup import TrainerSetup

    opts = dict(cfg.trainer.options)
    ensure(cfg.trainer.gradient_dir or cfg.trainer.bundle_dir,
           "trainer.gradient_dir or trainer.bundle_dir is required")
    ensure("shard" in opts, "trainer.options.shard (the site's data file) is required")
    threads, lr = max(1, int(cfg.agent.threads)), float(opts.get("lr", 3e-3))
    mu = float(cfg.trainer.prox_mu)
    if cfg.trainer.gradient_dir:
        from fedpeft_edge.peft.lowering import GradientModel
        from fedpeft_edge.training.gradient_trainer import GradientTrainer

        bundle: Any = GradientModel.load(cfg.trainer.gradient_dir)
        trainer: Any = GradientTrainer(bundle, threads=threads, lr=lr, prox_mu=mu)
    else:
        from fedpeft_edge.peft.artifacts import ArtifactBundle
        from fedpeft_edge.training.ort_trainer import OrtTrainer

        bundle = ArtifactBundle.load(cfg.trainer.bundle_dir)
        trainer = OrtTrainer(bundle, threads=threads, lr=lr, prox_mu=mu)
    train_in, train_y, test_in, test_y = load_shard(Path(opts["shard"]))
    batch_size = int(opts.get("batch_size", 16))
    seed = int(opts.get("seed", 0))
    rounds = [0]

    def train_batches() -> Iterator[dict[str, np.ndarray]]:
        rounds[0] += 1  # a fresh order each round; endless, the agent stops at local_steps
        return iterate(train_in, train_y, batch_size, shuffle=True, seed=seed * 1000 + rounds[0])

    def eval_batches() -> Iterator[dict[str, np.ndarray]]:
        return iterate(test_in, test_y, 64, shuffle=False)

    return TrainerSetup(trainer, train_batches, eval_batches if test_y.size else None, bundle.spec_hash)


def save_shard(
    path: Path,
    train: Mapping[str, np.ndarray],
    train_y: np.ndarray,
    test: Mapping[str, np.ndarray],
    test_y: np.ndarray,
) -> None:
    arrays = {f"train/{k}": v for k, v in train.items()}
    arrays.update({f"test/{k}": v for k, v in test.items()})
    arrays["train/labels"] = train_y.astype(np.int64)
    arrays["test/labels"] = test_y.astype(np.int64)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def load_shard(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray], np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, builtins.ValueError) as exc:  # numpy raises the builtin (e.g. "pickled data")
        raise InvalidValueError(f"unreadable site shard {path}: {exc}") from exc
    for key in ("train/labels", "test/labels"):
        ensure(key in data, f"site shard {path} lacks {key}")
    train = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith("train/") and k != "train/labels"}
    test = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith("test/") and k != "test/labels"}
    return train, data["train/labels"], test, data["test/labels"]
