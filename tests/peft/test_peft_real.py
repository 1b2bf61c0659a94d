"""PEFT + ORT training on the real backbones (MiniLM-L6 on Reuters R8, EfficientNet-Lite0 at 32 px on
MNIST-5k). Artifacts are generated once per module; each case overfits a few fixed batches briefly."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft_edge.peft.artifacts import generate_artifacts
from fedpeft_edge.peft.spec import PeftSpec
from fedpeft_edge.training.ort_trainer import OrtTrainer

pytestmark = pytest.mark.slow

QV = [r"attention\.self\.(query|value)"]
TEXT_SPECS = {
    "lora": PeftSpec("lora", targets=QV, rank=8, alpha=16, head_classes=8),
    "ffa_lora": PeftSpec("ffa_lora", targets=QV, rank=8, alpha=16, head_classes=8),
    "adapter": PeftSpec("adapter", targets=[r"layer\.\d+\.output\.dense"], adapter_dim=16, head_classes=8),
    "bitfit": PeftSpec("bitfit", head_classes=8),
    "head_only": PeftSpec("head_only", head_classes=8),
    "prompt": PeftSpec("prompt", num_virtual_tokens=4, head_classes=8),
}
IMAGE_SPECS = {
    "lora": PeftSpec("lora", targets=[r"_project_conv|_expand_conv|_conv_head"], target_ops=["Conv"], rank=4,
                     alpha=8, head_classes=10),
    "ffa_lora": PeftSpec("ffa_lora", targets=[r"_project_conv"], target_ops=["Conv"], rank=4, alpha=8,
                         head_classes=10),
    "adapter": PeftSpec("adapter", targets=[r"_blocks\.(14|15)/_project_conv"], adapter_dim=16,
                        head_classes=10),
    "bitfit": PeftSpec("bitfit", head_classes=10),
    "head_only": PeftSpec("head_only", head_classes=10),
}


@pytest.fixture(scope="module")
def text_setup():
    from fedpeft_edge.data.datasets import load_reuters_r8, subsample
    from fedpeft_edge.data.features import encode_for_model
    from fedpeft_edge.models.prepare import prepare_text_model

    prepared = prepare_text_model(max_len=32)
    ds = subsample(load_reuters_r8("train"), 32, seed=0)
    inputs = encode_for_model(ds, prepared.meta, prepared.kind)
    batches = [{**{k: v[i:i + 8] for k, v in inputs.items()}, "labels": ds.labels[i:i + 8]}
               for i in range(0, 32, 8)]
    return prepared, batches


@pytest.fixture(scope="module")
def image_setup():
    from fedpeft_edge.data.datasets import load_mnist5k, subsample
    from fedpeft_edge.data.features import encode_for_model
    from fedpeft_edge.models.prepare import prepare_image_model

    prepared = prepare_image_model(image_size=32)
    ds = subsample(load_mnist5k(), 32, seed=0)
    inputs = encode_for_model(ds, prepared.meta, prepared.kind)
    batches = [{**{k: v[i:i + 8] for k, v in inputs.items()}, "labels": ds.labels[i:i + 8]}
               for i in range(0, 32, 8)]
    return prepared, batches


def _check(prepared, batches, spec, out_dir, lr):
    bundle = generate_artifacts(prepared.onnx_path, spec, out_dir)
    trainer = OrtTrainer(bundle, lr=lr, threads=2)
    frozen_sample = bundle.plan.frozen[:: max(1, len(bundle.plan.frozen) // 12)]
    before = {n: trainer.parameter(n) for n in frozen_sample}
    first = trainer.evaluate(batches).loss
    for _ in range(3):
        trainer.train(batches)
    after = trainer.evaluate(batches).loss
    assert after < first - 0.02, (spec.method, first, after)
    for name, value in before.items():
        np.testing.assert_array_equal(trainer.parameter(name), value, err_msg=name)
    flat = trainer.get_flat()
    trainer.set_flat(flat)
    np.testing.assert_array_equal(trainer.get_flat(), flat)
    return bundle, trainer


@pytest.mark.parametrize("method", list(TEXT_SPECS))
def test_minilm_methods_train(text_setup, tmp_path, method):
    prepared, batches = text_setup
    bundle, _ = _check(prepared, batches, TEXT_SPECS[method], tmp_path / method, lr=5e-3)
    if method == "lora":  # 6 layers x (query, value) x (A, B) + head
        assert len(bundle.param_order) == 6 * 2 * 2 + 2


@pytest.mark.parametrize("method", list(IMAGE_SPECS))
def test_efficientnet_methods_train(image_setup, tmp_path, method):
    prepared, batches = image_setup
    _check(prepared, batches, IMAGE_SPECS[method], tmp_path / method, lr=5e-3)


def test_minilm_lora_merged_export_matches(text_setup, tmp_path):
    from fedpeft_edge.peft.merge import export_inference_model
    from fedpeft_edge.runtime.ort_import import ort

    prepared, batches = text_setup
    bundle = generate_artifacts(prepared.onnx_path, TEXT_SPECS["lora"], tmp_path / "b")
    trainer = OrtTrainer(bundle, lr=5e-3, threads=2)
    trainer.train(batches[:2])
    feeds = {k: v for k, v in batches[0].items() if k != "labels"}
    path = export_inference_model(bundle, trainer.get_flat(), tmp_path / "merged.onnx")
    out = ort().InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(out, trainer.predict(feeds), atol=1e-4)
