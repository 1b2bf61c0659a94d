"""Where the aggregator's first global comes from: a ``.npy`` vector, the gradient model or bundle, or a
trainer factory."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from fedpeft_edge.central.config import AggregatorServiceConfig
from fedpeft_edge.peft.layout import FlatLayout
from fedpeft_edge.runtime.errors import FedPeftError, InvalidValueError


def load_vector(path: str | Path) -> np.ndarray:
    """A 1-D float32 vector from a .npy file (no pickles)."""
    try:
        arr = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidValueError(f"cannot read initial global {path}: {exc}") from exc
    if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.size == 0:
        raise InvalidValueError(f"initial global {path} must be a non-empty 1-D array")
    if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)):
        raise InvalidValueError(f"initial global {path} must hold finite floats")
    return arr.astype(np.float32)


def initial_from_trainer(cfg: AggregatorServiceConfig) -> tuple[np.ndarray, str | None]:
    """The first global from ``[trainer]``: the starting adapter of the gradient model (``kind =
    "gradient"`` with ``gradient_dir``) or of the bundle (``bundle_dir``; the same values, and no trainer or
    data is built), or, for ``kind = "factory"`` (tests, simulations), the factory's trainer."""
    t = cfg.trainer
    if t.kind == "gradient" and t.gradient_dir:
        from fedpeft_edge.peft.lowering import GradientModel

        try:
            model = GradientModel.load(t.gradient_dir)
            return model.initial_vector(), model.spec_hash
        except (OSError, FedPeftError) as exc:
            raise InvalidValueError(
                f"aggregator cannot read the gradient model {t.gradient_dir}: {exc}") from exc
    if t.kind in ("gradient", "ort") and t.bundle_dir:
        from fedpeft_edge.peft.artifacts import ArtifactBundle

        try:
            bundle = ArtifactBundle.load(t.bundle_dir)
        except (OSError, FedPeftError) as exc:
            raise InvalidValueError(f"aggregator cannot read the bundle {t.bundle_dir}: {exc}") from exc
        return bundle.initial_vector(), bundle.spec_hash
    if t.kind == "factory" and t.factory and ":" in t.factory:
        mod_name, func_name = t.factory.split(":", 1)
        setup = getattr(importlib.import_module(mod_name), func_name)(cfg)
        return np.asarray(setup.trainer.get_flat(), dtype=np.float32), setup.spec_hash
    raise InvalidValueError(
        "aggregator needs an initial global: set aggregator.initial_global (.npy), or a [trainer] section "
        "with kind = 'gradient' + gradient_dir or bundle_dir, kind = 'ort' + bundle_dir, or kind = "
        "'factory' + factory")


def adapter_layout(cfg: AggregatorServiceConfig) -> FlatLayout | None:
    """The flat layout of the fleet's adapter, from ``[trainer] gradient_dir`` or ``bundle_dir`` (their
    metadata only); None without one. The aggregator needs it to count sites below the LoRA rank."""
    t = cfg.trainer
    try:
        if t.gradient_dir:
            from fedpeft_edge.peft.lowering import GradientModel

            return GradientModel.load(t.gradient_dir).layout
        if t.bundle_dir:
            from fedpeft_edge.peft.artifacts import ArtifactBundle

            b = ArtifactBundle.load(t.bundle_dir)
            return FlatLayout.from_shapes(zip(b.param_order, b.param_shapes, strict=True))
    except (OSError, FedPeftError) as exc:
        raise InvalidValueError(f"aggregator cannot read the adapter layout from [trainer]: {exc}") from exc
    return None


__all__ = ["adapter_layout", "initial_from_trainer", "load_vector"]
