"""Heterogeneous LoRA ranks: rank conversion, HetLoRA (slot-wise zero-padding), FlexLoRA (SVD) aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft_edge.central.hetero_rank import (
    LoraPair,
    RankedUpdate,
    flexlora_aggregate,
    hetlora_aggregate,
    lora_products,
    pad_rank,
    pairs_from_sites,
    truncate_rank,
)
from fedpeft_edge.runtime.errors import InvalidTypeError, InvalidValueError, NonFiniteError

D_IN, D_OUT = 6, 5
PAIRS = (LoraPair("q.lora_A", "q.lora_B"), LoraPair("v.lora_A", "v.lora_B"))
CONV = (LoraPair("c.lora_A", "c.lora_B", kind="conv"),)


def site(rank: int, seed: int, *, conv: bool = False) -> dict[str, np.ndarray]:
    """Tensors in the project's layout: A (d_in, r), B (r, d_out); conv A (r, c_in,1,1), B (c_out, r,1,1)."""
    rng = np.random.default_rng(seed)
    if conv:
        return {"c.lora_A": rng.normal(size=(rank, D_IN, 1, 1)).astype(np.float32),
                "c.lora_B": rng.normal(size=(D_OUT, rank, 1, 1)).astype(np.float32),
                "head.bias": rng.normal(size=(3,)).astype(np.float32)}
    out = {}
    for p in PAIRS:
        out[p.a] = rng.normal(size=(D_IN, rank)).astype(np.float32)
        out[p.b] = rng.normal(size=(rank, D_OUT)).astype(np.float32)
    out["head.weight"] = rng.normal(size=(D_IN, 3)).astype(np.float32)
    return out


def scale(rank: int, alpha: float = 16.0) -> float:
    return alpha / rank  # PeftSpec.scaling


# ------------------------------------------------------------------------------- conversion


def test_pad_then_truncate_round_trips_and_keeps_the_product() -> None:
    t = site(4, 0)
    padded = pad_rank(t, PAIRS, 8, scale_from=scale(4), scale_to=scale(8))
    assert padded["q.lora_A"].shape == (D_IN, 8) and padded["q.lora_B"].shape == (8, D_OUT)
    assert not padded["q.lora_A"][:, 4:].any() and not padded["q.lora_B"][4:].any()
    for name, before in lora_products(t, PAIRS, scale(4)).items():
        np.testing.assert_allclose(lora_products(padded, PAIRS, scale(8))[name], before, rtol=1e-5, atol=1e-5)
    back = truncate_rank(padded, PAIRS, 4, scale_from=scale(8), scale_to=scale(4))
    for name in t:
        np.testing.assert_allclose(back[name], t[name], rtol=1e-6)
    assert back["head.weight"] is not t["head.weight"]  # copies, never views of the caller's arrays


def test_truncate_keeps_the_first_slots_along_the_rank_axis() -> None:
    t = site(8, 1)
    out = truncate_rank(t, PAIRS, 3, scale_from=2.0, scale_to=2.0)
    np.testing.assert_array_equal(out["q.lora_A"], t["q.lora_A"][:, :3])  # A: columns
    np.testing.assert_array_equal(out["q.lora_B"], t["q.lora_B"][:3])  # B: rows
    conv = site(8, 2, conv=True)
    out = truncate_rank(conv, CONV, 3, scale_from=scale(8), scale_to=scale(3))
    np.testing.assert_array_equal(out["c.lora_A"], conv["c.lora_A"][:3])  # conv A: axis 0
    np.testing.assert_allclose(out["c.lora_B"], conv["c.lora_B"][:, :3] * scale(8) / scale(3), rtol=1e-6)
    # the kept slots add the same ΔW as in the rank-8 adapter
    kept = {"c.lora_A": conv["c.lora_A"][:3], "c.lora_B": conv["c.lora_B"][:, :3]}
    np.testing.assert_allclose(lora_products(out, CONV, scale(3))["c.lora_A"],
                               lora_products(kept, CONV, scale(8))["c.lora_A"], rtol=1e-5)


def test_pairs_from_plan_sites() -> None:
    from fedpeft_edge.peft.lora import LoraSite

    s = LoraSite(kind="conv", weight="w", a="w.lora_A", b="w.lora_B", scale=2.0, nodes=("n",))
    assert pairs_from_sites([s]) == (LoraPair("w.lora_A", "w.lora_B", "conv"),)


# ---------------------------------------------------------------------------------- HetLoRA


def test_hetlora_with_equal_ranks_is_fedavg() -> None:
    sites = [site(8, k) for k in range(3)]
    weights = [10.0, 30.0, 60.0]
    updates = [RankedUpdate(t, 8, scale(8), w) for t, w in zip(sites, weights, strict=True)]
    out = hetlora_aggregate(updates, PAIRS, 8, scale=scale(8))
    assert list(out) == list(sites[0])
    for name in sites[0]:
        fedavg = sum(w * t[name].astype(np.float64) for w, t in zip(weights, sites, strict=True)) / 100.0
        np.testing.assert_allclose(out[name], fedavg, rtol=1e-5, atol=1e-6)


def test_hetlora_weights_each_slot_over_the_sites_that_cover_it() -> None:
    # hand-computed: one LoRA pair, d_in = d_out = 1, ranks 2 and 1, weights 1 and 3, same scale
    pair = (LoraPair("a", "b"),)
    s1 = {"a": np.array([[1.0, 2.0]], np.float32), "b": np.array([[10.0], [20.0]], np.float32),
          "h": np.array([0.0], np.float32)}
    s2 = {"a": np.array([[5.0]], np.float32), "b": np.array([[30.0]], np.float32),
          "h": np.array([4.0], np.float32)}
    ups = [RankedUpdate(s1, 2, 1.0, 1.0), RankedUpdate(s2, 1, 1.0, 3.0)]
    out = hetlora_aggregate(ups, pair, 2, scale=1.0)
    # slot 0: (1·1 + 3·5)/4 = 4, (1·10 + 3·30)/4 = 25; slot 1: only site 1 covers it -> its own values
    np.testing.assert_allclose(out["a"], [[4.0, 2.0]])
    np.testing.assert_allclose(out["b"], [[25.0], [20.0]])
    np.testing.assert_allclose(out["h"], [3.0])  # non-LoRA: FedAvg over both, (0 + 3·4)/4
    # the plain zero-padded mean (slotwise=False) counts site 2's padding zeros in slot 1: (1·2 + 3·0)/4
    plain = hetlora_aggregate(ups, pair, 2, scale=1.0, slotwise=False)
    np.testing.assert_allclose(plain["a"], [[4.0, 0.5]])
    np.testing.assert_allclose(plain["b"], [[25.0], [5.0]])


def test_hetlora_rescales_b_between_scales() -> None:
    # a rank-1 site with alpha 16 (scale 16) read into a rank-2 global (scale 8): its B doubles
    pair = (LoraPair("a", "b"),)
    low = {"a": np.array([[1.0]], np.float32), "b": np.array([[1.0]], np.float32)}
    high = {"a": np.array([[1.0, 1.0]], np.float32), "b": np.array([[1.0], [1.0]], np.float32)}
    out = hetlora_aggregate([RankedUpdate(low, 1, 16.0, 1.0), RankedUpdate(high, 2, 8.0, 1.0)], pair, 2,
                            scale=8.0)
    np.testing.assert_allclose(out["b"], [[1.5], [1.0]])  # slot 0: (2 + 1)/2


def test_hetlora_norm_weighting_favours_the_larger_update() -> None:
    pair = (LoraPair("a", "b"),)
    small = {"a": np.array([[1.0]], np.float32), "b": np.array([[1.0]], np.float32)}
    big = {"a": np.array([[3.0]], np.float32), "b": np.array([[3.0]], np.float32)}
    ups = [RankedUpdate(small, 1, 1.0, 1.0), RankedUpdate(big, 1, 1.0, 1.0)]
    plain = hetlora_aggregate(ups, pair, 1, scale=1.0)
    normed = hetlora_aggregate(ups, pair, 1, scale=1.0, norm_weighted=True)
    np.testing.assert_allclose(plain["a"], [[2.0]])
    np.testing.assert_allclose(normed["a"], [[(1 * 1 + 9 * 3) / 10]])  # ‖ΔW‖ = 1 and 9
    for p, t in ((PAIRS[0], site(4, 9)), (CONV[0], site(3, 9, conv=True))):  # the Gram-matrix shortcut
        assert p.product_norm(t, 2.5) == pytest.approx(np.linalg.norm(p.product(t, 2.5)), rel=1e-6)


# --------------------------------------------------------------------------------- FlexLoRA


def test_flexlora_of_one_full_rank_site_reproduces_its_product() -> None:
    t = site(4, 3)
    out = flexlora_aggregate([RankedUpdate(t, 4, scale(4), 7.0)], PAIRS, 4, scale=scale(4))
    want = lora_products(t, PAIRS, scale(4))
    got = lora_products(out, PAIRS, scale(4))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["head.weight"], t["head.weight"])
    # and read at a larger global rank (zero slots beyond the product's rank), with another scale
    wide = flexlora_aggregate([RankedUpdate(t, 4, scale(4), 1.0)], PAIRS, 5, scale=scale(5))
    assert wide["q.lora_A"].shape == (D_IN, 5)
    np.testing.assert_allclose(lora_products(wide, PAIRS, scale(5))["q.lora_A"], want["q.lora_A"],
                               rtol=1e-5, atol=1e-5)


def test_flexlora_is_the_best_rank_r_approximation_of_the_mean_product() -> None:
    ranks, weights = [4, 3, 2, 4], [1.0, 2.0, 3.0, 4.0]
    sites = [site(r, 10 + k) for k, r in enumerate(ranks)]
    updates = [RankedUpdate(t, r, scale(r), w) for t, r, w in zip(sites, ranks, weights, strict=True)]
    out = flexlora_aggregate(updates, PAIRS, 4, scale=scale(4))
    for p in PAIRS:
        mean = sum(w * p.product(t, scale(r)) for t, r, w in zip(sites, ranks, weights, strict=True)) / 10.0
        u, s, vt = np.linalg.svd(mean)
        best = (u[:, :4] * s[:4]) @ vt[:4]
        got = p.product(out, scale(4))
        np.testing.assert_allclose(got, best, rtol=1e-4, atol=1e-4)
        # Eckart-Young: the residual is exactly the dropped singular values
        assert np.linalg.norm(mean - got) == pytest.approx(np.sqrt(np.sum(s[4:] ** 2)), rel=1e-4)
        # slots come ordered by singular value: truncating to r is the best rank-r approximation too
        two = truncate_rank(out, PAIRS, 2, scale_from=scale(4), scale_to=scale(2))
        np.testing.assert_allclose(p.product(two, scale(2)), (u[:, :2] * s[:2]) @ vt[:2], rtol=1e-4,
                                   atol=1e-4)
    head = sum(w * t["head.weight"].astype(np.float64) for t, w in zip(sites, weights, strict=True)) / 10.0
    np.testing.assert_allclose(out["head.weight"], head, rtol=1e-5)


def test_flexlora_low_rank_shortcut_equals_the_plain_svd() -> None:
    # d = 40 > Σ ranks = 9: the QR shortcut path; compared with numpy's SVD of the formed mean
    pair = (LoraPair("a", "b"),)
    rng = np.random.default_rng(30)
    ranks, weights = [4, 3, 2], [2.0, 1.0, 1.0]
    sites = [{"a": rng.normal(size=(40, r)).astype(np.float32),
              "b": rng.normal(size=(r, 40)).astype(np.float32)} for r in ranks]
    out = flexlora_aggregate([RankedUpdate(t, r, scale(r), w) for t, r, w in zip(sites, ranks, weights,
                                                                                 strict=True)],
                             pair, 4, scale=scale(4))
    mean = sum(w * pair[0].product(t, scale(r)) for t, r, w in zip(sites, ranks, weights, strict=True)) / 4.0
    u, s, vt = np.linalg.svd(mean)
    np.testing.assert_allclose(pair[0].product(out, scale(4)), (u[:, :4] * s[:4]) @ vt[:4], rtol=1e-4,
                               atol=1e-4)


def test_flexlora_conv_layout() -> None:
    t = site(3, 4, conv=True)
    out = flexlora_aggregate([RankedUpdate(t, 3, scale(3), 1.0)], CONV, 3, scale=scale(3))
    assert out["c.lora_A"].shape == (3, D_IN, 1, 1) and out["c.lora_B"].shape == (D_OUT, 3, 1, 1)
    np.testing.assert_allclose(lora_products(out, CONV, scale(3))["c.lora_A"],
                               lora_products(t, CONV, scale(3))["c.lora_A"], rtol=1e-5, atol=1e-5)


def test_flexlora_differs_from_fedavg_of_factors() -> None:
    # the mean of products is not the product of means: the reason FlexLoRA exists
    sites = [site(2, 20), site(2, 21)]
    ups = [RankedUpdate(t, 2, 1.0, 1.0) for t in sites]
    flex = lora_products(flexlora_aggregate(ups, PAIRS, 2, scale=1.0), PAIRS, 1.0)["q.lora_A"]
    het = lora_products(hetlora_aggregate(ups, PAIRS, 2, scale=1.0), PAIRS, 1.0)["q.lora_A"]
    assert not np.allclose(flex, het, atol=1e-3)


# ------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("aggregate", [hetlora_aggregate, flexlora_aggregate])
def test_bad_inputs_are_rejected(aggregate) -> None:
    good = site(4, 5)
    ok = RankedUpdate(good, 4, scale(4), 1.0)
    with pytest.raises(InvalidValueError, match="above the maximum rank"):
        aggregate([ok, RankedUpdate(site(8, 6), 8, scale(8), 1.0)], PAIRS, 4, scale=scale(4))
    with pytest.raises(InvalidValueError, match="declares rank 2"):
        aggregate([RankedUpdate(good, 2, scale(2), 1.0)], PAIRS, 4, scale=scale(4))
    bad = dict(good)
    bad["q.lora_A"] = bad["q.lora_A"].copy()
    bad["q.lora_A"][0, 0] = np.nan
    with pytest.raises(NonFiniteError):
        aggregate([ok, RankedUpdate(bad, 4, scale(4), 1.0)], PAIRS, 4, scale=scale(4))
    wrong = dict(good, **{"q.lora_A": np.zeros((D_IN + 1, 4), np.float32)})
    with pytest.raises(InvalidValueError, match="not compatible"):
        aggregate([ok, RankedUpdate(wrong, 4, scale(4), 1.0)], PAIRS, 4, scale=scale(4))
    mismatched = dict(good, **{"q.lora_B": np.zeros((3, D_OUT), np.float32)})
    with pytest.raises(InvalidValueError, match="A has rank 4, B has rank 3"):
        aggregate([RankedUpdate(mismatched, 4, scale(4), 1.0)], PAIRS, 4, scale=scale(4))
    head = dict(good, **{"head.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(InvalidValueError, match=r"head\.weight"):
        aggregate([ok, RankedUpdate(head, 4, scale(4), 1.0)], PAIRS, 4, scale=scale(4))
    missing = {k: v for k, v in good.items() if k != "v.lora_B"}
    with pytest.raises(InvalidValueError, match=r"v\.lora_B"):
        aggregate([RankedUpdate(missing, 4, scale(4), 1.0)], PAIRS, 4, scale=scale(4))
    for weight in (0.0, -1.0, float("nan")):
        with pytest.raises(InvalidValueError, match="weight"):
            aggregate([RankedUpdate(good, 4, scale(4), weight)], PAIRS, 4, scale=scale(4))
    with pytest.raises(InvalidValueError, match="scale"):
        aggregate([RankedUpdate(good, 4, 0.0, 1.0)], PAIRS, 4, scale=scale(4))
    with pytest.raises(InvalidValueError, match="no updates"):
        aggregate([], PAIRS, 4, scale=scale(4))
    with pytest.raises(InvalidValueError, match="max_rank"):
        aggregate([ok], PAIRS, 0, scale=scale(4))
    with pytest.raises(InvalidTypeError):
        aggregate([RankedUpdate(dict(good, **{"q.lora_A": [[1.0]]}), 4, scale(4), 1.0)], PAIRS, 4,
                  scale=scale(4))


def test_conversion_rejects_bad_ranks_and_values() -> None:
    t = site(4, 7)
    with pytest.raises(InvalidValueError, match="larger rank"):
        truncate_rank(t, PAIRS, 5, scale_from=1.0, scale_to=1.0)
    with pytest.raises(InvalidValueError, match="above the maximum rank"):
        pad_rank(t, PAIRS, 3, scale_from=1.0, scale_to=1.0)
    with pytest.raises(InvalidValueError, match="positive integer"):
        pad_rank(t, PAIRS, 0, scale_from=1.0, scale_to=1.0)
    with pytest.raises(InvalidValueError, match="scale"):
        pad_rank(t, PAIRS, 8, scale_from=float("inf"), scale_to=1.0)
    inf = dict(t, **{"head.weight": np.full((D_IN, 3), np.inf, np.float32)})
    with pytest.raises(NonFiniteError, match=r"head\.weight"):
        truncate_rank(inf, PAIRS, 2, scale_from=1.0, scale_to=1.0)
    with pytest.raises(InvalidTypeError, match="floats"):
        pad_rank(dict(t, ids=np.arange(3)), PAIRS, 8, scale_from=1.0, scale_to=1.0)
    with pytest.raises(InvalidValueError, match="kind"):
        LoraPair("a", "b", kind="dense")
    with pytest.raises(InvalidValueError, match="layout"):
        truncate_rank(site(4, 8, conv=True), (LoraPair("c.lora_A", "c.lora_B"),), 2, scale_from=1.0,
                      scale_to=1.0)


# ------------------------------------------------------- against the real LoRA graphs (peft/lora.py)


def _graph_cases():
    from conftest_models import conv_model, image_data, mlp_data, mlp_model, text_data, transformer_model

    return [
        ("matmul", mlp_model, {"target_ops": ["MatMul"]}, mlp_data),
        ("gemm", lambda: mlp_model(gemm=True), {"target_ops": ["Gemm"]}, mlp_data),
        ("conv", conv_model, {"targets": [r"pw\.weight"], "target_ops": ["Conv"]}, image_data),
        ("transformer", transformer_model, {"targets": [r"attention\.self\.(query|value)"]}, text_data),
    ]


@pytest.mark.parametrize("case", _graph_cases(), ids=lambda c: c[0])
def test_conversions_preserve_what_the_onnx_graph_computes(case) -> None:
    """A rank-2 adapter padded to rank 4 (other alpha/rank scale) gives the rank-4 graph the same output;
    FlexLoRA of that one site too: the layout and scale assumptions hold for every LoRA site kind."""
    from onnx import numpy_helper

    from fedpeft_edge.peft.spec import PeftSpec
    from fedpeft_edge.peft.surgery import apply_peft
    from fedpeft_edge.runtime.ort_import import ort

    _, make_model, targets, make_data = case
    data = make_data(n=8)
    feeds = {k: v for k, v in data.items() if k != "labels"}

    def build(rank: int):
        return apply_peft(make_model(), PeftSpec("lora", rank=rank, alpha=16.0, head_classes=3, **targets))

    def run(model, values: dict[str, np.ndarray]) -> np.ndarray:
        for init in model.graph.initializer:
            if init.name in values:
                init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values[init.name]), init.name))
        sess = ort().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)[0]

    small, plan2 = build(2)
    big, plan4 = build(4)
    pairs = pairs_from_sites(plan2.lora_sites)
    assert pairs == pairs_from_sites(plan4.lora_sites) and pairs
    inits = {i.name: numpy_helper.to_array(i) for i in small.graph.initializer}
    rng = np.random.default_rng(0)
    trained = {n: rng.normal(0, 0.5, inits[n].shape).astype(np.float32) for n in plan2.trainable}
    want = run(small, trained)
    assert not np.allclose(want, run(small, {p.b: np.zeros_like(inits[p.b]) for p in pairs}), atol=1e-3)
    padded = pad_rank(trained, pairs, 4, scale_from=16.0 / 2, scale_to=16.0 / 4)
    np.testing.assert_allclose(run(big, padded), want, rtol=1e-4, atol=1e-4)
    back = truncate_rank(padded, pairs, 2, scale_from=16.0 / 4, scale_to=16.0 / 2)
    np.testing.assert_allclose(run(build(2)[0], back), want, rtol=1e-4, atol=1e-4)
    flex = flexlora_aggregate([RankedUpdate(trained, 2, 16.0 / 2, 1.0)], pairs, 4, scale=16.0 / 4)
    np.testing.assert_allclose(run(build(4)[0], flex), want, rtol=1e-4, atol=1e-4)
