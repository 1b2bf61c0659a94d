"""Sites below the bundle's LoRA rank in the aggregator core: slot maps, HetLoRA-style rank-aware averaging
and FlexLoRA at close, checked against central/hetero_rank.py's in-process reference, rejections, and the
state surviving a restart mid-round."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedpeft_edge.central import core as R
from fedpeft_edge.central.hetero_rank import (
    LoraPair,
    RankedUpdate,
    flexlora_aggregate,
    hetlora_aggregate,
)
from fedpeft_edge.peft.layout import FlatLayout
from fedpeft_edge.peft.rank_slots import RANK_METRIC, RankSlots
from fedpeft_edge.protocol import codec as C
from fedpeft_edge.protocol import wire as W
from fedpeft_edge.protocol.privacy import PrivacyPolicy
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.site.rank_cut import RankCut, payload_bound

SPEC = "0123abcd" * 4
FLEET = "ranks"
RANK = 4
LAYOUT = FlatLayout.from_shapes([
    ("head.weight", (4, 3)),
    ("enc.q.lora_A", (6, RANK)),
    ("enc.q.lora_B", (RANK, 5)),
    ("conv.lora_A", (RANK, 3, 1, 1)),
    ("conv.lora_B", (2, RANK, 1, 1)),
    ("head.bias", (3,)),
])
N = LAYOUT.total
SLOTS = RankSlots.from_layout(LAYOUT)
PAIRS = [LoraPair("enc.q.lora_A", "enc.q.lora_B", "matmul"), LoraPair("conv.lora_A", "conv.lora_B", "conv")]


def _config(**kw: object) -> R.AggregatorConfig:
    base = {"fleet": FLEET, "n_params": N, "spec_hash": SPEC, "min_clients": 1, "quorum": 4,
            "round_deadline_s": 60.0, "norm_median_multiplier": 100.0, "norm_reject_multiplier": 0.0,
            "samples_median_multiplier": 0.0}  # bounds that keep the round buffer but never bind here
    base.update(kw)
    return R.AggregatorConfig(**base)  # type: ignore[arg-type]


def _core(tmp: Path | None = None, **kw: object) -> R.AggregatorCore:
    g = np.random.default_rng(7).standard_normal(N).astype(np.float32)
    return R.AggregatorCore(_config(**kw), tmp, initial_global=g, rank_slots=SLOTS)


def _delta(seed: int, rank: int) -> np.ndarray:
    """A rank-R vector that is zero beyond slot ``rank`` (what a rank-``rank`` site's training leaves)."""
    d = np.random.default_rng(seed).standard_normal(N).astype(np.float32) * 0.1
    assert SLOTS is not None
    d[~SLOTS.keep(rank)] = 0.0
    return d


def _msg(client: str, delta: np.ndarray, rank: int, samples: int, rnd: int = 0) -> W.UpdateMessage:
    assert SLOTS is not None
    metrics = {"loss": 1.0}
    values = delta
    if rank < RANK:
        values = delta[SLOTS.indices(rank)]
        metrics[RANK_METRIC] = float(rank)
    enc, _ = C.encode_vector(values, C.CodecConfig(mode="fp32"))
    return W.UpdateMessage(FLEET, rnd, client, SPEC, samples, metrics, enc)


SITES = [("a", 11, RANK, 300), ("b", 12, RANK, 100), ("c", 13, 2, 200), ("d", 14, 1, 400)]


# ---- the slot map ---------------------------------------------------------------------------------------


def test_slot_map_follows_the_rank_axes() -> None:
    assert SLOTS is not None and SLOTS.max_rank == RANK
    parts = LAYOUT.split(SLOTS.slot_of)
    assert (parts["head.weight"] == -1).all() and (parts["head.bias"] == -1).all()
    assert (parts["enc.q.lora_A"] == np.arange(RANK)[None, :]).all()  # A (d_in, r): columns
    assert (parts["enc.q.lora_B"] == np.arange(RANK)[:, None]).all()  # B (r, d_out): rows
    assert (parts["conv.lora_A"][:, 0, 0, 0] == np.arange(RANK)).all()  # conv A (r, c_in, 1, 1)
    assert (parts["conv.lora_B"][0, :, 0, 0] == np.arange(RANK)).all()  # conv B (c_out, r, 1, 1)
    # rank 2 keeps the head, the bias, and half of every factor
    assert SLOTS.size(2) == 12 + 3 + (6 * 2 + 2 * 5) + (2 * 3 + 2 * 2)
    segs = SLOTS.segments(2, LAYOUT)
    assert [n for _, n in segs] == [12, 12, 10, 6, 4, 3] and segs[-1][0] + 3 == SLOTS.size(2)
    assert RankSlots.from_layout(FlatLayout.from_shapes([("head.weight", (3, 2))])) is None
    with pytest.raises(InvalidValueError, match="from 1 to"):
        SLOTS.keep(RANK + 1)
    with pytest.raises(InvalidValueError, match=r"no \.lora_B partner"):
        RankSlots.from_layout(FlatLayout.from_shapes([("x.lora_A", (3, 2))]))


def test_site_cut_trains_from_the_cut_global_and_sends_only_its_slots() -> None:
    cut = RankCut.for_layout(LAYOUT, 2)
    assert cut is not None
    assert RankCut.for_layout(LAYOUT, 0) is None and RankCut.for_layout(LAYOUT, RANK) is None
    g = np.arange(N, dtype=np.float32) + 1
    start = cut.start_from(g)
    assert (start[cut.keep] == g[cut.keep]).all() and (start[~cut.keep] == 0).all()
    d = _delta(3, 2)
    assert np.array_equal(cut.take(d), d[cut.indices]) and cut.take(d).size == cut.size
    d[np.flatnonzero(~cut.keep)[0]] = 1e-3  # a move in a slot the site froze is a bug: refused
    with pytest.raises(InvalidValueError, match="moved frozen rank slots"):
        cut.take(d)
    with pytest.raises(InvalidValueError, match="no LoRA factors"):
        RankCut.for_layout(FlatLayout.from_shapes([("head.weight", (3, 2))]), 2)


def test_auto_rank_is_the_largest_that_fits_the_sites_uplink_budget() -> None:
    fp32 = C.CodecConfig(mode="fp32")
    assert SLOTS is not None
    cut = RankCut.for_layout(LAYOUT, "auto", codec=fp32, budget_bytes=4 * SLOTS.size(2) + 3)
    assert cut is not None and cut.rank == 2  # rank 3 needs more than the budget
    assert RankCut.for_layout(LAYOUT, "auto", codec=fp32, budget_bytes=4 * N) is None  # the full rank fits
    # top-k: the bound is the payload a real encoding of that many values takes at most
    topk = C.CodecConfig(mode="topk_int8", topk_ratio=0.3, topk_scope="tensor")
    budget = payload_bound(topk, SLOTS.segments(3, LAYOUT))
    cut = RankCut.for_layout(LAYOUT, "auto", codec=topk, budget_bytes=budget)
    assert cut is not None and cut.rank == 3
    enc, _ = C.encode_vector(np.random.default_rng(0).standard_normal(cut.size).astype(np.float32), topk,
                             segments=cut.segments)
    assert enc.nbytes <= payload_bound(topk, cut.segments)
    with pytest.raises(InvalidValueError, match="even a rank-1 update"):
        RankCut.for_layout(LAYOUT, "auto", codec=fp32, budget_bytes=8)
    with pytest.raises(InvalidValueError, match="update_budget_bytes > 0"):
        RankCut.for_layout(LAYOUT, "auto", codec=fp32)
    with pytest.raises(InvalidValueError, match="auto"):
        RankCut.for_layout(LAYOUT, "small")


# ---- aggregation ----------------------------------------------------------------------------------------


def _run_round(core: R.AggregatorCore) -> tuple[np.ndarray, dict]:
    for name, seed, rank, samples in SITES:
        d = core.offer(_msg(name, _delta(seed, rank), rank, samples), sender=name)
        assert d.status == "accepted", d
    return core.close_round()


def test_slotwise_mean_equals_the_in_process_slotwise_reference() -> None:
    core = _core(rank_aggregation="slotwise")
    g0 = core.global_vector.copy()
    new, metrics = _run_round(core)
    ups = [RankedUpdate({k: v.copy() for k, v in LAYOUT.split(_delta(seed, rank)).items()}, RANK, 1.0,
                        float(samples)) for _, seed, rank, samples in SITES]
    # hetero_rank reads each update's rank from its shapes: give it the cut tensors
    cut_ups = []
    for u, (_, _, rank, _) in zip(ups, SITES, strict=True):
        t = dict(u.tensors)
        for p in PAIRS:
            t[p.a] = np.take(t[p.a], np.arange(rank), axis=p.a_axis)
            t[p.b] = np.take(t[p.b], np.arange(rank), axis=p.b_axis)
        cut_ups.append(RankedUpdate(t, rank, 1.0, u.weight))
    ref = hetlora_aggregate(cut_ups, PAIRS, RANK, scale=1.0)
    got = LAYOUT.split(new - g0)
    for name, value in ref.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    # slot 3 is trained by the two rank-4 sites only: a plain mean over all four would shrink it
    plain = sum(w * _delta(s, r) for _, s, r, w in SITES) / sum(w for *_, w in SITES)
    assert not np.allclose(new - g0, plain)
    assert metrics[R.CUT_WEIGHTS] == {"2": 200.0, "1": 400.0} and RANK_METRIC not in metrics
    # the operators' fleet page: each site's rank, through the federation report's strict codec
    recs = {name: rec.lora_rank for name, rec in core.site_records().items()}
    assert recs == {"a": RANK, "b": RANK, "c": 2, "d": 1}


def test_equal_ranks_are_plain_fedavg() -> None:
    core = _core(rank_aggregation="slotwise")
    g0 = core.global_vector.copy()
    for name, seed, _, samples in SITES:
        core.offer(_msg(name, _delta(seed, 2), 2, samples), sender=name)
    new, _ = core.close_round()
    plain = sum(w * _delta(s, 2) for _, s, _, w in SITES) / sum(w for *_, w in SITES)
    plain[~SLOTS.keep(2)] = 0.0  # type: ignore[union-attr]
    np.testing.assert_allclose(new - g0, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule", ["slotwise", "hetlora", "flexlora"])
def test_a_round_of_full_rank_sites_is_plain_fedavg_under_every_rule(rule: str) -> None:
    core = _core(rank_aggregation=rule)
    g0 = core.global_vector.copy()
    for name, seed, _, samples in SITES:
        core.offer(_msg(name, _delta(seed, RANK), RANK, samples), sender=name)
    new, metrics = core.close_round()
    plain = sum(w * _delta(s, RANK) for _, s, _, w in SITES) / sum(w for *_, w in SITES)
    np.testing.assert_allclose(new - g0, plain, rtol=1e-5, atol=1e-7)
    assert "rank_aggregation" not in metrics and R.CUT_WEIGHTS not in metrics


def test_close_time_bounds_replay_ranked_updates_the_same_way() -> None:
    """With the median-relative bounds on, the round is re-summed from the buffer at close: same answer
    while nothing is clipped (the deltas have similar norms) and the sample cap is off."""
    a, b = _core(), _core(norm_median_multiplier=10.0, norm_reject_multiplier=0.0)
    na, _ = _run_round(a)
    nb, mb = _run_round(b)
    assert mb["adaptive"] is True
    np.testing.assert_allclose(na, nb, rtol=1e-5, atol=1e-7)


def _own_adapters(g0: np.ndarray) -> list[RankedUpdate]:
    """Each site's own adapter (the global cut to its rank plus its update), LoRA factors only."""
    ups = []
    for _, seed, rank, samples in SITES:
        own = np.where(SLOTS.keep(rank), g0, 0).astype(np.float32) + _delta(seed, rank)  # type: ignore[union-attr]
        t = LAYOUT.split(own)
        ups.append(RankedUpdate({p: t[p] for pr in PAIRS for p in (pr.a, pr.b)}, RANK, 1.0, float(samples)))
    return ups


def test_hetlora_is_the_published_zero_padded_norm_weighted_mean_of_the_sites_adapters() -> None:
    core = _core(rank_aggregation="hetlora")
    g0 = core.global_vector.copy()
    new, metrics = _run_round(core)
    assert metrics["rank_aggregation"] == "hetlora"
    ref = hetlora_aggregate(_own_adapters(g0), PAIRS, RANK, scale=1.0, norm_weighted=True, slotwise=False)
    got = LAYOUT.split(new)
    for name, value in ref.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    # by hand for one pair: slot 3 of A is owned by sites a and b only, the others count as zeros
    pr = PAIRS[0]
    own = _own_adapters(g0)
    w = np.array([float(u.weight) * pr.product_norm(u.tensors, 1.0) for u in own])
    col = sum(wk * u.tensors[pr.a][:, 3] for wk, u in zip(w, own, strict=True)) / w.sum()
    np.testing.assert_allclose(got[pr.a][:, 3], col, rtol=1e-5, atol=1e-6)
    plain = sum(w * _delta(s, r) for _, s, r, w in SITES) / sum(w for *_, w in SITES)  # the head: FedAvg
    np.testing.assert_allclose(got["head.bias"], LAYOUT.split(g0 + plain)["head.bias"], rtol=1e-5)


def test_flexlora_equals_the_in_process_reference_on_each_sites_own_adapter() -> None:
    core = _core(rank_aggregation="flexlora")
    g0 = core.global_vector.copy()
    new, metrics = _run_round(core)
    assert metrics["rank_aggregation"] == "flexlora"
    ref = flexlora_aggregate(_own_adapters(g0), PAIRS, RANK, scale=1.0)
    got = LAYOUT.split(new)
    for pr in PAIRS:  # the product is what FlexLoRA fixes (the factors are its SVD split)
        np.testing.assert_allclose(pr.product(got, 1.0), pr.product(ref, 1.0), rtol=1e-4, atol=1e-5)
    # the head is the weighted mean, as in FedAvg
    plain = sum(w * _delta(s, r) for _, s, r, w in SITES) / sum(w for *_, w in SITES)
    np.testing.assert_allclose(got["head.weight"], LAYOUT.split(g0 + plain)["head.weight"], rtol=1e-5)


def test_an_svd_that_fails_closes_the_round_on_the_slotwise_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedpeft_edge.central import core_ranks

    def broken(*a: object, **k: object) -> None:
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(core_ranks, "flexlora_aggregate", broken)
    slot, _ = _run_round(_core(rank_aggregation="slotwise"))
    flex = _core(rank_aggregation="flexlora")
    new, metrics = _run_round(flex)
    assert "did not converge" in metrics["rank_aggregation_skipped"] and flex.round == 1
    np.testing.assert_allclose(new, slot, rtol=1e-6)


def test_without_a_round_buffer_adapter_rules_take_the_slotwise_mean() -> None:
    slot, _ = _run_round(_core(rank_aggregation="slotwise"))
    flex = _core(rank_aggregation="flexlora", norm_median_multiplier=0.0)
    assert not flex.config.buffers_updates
    new, metrics = _run_round(flex)
    assert "no round buffer" in metrics["rank_aggregation_skipped"]
    np.testing.assert_allclose(new, slot, rtol=1e-6)


@pytest.mark.parametrize(("claim", "reason"), [(0.0, "bad_rank"), (5.0, "bad_rank"), (2.5, "bad_rank"),
                                                (-1.0, "bad_rank")])
def test_a_bad_rank_claim_is_rejected_and_counts_nothing(claim: float, reason: str) -> None:
    core = _core()
    msg = _msg("a", _delta(1, 2), 2, 100)
    msg.metrics[RANK_METRIC] = claim
    d = core.offer(msg, sender="a")
    assert (d.status, d.reason) == ("rejected", reason)
    assert core.accepted_this_round == 0 and not core.round_sum.any()


def test_a_rank_that_does_not_match_the_payload_is_rejected() -> None:
    core = _core()
    msg = _msg("a", _delta(1, 2), 2, 100)
    msg.metrics[RANK_METRIC] = 1.0  # claims rank 1 but sends rank 2's coordinates
    d = core.offer(msg, sender="a")
    assert d.status == "rejected" and core.accepted_this_round == 0 and not core.round_sum.any()
    full = _msg("b", _delta(2, RANK), RANK, 100)
    full.metrics[RANK_METRIC] = float(RANK)  # the full rank, said out loud: counted as usual
    assert core.offer(full, sender="b").status == "accepted"


CENTRAL_DP = PrivacyPolicy(mode="central", noise_multiplier=1.0, clip_norm=1.0)


@pytest.mark.parametrize("kw", [{"rank_aggregation": "off"}, {"robust_rule": "median"},
                                {"privacy": CENTRAL_DP}])
def test_policies_that_cannot_take_a_cut_update_refuse_it(kw: dict) -> None:
    core = _core(**kw)
    d = core.offer(_msg("a", _delta(1, 2), 2, 100), sender="a")
    assert (d.status, d.reason) == ("rejected", "rank_not_allowed")
    assert core.offer(_msg("b", _delta(2, RANK), RANK, 100), sender="b").status == "accepted"


def test_an_aggregator_without_the_layout_refuses_cut_updates() -> None:
    core = R.AggregatorCore(_config(), None, initial_global=np.zeros(N, np.float32))
    d = core.offer(_msg("a", _delta(1, 2), 2, 100), sender="a")
    assert (d.status, d.reason) == ("rejected", "rank_not_allowed") and "layout" in d.detail
    with pytest.raises(InvalidValueError, match="covers"):
        R.AggregatorCore(_config(n_params=N + 1), None, initial_global=np.zeros(N + 1, np.float32),
                         rank_slots=SLOTS)


@pytest.mark.parametrize("rule", ["hetlora", "flexlora"])
def test_adapter_rules_under_fednova_fall_back_to_the_slotwise_mean(rule: str) -> None:
    """FedNova normalises each update by its steps; an adapter has no such thing: the round says so and
    takes the slot-wise mean (which FedNova's normalisation applies to)."""
    slot = _core(rank_aggregation="slotwise", aggregation="fednova")
    adapter = _core(rank_aggregation=rule, aggregation="fednova")
    a, _ = _run_round(slot)
    b, metrics = _run_round(adapter)
    assert "FedNova" in metrics["rank_aggregation_skipped"]
    np.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(InvalidValueError, match="rank_aggregation"):
        _config(rank_aggregation="svd")


@pytest.mark.parametrize("rule", ["slotwise", "hetlora", "flexlora"])
def test_a_restart_mid_round_resumes_the_ranked_sums(tmp_path: Path, rule: str) -> None:
    """The per-rank weights live in the state file beside the sum: a core reopened from disk half-way
    through the round closes it exactly as one that never stopped."""
    whole, _ = _run_round(_core(rank_aggregation=rule))
    first = _core(tmp_path, rank_aggregation=rule)
    for name, seed, rank, samples in SITES[:2] + SITES[2:3]:
        first.offer(_msg(name, _delta(seed, rank), rank, samples), sender=name)
    del first
    again = _core(tmp_path, rank_aggregation=rule)
    assert again.accepted_this_round == 3
    dup = again.offer(_msg("c", _delta(13, 2), 2, 200), sender="c")
    assert dup.status == "duplicate"
    name, seed, rank, samples = SITES[3]
    again.offer(_msg(name, _delta(seed, rank), rank, samples), sender=name)
    resumed, _ = again.close_round()
    np.testing.assert_allclose(resumed, whole, rtol=1e-6, atol=1e-7)


# ---- kill -9 at random moments --------------------------------------------------------------------------

KILL_SITES = [("s0", RANK), ("s1", 2), ("s2", 1), ("s3", RANK), ("s4", 3), ("s5", 2)]
KILL_ROUNDS = 3


def _kill_msg(k: int, rnd: int) -> W.UpdateMessage:
    name, rank = KILL_SITES[k]
    return _msg(name, _delta(100 * rnd + k, rank), rank, 50 + 30 * k, rnd)


def _drive(core: R.AggregatorCore, say: Callable[[], object] = lambda: None) -> None:
    """Offer every site's update of every round, in order, closing each full round: what the sites'
    redeliveries amount to. Already counted updates come back as duplicates, closed rounds' as late."""
    for rnd in range(KILL_ROUNDS):
        for k in range(len(KILL_SITES)):
            core.offer(_kill_msg(k, rnd), sender=KILL_SITES[k][0])
            say()
            if core.round == rnd and core.ready_to_close():
                core.close_round()
                say()


_KILL_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_core_ranks import _core, _drive
core = _core(sys.argv[1], rank_aggregation=sys.argv[2], quorum=6, norm_median_multiplier=2.0)
print("ready", flush=True)
_drive(core, lambda: print("step", flush=True))
"""


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["slotwise", "hetlora", "flexlora"])
def test_kill9_at_random_moments_loses_and_double_counts_nothing(tmp_path: Path, rule: str) -> None:
    """20 trials: a child drives 3 rounds of 6 mixed-rank sites into a persisted core and is kill -9'd
    after a random number of steps plus a random delay (inside an offer, a save or a close). Restarted from
    disk and fed every update again, the core ends on exactly the global of a run that never stopped."""
    import random
    import sys

    from child_kill import kill_after_lines

    kw = {"rank_aggregation": rule, "quorum": 6, "norm_median_multiplier": 2.0}
    reference = _core(**kw)
    _drive(reference)
    assert reference.round == KILL_ROUNDS
    rng = random.Random(20261202)
    code = _KILL_CHILD.format(tests=str(Path(__file__).parent))
    kills_mid_round = 0
    for trial in range(20):
        state = tmp_path / f"t{trial}"
        steps = rng.randrange(0, 20)
        read = kill_after_lines([sys.executable, "-c", code, str(state), rule], 1 + steps,
                                delay_s=rng.uniform(0.0, 0.004), timeout_s=60)
        assert read[:1] == ["ready"]
        resumed = _core(state, **kw)
        kills_mid_round += resumed.accepted_this_round > 0 and resumed.round < KILL_ROUNDS
        _drive(resumed)
        assert resumed.round == KILL_ROUNDS
        np.testing.assert_allclose(resumed.global_vector, reference.global_vector, rtol=1e-6, atol=1e-7,
                                   err_msg=f"trial {trial}")
        assert resumed.counters["accepted"] == reference.counters["accepted"]
    assert kills_mid_round >= 5  # the kills did land inside rounds, with ranked updates pending
