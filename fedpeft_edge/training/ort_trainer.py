"""On-device trainer over an ORT Training artifact bundle (implements :class:`LocalTrainer`).

Optimizers:

- ``"c_adamw"`` (default) / ``"c_sgd"``: ORT computes loss and gradients (``train_step`` only); the update
  runs in the C core (``fedpeft_edge.kernels``) on one flat float32 vector, with FedProx's proximal term
  and global-norm clipping. The optimizer state is ours (numpy), so ``save_state`` writes a small file.
- ``"ort_adamw"``: ORT's own AdamW graph (the bundle's optimizer model, fixed hyper-parameters from the
  manifest). No prox/clipping. ORT keeps its moments inside the checkpoint state and exposes them only via
  ``save_checkpoint``, which also writes the frozen base, so its resume file is as large as the base.

Options, the schedule, the C-core update, the loops and the resume file are shared with
``GradientTrainer`` (:mod:`fedpeft_edge.training.flat_trainer`).

Parameter values are read and written per tensor through ``CheckpointState.parameters``; the numpy
buffers handed to ORT are kept alive until the copy returns (see STACK_NOTES on OrtValue lifetimes).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fedpeft_edge.peft.artifacts import ArtifactBundle
from fedpeft_edge.peft.layout import FlatLayout
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.runtime.ort_import import ort, training_api
from fedpeft_edge.training.flat_trainer import (
    C_OPTIMIZERS,
    SCHEDULES,
    STATE_FORMAT,
    FlatVectorTrainer,
    state_vector,
)

OPTIMIZERS = (*C_OPTIMIZERS, "ort_adamw")
__all__ = ["OPTIMIZERS", "SCHEDULES", "STATE_FORMAT", "OrtTrainer"]
_ONNX_TO_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT64: np.int64,
               onnx.TensorProto.INT32: np.int32, onnx.TensorProto.DOUBLE: np.float64}


def _input_dtypes(path: Path) -> dict[str, Any]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {i.name: _ONNX_TO_NP.get(i.type.tensor_type.elem_type, np.float32) for i in graph.input}


class OrtTrainer(FlatVectorTrainer):
    """Local training for one site over an :class:`ArtifactBundle`."""

    def __init__(self, bundle: ArtifactBundle | Path | str, *, threads: int = 1, lr: float = 1e-3,
                 lr_schedule: str = "constant", warmup_steps: int = 0, total_steps: int | None = None,
                 optimizer: str = "c_adamw", weight_decay: float = 0.0, momentum: float = 0.9,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6, prox_mu: float = 0.0,
                 clip_norm: float | None = None, seed: int = 0) -> None:
        if not isinstance(bundle, ArtifactBundle):
            bundle = ArtifactBundle.load(bundle)
        self._layout = FlatLayout.from_shapes(zip(bundle.param_order, bundle.param_shapes, strict=True))
        self._init_options(self._layout.total, optimizers=OPTIMIZERS, threads=threads, lr=lr,
                           lr_schedule=lr_schedule, warmup_steps=warmup_steps, total_steps=total_steps,
                           optimizer=optimizer, weight_decay=weight_decay, momentum=momentum, beta1=beta1,
                           beta2=beta2, eps=eps, prox_mu=prox_mu, clip_norm=clip_norm, seed=seed)
        if optimizer == "ort_adamw":
            if prox_mu or clip_norm is not None:
                raise InvalidValueError(
                    "prox_mu and clip_norm need a c_* optimizer (ORT's AdamW graph has neither)")
            fixed = bundle.ort_adamw
            if (weight_decay, beta1, beta2, eps) != (fixed["weight_decay"], fixed["beta1"], fixed["beta2"],
                                                     fixed["eps"]):
                raise InvalidValueError(f"ort_adamw hyper-parameters are fixed by the bundle: {fixed}")
        self.bundle = bundle
        self._dtypes = _input_dtypes(bundle.eval_model)
        self._build_session(bundle.checkpoint)

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
        lr = self._next_step(loss)
        if self._ort_opt is not None:
            self._ort_opt.set_learning_rate(lr)
            self._ort_opt.step()
            return loss, logits
        w, g = self.get_flat(), self._gradients()
        self._c_update(w, g, lr)
        self._write(w)
        return loss, logits

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        self._module.eval()
        try:
            yield
        finally:
            self._module.train()

    def _eval_forward(self, batch: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray]:
        loss, logits = self._module(*self._feeds(batch))
        return float(loss), logits

    def predict(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Logits for one batch of model inputs (labels not needed)."""
        self._module.eval()
        try:
            _, logits = self._module(*self._feeds(inputs, with_labels=False))
        finally:
            self._module.train()
        return np.asarray(logits)

    # ---- resume ---------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, np.ndarray]:
        if self.optimizer_name != "ort_adamw":
            return {}
        # ORT keeps AdamW moments in its state; only its own checkpoint carries them
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "ckpt"
            training_api().CheckpointState.save_checkpoint(self._state, str(ckpt),
                                                           include_optimizer_state=True)
            return {"ort_checkpoint": np.frombuffer(ckpt.read_bytes(), np.uint8)}

    def _restore_extra(self, data: Mapping[str, np.ndarray], path: Path) -> None:
        if self.optimizer_name != "ort_adamw":
            return
        blob = state_vector(data, "ort_checkpoint", self._layout.total, path, np.uint8)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "ckpt"
            ckpt.write_bytes(blob.tobytes())  # scratch file for ORT to read, not state
            session = (self._state, self._module, self._ort_opt, self._train_inputs, self._eval_inputs)
            try:
                self._build_session(ckpt)
            except Exception as exc:  # ORT's own error types; put the working session back
                (self._state, self._module, self._ort_opt, self._train_inputs,
                 self._eval_inputs) = session
                raise InvalidValueError(f"trainer state {path}: ORT checkpoint unusable: {exc}") from exc
