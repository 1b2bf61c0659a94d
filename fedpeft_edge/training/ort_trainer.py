"""On-device trainer over an ORT Training artifact bundle (implements :class:`LocalTrainer`).

Optimizers:

- ``"c_adamw"`` (default) / ``"c_sgd"``: ORT computes loss and gradients (``train_step`` only); the update
  runs in the C core (``fedpeft_edge.kernels``) on one flat float32 vector, with FedProx's proximal term
  and global-norm clipping. The optimizer state is ours (numpy), so ``save_state`` writes a small file.
- ``"ort_adamw"``: ORT's own AdamW graph (the bundle's optimizer model, fixed hyper-parameters from the
  manifest). No prox/clipping. ORT keeps its moments inside the checkpoint state and exposes them only via
  ``save_checkpoint``, which also writes the frozen base, so its resume file is as large as the base.

Parameter values are read and written per tensor through ``CheckpointState.parameters``; the numpy
buffers handed to ORT are kept alive until the copy returns (see STACK_NOTES on OrtValue lifetimes).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fedpeft_edge import kernels
from fedpeft_edge.peft.artifacts import ArtifactBundle
from fedpeft_edge.peft.layout import FlatLayout
from fedpeft_edge.runtime.durable import atomic_file
from fedpeft_edge.runtime.errors import InvalidTypeError, InvalidValueError, NonFiniteError
from fedpeft_edge.runtime.ort_import import ort, training_api
from fedpeft_edge.training.base import EvalMetrics, TrainMetrics

OPTIMIZERS = ("c_adamw", "c_sgd", "ort_adamw")
SCHEDULES = ("constant", "linear", "cosine")
STATE_FORMAT = 1
_ONNX_TO_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT64: np.int64,
               onnx.TensorProto.INT32: np.int32, onnx.TensorProto.DOUBLE: np.float64}


def _input_dtypes(path: Path) -> dict[str, Any]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {i.name: _ONNX_TO_NP.get(i.type.tensor_type.elem_type, np.float32) for i in graph.input}


class OrtTrainer:
    """Local training for one site over an :class:`ArtifactBundle`."""

    def __init__(self, bundle: ArtifactBundle | Path | str, *, threads: int = 1, lr: float = 1e-3,
                 lr_schedule: str = "constant", warmup_steps: int = 0, total_steps: int | None = None,
                 optimizer: str = "c_adamw", weight_decay: float = 0.0, momentum: float = 0.9,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6, prox_mu: float = 0.0,
                 clip_norm: float | None = None, seed: int = 0) -> None:
        if not isinstance(bundle, ArtifactBundle):
            bundle = ArtifactBundle.load(bundle)
        if optimizer not in OPTIMIZERS:
            raise InvalidValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
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
        if optimizer == "ort_adamw":
            if prox_mu or clip_norm is not None:
                raise InvalidValueError(
                    "prox_mu and clip_norm need a c_* optimizer (ORT's AdamW graph has neither)")
            fixed = bundle.ort_adamw
            if (weight_decay, beta1, beta2, eps) != (fixed["weight_decay"], fixed["beta1"], fixed["beta2"],
                                                     fixed["eps"]):
                raise InvalidValueError(f"ort_adamw hyper-parameters are fixed by the bundle: {fixed}")
        self.bundle = bundle
        self.optimizer_name = optimizer
        self.lr, self.lr_schedule = float(lr), lr_schedule
        self.warmup_steps, self.total_steps = int(warmup_steps), total_steps
        self.weight_decay, self.momentum = float(weight_decay), float(momentum)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.prox_mu, self.clip_norm = float(prox_mu), clip_norm
        self.threads, self.seed = threads, seed
        self._layout = FlatLayout.from_shapes(zip(bundle.param_order, bundle.param_shapes, strict=True))
        self._dtypes = _input_dtypes(bundle.eval_model)
        self._build_session(bundle.checkpoint)
        n = self._layout.total
        self._m = np.zeros(n, np.float32)
        self._v = np.zeros(n, np.float32)
        self._mom = np.zeros(n, np.float32)
        self.step = 0  # optimizer steps taken (drives bias correction and the schedule)
        self._w_ref: np.ndarray | None = None

    # ---- session ------------------------------------------------------------------------------
    def _build_session(self, checkpoint: Path) -> None:
        api, rt = training_api(), ort()
        rt.set_seed(self.seed)
        options = rt.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._state = api.CheckpointState.load_checkpoint(str(checkpoint))
        self._module = api.Module(str(self.bundle.training_model), self._state,
                                  str(self.bundle.eval_model), session_options=options)
        self._ort_opt = (api.Optimizer(str(self.bundle.optimizer_model), self._module)
                         if self.optimizer_name == "ort_adamw" else None)
        self._train_inputs = list(self._module.input_names())
        self._module.train()
        self._eval_inputs = self._train_inputs  # same user inputs + labels in both graphs

    @property
    def layout(self) -> FlatLayout:
        return self._layout

    # ---- flat vector ----------------------------------------------------------------------------
    def get_flat(self) -> np.ndarray:
        out = np.empty(self._layout.total, np.float32)
        params = self._state.parameters
        for slot in self._layout.slots:
            out[slot.offset:slot.offset + slot.size] = params[slot.name].data.reshape(-1)
        return out

    def parameter(self, name: str) -> np.ndarray:
        """A copy of any checkpoint parameter, trainable or frozen (tests check the base stays put)."""
        if name not in self._state.parameters:
            raise InvalidValueError(f"no parameter {name!r} in the checkpoint state")
        return np.array(self._state.parameters[name].data, copy=True)

    def _write(self, flat: np.ndarray) -> None:
        rt = ort()
        c_state = self._state._state  # write through the C state so we control the OrtValue lifetime
        for slot in self._layout.slots:
            array = np.array(flat[slot.offset:slot.offset + slot.size].reshape(slot.shape), np.float32,
                             order="C")
            value = rt.OrtValue.ortvalue_from_numpy(array)  # holds `array`; both live past the copy
            c_state.copy_parameter_from(slot.name, value._ortvalue)
            del value, array

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

    # ---- feeds --------------------------------------------------------------------------------
    def _feeds(self, batch: Mapping[str, np.ndarray], with_labels: bool = True) -> list[np.ndarray]:
        feeds = []
        for name in self._train_inputs:
            if name not in batch:
                if name == "labels" and not with_labels:
                    n = len(next(iter(batch.values())))
                    feeds.append(np.zeros(n, np.int64))
                    continue
                raise InvalidValueError(f"batch lacks input {name!r} (has {sorted(batch)})")
            feeds.append(np.ascontiguousarray(batch[name], dtype=self._dtypes.get(name, np.float32)))
        return feeds

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

    def _gradients(self) -> np.ndarray:
        g = np.empty(self._layout.total, np.float32)
        params = self._state.parameters
        for slot in self._layout.slots:
            grad = params[slot.name].grad
            if grad is None:
                raise RuntimeError(f"ORT produced no gradient for {slot.name!r}")
            g[slot.offset:slot.offset + slot.size] = grad.reshape(-1)
        return g

    def loss_and_gradients(self, batch: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray, np.ndarray]:
        """Forward and backward on one batch without an optimizer step: ``(loss, logits, flat gradient)``
        (gradient in flat-vector order). For checks of the training graph against another oracle."""
        self._module.train()
        self._module.lazy_reset_grad()
        loss, logits = self._module(*self._feeds(batch))
        return float(loss), np.asarray(logits), self._gradients()

    # ---- training -------------------------------------------------------------------------------
    def train_step(self, batch: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray]:
        """One optimizer step on one batch; returns (loss, logits)."""
        feeds = self._feeds(batch)
        self._module.train()
        self._module.lazy_reset_grad()
        loss, logits = self._module(*feeds)
        loss = float(loss)
        if not math.isfinite(loss):
            raise NonFiniteError(f"training loss is {loss} at step {self.step + 1}")
        self.step += 1
        lr = self.lr_at(self.step)
        if self._ort_opt is not None:
            self._ort_opt.set_learning_rate(lr)
            self._ort_opt.step()
            return loss, logits
        w, g = self.get_flat(), self._gradients()
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
        self._write(w)
        return loss, logits

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
        self._module.eval()
        total_loss, samples, correct = 0.0, 0, 0
        try:
            for batch in batches:
                loss, logits = self._module(*self._feeds(batch))
                n = len(batch["labels"])
                total_loss += float(loss) * n
                samples += n
                correct += int((np.argmax(logits, axis=1) == batch["labels"]).sum())
        finally:
            self._module.train()
        if samples == 0:
            raise InvalidValueError("evaluate() got no batches")
        return EvalMetrics(loss=total_loss / samples, accuracy=correct / samples, samples=samples)

    def predict(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Logits for one batch of model inputs (labels not needed)."""
        self._module.eval()
        try:
            _, logits = self._module(*self._feeds(inputs, with_labels=False))
        finally:
            self._module.train()
        return np.asarray(logits)

    # ---- resume ---------------------------------------------------------------------------------
    def save_state(self, path: Path) -> None:
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "format": np.array(STATE_FORMAT, np.int64),
            "spec_hash": np.array(self.bundle.spec_hash),
            "names": np.array("\n".join(self._layout.slots[i].name for i in range(len(self._layout.slots)))),
            "optimizer": np.array(self.optimizer_name),
            "step": np.array(self.step, np.int64),
            "params": self.get_flat(),
        }
        if self.optimizer_name == "c_adamw":
            arrays.update(m=self._m, v=self._v)
        elif self.optimizer_name == "c_sgd":
            arrays.update(mom=self._mom)
        else:  # ORT keeps AdamW moments in its state; only its own checkpoint carries them
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = Path(tmp) / "ckpt"
                training_api().CheckpointState.save_checkpoint(self._state, str(ckpt),
                                                               include_optimizer_state=True)
                arrays["ort_checkpoint"] = np.frombuffer(ckpt.read_bytes(), np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as fh:
            np.savez(fh, **arrays)

    def load_state(self, path: Path) -> None:
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, InvalidValueError) as exc:
            raise InvalidValueError(f"unreadable trainer state {path}: {exc}") from exc
        if int(data.get("format", -1)) != STATE_FORMAT:
            raise InvalidValueError(f"trainer state {path} has an unknown format")
        if str(data["spec_hash"]) != self.bundle.spec_hash:
            raise InvalidValueError("trainer state was made for another spec/model (spec_hash differs)")
        if str(data["names"]).split("\n") != [s.name for s in self._layout.slots]:
            raise InvalidValueError("trainer state parameter layout differs from this bundle")
        if str(data["optimizer"]) != self.optimizer_name:
            raise InvalidValueError(f"trainer state is for optimizer {str(data['optimizer'])!r}, "
                             f"this trainer uses {self.optimizer_name!r}")
        params = np.asarray(data["params"], np.float32)
        if self.optimizer_name == "ort_adamw":
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = Path(tmp) / "ckpt"
                ckpt.write_bytes(data["ort_checkpoint"].tobytes())
                self._build_session(ckpt)
        self.set_flat(params)
        if self.optimizer_name == "c_adamw":
            self._m[:] = data["m"]
            self._v[:] = data["v"]
        elif self.optimizer_name == "c_sgd":
            self._mom[:] = data["mom"]
        self.step = int(data["step"])
