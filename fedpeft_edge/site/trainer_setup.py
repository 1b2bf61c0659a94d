"""A site's trainer and data, made from its configuration (``[trainer]`` and ``[data]``)."""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpeft_edge.protocol.config import TrainerSettings
from fedpeft_edge.runtime.errors import FedPeftError, InvalidValueError
from fedpeft_edge.runtime.names import TRAINER_KINDS
from fedpeft_edge.site.config import AgentConfig
from fedpeft_edge.training.base import LocalTrainer

if TYPE_CHECKING:
    from fedpeft_edge.peft.lowering import GradientModel

log = logging.getLogger(__name__)

Batch = Mapping[str, np.ndarray]
BatchesFn = Callable[[], Iterable[Batch]]


@dataclass
class TrainerSetup:
    """What a site needs to take part: a trainer and its data (batches are made fresh per epoch)."""

    trainer: LocalTrainer
    train_batches_fn: BatchesFn
    eval_batches_fn: BatchesFn | None = None
    spec_hash: str | None = None  # from the PEFT artifact bundle; None: adopt the aggregator's
    bundle_id: str | None = None  # the verified site bundle ([bundle]) it was built from


# --- trainer + data from configuration (the agent CLI) -----------------------------------------------
GRADIENT_CACHE = "gradient_model"  # <state_dir>/gradient_model: the bundle lowered by this site, once


def build_trainer_setup(cfg: AgentConfig) -> TrainerSetup:
    """``[bundle]`` first (site/bundle_setup.py: verified, extracted, applied to the config; refused with
    a one-line BundleError), then :func:`_build_trainer_setup`."""
    from fedpeft_edge.site.bundle_setup import prepare_site_bundle

    site_bundle = prepare_site_bundle(cfg)
    setup = _build_trainer_setup(cfg)
    if site_bundle is not None:
        setup.bundle_id = site_bundle.bundle_id
    return setup


def _build_trainer_setup(cfg: AgentConfig) -> TrainerSetup:
    """Make the site's trainer and data from ``[trainer]`` and ``[data]``.

    ``kind = "factory"``: ``factory = "module:function"``, called with the config, returns TrainerSetup.
    ``kind = "gradient"`` (the default): :class:`GradientTrainer` on stock onnxruntime over the lowered
    gradient model in ``gradient_dir``, or over ``bundle_dir`` lowered once into
    ``<state_dir>/gradient_model`` (lowering needs ORT Training; a device with stock onnxruntime is given
    ``gradient_dir``). ``kind = "ort"``: :class:`OrtTrainer` (ONNX Runtime Training) over ``bundle_dir``.
    ``options`` are the trainer's keyword options (lr, optimizer, ...); ``prox_mu`` (FedProx) is a key of
    ``[trainer]`` itself, and a factory's trainer must apply it when it is set. The site's data is
    its own file ``data.path`` (labels mapped through ``data.classes``; ``eval_fraction`` held out) or
    its share ``partition(...)[client_index]`` of the benchmark ``data.dataset``; neither gives a setup
    without data (the aggregator only needs the initial adapter). Model inputs are made with the
    prepared model's meta, read from ``data.options.prepared_dir`` (its prepared.json; other options
    such as ``max_len`` override it) or given inline in ``data.options`` (``model_kind``,
    ``tokenizer_json``/``max_len`` or ``image_size``/``mean``/``std``).
    """
    t = cfg.trainer
    if t.kind == "factory":
        if not t.factory or ":" not in t.factory:
            raise InvalidValueError("trainer.factory must be 'package.module:function'")
        mod_name, func_name = t.factory.split(":", 1)
        setup = getattr(importlib.import_module(mod_name), func_name)(cfg)
        if not isinstance(setup, TrainerSetup):
            raise InvalidValueError(f"{t.factory} must return a TrainerSetup, got {type(setup).__name__}")
        applied = getattr(setup.trainer, "prox_mu", None)
        if t.prox_mu and applied != t.prox_mu:  # a FedProx the trainer ignores must not pass silently
            raise InvalidValueError(f"trainer.prox_mu = {t.prox_mu:g}, but the trainer of {t.factory} does "
                                    f"not apply it (its prox_mu: {applied!r})")
        return setup
    if t.kind not in TRAINER_KINDS:
        raise InvalidValueError(f"trainer.kind must be one of {TRAINER_KINDS}, not {t.kind!r}")
    if "prox_mu" in t.options:
        raise InvalidValueError("trainer.options.prox_mu: set trainer.prox_mu instead")
    trainer: LocalTrainer
    threads = max(1, int(cfg.agent.threads))
    cap = cfg.governor.max_threads  # [governor] max_threads (site/governor.py): the plant keeps its cores
    if cap is not None and threads > cap:
        log.info("intra-op threads capped by [governor] max_threads: %d -> %d", threads, cap)
        threads = cap
    if t.kind == "ort":
        if not t.bundle_dir:
            raise InvalidValueError("trainer.bundle_dir is required for kind = 'ort'")
        cfg.data.validate()  # command-line flags may have set dataset next to a configured path
        from fedpeft_edge.peft.artifacts import ArtifactBundle
        from fedpeft_edge.training.ort_trainer import OrtTrainer

        model: Any = ArtifactBundle.load(t.bundle_dir)
        _check_head(cfg, model.spec.head_classes)
        trainer = OrtTrainer(model, threads=threads, prox_mu=t.prox_mu, **t.options)
    else:
        if not t.gradient_dir and not t.bundle_dir:
            raise InvalidValueError("kind = 'gradient' needs trainer.gradient_dir (a lowered gradient model) "
                                    "or trainer.bundle_dir (lowered on first start)")
        cfg.data.validate()
        model = gradient_model_for(t, Path(cfg.agent.state_dir))
        _check_head(cfg, model.spec.head_classes)
        trainer = make_gradient_trainer(model, threads, t.options, prox_mu=t.prox_mu)
    d = cfg.data
    if not d.dataset and not d.path:
        return TrainerSetup(trainer, lambda: iter(()), None, model.spec_hash)
    train_in, train_y, eval_in, eval_y = site_arrays(cfg)
    epoch = [0]

    def train_fn() -> Iterator[Batch]:
        from fedpeft_edge.data.batches import iterate_batches

        epoch[0] += 1  # a new shuffle per epoch, reproducible from the seed
        return iterate_batches(train_in, train_y, d.batch_size, shuffle=True, seed=d.seed * 1000 + epoch[0])

    def eval_fn() -> Iterator[Batch]:
        from fedpeft_edge.data.batches import iterate_batches

        return iterate_batches(eval_in, eval_y, d.batch_size, shuffle=False, seed=0)

    return TrainerSetup(trainer, train_fn, eval_fn if eval_y.size else None, model.spec_hash)


def _check_head(cfg: AgentConfig, head: int | None) -> None:
    d = cfg.data
    if d.path and head is not None and len(d.classes) != head:
        raise InvalidValueError(
            f"data.classes names {len(d.classes)} classes but the bundle's head has {head} "
            "outputs; list every class in the head's output order")


# --- the gradient backend (stock onnxruntime) ---------------------------------------------------------
def gradient_model_for(t: TrainerSettings, state_dir: Path) -> GradientModel:
    """The gradient model of ``[trainer]``: ``gradient_dir`` as given, or ``bundle_dir`` lowered into
    ``<state_dir>/gradient_model`` on first use and reused while it matches the bundle's spec hash."""
    from fedpeft_edge.peft.lowering import GradientModel

    if t.gradient_dir:
        model = GradientModel.load(t.gradient_dir)
        if t.bundle_dir:  # both given: they must describe the same adapter
            from fedpeft_edge.peft.artifacts import ArtifactBundle  # imports onnx: only when needed

            bundle_hash = ArtifactBundle.load(t.bundle_dir).spec_hash
            if bundle_hash != model.spec_hash:
                raise InvalidValueError(
                    f"trainer.gradient_dir {t.gradient_dir} (spec {model.spec_hash[:12]}) was not lowered "
                    f"from trainer.bundle_dir {t.bundle_dir} (spec {bundle_hash[:12]})")
        return model
    if not t.bundle_dir:
        raise InvalidValueError("kind = 'gradient' needs trainer.gradient_dir or trainer.bundle_dir")
    from fedpeft_edge.peft.artifacts import ArtifactBundle

    bundle = ArtifactBundle.load(t.bundle_dir)
    return cached_gradient_model(bundle, state_dir / GRADIENT_CACHE)


def cached_gradient_model(bundle: Any, folder: Path) -> GradientModel:
    """``bundle`` lowered into ``folder``: reused when a complete one for the same spec is there, else made
    (lowering writes a temp folder beside it and renames it into place, so a crash leaves no half model)."""
    from fedpeft_edge.peft.lowering import GradientModel, lower_to_gradient_model

    def existing() -> GradientModel | None:
        try:
            model = GradientModel.load(folder)
        except FedPeftError:
            return None
        return model if model.spec_hash == bundle.spec_hash else None

    if (model := existing()) is not None:
        return model
    log.info("lowering the bundle %s to a gradient model in %s (first start only)", bundle.directory, folder)
    try:
        return lower_to_gradient_model(bundle, folder, overwrite=True)
    except ImportError as exc:
        raise InvalidValueError(
            f"lowering the bundle needs onnxruntime-training ({exc}); on a device with stock onnxruntime "
            "set trainer.gradient_dir to a gradient model lowered on the central side") from exc
    except OSError:
        if (model := existing()) is not None:  # another process finished the same folder first
            return model
        raise


SITE_MICRO_BATCH = 4


def make_gradient_trainer(model: GradientModel, threads: int, options: Mapping[str, Any], *,
                          prox_mu: float = 0.0) -> LocalTrainer:
    """GradientTrainer with ``[trainer] options`` and ``prox_mu``; options it does not have are refused by
    name."""
    from fedpeft_edge.training.gradient_trainer import OPTIMIZERS, GradientTrainer

    allowed = set(inspect.signature(GradientTrainer.__init__).parameters) - {"self", "model", "threads",
                                                                             "prox_mu"}
    unknown = sorted(set(options) - allowed)
    if "threads" in options:
        raise InvalidValueError("trainer.options.threads: set agent.threads instead")
    if "prox_mu" in options:
        raise InvalidValueError("trainer.options.prox_mu: set trainer.prox_mu instead")
    if unknown:
        raise InvalidValueError(f"trainer.options {unknown} not supported by kind = 'gradient'; "
                                f"allowed: {sorted(allowed)}")
    optimizer = options.get("optimizer", "c_adamw")
    if optimizer not in OPTIMIZERS:
        hint = " (ORT's AdamW graph needs kind = 'ort')" if optimizer == "ort_adamw" else ""
        raise InvalidValueError(f"trainer.options.optimizer {optimizer!r} not supported by kind = "
                                f"'gradient'{hint}; use one of {OPTIMIZERS}")
    options = dict(options)
    # Micro-batches of 4 by default: the same gradient (a mean over independent samples; the prepared
    # models hold no batch statistics) for half the activation memory and no loss of speed on MiniLM
    # (bench/RESULTS.md: 205 vs 394 MB, 0.29 vs 0.30 s per step). micro_batch = 0 turns it off.
    micro = options.pop("micro_batch", SITE_MICRO_BATCH)
    return GradientTrainer(model, threads=threads, micro_batch=micro or None, prox_mu=prox_mu, **options)


def site_arrays(cfg: AgentConfig) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray],
                                               np.ndarray]:
    """(train inputs, train labels, eval inputs, eval labels) of this site, encoded for the model."""
    from fedpeft_edge.data.features import encode_for_model

    d = cfg.data
    meta, kind = _model_meta(d.options)
    if d.path:
        ev, tr = _local_file_split(cfg)
    else:
        ev, tr = _benchmark_share_split(cfg)
    return (encode_for_model(tr, meta, kind), tr.labels, encode_for_model(ev, meta, kind), ev.labels)


def _model_meta(options: Mapping[str, object]) -> tuple[dict[str, object], str]:
    """The prepared model's input meta and kind (``prepared_dir``'s prepared.json, else inline options)."""
    opts = dict(options)
    if "prepared_dir" in opts:
        from fedpeft_edge.data.prepared_model import load_prepared

        pdir = opts.pop("prepared_dir")
        # load_prepared checks the folder is complete and max_len is an int in [2, 512]
        prepared = load_prepared(str(pdir), max_len=opts.pop("max_len", None))  # type: ignore[arg-type]
        return {**prepared.meta, **opts}, prepared.kind
    return opts, str(opts.pop("model_kind", "text"))


def _local_file_split(cfg: AgentConfig):  # -> (eval, train) datasets
    from fedpeft_edge.data.local_files import load_local_dataset, split_eval

    d = cfg.data
    ds = load_local_dataset(d.path, d.classes, limits=d.limits())  # type: ignore[arg-type]
    n = len(ds) if d.max_samples is None else min(len(ds), int(d.max_samples))
    eval_idx, train_idx = split_eval(len(ds), d.eval_fraction, d.seed)
    if n < len(ds):  # keep the split fixed; only shrink each side proportionally
        keep_eval = round(n * len(eval_idx) / len(ds))
        eval_idx, train_idx = eval_idx[:keep_eval], train_idx[: n - keep_eval]
    log.info("local data %s: %d samples (%d train, %d held out), %d classes", d.path, len(ds),
             len(train_idx), len(eval_idx), len(d.classes))
    return ds.take(eval_idx), ds.take(train_idx)


def _benchmark_share_split(cfg: AgentConfig):  # -> (eval, train) datasets
    from fedpeft_edge.data.datasets import load_dataset
    from fedpeft_edge.data.partition import partition

    d = cfg.data
    train = load_dataset(d.dataset, d.split)  # type: ignore[arg-type]
    groups = getattr(train, "groups", None)
    parts = partition(d.partition, train.labels, groups, d.num_clients, d.alpha, d.seed)
    if not 0 <= d.client_index < len(parts):
        raise InvalidValueError(f"data.client_index {d.client_index} outside 0..{len(parts) - 1}")
    mine = train.take(parts[d.client_index])
    rng = np.random.default_rng([d.seed, d.client_index])
    order = rng.permutation(len(mine.labels))
    if d.max_samples is not None:
        order = order[: int(d.max_samples)]
    n_eval = max(1, len(order) // 5) if len(order) >= 5 else 0
    return mine.take(order[:n_eval]), mine.take(order[n_eval:])
