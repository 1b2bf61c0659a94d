"""Deployment export: an inference model carrying trained adapter values, LoRA folded into the weights.

LoRA folding (s = alpha / rank): MatMul ``W[in,out] += s * A @ B``; Gemm ``W += (s / gemm_alpha) * AB``
(transposed when ``transB``); 1x1 Conv ``W[:, :, 0, 0] += s * B[:, :, 0, 0] @ A[:, :, 0, 0]``. The merged
graph is the base plus the head: no LoRA nodes remain. Adapters and prompts cannot fold; they are exported
unmerged. The base model is re-read from the bundle's source path (or ``base_model_path``) and must match
the bundle's sha256; surgery is deterministic (seeded), so frozen values such as FFA-LoRA's A are rebuilt.
"""

from __future__ import annotations

from pathlib import Path

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
            w = _get(model, site.weight).astype(np.float64)
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            if site.kind == "conv":
                w[:, :, 0, 0] += site.scale * (b64[:, :, 0, 0] @ a64[:, :, 0, 0])
            elif site.kind == "gemm":
                delta = (site.scale / site.gemm_alpha) * (a64 @ b64)
                w += delta.T if site.trans_b else delta
            else:
                w += site.scale * (a64 @ b64)
            _set(model, site.weight, w.astype(np.float32))
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
