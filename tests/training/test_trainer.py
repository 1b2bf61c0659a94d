"""OrtTrainer on synthetic models: every PEFT method trains, the base stays bit-identical, the flat vector
round-trips, resume reproduces the next step, the C optimizers track ORT's AdamW, FedProx pulls back."""

from __future__ import annotations

import lowering_cases
import numpy as np
import pytest
from conftest_models import batches, conv_model, image_data, mlp_model, save, text_data, transformer_model

from fedpeft_edge.peft.artifacts import generate_artifacts
from fedpeft_edge.runtime.errors import InvalidTypeError, InvalidValueError, NonFiniteError
from fedpeft_edge.training.base import LocalTrainer
from fedpeft_edge.training.ort_trainer import OrtTrainer

# The same synthetic PEFT cases the lowering tests use (one list for both backends' tests); the trainer
# tests leave out the strided-stem case, which exists for the lowering of convolution weight gradients.
CASES = {name: case for name, case in lowering_cases.CASES.items() if name != "conv_select"}
DATA = {"tf": text_data, "conv": image_data, "gemm": None}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    paths = {"tf": save(transformer_model(), root / "tf.onnx"),
             "conv": save(conv_model(), root / "conv.onnx"),
             "gemm": save(mlp_model(gemm=True), root / "gemm.onnx")}
    cache = {}

    def get(case):
        if case not in cache:
            model, spec = CASES[case]
            cache[case] = generate_artifacts(paths[model], spec, root / case)
        return cache[case]
    return get


def _data(case):
    from conftest_models import mlp_data
    model = CASES[case][0]
    return mlp_data(n=48) if model == "gemm" else DATA[model](n=48)


@pytest.mark.parametrize("case", list(CASES))
def test_method_trains_only_its_parameters(bundles, case):
    bundle = bundles(case)
    trainer = OrtTrainer(bundle, lr=0.02)
    assert isinstance(trainer, LocalTrainer)
    data = _data(case)
    frozen_before = {n: trainer.parameter(n) for n in bundle.plan.frozen}
    flat0 = trainer.get_flat()
    first = trainer.evaluate(batches(data)).loss
    for _ in range(4):
        trainer.train(batches(data))
    after = trainer.evaluate(batches(data)).loss
    assert after < first - 1e-3, (first, after)
    for name, before in frozen_before.items():  # base bit-identical
        np.testing.assert_array_equal(trainer.parameter(name), before, err_msg=name)
    assert not np.array_equal(trainer.get_flat(), flat0)
    # flat round trip is exact
    flat = trainer.get_flat()
    trainer.set_flat(flat)
    np.testing.assert_array_equal(trainer.get_flat(), flat)


def test_layout_matches_bundle_and_flat_sets_values(bundles):
    bundle = bundles("lora")
    trainer = OrtTrainer(bundle)
    assert [s.name for s in trainer.layout.slots] == list(bundle.param_order)
    assert trainer.layout.total == bundle.num_trainable
    flat = np.arange(trainer.layout.total, dtype=np.float32) / 1000
    trainer.set_flat(flat)
    for slot in trainer.layout.slots:
        np.testing.assert_array_equal(trainer.parameter(slot.name).reshape(-1),
                                      flat[slot.offset:slot.offset + slot.size])


def test_zero_lora_b_predicts_like_head_only(bundles):
    lora, head = OrtTrainer(bundles("lora")), OrtTrainer(bundles("head_only"))
    data = text_data(n=8)
    feeds = {k: v for k, v in data.items() if k != "labels"}
    flat = lora.get_flat()
    parts = lora.layout.split(flat)
    rng = np.random.default_rng(3)
    for name, view in parts.items():
        view[...] = 0.0 if name.endswith("lora_B") else rng.normal(0, 0.5, view.shape)
    lora.set_flat(flat)
    head.set_flat(np.concatenate([parts["head.weight"].ravel(), parts["head.bias"]]))
    np.testing.assert_allclose(lora.predict(feeds), head.predict(feeds), atol=1e-5)
    parts["layer.0.attention.self.query.weight.lora_B"][...] = 0.3
    lora.set_flat(flat)
    assert np.abs(lora.predict(feeds) - head.predict(feeds)).max() > 1e-3


def test_set_flat_rejects_bad_vectors(bundles):
    trainer = OrtTrainer(bundles("lora"))
    n = trainer.layout.total
    before = trainer.get_flat()
    with pytest.raises(InvalidTypeError):
        trainer.set_flat(np.zeros(n, np.float64))
    with pytest.raises(InvalidValueError):
        trainer.set_flat(np.zeros(n + 1, np.float32))
    bad = before.copy()
    bad[3] = np.nan
    with pytest.raises(NonFiniteError):
        trainer.set_flat(bad)
    np.testing.assert_array_equal(trainer.get_flat(), before)


def test_bad_options_and_batches(bundles):
    bundle = bundles("lora")
    with pytest.raises(InvalidValueError):
        OrtTrainer(bundle, optimizer="lamb")
    with pytest.raises(InvalidValueError):
        OrtTrainer(bundle, lr_schedule="cosine")  # needs total_steps
    with pytest.raises(InvalidValueError):
        OrtTrainer(bundle, optimizer="ort_adamw", prox_mu=0.1)
    with pytest.raises(InvalidValueError, match="attention_mask"):
        OrtTrainer(bundle).train([{"input_ids": np.zeros((2, 4), np.int64), "labels": np.zeros(2, np.int64)}])


@pytest.mark.parametrize("optimizer", ["c_adamw", "c_sgd", "ort_adamw"])
def test_resume_reproduces_next_step(bundles, tmp_path, optimizer):
    bundle = bundles("lora")
    data = text_data(n=64)
    all_batches = list(batches(data))
    a = OrtTrainer(bundle, lr=0.01, optimizer=optimizer)
    a.train(all_batches[:2])
    a.save_state(tmp_path / "state.npz")
    a.train(all_batches[2:3])
    expected = a.get_flat()

    b = OrtTrainer(bundle, lr=0.01, optimizer=optimizer)
    b.load_state(tmp_path / "state.npz")
    assert b.step == 2
    b.train(all_batches[2:3])
    np.testing.assert_allclose(b.get_flat(), expected, rtol=0, atol=1e-7)
    if optimizer != "ort_adamw":
        assert (tmp_path / "state.npz").stat().st_size < 3 * 4 * bundle.num_trainable + 4096


def test_state_from_other_bundle_is_rejected(bundles, tmp_path):
    a = OrtTrainer(bundles("lora"))
    a.save_state(tmp_path / "s.npz")
    with pytest.raises(InvalidValueError, match="spec_hash"):
        OrtTrainer(bundles("ffa_lora")).load_state(tmp_path / "s.npz")
    with pytest.raises(InvalidValueError, match="optimizer"):
        OrtTrainer(bundles("lora"), optimizer="c_sgd").load_state(tmp_path / "s.npz")


def test_c_adamw_tracks_ort_adamw(bundles):
    bundle = bundles("lora")
    data = text_data(n=64)
    runs = {}
    for opt in ("c_adamw", "ort_adamw"):
        trainer = OrtTrainer(bundle, lr=0.01, optimizer=opt)
        losses = [trainer.train_step(b)[0] for _ in range(2) for b in batches(data)]
        runs[opt] = (np.array(losses), trainer.get_flat())
    np.testing.assert_allclose(runs["c_adamw"][0], runs["ort_adamw"][0], rtol=5e-3)
    # Adam normalises tiny gradients, so float differences can move a weight by up to ~lr per step.
    assert np.abs(runs["c_adamw"][1] - runs["ort_adamw"][1]).max() < 0.02
    assert np.median(np.abs(runs["c_adamw"][1] - runs["ort_adamw"][1])) < 1e-3


def test_prox_term_pulls_toward_reference(bundles):
    bundle = bundles("lora")
    data = text_data(n=64)
    distances = {}
    for mu in (0.0, 5.0):
        trainer = OrtTrainer(bundle, lr=0.02, optimizer="c_sgd", momentum=0.0, prox_mu=mu)
        ref = trainer.get_flat()
        trainer.set_prox_reference(ref)
        for _ in range(3):
            trainer.train(batches(data))
        distances[mu] = float(np.linalg.norm(trainer.get_flat() - ref))
    assert distances[5.0] < 0.8 * distances[0.0], distances


def test_clip_norm_limits_the_step(bundles):
    bundle = bundles("lora")
    batch = next(batches(text_data(n=16)))
    steps = {}
    for clip in (None, 1e-4):
        trainer = OrtTrainer(bundle, lr=1.0, optimizer="c_sgd", momentum=0.0, clip_norm=clip)
        before = trainer.get_flat()
        trainer.train_step(batch)
        steps[clip] = float(np.linalg.norm(trainer.get_flat() - before))
    assert steps[1e-4] == pytest.approx(1e-4, rel=1e-2)
    assert steps[None] > 10 * steps[1e-4]


def test_lr_schedules():
    from types import SimpleNamespace
    t = SimpleNamespace(lr=1.0, warmup_steps=2, total_steps=10, lr_schedule="linear")
    lr_at = OrtTrainer.lr_at
    assert [lr_at(t, s) for s in (1, 2)] == [0.5, 1.0]
    assert lr_at(t, 10) == pytest.approx(0.0)
    t.lr_schedule = "cosine"
    assert lr_at(t, 6) == pytest.approx(0.5)


def test_training_on_device_never_imports_torch(bundles):
    """Torch is installed here, yet a trainer process must not load it (ORT imports it opportunistically)."""
    import subprocess
    import sys

    bundle = bundles("lora")
    code = ("import sys, numpy as np\n"
            "from fedpeft_edge.training.ort_trainer import OrtTrainer\n"
            f"t = OrtTrainer({str(bundle.directory)!r})\n"
            "b = {'input_ids': np.ones((2, 5), np.int64), 'attention_mask': np.ones((2, 5), np.int64),"
            " 'labels': np.zeros(2, np.int64)}\n"
            "t.train([b])\n"
            "print('torch' in sys.modules, 'onnxruntime.training.api' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
