"""Writes a bundle's gradient model folder (:func:`lower_to_gradient_model`); :class:`GradientModel` loads it.

The output folder (what a device needs; no ORT Training file is in it)::

    gradient.json         manifest: spec, spec hash, parameter order and shapes, inputs, outputs, files
    gradient_model.onnx   inputs: model inputs, labels, trainable tensors (flat-vector order)
                          outputs: loss, logits, d loss / d tensor for every trainable tensor (same order)
    eval_model.onnx       the bundle's eval graph, same inputs; outputs loss and logits
    base.data             the frozen base, raw little-endian, the external data of *both* models (one copy
                          on disk; onnxruntime maps external data of CPU initializers from the file)
    initial_params.npy    the trainable tensors' starting values as one flat float32 vector

The accumulators (InPlaceAccumulator(V2)) are removed here: the gradient each would accumulate becomes a
graph output. Every other training op is lowered by :func:`.ops.lower_training_ops`. Frozen values come
from the bundle's checkpoint, read with ORT Training's ``CheckpointState`` (never on a device).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from fedpeft_edge.peft.artifacts import ArtifactBundle
from fedpeft_edge.peft.lowering.model import (
    BASE_DATA,
    EVAL_MODEL,
    GRADIENT_MODEL,
    INITIAL_PARAMS,
    LABELS,
    MANIFEST,
    GradientModel,
    _sha256,
)
from fedpeft_edge.peft.lowering.ops import lower_training_ops
from fedpeft_edge.peft.lowering.stock import _MS, LoweringError, _describe, _tidy
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.runtime.ort_import import training_api

_ALIGN = 64  # byte alignment of every tensor in base.data (SIMD loads straight from the mapped file)
_ACC_SUFFIX = "_grad.accumulation.buffer"


def _float_output(name: str, shape: Iterable[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _externalise(graph: onnx.GraphProto, frozen: dict[str, tuple[np.dtype, tuple[int, ...], int, int]]
                 ) -> None:
    """Frozen graph inputs become initializers whose data live in BASE_DATA (offset, length)."""
    names = {i.name for i in graph.input if i.name in frozen}
    inputs = [i for i in graph.input if i.name not in names]
    del graph.input[:]
    graph.input.extend(inputs)
    for name in sorted(names):
        dtype, shape, offset, length = frozen[name]
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype), dims=list(shape),
                        data_location=TensorProto.EXTERNAL)
        for key, value in (("location", BASE_DATA), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        graph.initializer.append(t)


def _lower_gradient_graph(bundle: ArtifactBundle) -> tuple[onnx.ModelProto, dict[str, int], str, str | None,
                                                             list[str]]:
    model = onnx.load(str(bundle.training_model))  # any external data of its own is pulled in
    graph = model.graph
    order = list(bundle.param_order)
    trainable = set(order)
    grads: dict[str, str] = {}
    accumulators: Counter[str] = Counter()
    kept = []
    for node in graph.node:  # accumulators out, their gradient input becomes the parameter's output
        if node.domain == _MS and node.op_type in ("InPlaceAccumulatorV2", "InPlaceAccumulator"):
            buffer, grad = node.input[0], node.input[1]
            param = buffer[:-len(_ACC_SUFFIX)] if buffer.endswith(_ACC_SUFFIX) else None
            if param not in trainable or param in grads:
                raise LoweringError(f"cannot lower {_describe(node)}: accumulation buffer {buffer!r} belongs "
                                    "to no trainable parameter of the bundle, or to one seen before")
            grads[param] = grad
            accumulators[node.op_type] += 1
        else:
            kept.append(node)
    missing = [p for p in order if p not in grads]
    if missing:
        raise LoweringError(f"the training graph has no gradient for trainable tensor(s) {missing[:5]}")
    del graph.node[:]
    graph.node.extend(kept)

    loss = graph.output[0].name
    logits = bundle.plan.output_name if any(o.name == bundle.plan.output_name for o in graph.output) else None
    produced = {o for n in graph.node for o in n.output}
    outputs = [graph.output[0], *[o for o in graph.output if o.name == logits][:1]]
    grad_outputs = []
    for param, shape in zip(order, bundle.param_shapes, strict=True):
        name = grads[param]
        if name not in produced or name in grad_outputs:  # a graph output must be its own node output
            alias = f"{param}_grad.lowered"
            graph.node.append(helper.make_node("Identity", [name], [alias], name=f"{alias}/Identity"))
            name = alias
        grad_outputs.append(name)
        outputs.append(_float_output(name, shape))
    del graph.output[:]
    graph.output.extend(outputs)
    dropped = {f"{p}{_ACC_SUFFIX}" for p in order} | {"lazy_reset_grad"}
    inputs = [i for i in graph.input if i.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)
    counts = lower_training_ops(model)
    counts.update(accumulators)
    return model, counts, loss, logits, grad_outputs


def _write_base(path: Path, bundle: ArtifactBundle, names: list[str]
                ) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int, int]], np.ndarray]:
    """Write the frozen tensors (from the checkpoint) to ``path``; returns their places and the initial
    trainable vector (read from the same checkpoint load)."""
    state = training_api().CheckpointState.load_checkpoint(str(bundle.checkpoint))
    params = state.parameters
    places: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    with open(path, "wb") as fh:
        for name in names:
            if name not in params:
                raise LoweringError(f"frozen tensor {name!r} is not in the bundle's checkpoint")
            value = np.asarray(params[name].data)
            value = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
            fh.write(b"\0" * (-fh.tell() % _ALIGN))
            offset = fh.tell()
            fh.write(value.tobytes())
            places[name] = (value.dtype, tuple(value.shape), offset, value.nbytes)
            del value
        fh.flush()
        os.fsync(fh.fileno())
    parts = []
    for name, shape in zip(bundle.param_order, bundle.param_shapes, strict=True):
        value = np.asarray(params[name].data, dtype=np.float32)
        if value.shape != tuple(shape):
            raise InvalidValueError(f"checkpoint tensor {name} has shape {value.shape}, "
                                    f"manifest says {shape}")
        parts.append(value.reshape(-1))
    initial = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return places, initial


def _input_types(graph: onnx.GraphProto, names: Iterable[str]) -> dict[str, str]:
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    return {n: np.dtype(helper.tensor_dtype_to_np_dtype(types[n])).name for n in names}


def lower_to_gradient_model(bundle: ArtifactBundle | Path | str, out_dir: Path | str, *,
                            overwrite: bool = False) -> GradientModel:
    """Write the gradient model, eval model, frozen base and starting vector of ``bundle`` to ``out_dir``.

    Raises :class:`LoweringError` (before anything lands in ``out_dir``) when the training graph holds an
    op that cannot be lowered. The folder appears complete or not at all (built beside it, then renamed).
    """
    if not isinstance(bundle, ArtifactBundle):
        bundle = ArtifactBundle.load(bundle)
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InvalidValueError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    grad_model, counts, loss, logits, grad_outputs = _lower_gradient_graph(bundle)
    eval_model = onnx.load(str(bundle.eval_model))
    lower_training_ops(eval_model)  # normally nothing to do; raises if the eval graph has training ops
    eval_names = [o.name for o in eval_model.graph.output]
    if len(eval_names) != 2 or eval_names[1] != bundle.plan.output_name:
        raise LoweringError(f"the eval graph's outputs {eval_names} are not "
                            f"(loss, {bundle.plan.output_name})")

    frozen_inputs = set(bundle.plan.frozen)
    used = {n for m in (grad_model, eval_model) for node in m.graph.node for n in node.input}
    in_graphs = {i.name for m in (grad_model, eval_model) for i in m.graph.input}
    frozen_names = [n for n in bundle.plan.frozen if n in used and n in in_graphs]
    stray = [i.name for i in grad_model.graph.input
             if i.name not in frozen_inputs and i.name not in bundle.param_order
             and i.name not in bundle.plan.input_names and i.name != LABELS]
    if stray:
        raise LoweringError(f"the training graph has inputs that are neither model inputs, labels nor "
                            f"parameters: {stray[:5]}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        places, initial = _write_base(tmp / BASE_DATA, bundle, frozen_names)
        base_names: dict[str, tuple[str, ...]] = {}
        for role, model in (("gradient_model", grad_model), ("eval_model", eval_model)):
            _externalise(model.graph, places)
            # model inputs, labels, then the trainable tensors in flat-vector order
            rank = {n: i for i, n in enumerate([*bundle.plan.input_names, LABELS, *bundle.param_order])}
            inputs = sorted(model.graph.input, key=lambda v: rank.get(v.name, len(rank)))
            del model.graph.input[:]
            model.graph.input.extend(inputs)
            _tidy(model)
            base_names[role] = tuple(t.name for t in model.graph.initializer if t.name in places)
        onnx.save(grad_model, str(tmp / GRADIENT_MODEL))
        onnx.save(eval_model, str(tmp / EVAL_MODEL))
        np.save(tmp / INITIAL_PARAMS, initial)
        result = GradientModel(
            directory=out_dir, spec=bundle.spec, spec_hash=bundle.spec_hash, model_sha256=bundle.model_sha256,
            param_order=tuple(bundle.param_order), param_shapes=tuple(bundle.param_shapes),
            input_names=tuple(bundle.plan.input_names),
            input_dtypes=_input_types(grad_model.graph, [*bundle.plan.input_names, LABELS]),
            loss_output=loss, logits_output=logits, grad_outputs=tuple(grad_outputs),
            eval_outputs=(eval_names[0], eval_names[1]),
            lowered_ops=dict(sorted(counts.items())), source_bundle=str(bundle.directory),
            base_tensors={n: (np.dtype(d).name, tuple(int(x) for x in shape), int(off))
                          for n, (d, shape, off, _) in places.items()},
            base_names=base_names)
        files = {role: {"name": name, "bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                 for role, name in (("gradient_model", GRADIENT_MODEL), ("eval_model", EVAL_MODEL),
                                    ("base_data", BASE_DATA), ("initial_params", INITIAL_PARAMS))}
        (tmp / MANIFEST).write_text(json.dumps(result.manifest(files), indent=1, sort_keys=True),
                                    encoding="utf-8")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
