"""PEFT spec, graph surgery, artifact bundles and merged export on small synthetic ONNX models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest_models import conv_model, image_data, mlp_data, mlp_model, save, text_data, transformer_model

from fedpeft_edge.peft.artifacts import ArtifactBundle, generate_artifacts
from fedpeft_edge.peft.graph_edit import fix_layernorm_outputs
from fedpeft_edge.peft.merge import export_inference_model
from fedpeft_edge.peft.spec import PeftSpec
from fedpeft_edge.peft.surgery import apply_peft
from fedpeft_edge.runtime.errors import SpecError
from fedpeft_edge.runtime.ort_import import ort

QV = [r"attention\.self\.(query|value)"]


def _run(model_or_path, feeds):
    src = (model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto)
           else str(model_or_path))
    return ort().InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


# ---- spec -------------------------------------------------------------------------------------------
def test_spec_round_trip_and_hash_is_canonical():
    spec = PeftSpec("lora", targets=["q", "v"], rank=4, alpha=8, head_classes=3)
    again = PeftSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.spec_hash() == spec.spec_hash()
    # key order of the source dict must not matter
    reordered = PeftSpec.from_dict(dict(reversed(list(spec.to_dict().items()))))
    assert reordered.spec_hash() == spec.spec_hash()
    other = PeftSpec("lora", targets=["q", "v"], rank=8, alpha=8, head_classes=3)
    assert other.spec_hash() != spec.spec_hash()
    sha = "ab" * 32
    assert spec.spec_hash(sha) != spec.spec_hash() and spec.spec_hash(sha) == again.spec_hash(sha)


def test_spec_hash_is_stable_across_processes():
    spec = PeftSpec("adapter", target_ops=["MatMul"], adapter_dim=4, head_classes=5, seed=3)
    code = ("from fedpeft_edge.peft.spec import PeftSpec;"
            "print(PeftSpec('adapter', target_ops=['MatMul'], adapter_dim=4, head_classes=5, seed=3)"
            ".spec_hash('cd'*32))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == spec.spec_hash("cd" * 32)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"method": "magic"}, "unknown PEFT method"),
    ({"method": "lora", "targets": ["x"], "rank": 0}, "rank"),
    ({"method": "lora", "targets": ["x"], "alpha": 0}, "alpha"),
    ({"method": "lora", "targets": ["x"], "alpha": -1.0}, "alpha"),
    ({"method": "lora"}, "targets"),
    ({"method": "lora", "targets": ["("]}, "regular expression"),
    ({"method": "lora", "target_ops": ["Softmax"]}, "not supported"),
    ({"method": "head_only"}, "head_classes"),
    ({"method": "select"}, "select_patterns"),
    ({"method": "lora", "targets": ["x"], "dropout": 0.1}, "dropout"),
])
def test_bad_specs_raise_spec_error(kwargs, fragment):
    with pytest.raises(SpecError, match=fragment):
        PeftSpec(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(SpecError, match="unknown PEFT spec keys"):
        PeftSpec.from_dict({"method": "lora", "targets": ["x"], "rnk": 4})


# ---- surgery ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, fragment", [
    (PeftSpec("lora", targets=["no_such_layer"], head_classes=3), "matches no eligible"),
    (PeftSpec("lora", target_ops=["Conv"], head_classes=3), "no eligible Conv"),
    (PeftSpec("select", select_patterns=["nothing_here"], head_classes=3), "matches no float"),
    (PeftSpec("prompt", head_classes=3), "attention_mask"),
])
def test_spec_not_fitting_model_raises_before_writing(tmp_path, spec, fragment):
    path = save(mlp_model(), tmp_path / "mlp.onnx")
    out = tmp_path / "bundle"
    with pytest.raises(SpecError, match=fragment):
        generate_artifacts(path, spec, out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]


def test_layernorm_gets_three_outputs():
    model = transformer_model()
    assert fix_layernorm_outputs(model) == 3
    assert all(len(n.output) == 3 for n in model.graph.node if n.op_type == "LayerNormalization")


def test_lora_with_zero_b_equals_base_plus_head():
    model = transformer_model()
    data = text_data(n=6)
    feeds = {k: v for k, v in data.items() if k != "labels"}
    peft_model, plan = apply_peft(model, PeftSpec("lora", targets=QV, rank=2, head_classes=3))
    head_only, _ = apply_peft(model, PeftSpec("head_only", head_classes=3))
    np.testing.assert_allclose(_run(peft_model, feeds), _run(head_only, feeds), atol=1e-6)
    assert plan.trainable == ("layer.0.attention.self.query.weight.lora_A",
                              "layer.0.attention.self.query.weight.lora_B",
                              "layer.0.attention.self.value.weight.lora_A",
                              "layer.0.attention.self.value.weight.lora_B", "head.weight", "head.bias")
    assert "layer.0.attention.self.query.weight" in plan.frozen
    assert plan.output_name == "logits"


def test_surgery_is_deterministic_and_seeded():
    spec = PeftSpec("lora", target_ops=["MatMul"], rank=2, head_classes=3, seed=7)
    a, _ = apply_peft(mlp_model(), spec)
    b, _ = apply_peft(mlp_model(), spec)
    c, _ = apply_peft(mlp_model(), PeftSpec("lora", target_ops=["MatMul"], rank=2, head_classes=3, seed=8))
    assert a.SerializeToString() == b.SerializeToString()
    assert a.SerializeToString() != c.SerializeToString()


def test_bitfit_finds_biases_of_matmul_add_conv_and_layernorm():
    _, plan = apply_peft(transformer_model(), PeftSpec("bitfit", head_classes=3))
    assert "layer.0.attention.self.query.bias" in plan.trainable      # Add(bias, MatMul) order
    assert "embeddings.LayerNorm.bias" in plan.trainable
    assert "embeddings.LayerNorm.weight" not in plan.trainable
    _, plan = apply_peft(conv_model(), PeftSpec("bitfit", head_classes=3))
    assert plan.trainable == ("stem.bias", "pw.bias", "head.weight", "head.bias")


def test_prompt_extends_mask_and_sequence():
    model, plan = apply_peft(transformer_model(), PeftSpec("prompt", num_virtual_tokens=3, head_classes=3))
    assert plan.trainable == ("peft.prompt.embeddings", "head.weight", "head.bias")
    data = text_data(n=4)
    out = _run(model, {k: v for k, v in data.items() if k != "labels"})
    assert out.shape == (4, 3) and np.isfinite(out).all()


# ---- artifacts + merge ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    save(transformer_model(), d / "tf.onnx", external=True)
    save(conv_model(), d / "conv.onnx")
    save(mlp_model(gemm=True), d / "gemm.onnx")
    return d


def test_bundle_manifest_and_load(models_dir, tmp_path):
    spec = PeftSpec("lora", targets=QV, rank=2, head_classes=3)
    bundle = generate_artifacts(models_dir / "tf.onnx", spec, tmp_path / "b")
    loaded = ArtifactBundle.load(tmp_path / "b")
    assert loaded == bundle
    assert loaded.spec_hash == spec.spec_hash(bundle.model_sha256)
    assert set(loaded.param_order) == set(bundle.plan.trainable)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "bundle.json", "checkpoint", "eval_model.onnx", "optimizer_model.onnx", "training_model.onnx"]
    assert not list(tmp_path.glob(".b.tmp-*")) and not list(Path.cwd().glob("temp.onnx*"))
    with pytest.raises(ValueError, match="not empty"):
        generate_artifacts(models_dir / "tf.onnx", spec, tmp_path / "b")


def test_load_rejects_tampered_manifest(models_dir, tmp_path):
    generate_artifacts(models_dir / "gemm.onnx", PeftSpec("head_only", head_classes=3), tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "bundle.json").read_text())
    manifest["spec"]["head_classes"] = 4
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="spec_hash"):
        ArtifactBundle.load(tmp_path / "b")


@pytest.mark.parametrize("model_name, spec, data_fn", [
    ("tf.onnx", PeftSpec("lora", targets=QV, rank=2, head_classes=3), text_data),
    ("tf.onnx", PeftSpec("ffa_lora", targets=QV, rank=2, head_classes=3), text_data),
    ("conv.onnx", PeftSpec("lora", target_ops=["Conv"], rank=2, head_classes=3), image_data),
    ("gemm.onnx", PeftSpec("lora", target_ops=["Gemm"], rank=2, head_classes=3), mlp_data),
])
def test_merged_export_equals_unmerged(models_dir, tmp_path, model_name, spec, data_fn):
    from fedpeft_edge.training.ort_trainer import OrtTrainer

    bundle = generate_artifacts(models_dir / model_name, spec, tmp_path / "b")
    trainer = OrtTrainer(bundle, lr=0.05)
    rng = np.random.default_rng(0)
    flat = trainer.get_flat() + rng.normal(0, 0.2, trainer.layout.total).astype(np.float32)
    trainer.set_flat(flat)
    data = data_fn(n=8)
    feeds = {k: v for k, v in data.items() if k != "labels"}
    reference = trainer.predict(feeds)
    merged = export_inference_model(bundle, flat, tmp_path / "merged.onnx")
    unmerged = export_inference_model(bundle, flat, tmp_path / "unmerged.onnx", merge=False)
    np.testing.assert_allclose(_run(merged, feeds), reference, atol=1e-5)
    np.testing.assert_allclose(_run(unmerged, feeds), reference, atol=1e-5)
    base_plus_head, _ = apply_peft(onnx.load(str(models_dir / model_name)),
                                   PeftSpec("head_only", head_classes=3))
    merged_model = onnx.load(str(merged))
    assert len(merged_model.graph.node) == len(base_plus_head.graph.node)
    assert not any("lora" in t.name for t in merged_model.graph.initializer)

