"""The training-graph rewrite in artifacts generation (single-threaded ORT grad kernels -> pooled
elementwise ops) must keep loss and gradients and must leave nodes whose extra outputs are read alone."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from conftest_models import save, text_data, transformer_model

import fedpeft_edge.peft.artifacts as artifacts
from fedpeft_edge.peft.artifacts import generate_artifacts
from fedpeft_edge.peft.spec import PeftSpec
from fedpeft_edge.training.ort_trainer import OrtTrainer

QV = [r"attention\.self\.(query|value)"]
SPECS = {"lora": PeftSpec("lora", targets=QV, rank=4, head_classes=3),
         "bitfit": PeftSpec("bitfit", head_classes=3)}


def _ops(bundle) -> collections.Counter:
    graph = onnx.load(str(bundle.training_model), load_external_data=False).graph
    return collections.Counter(n.op_type for n in graph.node)


def _loss_and_grads(bundle, flat, batch):
    trainer = OrtTrainer(bundle, threads=1)
    trainer.set_flat(flat)
    return trainer.loss_and_gradients(batch)


@pytest.mark.slow  # about 1 s per method
@pytest.mark.parametrize("method", list(SPECS))
def test_rewrite_keeps_loss_and_gradients(tmp_path, monkeypatch, method):
    model_path = save(transformer_model(), tmp_path / "tf.onnx")
    fast = generate_artifacts(model_path, SPECS[method], tmp_path / "fast")
    monkeypatch.setattr(artifacts, "_speed_up_training_model", lambda path: {})
    plain = generate_artifacts(model_path, SPECS[method], tmp_path / "plain")
    assert fast.param_order == plain.param_order

    fast_ops, plain_ops = _ops(fast), _ops(plain)
    assert plain_ops["SoftmaxGrad_13"] >= 1 and plain_ops["LayerNormalizationGrad"] >= 1
    assert fast_ops["SoftmaxGrad_13"] == 0 and fast_ops["Sum"] == 0
    if method == "lora":  # frozen LayerNorm: the dX-only expansion replaces every LayerNormalizationGrad
        assert fast_ops["LayerNormalizationGrad"] == 0
    else:  # BitFit trains LayerNorm biases: their gradient comes from the original node, which must stay
        assert fast_ops["LayerNormalizationGrad"] == plain_ops["LayerNormalizationGrad"]

    rng = np.random.default_rng(3)
    flat = (rng.normal(size=fast.num_trainable) * 0.2).astype(np.float32)
    data = text_data(n=16)
    fast_loss, fast_logits, fast_grads = _loss_and_grads(fast, flat, data)
    plain_loss, plain_logits, plain_grads = _loss_and_grads(plain, flat, data)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-6)
    np.testing.assert_allclose(fast_logits, plain_logits, rtol=1e-6, atol=1e-6)
    assert np.abs(plain_grads).max() > 0
    np.testing.assert_allclose(fast_grads, plain_grads, rtol=1e-4, atol=1e-6 * np.abs(plain_grads).max())
