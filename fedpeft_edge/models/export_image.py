"""Export EfficientNet-Lite0 to an ONNX feature extractor (named convolutions, batch norms folded by default).

Convolutions keep ``backbone._blocks.{i}._expand_conv.weight`` / ``backbone._blocks.{i}._project_conv.weight``
(1x1) etc.; unless folded (see :func:`fedpeft_edge.models.prepare.prepare_image_model`), batch norms stay
separate ``BatchNormalization`` nodes. Output ``features`` = global average pool of the head,
``[batch, 1280]``. torch is imported inside :func:`_export_image` only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedpeft_edge.models.toolchain import (
    EXPORT_CODE_VERSION,
    IMAGE_CODE_PACKAGE,
    IMAGE_WEIGHTS_PACKAGE,
    OPSET,
    PREPARE_INSTALL_HINT,
    _ort_run,
    _package_version,
    _quiet_export,
    _require_torch,
    _sha256_file,
    _torch_threads,
)
from fedpeft_edge.runtime.errors import FedPeftError, MissingDependencyError

# ImageNet statistics (on a [0, 1] pixel scale) used by the efficientnet-lite-pytorch examples.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Parity check between torch and ONNX Runtime at export time.
IMAGE_PARITY_ATOL = 1e-4


def _fold_batchnorms(torch: Any, net: Any) -> int:
    """Merge each eval-mode BatchNorm into the convolution feeding it; returns how many were folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs.append((block, "_depthwise_conv", "_bn1"))
        pairs.append((block, "_project_conv", "_bn2"))
    for owner, conv_name, bn_name in pairs:
        conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        conv.weight = weight
        conv.bias = bias
        setattr(owner, bn_name, torch.nn.Identity())
    leftover = [name for name, mod in net.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    if leftover:
        raise FedPeftError(f"BatchNorm layers left unfolded: {leftover[:3]}")
    return len(pairs)


def _export_image(out_dir: Path, weights: Path, image_size: int, fold_batchnorm: bool) -> dict[str, Any]:
    torch = _require_torch()
    import numpy as np

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise MissingDependencyError(
            f"exporting the image model needs {IMAGE_CODE_PACKAGE}; install it with `{PREPARE_INSTALL_HINT}`"
        ) from exc

    started = time.perf_counter()
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)  # raises on any missing/unexpected key
    net.eval()

    class PooledFeatures(torch.nn.Module):
        """Backbone up to the head's global average pool (the classifier is left to the PEFT layer)."""

        def __init__(self, backbone: Any) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, pixel_values: Any) -> Any:
            maps = self.backbone.extract_features(pixel_values)
            return maps.mean(dim=(2, 3))

    wrapper = PooledFeatures(net).eval()
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 3, image_size, image_size)).astype(np.float32)
    # Parity is checked against the original (unfolded) network, on a batch size not used for tracing.
    check = rng.standard_normal((3, 3, image_size, image_size)).astype(np.float32)
    with torch.no_grad():
        expected = wrapper(torch.from_numpy(check)).numpy()
    folded = _fold_batchnorms(torch, net) if fold_batchnorm else 0
    onnx_path = out_dir / "model.onnx"
    with torch.no_grad(), _torch_threads(torch), _quiet_export():
        torch.onnx.export(
            wrapper,
            (torch.from_numpy(sample),),
            str(onnx_path),
            input_names=["pixel_values"],
            output_names=["features"],
            dynamic_axes={"pixel_values": {0: "batch"}, "features": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            dynamo=False,
        )
    export_seconds = time.perf_counter() - started

    got = _ort_run(onnx_path, {"pixel_values": check})
    max_diff = float(np.max(np.abs(got - expected)))
    if not max_diff <= IMAGE_PARITY_ATOL:
        raise FedPeftError(
            f"exported image model differs from torch by {max_diff:.3g} (> {IMAGE_PARITY_ATOL})"
        )
    feature_dim = int(expected.shape[1])
    return {
        "onnx_file": "model.onnx",
        "kind": "image",
        "input_names": ["pixel_values"],
        "feature_dim": feature_dim,
        "path_meta_keys": [],
        "meta": {
            "model_name": "efficientnet-lite0",
            "image_size": image_size,
            "fold_batchnorm": fold_batchnorm,
            "folded_batchnorms": folded,
            "channels": 3,
            "layout": "NCHW",
            "pixel_scale": 255.0,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "opset": OPSET,
            "source_package": IMAGE_WEIGHTS_PACKAGE,
            "source_version": _package_version(IMAGE_WEIGHTS_PACKAGE),
            "code_package": IMAGE_CODE_PACKAGE,
            "code_package_version": _package_version(IMAGE_CODE_PACKAGE),
            "source_weights_sha256": _sha256_file(weights),
            "torch_version": torch.__version__,
            "export_seconds": round(export_seconds, 3),
            "parity_max_abs_diff": max_diff,
            "code_version": EXPORT_CODE_VERSION,
        },
    }
