"""On-device trainer over a lowered gradient model on stock onnxruntime (implements :class:`LocalTrainer`).

The gradient model (:func:`fedpeft_edge.peft.lowering.lower_to_gradient_model`) computes loss, logits and
the gradient of every trainable tensor with standard ops, so a plain ``InferenceSession`` runs it: no ORT
Training, no checkpoint, any platform stock onnxruntime ships for (aarch64 included). The optimizer is the
C core's, exactly as in ``OrtTrainer`` with ``c_adamw`` / ``c_sgd`` (shared code in
:mod:`fedpeft_edge.training.flat_trainer`; resume files are interchangeable between the two trainers).

Memory and copies:

- the trainable tensors are views of one flat float32 vector, each wrapped once in an ``OrtValue`` that
  points at the view (no copy) and bound as an input through ``IOBinding``; the C-core optimizer and
  ``set_flat`` write that vector in place, so the next run sees the new values without any copy;
- the gradient outputs are bound to views of a second flat vector: ORT writes each gradient straight into
  it (checked by pointer after every run; an output ORT placed elsewhere, e.g. because its producer
  aliases another buffer, is copied in, so the result is right either way) and the optimizer reads it in
  place;
- batch inputs are bound from the caller's arrays (no copy when they are C-contiguous and of the model's
  dtype, else one conversion); loss and logits are small ORT-allocated outputs, copied out;
- ``get_flat`` returns a copy, as the protocol says; the frozen base lives in the gradient model's
  external data (``base.data``), which onnxruntime maps from the file, and the eval session shares it.

Session options follow the measurements in STACK_NOTES (peak RSS of MiniLM LoRA: 682 MB by default,
399 MB with both): ``enable_mem_pattern=False`` and ``session.disable_prepacking=1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.peft.lowering import GradientModel
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.runtime.ort_import import ort
from fedpeft_edge.training.flat_trainer import C_OPTIMIZERS, FlatVectorTrainer

OPTIMIZERS = C_OPTIMIZERS  # ORT's AdamW graph needs ORT Training


class _Run:
    """One session with its IOBinding: parameters bound once, data inputs bound per call."""

    def __init__(self, session: Any, params: list[tuple[str, Any]], outputs: list[str],
                 preallocated: list[tuple[str, np.ndarray]]) -> None:
        rt = ort()
        self.session = session
        self.binding = session.io_binding()
        for name, value in params:
            self.binding.bind_ortvalue_input(name, value)
        self.outputs = outputs
        # Keep the OrtValues (and through them the views) alive as long as the binding.
        self.prealloc = [(name, view, rt.OrtValue.ortvalue_from_numpy(view)) for name, view in preallocated]
        self.copied_outputs: set[str] = set()

    def _bind_outputs(self) -> None:
        # Re-bound on every run: an ORT-allocated output keeps its first shape and would refuse the next
        # batch size. Loss and logits first, so get_outputs() starts with them.
        self.binding.clear_binding_outputs()
        for name in self.outputs:
            self.binding.bind_output(name, "cpu")
        for name, _, value in self.prealloc:
            self.binding.bind_ortvalue_output(name, value)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        for name, array in feeds.items():
            self.binding.bind_cpu_input(name, array)
        self._bind_outputs()
        self.session.run_with_iobinding(self.binding)
        values = self.binding.get_outputs()
        for (name, view, _), value in zip(self.prealloc, values[len(self.outputs):], strict=True):
            if value.data_ptr() != view.ctypes.data:  # ORT placed it elsewhere: copy it in
                self.copied_outputs.add(name)
                np.copyto(view, value.numpy().reshape(view.shape))
        return [v.numpy() for v in values[:len(self.outputs)]]


class GradientTrainer(FlatVectorTrainer):
    """Local training for one site over a :class:`GradientModel` (see the module docstring)."""

    def __init__(self, model: GradientModel | Path | str, *, threads: int = 1, lr: float = 1e-3,
                 lr_schedule: str = "constant", warmup_steps: int = 0, total_steps: int | None = None,
                 optimizer: str = "c_adamw", weight_decay: float = 0.0, momentum: float = 0.9,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6, prox_mu: float = 0.0,
                 clip_norm: float | None = None, seed: int = 0) -> None:
        if not isinstance(model, GradientModel):
            model = GradientModel.load(model)
        if model.logits_output is None:
            raise InvalidValueError(f"gradient model {model.directory} has no logits output")
        self._layout = model.layout
        self._init_options(self._layout.total, optimizers=OPTIMIZERS, threads=threads, lr=lr,
                           lr_schedule=lr_schedule, warmup_steps=warmup_steps, total_steps=total_steps,
                           optimizer=optimizer, weight_decay=weight_decay, momentum=momentum, beta1=beta1,
                           beta2=beta2, eps=eps, prox_mu=prox_mu, clip_norm=clip_norm, seed=seed)
        self.bundle = model  # like OrtTrainer.bundle: spec_hash, param_order, param_shapes
        self._dtypes = {k: np.dtype(v) for k, v in model.input_dtypes.items()}
        self._flat = model.initial_vector()
        self._grad = np.zeros_like(self._flat)
        rt = ort()
        # One OrtValue per trainable tensor, viewing the flat vector (zero-copy, bound once).
        self._param_values = [(name, rt.OrtValue.ortvalue_from_numpy(view))
                              for name, view in self._layout.split(self._flat).items()]
        grads = list(zip(model.grad_outputs, self._layout.split(self._grad).values(), strict=True))
        self._train_run = _Run(self._session(model.gradient_model), self._param_values,
                               [model.loss_output, model.logits_output], grads)
        self._eval_run: _Run | None = None  # built on first use: a device may never evaluate

    def _session(self, path: Path) -> Any:
        rt = ort()
        options = rt.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.enable_mem_pattern = False  # STACK_NOTES: -240 MB peak for MiniLM LoRA, same speed
        options.add_session_config_entry("session.disable_prepacking", "1")  # keeps weights mapped, -40 MB
        return rt.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @property
    def zero_copy_report(self) -> dict[str, list[str]]:
        """Gradient outputs ORT did not write in place so far (they were copied in)."""
        return {"copied_gradient_outputs": sorted(self._train_run.copied_outputs)}

    # ---- flat vector ----------------------------------------------------------------------------
    def get_flat(self) -> np.ndarray:
        return self._flat.copy()

    def _write(self, flat: np.ndarray) -> None:
        np.copyto(self._flat, flat)  # in place: the bound OrtValues view this buffer

    def parameter(self, name: str) -> np.ndarray:
        """A copy of a trainable tensor."""
        slot = next((s for s in self._layout.slots if s.name == name), None)
        if slot is None:
            raise InvalidValueError(f"{name!r} is not a trainable tensor of this model")
        return self._flat[slot.offset:slot.offset + slot.size].reshape(slot.shape).copy()

    # ---- feeds --------------------------------------------------------------------------------
    def _feeds(self, batch: Mapping[str, np.ndarray], with_labels: bool = True) -> dict[str, np.ndarray]:
        feeds = {}
        names = [*self.bundle.input_names, self.bundle.labels_name]
        for name in names:
            if name not in batch:
                if name == self.bundle.labels_name and not with_labels:
                    n = len(next(iter(batch.values())))
                    feeds[name] = np.zeros(n, self._dtypes.get(name, np.int64))
                    continue
                raise InvalidValueError(f"batch lacks input {name!r} (has {sorted(batch)})")
            feeds[name] = np.ascontiguousarray(batch[name], dtype=self._dtypes.get(name, np.float32))
        return feeds

    # ---- training -------------------------------------------------------------------------------
    def _forward_backward(self, batch: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray]:
        loss, logits = self._train_run(self._feeds(batch))
        return float(loss), logits

    def loss_and_gradients(self, batch: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray, np.ndarray]:
        """Forward and backward on one batch without an optimizer step: ``(loss, logits, flat gradient)``."""
        loss, logits = self._forward_backward(batch)
        return loss, logits, self._grad.copy()

    def train_step(self, batch: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray]:
        """One optimizer step on one batch; returns (loss, logits)."""
        loss, logits = self._forward_backward(batch)
        lr = self._next_step(loss)
        self._c_update(self._flat, self._grad, lr)  # both in place: nothing to write back
        return loss, logits

    def _eval(self) -> _Run:
        if self._eval_run is None:
            self._eval_run = _Run(self._session(self.bundle.eval_model), self._param_values,
                                  list(self.bundle.eval_outputs), [])
        return self._eval_run

    def _eval_forward(self, batch: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray]:
        loss, logits = self._eval()(self._feeds(batch))
        return float(loss), logits

    def predict(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Logits for one batch of model inputs (labels not needed)."""
        return np.asarray(self._eval()(self._feeds(inputs, with_labels=False))[1])
