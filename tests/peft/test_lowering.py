"""Lowering ORT Training graphs to gradient models for stock onnxruntime.

Three oracles: ORT Training itself (``OrtTrainer.loss_and_gradients``) for every PEFT method, float64
central differences of the eval graph run by onnx's reference evaluator (no ORT involved), and, per
lowered op, ORT Training's own kernel for that op on a one-node graph.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from lowering_cases import CASES, case_data, make_cache
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from fedpeft_edge.peft.artifacts import ArtifactBundle
from fedpeft_edge.peft.lowering import (
    BASE_DATA,
    TRAINING_ONLY_OPS,
    GradientModel,
    LoweringError,
    is_stock_node,
    lower_to_gradient_model,
    lower_training_ops,
)
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.runtime.ort_import import ort
from fedpeft_edge.training.ort_trainer import OrtTrainer


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("lowering"))


def _perturbed(bundle: ArtifactBundle, scale: float = 0.2) -> np.ndarray:
    """Starting values plus noise: LoRA B starts at zero, which would leave A's gradient zero."""
    rng = np.random.default_rng(7)
    flat = bundle.initial_vector()
    return (flat + rng.normal(0, scale, flat.shape)).astype(np.float32)


def _session(path, threads: int = 1):
    options = ort().SessionOptions()
    options.intra_op_num_threads = threads
    return ort().InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_lowered(gm: GradientModel, flat: np.ndarray, batch: dict[str, np.ndarray]):
    feeds = {**batch, **gm.layout.split(flat)}
    out = _session(gm.gradient_model).run(None, feeds)
    assert len(out) == 2 + len(gm.param_order)
    grads = np.concatenate([g.reshape(-1) for g in out[2:]]) if len(out) > 2 else np.zeros(0, np.float32)
    return float(out[0]), out[1], grads


def _assert_grads_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> None:
    scale = float(np.abs(want).max())
    assert scale > 0
    assert float(np.abs(got - want).max()) <= rel * scale, float(np.abs(got - want).max()) / scale
    np.testing.assert_allclose(got, want, rtol=rel, atol=1e-6 * scale)


# ---- parity with ORT Training, every method ------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_lowered_gradients_match_ort_training(cache, case):
    bundle_of, lowered_of = cache
    bundle, gm = bundle_of(case), lowered_of(case)
    assert gm.param_order == bundle.param_order and gm.spec_hash == bundle.spec_hash
    np.testing.assert_array_equal(gm.initial_vector(), bundle.initial_vector())
    flat = _perturbed(bundle)
    batch = case_data(case, n=16)
    trainer = OrtTrainer(bundle)
    trainer.set_flat(flat)
    loss, logits, grads = trainer.loss_and_gradients(batch)
    got_loss, got_logits, got_grads = _run_lowered(gm, flat, batch)
    assert got_loss == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-5)
    _assert_grads_close(got_grads, grads)
    # the eval model gives the same loss and logits
    eval_out = _session(gm.eval_model).run(list(gm.eval_outputs), {**batch, **gm.layout.split(flat)})
    assert float(eval_out[0]) == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(eval_out[1], logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_lowered_graphs_hold_only_stock_ops(cache, case):
    """Nothing of ORT Training's training-only set is left; the base is external data in one file."""
    gm = cache[1](case)
    bundle = cache[0](case)
    for path in (gm.gradient_model, gm.eval_model):
        model = onnx.load(str(path), load_external_data=False)
        left = [(n.op_type, n.name) for n in model.graph.node if n.op_type in TRAINING_ONLY_OPS]
        assert not left, left
        assert all(is_stock_node(n) for n in model.graph.node)
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx", "com.microsoft"}
        inputs = [i.name for i in model.graph.input]
        assert inputs == [*bundle.plan.input_names, "labels", *bundle.param_order]
        external = {t.name for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}
        assert external <= set(bundle.plan.frozen) and bool(external) == bool(bundle.plan.frozen)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == ({BASE_DATA} if external else set())
        assert not set(bundle.param_order) & {t.name for t in model.graph.initializer}
    # a device needs no ORT Training file
    assert sorted(p.name for p in gm.directory.iterdir()) == sorted(
        ["gradient.json", "gradient_model.onnx", "eval_model.onnx", BASE_DATA, "initial_params.npy"])
    again = GradientModel.load(gm.directory)
    assert again == gm
    again.verify()


# ---- an oracle without ORT: float64 central differences ------------------------------------------------
def _float64_eval(gm: GradientModel) -> ReferenceEvaluator:
    """The eval graph in float64, run by onnx's reference evaluator."""
    model = onnx.load(str(gm.eval_model))  # external data pulled in
    g = model.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64),
                                                              t.name))
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in g.node:
        for a in node.attribute:
            if a.name == "stash_type" or (node.op_type == "Cast" and a.name == "to"
                                          and a.i == TensorProto.FLOAT):
                a.i = TensorProto.DOUBLE
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
    return ReferenceEvaluator(model)


@pytest.mark.parametrize("case, coords", [("gemm_lora", None), ("lora", None), ("prompt", 24), ("bitfit", 24),
                                          ("full", 24), ("conv_lora", 24), ("conv_select", 24),
                                          ("adapter", 24)])
@pytest.mark.slow  # > 1 s: the full suite runs it, the fast tier leaves it out
def test_gradients_match_float64_central_differences(cache, case, coords):
    gm = cache[1](case)
    evaluator = _float64_eval(gm)
    batch = case_data(case, n=8)
    batch64 = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in batch.items()}
    flat = _perturbed(cache[0](case), 0.1)
    flat64 = flat.astype(np.float64)

    def loss(x: np.ndarray) -> float:
        return float(evaluator.run([gm.eval_outputs[0]], {**batch64, **gm.layout.split(x)})[0])

    _, _, grads = _run_lowered(gm, flat, batch)
    rng = np.random.default_rng(3)
    idx = np.arange(flat.size) if coords is None else rng.choice(flat.size, coords, replace=False)
    scale = float(np.abs(grads).max())

    def central(i: int, h: float) -> float:
        step = np.zeros_like(flat64)
        step[i] = h
        return (loss(flat64 + step) - loss(flat64 - step)) / (2 * h)

    checked, kinks = 0, 0
    for i in idx:
        fd, fd2 = central(i, 1e-7), central(i, 2e-7)
        if abs(fd - fd2) > 1e-6 * scale:  # a ReLU kink inside the stencil: no derivative to compare with
            kinks += 1
            continue
        checked += 1
        # float32 forward/backward against an exact float64 derivative: a few ulp of the largest gradient
        assert abs(grads[i] - fd) <= 1e-5 * scale, (case, i, grads[i], fd)
    assert kinks <= max(1, idx.size // 10), (case, kinks, idx.size)


# ---- errors: never a silent fallback ---------------------------------------------------------------------
def test_unknown_training_op_is_named(cache, tmp_path):
    bundle = cache[0]("lora")
    src = bundle.directory
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    path = broken / "training_model.onnx"
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == "ReluGrad")
    node.op_type = "FrobnicateGrad"  # an op the lowering does not know
    node.name = "the/odd/node"
    onnx.save(model, str(path))
    out = tmp_path / "out"
    with pytest.raises(LoweringError, match=r"com\.microsoft::FrobnicateGrad.*the/odd/node"):
        lower_to_gradient_model(ArtifactBundle.load(broken), out)
    assert not out.exists()  # nothing half-written


def test_known_training_op_without_lowering_is_named():
    model = _one_node("LeakyReluGrad", [("dy", [2, 3]), ("x", [2, 3])], ["dx"], alpha=0.1)
    with pytest.raises(LoweringError, match="LeakyReluGrad"):
        lower_training_ops(model)


def test_unsupported_variant_is_named():
    model = _one_node("GatherGrad", [("shape", None), ("idx", None), ("dy", [2, 3, 4])], ["dx"], axis=1,
                      types={"shape": TensorProto.INT64, "idx": TensorProto.INT64})
    with pytest.raises(LoweringError, match=r"GatherGrad.*axis 0"):
        lower_training_ops(model)


def test_existing_output_folder_is_kept_unless_overwrite(cache, tmp_path):
    bundle = cache[0]("head_only")
    out = tmp_path / "g"
    lower_to_gradient_model(bundle, out)
    with pytest.raises(InvalidValueError, match="not empty"):
        lower_to_gradient_model(bundle, out)
    lower_to_gradient_model(bundle, out, overwrite=True)
    manifest = json.loads((out / "gradient.json").read_text())
    manifest["files"]["base_data"]["bytes"] += 1
    (out / "gradient.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidValueError, match="base_data"):
        GradientModel.load(out)


# ---- each lowering against ORT Training's kernel of that op ---------------------------------------------
def _one_node(op: str, inputs: list[tuple[str, list | None]], outputs: list[str], *,
              domain: str = "com.microsoft", types: dict[str, int] | None = None, opset: int = 17,
              read: list[str] | None = None, **attrs) -> onnx.ModelProto:
    """One ``op`` node; graph outputs = ``read`` (default: every named output)."""
    types = types or {}
    node = helper.make_node(op, [n for n, _ in inputs], outputs, name=f"test/{op}", domain=domain, **attrs)
    graph = helper.make_graph(
        [node], "one",
        [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), s) for n, s in inputs],
        [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None)
         for n in (read if read is not None else outputs) if n])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def _session_of(model: onnx.ModelProto):
    return ort().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _check_lowering(model: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol: float = 1e-5) -> None:
    want = _session_of(model).run(None, feeds)
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    counts = lower_training_ops(lowered)
    assert counts and all(is_stock_node(n) for n in lowered.graph.node)
    got = _session_of(lowered).run(None, feeds)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(1.0, float(np.abs(w).max())))


RNG = np.random.default_rng(11)


def _f(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("op, y", [("ReluGrad", np.maximum(_f(4, 5), 0)),
                                   ("SigmoidGrad", 1 / (1 + np.exp(-_f(4, 5)))),
                                   ("TanhGrad", np.tanh(_f(4, 5))),
                                   ("GeluGrad", 3 * _f(4, 5))])
def test_elementwise_grads(op, y):
    model = _one_node(op, [("dy", [4, 5]), ("y", [4, 5])], ["dx"])
    _check_lowering(model, {"dy": _f(4, 5), "y": y.astype(np.float32)})


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softmax_cross_entropy_loss_grad(reduction):
    logits = _f(6, 4)
    log_prob = (logits - np.log(np.exp(logits).sum(1, keepdims=True))).astype(np.float32)
    dy_shape = [6] if reduction == "none" else []
    model = _one_node("SoftmaxCrossEntropyLossGrad", [("dy", dy_shape), ("log_prob", [6, 4]), ("label", [6])],
                      ["dx"], reduction=reduction, types={"label": TensorProto.INT64})
    dy = np.abs(_f(*dy_shape)) if dy_shape else np.array(1.7, np.float32)
    _check_lowering(model, {"dy": dy, "log_prob": log_prob, "label": np.array([0, 3, 1, 1, 2, 3], np.int64)})


def test_concat_and_split_training():
    model = _one_node("ConcatTraining", [("a", [2, 3]), ("b", [2, 5])], ["c", "lengths"], axis=1,
                      types={"lengths": TensorProto.INT64})
    _check_lowering(model, {"a": _f(2, 3), "b": _f(2, 5)})
    model = _one_node("SplitTraining", [("x", [2, 8]), ("split", [2])], ["p", "q"], axis=1,
                      types={"split": TensorProto.INT64})
    _check_lowering(model, {"x": _f(2, 8), "split": np.array([3, 5], np.int64)})


def test_gather_grad_accumulates_repeated_indices():
    model = _one_node("GatherGrad", [("shape", [2]), ("idx", [3, 4]), ("dy", [3, 4, 5])], ["dx"], axis=0,
                      types={"shape": TensorProto.INT64, "idx": TensorProto.INT64})
    idx = np.array([[0, 2, 2, 6], [1, 1, 1, 0], [6, 5, 2, 0]], np.int64)
    _check_lowering(model, {"shape": np.array([7, 5], np.int64), "idx": idx, "dy": _f(3, 4, 5)})


@pytest.mark.parametrize("axis, read", [(-1, ["dx", "ds", "db"]), (-1, ["dx", "db"]), (-1, ["dx"]),
                                        (-2, ["dx", "ds", "db"]), (1, ["ds"])])
def test_layer_normalization_grad(axis, read):
    """Unread outputs are not computed (["dx"] alone is the artifact rewriter's dX-only form)."""
    shape = [2, 3, 6]
    norm = shape[axis:]
    x = _f(*shape)
    red = tuple(range(len(shape) - len(norm), len(shape)))
    mean = x.mean(red, keepdims=True)
    inv_std = 1 / np.sqrt(x.var(red, keepdims=True) + 1e-5)
    inputs = [("dy", shape), ("x", shape), ("scale", norm), ("mean", list(mean.shape)),
              ("inv_std", list(inv_std.shape))]
    model = _one_node("LayerNormalizationGrad", inputs, ["dx", "ds", "db"], axis=axis, read=read)
    _check_lowering(model, {"dy": _f(*shape), "x": x, "scale": _f(*norm), "mean": mean.astype(np.float32),
                            "inv_std": inv_std.astype(np.float32)}, rtol=1e-4)


def test_softmax_grad_13_and_scale():
    y = np.exp(_f(2, 3, 4))
    y = (y / y.sum(1, keepdims=True)).astype(np.float32)
    model = _one_node("SoftmaxGrad_13", [("dy", [2, 3, 4]), ("y", [2, 3, 4])], ["dx"], axis=1)
    _check_lowering(model, {"dy": _f(2, 3, 4), "y": y})
    model = _one_node("Scale", [("x", [3, 4]), ("s", [])], ["y"], scale_down=1,
                      types={"s": TensorProto.INT64})
    _check_lowering(model, {"x": _f(3, 4), "s": np.array(4, np.int64)})
    model = _one_node("Scale", [("x", [3, 4]), ("s", [])], ["y"])
    _check_lowering(model, {"x": _f(3, 4), "s": np.array(0.25, np.float32)})


CONVS = {  # name: (N, C, H, W, O, kernel, attrs, outputs)
    "3x3_stride2_asym_pads": (2, 4, 9, 8, 6, 3, {"strides": [2, 2], "pads": [1, 0, 0, 1]},
                              ["dx", "dw", "db"]),
    "1x1": (2, 5, 4, 4, 3, 1, {}, ["dx", "dw", "db"]),
    "5x5_stride2_even": (2, 3, 10, 10, 4, 5, {"strides": [2, 2], "pads": [0, 0, 0, 0]}, ["dx", "dw", ""]),
    "dilated": (1, 2, 9, 9, 3, 3, {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, ["dx", "dw", "db"]),
    "depthwise_stride2": (2, 4, 9, 9, 4, 3, {"strides": [2, 2], "group": 4}, ["dx", "", "db"]),
    "1d": (2, 3, 11, 0, 4, 3, {"strides": [2], "pads": [1, 1]}, ["dx", "dw", "db"]),
}


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("static", [True, False])
def test_conv_grad(name, static):
    n, c, h, w, o, k, attrs, outputs = CONVS[name]
    spatial = [h, w] if w else [h]
    group = attrs.get("group", 1)
    x = _f(n, c, *spatial)
    weight = _f(o, c // group, *[k] * len(spatial))
    # dY has the forward output's shape
    dims = []
    for i, size in enumerate(spatial):
        pads = attrs.get("pads", [0] * 2 * len(spatial))
        s, d = attrs.get("strides", [1] * len(spatial))[i], attrs.get("dilations", [1] * len(spatial))[i]
        dims.append((size + pads[i] + pads[i + len(spatial)] - d * (k - 1) - 1) // s + 1)
    x_shape = [n, c, *spatial] if static else ["n", c, *[f"s{i}" for i in range(len(spatial))]]
    model = _one_node("ConvGrad", [("dy", [n, o, *dims]), ("x", x_shape), ("w", list(weight.shape))], outputs,
                      kernel_shape=[k] * len(spatial), **attrs)
    _check_lowering(model, {"dy": _f(n, o, *dims), "x": x, "w": weight}, rtol=1e-4)
