"""Small checks on ONNX model files (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedpeft_edge.runtime.errors import FedPeftError, ensure


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # ORT type string, e.g. "tensor(float)"
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class ModelSummary:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    initializer_names: tuple[str, ...]
    opset: int


def check_onnx_model(path: str | Path) -> ModelSummary:
    """Run the ONNX checker (by path, so models with external data work) and load it in ONNX Runtime.

    Raises :class:`~fedpeft_edge.runtime.errors.FedPeftError` if either rejects the file.
    """
    import onnx

    from fedpeft_edge.runtime.ort_import import ort as _ort  # the torch-free way to import onnxruntime

    ort = _ort()

    path = Path(path)
    ensure(path.is_file(), f"model file not found: {path}")
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise FedPeftError(f"{path} fails the ONNX checker: {exc}") from exc
    model = onnx.load(str(path), load_external_data=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception classes
        raise FedPeftError(f"ONNX Runtime cannot load {path}: {exc}") from exc
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ModelSummary(
        inputs=tuple(TensorSpec(i.name, i.type, tuple(i.shape)) for i in session.get_inputs()),
        outputs=tuple(TensorSpec(o.name, o.type, tuple(o.shape)) for o in session.get_outputs()),
        initializer_names=tuple(init.name for init in model.graph.initializer),
        opset=int(opset),
    )


__all__ = ["ModelSummary", "TensorSpec", "check_onnx_model"]
