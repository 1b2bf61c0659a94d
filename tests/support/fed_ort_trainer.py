"""Trainer factory for service tests with the real ORT Training backend on a tiny synthetic transformer
(tests/support/conftest_models.py) with LoRA: ``[trainer] kind = "factory"``,
``factory = "fed_ort_trainer:make"``, ``bundle_dir`` = a bundle made by ``generate_artifacts``.
Each site gets its own synthetic token data."""

from __future__ import annotations

from conftest_models import batches, text_data

from fedpeft_edge.peft.artifacts import ArtifactBundle
from fedpeft_edge.site.config import AgentConfig, DataSettings
from fedpeft_edge.site.trainer_setup import TrainerSetup
from fedpeft_edge.training.ort_trainer import OrtTrainer


def make(cfg: AgentConfig) -> TrainerSetup:
    # The aggregator calls this too, with its own config (no [data]): only the starting vector matters.
    data = getattr(cfg, "data", None) or DataSettings()
    bundle = ArtifactBundle.load(cfg.trainer.bundle_dir)  # type: ignore[arg-type]
    trainer = OrtTrainer(bundle, threads=1, lr=float(cfg.trainer.options.get("lr", 0.02)))
    data = text_data(n=64, seed=100 + data.client_index)
    train = {k: v[:48] for k, v in data.items()}
    held_out = {k: v[48:] for k, v in data.items()}
    return TrainerSetup(trainer, lambda: batches(train, 16), lambda: batches(held_out, 16), bundle.spec_hash)
