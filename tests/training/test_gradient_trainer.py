"""GradientTrainer: a lowered gradient model on a plain InferenceSession, the optimizer in the C core.

It must train, step for step like OrtTrainer with the same C-core optimizer, share OrtTrainer's resume
file, bind parameters without copies, and never import ORT Training. The slow tests do the same on the
real backbones (gradient parity and step times side by side) and, in a throwaway venv, on stock
onnxruntime from the package index.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest_models import batches
from lowering_cases import case_data, make_cache

from fedpeft_edge.peft.artifacts import generate_artifacts
from fedpeft_edge.peft.lowering import lower_to_gradient_model
from fedpeft_edge.peft.spec import PeftSpec
from fedpeft_edge.runtime.errors import InvalidTypeError, InvalidValueError, NonFiniteError
from fedpeft_edge.training.base import LocalTrainer
from fedpeft_edge.training.gradient_trainer import GradientTrainer
from fedpeft_edge.training.ort_trainer import OrtTrainer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("gradient_trainer"))


def _inputs(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in data.items() if k != "labels"}


METHODS = ["lora", "prompt", "bitfit", "full", "conv_lora", "conv_adapter", "gemm_lora"]


@pytest.mark.parametrize("optimizer", ["c_adamw", "c_sgd"])
@pytest.mark.parametrize("case", METHODS)
def test_trains_and_steps_like_ort_trainer(cache, case, optimizer):
    bundle, gm = cache[0](case), cache[1](case)
    data = case_data(case, n=48)
    lr = 0.02
    ref = OrtTrainer(bundle, lr=lr, optimizer=optimizer)
    trainer = GradientTrainer(gm, lr=lr, optimizer=optimizer)
    assert isinstance(trainer, LocalTrainer)
    np.testing.assert_array_equal(trainer.get_flat(), ref.get_flat())
    first = trainer.evaluate(batches(data))
    assert first.loss == pytest.approx(ref.evaluate(batches(data)).loss, rel=1e-5)
    _, _, g0 = ref.loss_and_gradients(next(batches(data)))
    for _ in range(4):
        for batch in batches(data):
            loss_ref, logits_ref = ref.train_step(batch)
            loss, logits = trainer.train_step(batch)
            assert loss == pytest.approx(loss_ref, rel=1e-5)
            np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-5)
    assert trainer.step == ref.step == 12
    diff = np.abs(trainer.get_flat() - ref.get_flat())
    if optimizer == "c_sgd":
        assert diff.max() <= 1e-5
    else:
        # Adam divides by sqrt(v): a gradient that is zero up to rounding (a key bias under softmax,
        # say) gets a full +-lr step with a sign set by float noise, in either backend. Elsewhere the
        # two stay together.
        live = np.abs(g0) > 1e-4 * np.abs(g0).max()
        assert diff[live].max() <= 1e-5, diff[live].max()
        assert diff.max() <= 2 * lr * trainer.step
    after = trainer.evaluate(batches(data))
    assert after.loss < first.loss - 1e-3, (first, after)
    np.testing.assert_allclose(trainer.predict(_inputs(data)), ref.predict(_inputs(data)), atol=1e-3)
    assert trainer.zero_copy_report == {"copied_gradient_outputs": []}


def test_sgd_with_prox_clip_and_schedule_matches_ort_trainer(cache):
    bundle, gm = cache[0]("lora"), cache[1]("lora")
    data = case_data("lora", n=64)
    opts = dict(lr=0.05, optimizer="c_sgd", momentum=0.9, weight_decay=0.01, prox_mu=0.5, clip_norm=0.5,
                lr_schedule="cosine", warmup_steps=2, total_steps=8)
    ref, trainer = OrtTrainer(bundle, **opts), GradientTrainer(gm, **opts)
    anchor = trainer.get_flat() + np.float32(0.1)
    ref.set_prox_reference(anchor)
    trainer.set_prox_reference(anchor)
    for _ in range(2):
        m_ref, m = ref.train(batches(data)), trainer.train(batches(data))
        assert m.loss == pytest.approx(m_ref.loss, rel=1e-5) and m.extra == m_ref.extra
    np.testing.assert_allclose(trainer.get_flat(), ref.get_flat(), rtol=0, atol=1e-6)


def test_flat_vector_is_bound_without_copies(cache):
    """set_flat writes the buffer ORT reads: predictions follow at once; get_flat is a copy."""
    lora, head = GradientTrainer(cache[1]("lora")), GradientTrainer(cache[1]("head_only"))
    data = case_data("lora", n=8)
    flat = lora.get_flat()
    parts = lora.layout.split(flat)
    rng = np.random.default_rng(3)
    for name, view in parts.items():
        view[...] = 0.0 if name.endswith("lora_B") else rng.normal(0, 0.5, view.shape)
    lora.set_flat(flat)
    head.set_flat(np.concatenate([parts["head.weight"].ravel(), parts["head.bias"]]))
    np.testing.assert_allclose(lora.predict(_inputs(data)), head.predict(_inputs(data)), atol=1e-5)
    parts["layer.0.attention.self.query.weight.lora_B"][...] = 0.3
    lora.set_flat(flat)
    assert np.abs(lora.predict(_inputs(data)) - head.predict(_inputs(data))).max() > 1e-3
    copy = lora.get_flat()
    copy[:] = 0
    assert np.abs(lora.get_flat()).max() > 0
    np.testing.assert_array_equal(lora.parameter("head.bias"), parts["head.bias"])


def test_bad_vectors_options_and_batches(cache):
    trainer = GradientTrainer(cache[1]("lora"))
    n = trainer.layout.total
    before = trainer.get_flat()
    with pytest.raises(InvalidTypeError):
        trainer.set_flat(np.zeros(n, np.float64))
    with pytest.raises(InvalidValueError):
        trainer.set_flat(np.zeros(n + 1, np.float32))
    bad = before.copy()
    bad[3] = np.inf
    with pytest.raises(NonFiniteError):
        trainer.set_flat(bad)
    np.testing.assert_array_equal(trainer.get_flat(), before)
    with pytest.raises(InvalidValueError, match="optimizer"):
        GradientTrainer(cache[1]("lora"), optimizer="ort_adamw")  # needs ORT Training
    with pytest.raises(InvalidValueError, match="attention_mask"):
        trainer.train([{"input_ids": np.zeros((2, 4), np.int64), "labels": np.zeros(2, np.int64)}])


def test_batch_size_may_change_between_runs(cache):
    trainer = GradientTrainer(cache[1]("lora"))
    data = case_data("lora", n=24)
    trainer.train([{k: v[:16] for k, v in data.items()}, {k: v[16:] for k, v in data.items()}])
    assert trainer.predict(_inputs(data)).shape == (24, 3)
    assert trainer.predict({k: v[:5] for k, v in _inputs(data).items()}).shape == (5, 3)


@pytest.mark.parametrize("optimizer", ["c_adamw", "c_sgd"])
def test_resume_files_are_shared_with_ort_trainer(cache, tmp_path, optimizer):
    bundle, gm = cache[0]("lora"), cache[1]("lora")
    steps = list(batches(case_data("lora", n=64)))
    a = GradientTrainer(gm, lr=0.01, optimizer=optimizer)
    a.train(steps[:2])
    a.save_state(tmp_path / "g.npz")
    a.train(steps[2:3])
    expected = a.get_flat()
    b = GradientTrainer(gm, lr=0.01, optimizer=optimizer)
    b.load_state(tmp_path / "g.npz")
    assert b.step == 2
    b.train(steps[2:3])
    np.testing.assert_array_equal(b.get_flat(), expected)
    # an OrtTrainer resumes from the GradientTrainer's file and takes the same next step
    c = OrtTrainer(bundle, lr=0.01, optimizer=optimizer)
    c.load_state(tmp_path / "g.npz")
    c.train(steps[2:3])
    np.testing.assert_allclose(c.get_flat(), expected, rtol=0, atol=1e-6)
    # and the other way round
    c.save_state(tmp_path / "o.npz")
    d = GradientTrainer(gm, lr=0.01, optimizer=optimizer)
    d.load_state(tmp_path / "o.npz")
    np.testing.assert_array_equal(d.get_flat(), c.get_flat())
    with pytest.raises(InvalidValueError, match="spec_hash"):
        GradientTrainer(cache[1]("ffa_lora"), optimizer=optimizer).load_state(tmp_path / "g.npz")


def test_session_options_and_one_mapping_of_the_base(cache):
    """The memory settings are really applied to both sessions, and the frozen base is mapped once."""
    from fedpeft_edge.training import gradient_trainer as gt

    gm = cache[1]("lora")
    assert gm.base_tensors and set(gm.base_names["gradient_model"]) <= set(gm.base_tensors)
    trainer = GradientTrainer(gm, threads=2)
    data = case_data("lora", n=16)
    trainer.train_step(data)
    trainer.evaluate([data])
    assert gt._SHARED_ARENA is True
    for run in (trainer._train_run, trainer._eval_run):
        options = run.session.get_session_options()
        assert options.enable_mem_pattern is False
        assert options.intra_op_num_threads == 2
        assert options.get_session_config_entry("session.disable_prepacking") == "1"
        assert options.get_session_config_entry("session.use_env_allocators") == "1"
    base = str(gm.base_data.resolve())
    with open("/proc/self/maps") as fh:
        mappings = [line for line in fh if line.rstrip().endswith(base)]
    assert len(mappings) == 1, mappings  # ours; ORT loading the external data itself would add more


def test_micro_batches_give_the_batch_gradient(cache):
    gm = cache[1]("lora")
    data = case_data("lora", n=20)
    whole, parts = GradientTrainer(gm), GradientTrainer(gm, micro_batch=8)  # 8 + 8 + 4 samples
    flat = whole.get_flat() + np.random.default_rng(1).normal(0, 0.05, whole.layout.total).astype(np.float32)
    whole.set_flat(flat)
    parts.set_flat(flat)
    loss, logits, grads = whole.loss_and_gradients(data)
    loss_p, logits_p, grads_p = parts.loss_and_gradients(data)
    assert loss_p == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(logits_p, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads_p, grads, rtol=1e-4, atol=1e-6 * float(np.abs(grads).max()))
    whole.train(batches(data))
    parts.train(batches(data))  # train() ends with release_memory(): nothing it changes is observable
    np.testing.assert_allclose(parts.get_flat(), whole.get_flat(), atol=1e-5)
    with pytest.raises(InvalidValueError, match="micro_batch"):
        GradientTrainer(gm, micro_batch=0)


def test_device_process_imports_neither_ort_training_nor_torch(cache):
    gm = cache[1]("lora")
    code = ("import sys, numpy as np\n"
            "from fedpeft_edge.training.gradient_trainer import GradientTrainer\n"
            f"t = GradientTrainer({str(gm.directory)!r})\n"
            "b = {'input_ids': np.ones((2, 5), np.int64), 'attention_mask': np.ones((2, 5), np.int64),"
            " 'labels': np.zeros(2, np.int64)}\n"
            "t.train([b]); t.evaluate([b])\n"
            "api = [m for m in sys.modules if m.startswith(('onnxruntime.training.api',\n"
            "                                             'onnxruntime.training.artifacts'))]\n"
            "print('torch' in sys.modules, bool(api))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---- real backbones (slow) -------------------------------------------------------------------------------
REAL = {
    "minilm_lora": ("text", PeftSpec("lora", targets=[r"attention\.self\.(query|value)"], rank=8, alpha=16,
                                     head_classes=8)),
    "effnet_lora": ("image", PeftSpec("lora", targets=[r"_project_conv|_expand_conv|_conv_head"],
                                      target_ops=["Conv"], rank=4, alpha=8, head_classes=10)),
}


def _real_batch(kind: str, n: int = 16) -> tuple[Path, dict[str, np.ndarray]]:
    from fedpeft_edge.data.datasets import load_mnist5k, load_reuters_r8, subsample
    from fedpeft_edge.data.features import encode_for_model
    from fedpeft_edge.models.prepare import prepare_image_model, prepare_text_model

    if kind == "text":  # the STACK_NOTES setting: batch 16 x 64 tokens
        prepared, ds = prepare_text_model(max_len=64), subsample(load_reuters_r8("train"), n, seed=0)
    else:
        prepared, ds = prepare_image_model(image_size=32), subsample(load_mnist5k(), n, seed=0)
    return prepared.onnx_path, {**encode_for_model(ds, prepared.meta, prepared.kind), "labels": ds.labels}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    made = {}

    def get(name: str):
        if name not in made:
            kind, spec = REAL[name]
            model_path, batch = _real_batch(kind)
            bundle = generate_artifacts(model_path, spec, root / name / "bundle")
            made[name] = (bundle, lower_to_gradient_model(bundle, root / name / "lowered"), batch)
        return made[name]
    return get


def _graph_gradients(path: Path, feeds: dict[str, np.ndarray], grad_names: list[str], level: str
                     ) -> tuple[float, np.ndarray]:
    """Loss and flat gradient of an ONNX graph in a plain session of the installed (training) build."""
    import onnx

    from fedpeft_edge.runtime.ort_import import ort

    model = onnx.load(str(path))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in grad_names
                              if n not in known)
    rt = ort()
    options = rt.SessionOptions()
    options.intra_op_num_threads = 2
    options.graph_optimization_level = getattr(rt.GraphOptimizationLevel, level)
    session = rt.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    grads = np.concatenate([values[n].reshape(-1) for n in grad_names])
    return float(values[model.graph.output[0].name]), grads


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_model_gradients_and_step_time(real, name, capsys):
    import onnx

    from fedpeft_edge.runtime.ort_import import training_api

    bundle, gm, batch = real(name)
    ref = OrtTrainer(bundle, threads=2, lr=1e-3)
    trainer = GradientTrainer(gm, threads=2, lr=1e-3)
    rng = np.random.default_rng(5)
    flat = (ref.get_flat() + rng.normal(0, 0.01, ref.layout.total)).astype(np.float32)
    ref.set_flat(flat)
    trainer.set_flat(flat)

    # 1. The lowering itself: ORT Training's own graph (training ops, accumulators fed zeros) and the
    #    lowered graph in the same kind of session, same optimisation level.
    params = gm.layout.split(flat)
    state = training_api().CheckpointState.load_checkpoint(str(bundle.checkpoint))
    graph = onnx.load(str(bundle.training_model), load_external_data=False).graph
    feeds = dict(batch)
    grad_inputs = {}
    for node in graph.node:
        if node.op_type == "InPlaceAccumulatorV2":
            grad_inputs[node.input[0][:-len("_grad.accumulation.buffer")]] = node.input[1]
    for i in graph.input:
        if i.name in feeds:
            continue
        if i.name in params:
            feeds[i.name] = params[i.name]
        elif i.name == "lazy_reset_grad":
            feeds[i.name] = np.array([True])
        elif i.name.endswith("_grad.accumulation.buffer"):
            feeds[i.name] = np.zeros_like(params[i.name[:-len("_grad.accumulation.buffer")]])
        else:
            feeds[i.name] = np.asarray(state.parameters[i.name].data)
    del state
    loss_t, grads_t = _graph_gradients(bundle.training_model, feeds, [grad_inputs[p] for p in gm.param_order],
                                       "ORT_ENABLE_BASIC")
    loss_l, grads_l = _graph_gradients(gm.gradient_model, {**batch, **params}, list(gm.grad_outputs),
                                       "ORT_ENABLE_BASIC")
    exact = float(np.abs(grads_l - grads_t).max() / np.abs(grads_t).max())
    assert loss_l == pytest.approx(loss_t, rel=1e-5)
    assert exact <= 1e-4
    np.testing.assert_allclose(grads_l, grads_t, rtol=1e-4, atol=1e-6 * float(np.abs(grads_t).max()))

    # 2. The two trainers as they run (ORT Training's Module vs GradientTrainer, default optimisations).
    #    ORT's full optimisations rewrite the forward convolutions of the two graphs differently (NCHWc
    #    and fusions), so float rounding differs and a ReLU6 unit sitting on its kink can land on
    #    either side: a few gradient entries then differ by far more than rounding, in ORT alone too
    #    (its own graph at basic vs full optimisation). Everything else agrees to rounding.
    loss_ref, logits_ref, grads_ref = ref.loss_and_gradients(batch)
    loss, logits, grads = trainer.loss_and_gradients(batch)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-4, atol=1e-4)
    scale = float(np.abs(grads_ref).max())
    rel = float(np.abs(grads - grads_ref).max()) / scale
    off = float(np.mean(np.abs(grads - grads_ref) > 1e-4 * scale))
    ort_self = float(np.abs(grads_t - grads_ref).max()) / scale  # ORT Training: basic vs full
    if name == "minilm_lora":  # smooth (GELU): no kinks to land on
        assert rel <= 1e-4
    else:
        assert off <= 1e-2 and (rel <= 1e-4 or ort_self >= 0.5 * rel), (rel, off, ort_self)
    assert trainer.zero_copy_report == {"copied_gradient_outputs": []}

    times: dict[str, list[float]] = {"ort_training": [], "gradient_model": []}
    for i in range(7):  # alternate, so drift on the shared machine hits both alike; step 0 is warm-up
        for key, t in (("ort_training", ref), ("gradient_model", trainer)):
            start = time.perf_counter()
            t.train_step(batch)
            if i:
                times[key].append(time.perf_counter() - start)
    drift = np.abs(trainer.get_flat() - ref.get_flat())
    if name == "minilm_lora":
        assert drift.max() <= 1e-4
    else:  # the kink entries above, normalised by Adam, may take different +-lr steps
        assert np.median(drift) <= 1e-4 and drift.max() <= 2 * 1e-3 * trainer.step
    med = {k: statistics.median(v) for k, v in times.items()}
    with capsys.disabled():
        ort_ms, grad_ms = med["ort_training"] * 1e3, med["gradient_model"] * 1e3
        print(f"\n[{name}] lowering vs ORT Training's own graph (basic optimisation): max grad diff "
              f"{exact:.1e} of max |g|; GradientTrainer vs OrtTrainer: {rel:.1e} ({off:.2%} of entries above "
              f"1e-4; ORT Training basic vs full: {ort_self:.1e}). Batch {len(batch['labels'])}, 2 threads, "
              f"c_adamw step (fwd+bwd+update), median of 6: ORT Training {ort_ms:.0f} ms, gradient model "
              f"{grad_ms:.0f} ms (ratio {grad_ms / ort_ms:.2f}); lowered {gm.lowered_ops}")


# ---- stock onnxruntime from the package index (slow) -----------------------------------------------------
_STOCK_SCRIPT = r"""
import json, statistics, sys, time
import numpy as np
import onnxruntime
sys.path.insert(0, sys.argv[2])
from conftest_models import batches
from fedpeft_edge.training.gradient_trainer import GradientTrainer
job = json.loads(open(sys.argv[1]).read())
from pathlib import Path
assert not (Path(onnxruntime.__file__).parent / "training" / "api").is_dir(), "not a stock build"
out = {"version": onnxruntime.__version__, "file": onnxruntime.__file__}
for name, case in job.items():
    t = GradientTrainer(case["dir"], threads=2, lr=case["lr"])
    batch = dict(np.load(case["batch"]))
    t.set_flat(np.load(case["flat"]))
    loss, _, grads = t.loss_and_gradients(batch)
    res = {"loss": loss}
    np.save(case["grads_out"], grads)
    if case.get("time"):
        ts = []
        for _ in range(5):
            s = time.perf_counter(); t.train_step(batch); ts.append(time.perf_counter() - s)
        res["step_s"] = statistics.median(ts[1:])
    if case.get("train"):
        data = dict(np.load(case["train"]))
        first = t.evaluate(batches(data)).loss
        for _ in range(3):
            t.train(batches(data))
        res["eval_before"], res["eval_after"] = first, t.evaluate(batches(data)).loss
    out[name] = res
print(json.dumps(out))
"""
_NETWORK_SIGNS = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
                  "No matching distribution", "Could not find a version", "ConnectTimeout", "ReadTimeout",
                  "ProxyError", "SSLError")


@pytest.mark.slow
def test_stock_onnxruntime_runs_the_gradient_trainer(real, cache, tmp_path, capsys):
    """A venv with stock onnxruntime (no training build): GradientTrainer trains the lowered models and
    MiniLM LoRA's loss and gradients match ORT Training's."""
    import onnx

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    py = str(venv / "bin" / "python")
    packages = ["onnxruntime", "numpy", f"onnx=={onnx.__version__}", "cffi"]  # cffi: the C core's backend
    pip = subprocess.run([py, "-m", "pip", "install", "-q", *packages], capture_output=True, text=True,
                         timeout=900)
    if pip.returncode != 0:
        tail = "\n".join((pip.stderr or pip.stdout).strip().splitlines()[-5:])
        if any(sign in tail for sign in _NETWORK_SIGNS):
            pytest.skip(f"stock onnxruntime could not be installed (no network to the index?): {tail}")
        pytest.fail(f"pip install onnxruntime failed:\n{tail}")

    job, expected = {}, {}
    bundle, gm, batch = real("minilm_lora")
    ref = OrtTrainer(bundle, threads=2)
    flat = (ref.get_flat() + np.random.default_rng(5).normal(0, 0.01, ref.layout.total)).astype(np.float32)
    ref.set_flat(flat)
    loss_ref, _, grads_ref = ref.loss_and_gradients(batch)
    expected["minilm_lora"] = (loss_ref, grads_ref)
    np.savez(tmp_path / "minilm_batch.npz", **batch)
    np.save(tmp_path / "minilm_flat.npy", flat)
    job["minilm_lora"] = {"dir": str(gm.directory), "lr": 1e-3, "batch": str(tmp_path / "minilm_batch.npz"),
                          "flat": str(tmp_path / "minilm_flat.npy"),
                          "grads_out": str(tmp_path / "minilm_g.npy"), "time": True}
    for case in ("lora", "prompt", "full", "conv_lora", "gemm_lora"):  # every lowering, synthetic models
        ref = OrtTrainer(cache[0](case))
        data = case_data(case, n=48)
        first = {k: v[:16] for k, v in data.items()}
        loss_ref, _, grads_ref = ref.loss_and_gradients(first)
        expected[case] = (loss_ref, grads_ref)
        np.savez(tmp_path / f"{case}_batch.npz", **first)
        np.savez(tmp_path / f"{case}_train.npz", **data)
        np.save(tmp_path / f"{case}_flat.npy", ref.get_flat())
        job[case] = {"dir": str(cache[1](case).directory), "lr": 0.02,
                     "batch": str(tmp_path / f"{case}_batch.npz"), "flat": str(tmp_path / f"{case}_flat.npy"),
                     "grads_out": str(tmp_path / f"{case}_g.npy"),
                     "train": str(tmp_path / f"{case}_train.npz")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([py, "-c", _STOCK_SCRIPT, str(tmp_path / "job.json"), str(REPO / "tests" / "support")
                          ], capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert str(venv) in result["file"]  # really the venv's stock build
    for name, (loss_ref, grads_ref) in expected.items():
        grads = np.load(job[name]["grads_out"])
        assert result[name]["loss"] == pytest.approx(loss_ref, rel=1e-5), name
        scale = float(np.abs(grads_ref).max())
        assert float(np.abs(grads - grads_ref).max()) <= 1e-4 * scale, name
        if "eval_after" in result[name]:
            assert result[name]["eval_after"] < result[name]["eval_before"] - 1e-3, (name, result[name])
    rel = float(np.abs(np.load(job["minilm_lora"]["grads_out"]) - expected["minilm_lora"][1]).max()
                / np.abs(expected["minilm_lora"][1]).max())
    with capsys.disabled():
        print(f"\n[stock onnxruntime {result['version']}] MiniLM LoRA batch 16x64, 2 threads: gradient max "
              f"diff {rel:.1e} of max |g| vs ORT Training; GradientTrainer step median "
              f"{result['minilm_lora']['step_s'] * 1e3:.0f} ms")
