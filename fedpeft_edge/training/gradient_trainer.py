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
- ``get_flat`` returns a copy, as the protocol says.

Memory (issue 10; MiniLM LoRA, batch 16 x 64, figures in bench/RESULTS.md section 4):

- the frozen base is mapped once from ``base.data`` (``GradientModel.map_base``, copy-on-write, never
  written) and handed to both sessions with ``add_initializer``: ORT reads those buffers in place, where
  each session mapping the external data itself counted the base twice;
- both sessions allocate from one process-wide CPU arena (``session.use_env_allocators``) that grows by
  exactly what is asked (``ARENA_CONFIG``), so evaluation reuses what training freed; ``train()`` ends
  with :meth:`release_memory` (ORT's arena shrinkage), so between rounds the step's peak is given back;
- ``enable_mem_pattern=False`` and ``session.disable_prepacking=1`` (STACK_NOTES: 682 -> 399 MB);
- ``micro_batch=k`` splits a batch into parts of k samples and accumulates their gradients (weighted by
  their share of the samples: the loss is a mean), which divides the activations held for the backward
  pass; for losses that are means over independent samples only (no batch statistics).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.peft.lowering import GradientModel
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.runtime.ort_import import ort
from fedpeft_edge.training.base import TrainMetrics
from fedpeft_edge.training.flat_trainer import C_OPTIMIZERS, FlatVectorTrainer

OPTIMIZERS = C_OPTIMIZERS  # ORT's AdamW graph needs ORT Training

# Session configuration of every GradientTrainer session (tests/training checks these are applied).
SESSION_CONFIG = {
    # Pre-packed copies of the frozen weights would double them in anonymous memory (STACK_NOTES).
    "session.disable_prepacking": "1",
    # Both sessions (training, evaluation) allocate from one process-wide arena (see _use_shared_arena).
    "session.use_env_allocators": "1",
}
# The shared CPU arena: grows by exactly what is asked (no power-of-two overshoot of the activation peak).
ARENA_CONFIG = {"arena_extend_strategy": 1}  # 1 = kSameAsRequested
_SHARED_ARENA: bool | None = None  # None: not tried yet; False: registering failed, sessions keep their own


def _use_shared_arena() -> bool:
    """Register the process-wide CPU arena once (see ARENA_CONFIG); sessions opt in by SESSION_CONFIG."""
    global _SHARED_ARENA
    if _SHARED_ARENA is None:
        rt = ort()
        try:
            info = rt.OrtMemoryInfo("Cpu", rt.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, rt.OrtMemType.DEFAULT)
            rt.create_and_register_allocator(info, rt.OrtArenaCfg(dict(ARENA_CONFIG)))
            _SHARED_ARENA = True
        except Exception as exc:  # e.g. registered by other code of this process first: that one serves
            _SHARED_ARENA = "already" in str(exc).lower()
    return bool(_SHARED_ARENA)


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

    def __call__(self, feeds: Mapping[str, np.ndarray], run_options: Any = None) -> list[np.ndarray]:
        for name, array in feeds.items():
            self.binding.bind_cpu_input(name, array)
        self._bind_outputs()
        self.session.run_with_iobinding(self.binding, run_options)
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
                 clip_norm: float | None = None, seed: int = 0, micro_batch: int | None = None) -> None:
        if micro_batch is not None and (isinstance(micro_batch, bool) or not isinstance(micro_batch, int)
                                        or micro_batch < 1):
            raise InvalidValueError(f"micro_batch must be a positive integer or None, got {micro_batch!r}")
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
        self.micro_batch = micro_batch
        self._dtypes = {k: np.dtype(v) for k, v in model.input_dtypes.items()}
        self._flat = model.initial_vector()
        self._grad = np.zeros_like(self._flat)
        rt = ort()
        _use_shared_arena()
        # The frozen base, mapped once from base.data and handed to both sessions as initializers (each
        # session mapping the external data itself would count it twice in the process's memory).
        self._base = {name: rt.OrtValue.ortvalue_from_numpy(view) for name, view in model.map_base().items()}
        # One OrtValue per trainable tensor, viewing the flat vector (zero-copy, bound once).
        self._param_values = [(name, rt.OrtValue.ortvalue_from_numpy(view))
                              for name, view in self._layout.split(self._flat).items()]
        grads = list(zip(model.grad_outputs, self._layout.split(self._grad).values(), strict=True))
        session = self._session(model.gradient_model, "gradient_model")
        outputs = [model.loss_output, model.logits_output]
        self._train_run = _Run(session, self._param_values, outputs, grads)
        # Micro-batches after the first write their gradients here; they are added into _grad.
        self._grad_part = np.zeros_like(self._flat) if micro_batch else None
        self._part_run = (_Run(session, self._param_values, outputs,
                               list(zip(model.grad_outputs, self._layout.split(self._grad_part).values(),
                                        strict=True)))
                          if self._grad_part is not None else None)
        self._eval_run: _Run | None = None  # built on first use: a device may never evaluate
        self._sample: dict[str, np.ndarray] | None = None  # one sample of the last batch (release_memory)

    def _session_options(self) -> Any:
        rt = ort()
        options = rt.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        for key, value in SESSION_CONFIG.items():
            if key == "session.use_env_allocators" and not _SHARED_ARENA:
                continue
            options.add_session_config_entry(key, value)
        options.enable_mem_pattern = False  # STACK_NOTES: -240 MB peak for MiniLM LoRA, same speed
        return options

    def _session(self, path: Path, role: str) -> Any:
        options = self._session_options()
        for name in self.bundle.base_names.get(role, ()):
            options.add_initializer(name, self._base[name])  # ORT reads the mapped buffer, no copy
        return ort().InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

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
        feeds = self._feeds(batch)
        self._sample = {k: v[:1].copy() for k, v in feeds.items()}
        n = len(feeds[self.bundle.labels_name])
        if self._part_run is None or n <= self.micro_batch:
            loss, logits = self._train_run(feeds)
            return float(loss), logits
        # Gradient accumulation over micro-batches: the loss is a mean over samples, so the batch's loss
        # and gradient are the micro-batches' weighted by their share of the samples. The activations
        # held for the backward pass shrink with the micro-batch (the memory of a training step).
        total, parts = 0.0, []
        for start in range(0, n, self.micro_batch):
            part = {k: v[start:start + self.micro_batch] for k, v in feeds.items()}
            weight = len(part[self.bundle.labels_name]) / n
            if start == 0:
                loss, logits = self._train_run(part)
                self._grad *= np.float32(weight)
            else:
                loss, logits = self._part_run(part)
                self._grad += np.float32(weight) * self._grad_part
            total += float(loss) * weight
            parts.append(logits)
        return total, np.concatenate(parts)

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

    def train(self, batches: Iterable[Mapping[str, np.ndarray]], *, max_steps: int | None = None
              ) -> TrainMetrics:
        """The base loop, then :meth:`release_memory`: what a round's training needed is given back
        before the agent encodes, sends and exports (the arena would otherwise hold the step's peak)."""
        try:
            return super().train(batches, max_steps=max_steps)
        finally:
            self.release_memory()

    def release_memory(self) -> None:
        """Return the arena's free memory to the system (one one-sample evaluation run with ORT's arena
        shrinkage on; the next step allocates again, a few ms). A no-op before the first step."""
        if self._sample is None:
            return
        options = ort().RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._eval()(self._sample, options)

    def _eval(self) -> _Run:
        if self._eval_run is None:
            self._eval_run = _Run(self._session(self.bundle.eval_model, "eval_model"), self._param_values,
                                  list(self.bundle.eval_outputs), [])
        return self._eval_run

    def _eval_forward(self, batch: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray]:
        loss, logits = self._eval()(self._feeds(batch))
        return float(loss), logits

    def predict(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Logits for one batch of model inputs (labels not needed)."""
        return np.asarray(self._eval()(self._feeds(inputs, with_labels=False))[1])
