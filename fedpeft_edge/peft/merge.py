"""Deployment export: an inference model carrying trained adapter values, LoRA folded into the weights.

LoRA folding (s = alpha / rank): MatMul ``W[in,out] += s * A @ B``; Gemm ``W += (s / gemm_alpha) * AB``
(transposed when ``transB``); 1x1 Conv ``W[:, :, 0, 0] += s * B[:, :, 0, 0] @ A[:, :, 0, 0]``. The merged
graph is the base plus the head: no LoRA nodes remain. Adapters and prompts cannot fold; they are exported
unmerged. The base model is re-read from the bundle's source path (or ``base_model_path``) and must match
the bundle's sha256; surgery is deterministic (seeded), so frozen values such as FFA-LoRA's A are rebuilt.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from fedpeft_edge.peft.artifacts import ArtifactBundle, file_sha256
from fedpeft_edge.peft.layout import FlatLayout
from fedpeft_edge.peft.surgery import apply_peft
from fedpeft_edge.runtime.errors import InvalidValueError

MERGEABLE = ("lora", "ffa_lora")


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            if tuple(t.dims) != value.shape:
                raise InvalidValueError(f"{name}: shape {value.shape} does not fit {tuple(t.dims)}")
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(
                np.array(value, np.float32, order="C"), name))
            return
    raise InvalidValueError(f"initializer {name!r} not in the model")


def _get(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise InvalidValueError(f"initializer {name!r} not in the model")


def fold_lora(weight: np.ndarray, a: np.ndarray, b: np.ndarray, *, kind: str, scale: float,
              gemm_alpha: float = 1.0, trans_b: bool = False) -> np.ndarray:
    """``weight`` with the LoRA product folded in (float64 sums, float32 result; formulas: module doc)."""
    w = np.array(weight, dtype=np.float64)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if kind == "conv":
        w[:, :, 0, 0] += scale * (b64[:, :, 0, 0] @ a64[:, :, 0, 0])
    elif kind == "gemm":
        delta = (scale / gemm_alpha) * (a64 @ b64)
        w += delta.T if trans_b else delta
    elif kind == "matmul":
        w += scale * (a64 @ b64)
    else:
        raise InvalidValueError(f"unknown LoRA site kind {kind!r}")
    return w.astype(np.float32)


def export_inference_model(bundle: ArtifactBundle | Path | str, flat: np.ndarray, out_path: Path | str, *,
                           merge: bool = True, base_model_path: Path | str | None = None) -> Path:
    """Write an ONNX inference model (input names as the backbone, output ``logits``)."""
    if not isinstance(bundle, ArtifactBundle):
        bundle = ArtifactBundle.load(bundle)
    layout = FlatLayout.from_shapes(zip(bundle.param_order, bundle.param_shapes, strict=True))
    flat = np.asarray(flat)
    if flat.dtype != np.float32 or flat.shape != (layout.total,):
        raise InvalidValueError(
            f"flat must be float32 of shape ({layout.total},), got {flat.dtype} {flat.shape}")
    if not np.isfinite(flat).all():
        raise InvalidValueError("flat holds NaN or Inf")
    base_path = Path(base_model_path or bundle.source_model)
    if not base_path.is_file():
        raise InvalidValueError(f"base model {base_path} not found (pass base_model_path=)")
    if file_sha256(base_path) != bundle.model_sha256:
        raise InvalidValueError(f"base model {base_path} is not the one this bundle was built from (sha256)")
    base = onnx.load(str(base_path))
    values = layout.split(flat)
    peft_model, plan = apply_peft(base, bundle.spec)
    if merge and bundle.spec.method in MERGEABLE:
        model, _ = apply_peft(base, bundle.spec, adapters=False)
        for site in plan.lora_sites:
            a = values.get(site.a, None)
            a = a if a is not None else _get(peft_model, site.a)  # FFA-LoRA: A is frozen
            b = values[site.b]
            w = fold_lora(_get(model, site.weight), a, b, kind=site.kind, scale=site.scale,
                          gemm_alpha=site.gemm_alpha, trans_b=site.trans_b)
            _set(model, site.weight, w)
        for name, value in values.items():
            if name not in {n for s in plan.lora_sites for n in (s.a, s.b)}:
                _set(model, name, value)
    else:
        model = peft_model
        for name, value in values.items():
            _set(model, name, value)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(out_path)
    return out_path


# ---- from a site's gradient model folder (no base model file, no ORT Training) -----------------------
INFERENCE_MODEL = "model.onnx"
INFERENCE_DATA = "model.data"  # external data of INFERENCE_MODEL: every tensor above _INLINE_BYTES
_INLINE_BYTES = 1024
_ALIGN = 64


def _external_array(tensor: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """A read-only view of an external-data initializer, mapped from its file (nothing read until used)."""
    info = {e.key: e.value for e in tensor.external_data}
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape, dtype=np.int64))
    path = base_dir / info["location"]
    if count == 0:
        return np.zeros(shape, dtype)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    offset = int(info.get("offset", 0))
    if offset + count * dtype.itemsize > raw.size:
        raise InvalidValueError(f"{tensor.name}: external data lies outside {path}")
    return np.ndarray(shape, dtype=dtype, buffer=raw, offset=offset)


def _needed_nodes(graph: onnx.GraphProto, outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes the given outputs depend on, in graph order (graphs from ORT are topologically sorted)."""
    needed = set(outputs)
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    return keep[::-1]


def _fold_gradient_lora(graph: onnx.GraphProto, arrays: dict[str, np.ndarray], scaling: float) -> int:
    """Fold every ``W.lora_A``/``W.lora_B`` branch (naming in peft.surgery) into ``W``; returns the number
    of weights folded. Raises InvalidValueError when a branch does not have the shape surgery gives it
    (the caller then exports unmerged)."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def only(name: str, op: str) -> onnx.NodeProto:
        users = consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op:
            raise InvalidValueError(f"LoRA branch at {name!r}: expected one {op} consumer")
        return users[0]

    removed: set[int] = set()
    folded = 0
    for a_name in [n for n in arrays if n.endswith(".lora_A")]:
        weight = a_name[: -len(".lora_A")]
        b_name = f"{weight}.lora_B"
        if b_name not in arrays or weight not in arrays:
            raise InvalidValueError(f"LoRA weight {weight!r} without its B or base weight")
        adapted: list[onnx.NodeProto] = []
        kind, gemm_alpha, trans_b, scale = "", 1.0, False, scaling
        for first in consumers.get(a_name, []):
            mul = only(first.output[0], "Mul")
            second = only(mul.output[0], first.op_type)
            if second.input[1] != b_name:
                raise InvalidValueError(f"LoRA branch of {weight!r} does not end in {b_name!r}")
            add = only(second.output[0], "Add")
            inner = add.input[0] if add.input[1] == second.output[0] else add.input[1]
            base = producers.get(inner)
            if base is None or base.input[1] != weight or len(consumers.get(inner, [])) != 1:
                raise InvalidValueError(f"LoRA branch of {weight!r}: no base node feeding its Add")
            other = mul.input[1] if mul.input[0] == first.output[0] else mul.input[0]
            if other in arrays and arrays[other].size == 1:
                scale = float(np.asarray(arrays[other]).reshape(()))
            kind = {"MatMul": "matmul", "Gemm": "gemm", "Conv": "conv"}.get(base.op_type, "")
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in base.attribute}
            gemm_alpha, trans_b = float(attrs.get("alpha", 1.0)), bool(attrs.get("transB", 0))
            base.output[0] = add.output[0]  # the base node now writes what the Add wrote
            removed.update(id(n) for n in (first, mul, second, add))
            adapted.append(base)
        if not adapted:
            raise InvalidValueError(f"LoRA A {a_name!r} feeds no branch")
        merged = fold_lora(arrays[weight], arrays[a_name], arrays[b_name], kind=kind, scale=scale,
                           gemm_alpha=gemm_alpha, trans_b=trans_b)
        others = [n for n in consumers.get(weight, []) if n not in adapted]
        if others:  # the base weight also feeds nodes LoRA did not adapt: they keep the original
            name = f"{weight}.merged"
            arrays[name] = merged
            for n in adapted:
                n.input[1] = name
        else:
            arrays[weight] = merged
        folded += 1
    kept = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    return folded


def export_from_gradient_model(model: Any, flat: np.ndarray, out_dir: Path | str, *, merge: bool = True
                               ) -> dict[str, Any]:
    """Write ``out_dir/model.onnx`` (+ ``model.data``): the inference model of a site's gradient model
    folder (``fedpeft_edge.peft.lowering.GradientModel``) with the trainable tensors set to ``flat``.

    Built from the folder's eval graph and its ``base.data`` only, so a device needs neither the base
    model file nor ORT Training. Loss and labels are dropped (output: the logits); LoRA and FFA-LoRA are
    folded into the base weights when ``merge`` (other methods, or a branch of an unexpected shape, stay
    unmerged). Every tensor above 1 KiB goes to one external-data file written tensor by tensor (the base
    is mapped, never held twice in memory). Files are fsynced; making the folder visible atomically is
    the caller's job. Returns a summary: inputs, output, merged, lora weights folded, bytes.
    """
    layout = model.layout
    flat = np.asarray(flat)
    if flat.dtype != np.float32 or flat.shape != (layout.total,):
        raise InvalidValueError(
            f"flat must be float32 of shape ({layout.total},), got {flat.dtype} {flat.shape}")
    if not np.isfinite(flat).all():
        raise InvalidValueError("flat holds NaN or Inf")
    src = onnx.load(str(model.eval_model), load_external_data=False)
    graph = src.graph
    logits_name = model.eval_outputs[1]
    trainable = layout.split(flat)
    arrays: dict[str, np.ndarray] = {}
    inline: dict[str, onnx.TensorProto] = {}
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            arrays[t.name] = _external_array(t, model.directory)
        elif t.name not in trainable:
            arrays[t.name] = numpy_helper.to_array(t)
            inline[t.name] = t
    arrays.update({name: np.asarray(v) for name, v in trainable.items()})
    inputs = [i for i in graph.input if i.name in model.input_names]
    outputs = [o for o in graph.output if o.name == logits_name]
    if len(outputs) != 1:
        raise InvalidValueError(f"{model.eval_model}: no output {logits_name!r}")
    folded = 0
    method = model.spec.method
    if merge and method in MERGEABLE:
        trial = onnx.GraphProto()
        trial.CopyFrom(graph)
        trial_arrays = dict(arrays)
        try:
            folded = _fold_gradient_lora(trial, trial_arrays, float(model.spec.scaling))
        except InvalidValueError:
            folded = 0  # an unexpected branch shape: export unmerged rather than wrong
        else:
            graph, arrays = trial, trial_arrays
    nodes = _needed_nodes(graph, {logits_name})
    used = {i for n in nodes for i in n.input}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: list[onnx.TensorProto] = []
    with open(out_dir / INFERENCE_DATA, "wb") as fh:
        for name, value in arrays.items():
            if name not in used:
                continue
            value = np.asarray(value)
            if name in inline and value.nbytes <= _INLINE_BYTES:
                tensors.append(inline[name])
                continue
            if value.nbytes <= _INLINE_BYTES:
                tensors.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
                continue
            le = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
            fh.write(b"\0" * (-fh.tell() % _ALIGN))
            offset = fh.tell()
            fh.write(memoryview(le).cast("B"))
            t = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(value.dtype),
                                 dims=list(value.shape), data_location=onnx.TensorProto.EXTERNAL)
            places = (("location", INFERENCE_DATA), ("offset", str(offset)), ("length", str(le.nbytes)))
            for key, val in places:
                entry = t.external_data.add()
                entry.key, entry.value = key, val
            tensors.append(t)
        fh.flush()
        os.fsync(fh.fileno())
    out_graph = onnx.helper.make_graph(nodes, graph.name or "inference", inputs, outputs, tensors)
    out = onnx.helper.make_model(out_graph, opset_imports=list(src.opset_import),
                                 producer_name="fedpeft_edge")
    out.ir_version = src.ir_version
    path = out_dir / INFERENCE_MODEL
    with open(path, "wb") as fh:
        fh.write(out.SerializeToString())
        fh.flush()
        os.fsync(fh.fileno())
    return {"model": INFERENCE_MODEL, "data": INFERENCE_DATA, "inputs": [i.name for i in inputs],
            "output": logits_name, "merged": folded > 0, "lora_weights_folded": folded, "method": method,
            "bytes": path.stat().st_size + (out_dir / INFERENCE_DATA).stat().st_size}
