"""What every flat-vector trainer shares, whichever runtime computes its gradients.

:class:`FlatVectorTrainer` holds the optimizer options and state, the learning-rate schedule, the C-core
update (``fedpeft_edge.kernels``: global-norm clipping, AdamW / SGD with FedProx's proximal term), the
train / evaluate loops and the resume file. ``OrtTrainer`` (ORT Training) and ``GradientTrainer`` (a
lowered gradient model on stock onnxruntime) subclass it, so a resume file written by one loads in the
other for the same spec and ``c_*`` optimizer.

A subclass sets ``bundle`` (with ``spec_hash``) and ``_layout``, calls :meth:`_init_options` and
implements ``get_flat``, ``_write`` (store a checked vector), ``train_step`` (usually through
:meth:`_c_update`) and ``_eval_forward``; ``_eval_mode``, ``_extra_state`` and ``_restore_extra`` are
optional hooks.
"""

from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge import kernels
from fedpeft_edge.peft.layout import FlatLayout
from fedpeft_edge.runtime.durable import atomic_file, read_npz
from fedpeft_edge.runtime.errors import InvalidTypeError, InvalidValueError, NonFiniteError
from fedpeft_edge.training.base import EvalMetrics, TrainMetrics

C_OPTIMIZERS = ("c_adamw", "c_sgd")
SCHEDULES = ("constant", "linear", "cosine")
STATE_FORMAT = 1
_MOMENT_KEYS = {"c_adamw": ("m", "v"), "c_sgd": ("mom",)}


class FlatVectorTrainer(ABC):
    """Base of the trainers whose parameters are one flat float32 vector (see the module docstring)."""

    bundle: Any
    _layout: FlatLayout

    def _init_options(self, n: int, *, optimizers: tuple[str, ...], threads: int, lr: float, lr_schedule: str,
                      warmup_steps: int, total_steps: int | None, optimizer: str, weight_decay: float,
                      momentum: float, beta1: float, beta2: float, eps: float, prox_mu: float,
                      clip_norm: float | None, seed: int) -> None:
        """Check and store the options; allocate the optimizer state for ``n`` parameters."""
        if optimizer not in optimizers:
            raise InvalidValueError(f"optimizer must be one of {optimizers}, got {optimizer!r}")
        if lr_schedule not in SCHEDULES:
            raise InvalidValueError(f"lr_schedule must be one of {SCHEDULES}, got {lr_schedule!r}")
        if lr_schedule != "constant" and not total_steps:
            raise InvalidValueError(f"lr_schedule {lr_schedule!r} needs total_steps")
        if not (lr > 0 and math.isfinite(lr)):
            raise InvalidValueError(f"lr must be a positive finite number, got {lr!r}")
        if prox_mu < 0 or weight_decay < 0 or warmup_steps < 0:
            raise InvalidValueError("prox_mu, weight_decay and warmup_steps must be >= 0")
        if clip_norm is not None and not clip_norm > 0:
            raise InvalidValueError(f"clip_norm must be > 0 or None, got {clip_norm!r}")
        if not isinstance(threads, int) or threads < 1:
            raise InvalidValueError(f"threads must be a positive integer, got {threads!r}")
        self.optimizer_name = optimizer
        self.lr, self.lr_schedule = float(lr), lr_schedule
        self.warmup_steps, self.total_steps = int(warmup_steps), total_steps
        self.weight_decay, self.momentum = float(weight_decay), float(momentum)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.prox_mu, self.clip_norm = float(prox_mu), clip_norm
        self.threads, self.seed = threads, seed
        self._m = np.zeros(n, np.float32)
        self._v = np.zeros(n, np.float32)
        self._mom = np.zeros(n, np.float32)
        self.step = 0  # optimizer steps taken (drives bias correction and the schedule)
        self._w_ref: np.ndarray | None = None
        self._frozen: np.ndarray | None = None  # bool mask of parameters no step may change (effective)
        self._phase_frozen: np.ndarray | None = None  # set_frozen's mask (FedRep's phases)
        self._always_frozen: np.ndarray | None = None  # set_always_frozen's mask (a site's LoRA rank cut)

    @property
    def layout(self) -> FlatLayout:
        return self._layout

    # ---- subclass interface ---------------------------------------------------------------------
    @abstractmethod
    def get_flat(self) -> np.ndarray:
        """A copy of the trainable parameters as one float32 vector (flat-vector order)."""

    @abstractmethod
    def _write(self, flat: np.ndarray) -> None:
        """Store ``flat`` (already checked: float32, right length, finite) as the trainable parameters."""

    @abstractmethod
    def train_step(self, batch: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray]:
        """One optimizer step on one batch; returns (loss, logits)."""

    @abstractmethod
    def _eval_forward(self, batch: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray]:
        """(loss, logits) of one batch without gradients."""

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        yield

    def _extra_state(self) -> dict[str, np.ndarray]:
        """Arrays a subclass adds to the resume file."""
        return {}

    def _restore_extra(self, data: Mapping[str, np.ndarray], path: Path) -> None:
        """Called by :meth:`load_state` after every common check passed, before the parameters change;
        raise :class:`InvalidValueError` (leaving the trainer as it was) if the extra state is unusable."""
        return None  # an optional hook: a trainer without extra resume state has nothing to check

    # ---- flat vector ----------------------------------------------------------------------------
    def set_flat(self, flat: np.ndarray) -> None:
        if not isinstance(flat, np.ndarray) or flat.dtype != np.float32:
            raise InvalidTypeError(
                f"flat must be a float32 numpy array, got {getattr(flat, 'dtype', type(flat))}")
        if flat.shape != (self._layout.total,):
            raise InvalidValueError(f"flat has shape {flat.shape}, layout needs ({self._layout.total},)")
        if not np.isfinite(flat).all():
            raise NonFiniteError("flat vector holds NaN or Inf")
        self._write(flat)

    def set_prox_reference(self, flat: np.ndarray | None) -> None:
        """FedProx anchor (the global adapter at round start); None = use each train() call's start."""
        if flat is None:
            self._w_ref = None
            return
        if (not isinstance(flat, np.ndarray) or flat.dtype != np.float32
                or flat.shape != (self._layout.total,)):
            raise InvalidValueError(f"prox reference must be float32 of shape ({self._layout.total},)")
        self._w_ref = np.array(flat, np.float32, order="C")

    def set_frozen(self, mask: np.ndarray | None) -> None:
        """Freeze the parameters where ``mask`` is True (None: train everything): the steps that follow
        leave them and their optimizer state bit for bit as they are, and global-norm clipping sees only
        the trainable gradient. FedRep trains a site's head with the body frozen, then the body with the
        head frozen (site/personal.py). What :meth:`set_always_frozen` froze stays frozen as well."""
        phase = self._check_mask(mask)
        self._frozen = self._combined(phase, self._always_frozen)
        self._phase_frozen = phase

    def set_always_frozen(self, mask: np.ndarray | None) -> None:
        """Freeze the parameters where ``mask`` is True under every later :meth:`set_frozen` too: the rank
        slots a site below the bundle's LoRA rank does not train (peft/rank_slots.py)."""
        always = self._check_mask(mask)
        self._frozen = self._combined(self._phase_frozen, always)
        self._always_frozen = always

    def _check_mask(self, mask: np.ndarray | None) -> np.ndarray | None:
        if mask is None:
            return None
        m = np.asarray(mask)
        if m.dtype != np.bool_ or m.shape != (self._layout.total,):
            raise InvalidValueError(f"frozen mask must be bool of shape ({self._layout.total},)")
        return m.copy() if m.any() else None

    @staticmethod
    def _combined(*masks: np.ndarray | None) -> np.ndarray | None:
        """The union of the masks; raises (nothing changed yet) when it would freeze every parameter."""
        present = [m for m in masks if m is not None]
        if not present:
            return None
        union = np.logical_or.reduce(present)
        if union.all():
            raise InvalidValueError("frozen mask freezes every parameter: nothing would train")
        return union

    # ---- optimizer --------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (1-based)."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        total = max(int(self.total_steps or 1), self.warmup_steps + 1)
        frac = min(1.0, (step - self.warmup_steps) / (total - self.warmup_steps))
        if self.lr_schedule == "linear":
            return self.lr * (1.0 - frac)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))

    def _c_update(self, w: np.ndarray, g: np.ndarray, lr: float) -> None:
        """One C-core step in place on ``w`` (``g`` is clipped in place first when ``clip_norm`` is set)."""
        frozen = self._frozen
        if frozen is not None:  # kept aside and put back: weight decay and moments must not move them
            kept = [(a, a[frozen]) for a in (w, self._m, self._v, self._mom)]
            g[frozen] = 0.0
        if self.clip_norm is not None:
            kernels.clip_by_global_norm(g, float(self.clip_norm))
        ref = self._w_ref if self.prox_mu else None
        if self.optimizer_name == "c_adamw":
            kernels.adamw_step(w, g, self._m, self._v, step=self.step, lr=lr, beta1=self.beta1,
                               beta2=self.beta2, eps=self.eps, weight_decay=self.weight_decay,
                               prox_mu=self.prox_mu, w_ref=ref)
        else:
            kernels.sgd_step(w, g, self._mom if self.momentum else None, lr=lr, momentum=self.momentum,
                             weight_decay=self.weight_decay, prox_mu=self.prox_mu, w_ref=ref)
        if frozen is not None:
            for arr, vals in kept:
                arr[frozen] = vals

    def _next_step(self, loss: float) -> float:
        """Count a step whose loss is finite; returns its learning rate."""
        if not math.isfinite(loss):
            raise NonFiniteError(f"training loss is {loss} at step {self.step + 1}")
        self.step += 1
        return self.lr_at(self.step)

    # ---- loops ----------------------------------------------------------------------------------
    def train(self, batches: Iterable[Mapping[str, np.ndarray]], *, max_steps: int | None = None
              ) -> TrainMetrics:
        if max_steps is not None and max_steps < 0:
            raise InvalidValueError(f"max_steps must be >= 0, got {max_steps}")
        started = time.perf_counter()
        implicit_ref = self.prox_mu and self._w_ref is None
        if implicit_ref:
            self._w_ref = self.get_flat()
        total_loss, samples, steps, correct = 0.0, 0, 0, 0
        try:
            for batch in batches:
                if max_steps is not None and steps >= max_steps:
                    break
                loss, logits = self.train_step(batch)
                n = len(batch["labels"])
                total_loss += loss * n
                samples += n
                steps += 1
                correct += int((np.argmax(logits, axis=1) == batch["labels"]).sum())
        finally:
            if implicit_ref:
                self._w_ref = None
        return TrainMetrics(loss=total_loss / max(samples, 1), samples=samples, steps=steps,
                            seconds=time.perf_counter() - started,
                            accuracy=correct / samples if samples else None,
                            extra={"lr": self.lr_at(self.step)})

    def evaluate(self, batches: Iterable[Mapping[str, np.ndarray]]) -> EvalMetrics:
        total_loss, samples, correct = 0.0, 0, 0
        with self._eval_mode():
            for batch in batches:
                loss, logits = self._eval_forward(batch)
                n = len(batch["labels"])
                total_loss += float(loss) * n
                samples += n
                correct += int((np.argmax(logits, axis=1) == batch["labels"]).sum())
        if samples == 0:
            raise InvalidValueError("evaluate() got no batches")
        return EvalMetrics(loss=total_loss / samples, accuracy=correct / samples, samples=samples)

    # ---- resume ---------------------------------------------------------------------------------
    def save_state(self, path: Path) -> None:
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "format": np.array(STATE_FORMAT, np.int64),
            "spec_hash": np.array(self.bundle.spec_hash),
            "names": np.array("\n".join(s.name for s in self._layout.slots)),
            "optimizer": np.array(self.optimizer_name),
            "step": np.array(self.step, np.int64),
            "params": self.get_flat(),
        }
        if self.optimizer_name == "c_adamw":
            arrays.update(m=self._m, v=self._v)
        elif self.optimizer_name == "c_sgd":
            arrays.update(mom=self._mom)
        arrays.update(self._extra_state())
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as fh:
            np.savez(fh, **arrays)

    def load_state(self, path: Path) -> None:
        """Resume from :meth:`save_state`'s file. Everything is checked before anything changes, so a
        damaged or foreign file raises :class:`InvalidValueError` and leaves the trainer as it was."""
        path = Path(path)
        try:
            data = read_npz(path)
        except OSError as exc:
            raise InvalidValueError(f"unreadable trainer state {path}: {exc}") from exc
        n = self._layout.total

        def scalar(key: str, kinds: str) -> Any:
            a = data.get(key)
            if a is None or a.shape != () or a.dtype.kind not in kinds:
                raise InvalidValueError(f"trainer state {path}: {key!r} missing or not a scalar")
            return a[()]

        if int(scalar("format", "iu")) != STATE_FORMAT:
            raise InvalidValueError(f"trainer state {path} has an unknown format")
        if str(scalar("spec_hash", "U")) != self.bundle.spec_hash:
            raise InvalidValueError("trainer state was made for another spec/model (spec_hash differs)")
        if str(scalar("names", "U")).split("\n") != [s.name for s in self._layout.slots]:
            raise InvalidValueError("trainer state parameter layout differs from this bundle")
        saved_opt = str(scalar("optimizer", "U"))
        if saved_opt != self.optimizer_name:
            raise InvalidValueError(f"trainer state is for optimizer {saved_opt!r}, "
                                    f"this trainer uses {self.optimizer_name!r}")
        step = int(scalar("step", "iu"))
        if step < 0:
            raise InvalidValueError(f"trainer state {path}: step {step} < 0")
        params = state_vector(data, "params", n, path)
        moments = {k: state_vector(data, k, n, path) for k in _MOMENT_KEYS.get(self.optimizer_name, ())}
        self._restore_extra(data, path)
        self.set_flat(params)
        if self.optimizer_name == "c_adamw":
            self._m[:] = moments["m"]
            self._v[:] = moments["v"]
        elif self.optimizer_name == "c_sgd":
            self._mom[:] = moments["mom"]
        self.step = step


def state_vector(data: Mapping[str, np.ndarray], key: str, n: int, path: Path, dtype: Any = np.float32
                 ) -> np.ndarray:
    """A 1-D member of a resume file: float32 ones must have the layout's size and be finite."""
    a = data.get(key)
    if a is None or a.dtype != dtype or a.ndim != 1 or (dtype == np.float32 and a.shape != (n,)):
        raise InvalidValueError(f"trainer state {path}: {key!r} missing or not a {np.dtype(dtype)} "
                                f"vector of the layout's size")
    if dtype == np.float32 and not np.isfinite(a).all():
        raise InvalidValueError(f"trainer state {path}: {key!r} holds NaN/Inf")
    return a
