"""FedBuff (``round_mode = "fedbuff"``, Nguyen et al. 2022): the server steps every ``buffer_k`` updates,
whichever global each was trained from, each update discounted by ``s(τ) = 1/sqrt(1+τ)`` while its weight
in the mean stays — on hand-made updates through the real core, across a reload mid-buffer, against plain
FedAvg, in the settings, and in the service's batch loop (a step at exactly K within one batch)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedpeft_edge.central import core as R
from fedpeft_edge.central.config import load_aggregator_config
from fedpeft_edge.central.robust import BufferedUpdate
from fedpeft_edge.central.service import AggregatorService
from fedpeft_edge.central.store import STATE_FILE, RoundState
from fedpeft_edge.protocol import codec as C
from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol import wire as W
from fedpeft_edge.protocol.transport import Message
from fedpeft_edge.runtime.errors import InvalidValueError

N = 500
SPEC = "fb000000" * 4
FLEET = "buff"
OFF = {"norm_median_multiplier": 0, "norm_reject_multiplier": 0, "samples_median_multiplier": 0}


def _config(**kw: object) -> R.AggregatorConfig:
    base: dict[str, object] = {
        "fleet": FLEET,
        "n_params": N,
        "spec_hash": SPEC,
        "round_mode": "fedbuff",
        "buffer_k": 3,
        "max_staleness": 8,
        "max_rounds": None,
        **OFF,
    }
    base.update(kw)
    return R.AggregatorConfig(**base)  # type: ignore[arg-type]


def _delta(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(N) * 0.1).astype(np.float32)


def _msg(client: str, rnd: int, delta: np.ndarray, samples: int = 100) -> W.UpdateMessage:
    return W.UpdateMessage(FLEET, rnd, client, SPEC, samples, {"loss": 1.0}, C.encode_global(delta, "fp32"))


def _offer(core: R.AggregatorCore, client: str, rnd: int, delta: np.ndarray, samples: int = 100):
    return core.offer(_msg(client, rnd, delta, samples), sender=client, now=1.0)


def test_staleness_weight_is_one_over_sqrt_one_plus_tau() -> None:
    core = R.AggregatorCore(
        _config(buffer_k=1, max_staleness=20, norm_median_multiplier=2.0),
        None,
        initial_global=np.zeros(N, np.float32),
    )  # a close-time bound on: entries kept
    for _ in range(9):  # nine steps from one site, so round 9 is open
        assert _offer(core, "pace", core.round, _delta(core.round)).accepted
        core.close_round(now=2.0)
    assert core.round == 9
    for tau in (0, 1, 3, 8):
        d = _delta(100 + tau)
        before = core.global_vector.copy()
        dec = _offer(core, f"site-{tau}", core.round - tau, d, samples=40)
        assert dec.accepted and dec.staleness == tau
        assert dec.weight == pytest.approx(40 / math.sqrt(1 + tau), rel=1e-12)  # w·s(τ), the paper's s
        (entry,) = core.buffered
        assert entry.stale_on_update and entry.weight == 40.0
        assert entry.stale_factor == pytest.approx(1 / math.sqrt(1 + tau), rel=1e-12)
        g, m = core.close_round(now=3.0)
        # one update per step: Σ w·s·Δ / Σ w = s(τ)·Δ — the step shrinks, it is not renormalised away
        np.testing.assert_allclose(g - before, d / np.sqrt(1 + tau), rtol=1e-5, atol=1e-7)
        assert m["round_mode"] == "fedbuff" and m["staleness"] == [tau] and m["staleness_max"] == tau


def test_server_steps_exactly_at_k_with_mixed_staleness() -> None:
    k = 3
    core = R.AggregatorCore(
        _config(buffer_k=k, weighting="uniform", server_opt_params={"lr": 0.5}),
        None,
        initial_global=np.zeros(N, np.float32),
    )
    for i in range(k):  # step 1 at round 0
        assert _offer(core, f"a{i}", 0, _delta(i)).accepted
        assert core.ready_to_close(now=1e9) == (i == k - 1)  # never before K, however late: no deadline
    core.close_round(now=2.0)
    core_round1 = core.global_vector.copy()
    # K updates trained from globals 1, 0 (one step behind) and 1 again: a mixed buffer
    updates = [("b0", 1, _delta(10)), ("a0", 0, _delta(11)), ("b1", 1, _delta(12))]
    for j, (site, rnd, d) in enumerate(updates):
        if site == "a0":  # a0 already counted for round 0: a second update from the same global is a dup
            assert _offer(core, site, rnd, d).status == "duplicate"
            assert _offer(core, "c0", rnd, d).accepted
        else:
            assert _offer(core, site, rnd, d).accepted
        assert core.ready_to_close() == (j == k - 1)
    assert core.accepted_this_round == k
    g, m = core.close_round(now=3.0)
    taus = [0, 1, 0]
    expect = sum(d / np.sqrt(1 + t) for (_, _, d), t in zip(updates, taus, strict=True)) / k  # Σ s·Δ / K
    np.testing.assert_allclose(g, core_round1 + 0.5 * expect, rtol=1e-5, atol=1e-7)
    assert m["num_updates"] == k and m["staleness"] == taus and m["late_accepted"] == 1
    assert core.counters["rounds_closed"] == 2 and core.counters["accepted"] == 2 * k


def test_updates_beyond_max_staleness_are_refused() -> None:
    core = R.AggregatorCore(
        _config(buffer_k=1, max_staleness=2), None, initial_global=np.zeros(N, np.float32)
    )
    for _ in range(4):
        assert _offer(core, "pace", core.round, _delta(core.round)).accepted
        core.close_round(now=2.0)
    assert core.round == 4
    late = _offer(core, "slow", 1, _delta(50))  # 3 steps behind, max 2
    assert late.status == "late" and late.staleness == 3 and core.accepted_this_round == 0
    assert _offer(core, "slow", 2, _delta(51)).accepted  # 2 behind: still counted
    assert core.counters["late"] == 1
    # late_policy does not apply in fedbuff mode: "drop" (its default) still counts stale updates
    assert core.config.late_policy == "drop"


def test_fedbuff_with_k_all_sites_and_no_staleness_is_fedavg() -> None:
    sites, rounds = 4, 3
    init = _delta(999)
    # the default close-time bounds stay on in both: they bind identically on identical rounds
    defaults = {
        "norm_median_multiplier": 2.0,
        "norm_reject_multiplier": 10.0,
        "samples_median_multiplier": 1.0,
    }
    buff = R.AggregatorCore(_config(buffer_k=sites, **defaults), None, initial_global=init)
    sync = R.AggregatorCore(
        R.AggregatorConfig(
            fleet=FLEET, n_params=N, spec_hash=SPEC, quorum=sites, min_clients=sites, max_rounds=None
        ),
        None,
        initial_global=init,
    )
    for rnd in range(rounds):
        for i in range(sites):
            d = _delta(100 * rnd + i) * (1 + 4 * (i == 3))  # one large update: the norm bound clips it
            samples = [50, 100, 150, 120][i]
            assert _offer(buff, f"s{i}", rnd, d, samples).accepted
            assert _offer(sync, f"s{i}", rnd, d, samples).accepted
        assert buff.ready_to_close() and sync.ready_to_close()
        gb, mb = buff.close_round(now=5.0)
        gs, ms = sync.close_round(now=5.0)
        assert np.array_equal(gb, gs)  # bit for bit
        assert mb["adaptive_clipped"] == ms["adaptive_clipped"] == 1
        assert mb["total_weight"] == ms["total_weight"]


def test_resumed_state_continues_the_buffer(tmp_path: Path) -> None:
    cfg = _config(buffer_k=3, norm_median_multiplier=2.0)  # the buffer is persisted (close-time bound on)
    core = R.AggregatorCore(cfg, tmp_path, initial_global=np.zeros(N, np.float32))
    for i in range(3):
        assert _offer(core, f"a{i}", 0, _delta(i)).accepted
    core.close_round(now=2.0)
    g1 = core.global_vector.copy()
    d_stale, d_fresh, d_last = _delta(20), _delta(21), _delta(22)
    assert _offer(core, "b0", 0, d_stale).accepted  # τ = 1
    assert _offer(core, "a1", 1, d_fresh).accepted
    meta = json.loads(bytes(np.load(tmp_path / STATE_FILE)["meta_json"]).decode())
    assert [e["stale_on_update"] for e in meta["buffer"]] == [True, True]
    del core  # "kill": a new process reads the state file
    again = R.AggregatorCore(cfg, tmp_path)
    assert again.round == 1 and again.accepted_this_round == 2 and not again.ready_to_close()
    assert [(e.client_id, e.round) for e in again.buffered] == [("b0", 0), ("a1", 1)]
    assert _offer(again, "b0", 0, d_stale).status == "duplicate"  # exactly once across the restart
    assert _offer(again, "a2", 1, d_last).accepted
    assert again.ready_to_close()
    g2, m = again.close_round(now=3.0)
    expect = (d_stale / np.sqrt(2) + d_fresh + d_last) / 3
    np.testing.assert_allclose(g2, g1 + expect, rtol=1e-5, atol=1e-7)
    assert m["staleness"] == [1, 0, 0]


def test_resumed_buffer_is_re_aggregated_as_it_was_summed(tmp_path: Path) -> None:
    """When a close-time bound binds, the buffer is aggregated again from its entries: FedBuff entries must
    keep their discount on the update (not on the weight), also after a reload."""
    cfg = _config(buffer_k=3, norm_median_multiplier=1.0, norm_reject_multiplier=0)
    core = R.AggregatorCore(cfg, tmp_path, initial_global=np.zeros(N, np.float32))
    for i in range(3):
        assert _offer(core, f"a{i}", 0, _delta(i)).accepted
    core.close_round(now=2.0)
    g1 = core.global_vector.copy()
    ds = [_delta(30), 3 * _delta(31), _delta(32)]
    assert _offer(core, "b0", 0, ds[0]).accepted
    assert _offer(core, "a0", 1, ds[1]).accepted
    again = R.AggregatorCore(cfg, tmp_path)
    assert _offer(again, "a1", 1, ds[2]).accepted
    g2, m = again.close_round(now=3.0)
    assert m["adaptive_clipped"] >= 1
    norms = [float(np.linalg.norm(d)) for d in ds]
    cap = sorted(norms)[1]  # lower median of 3 (raw norms: the discount is not what the bound measures)
    clip = [min(1.0, cap / n) for n in norms]
    s = [1 / np.sqrt(2), 1.0, 1.0]
    expect = sum(c * f * d for c, f, d in zip(clip, s, ds, strict=True)) / 3
    np.testing.assert_allclose(g2, g1 + expect, rtol=1e-5, atol=1e-7)


def test_robust_rule_sees_the_damped_updates() -> None:
    """A close-time robust rule (here the coordinate-wise median) works on the same rows as FedBuff's mean:
    each update damped by s(τ)."""
    core = R.AggregatorCore(
        _config(buffer_k=3, robust_rule="median"), None, initial_global=np.zeros(N, np.float32)
    )
    for rnd in range(2):  # two steps (closed early, as an operator's close_round would), round 2 open
        assert _offer(core, "x", rnd, _delta(rnd)).accepted
        core.close_round(now=2.0)
    g = core.global_vector.copy()
    ds = [_delta(40), _delta(41), _delta(42)]
    taus = [2, 0, 1]
    for site, d, tau in zip(("a", "b", "c"), ds, taus, strict=True):
        assert _offer(core, site, core.round - tau, d).accepted
    g2, m = core.close_round(now=3.0)
    assert m["robust_rule"] == "median"
    rows = np.stack([d / np.sqrt(1 + t) for d, t in zip(ds, taus, strict=True)])
    np.testing.assert_allclose(g2 - g, np.median(rows, axis=0), rtol=1e-5, atol=1e-7)


def test_old_buffered_entries_load_with_the_discount_on_the_weight() -> None:
    enc = C.encode_global(_delta(1), "fp32")
    e = BufferedUpdate("s", 0, enc, 100, 0.5, 50.0, 1.0, 1.0, {}, 1.0)
    meta = e.meta()
    meta.pop("stale_on_update")  # as written before FedBuff
    old = BufferedUpdate.from_meta(meta, bytes(enc.payload))
    assert not old.stale_on_update and old.update_factor == 1.0 and old.weight_stale_factor == 0.5
    new = BufferedUpdate.from_meta({**meta, "stale_on_update": True}, bytes(enc.payload))
    assert new.update_factor == 0.5 and new.weight_stale_factor == 1.0


def test_settings() -> None:
    pol = load_aggregator_config(
        text='[aggregator]\nround_mode = "fedbuff"\nbuffer_k = 5\nmax_staleness = 20\n'
        "server_opt_params = { lr = 0.5 }\n"
    ).aggregator.policy
    assert pol.fedbuff and pol.buffer_k == 5 and pol.max_staleness == 20
    assert not load_aggregator_config(text="").aggregator.policy.fedbuff  # sync by default
    for bad in ('round_mode = "async"', "buffer_k = 0", 'round_mode = "fedbuff"\ngateways = ["gw-1"]'):
        with pytest.raises(InvalidValueError):
            load_aggregator_config(text=f"[aggregator]\n{bad}\n")


def test_old_state_file_loads_in_fedbuff_mode(tmp_path: Path) -> None:
    """A sync state written before round_mode existed (no stale_on_update) resumes under fedbuff."""
    sync_cfg = R.AggregatorConfig(
        fleet=FLEET, n_params=N, spec_hash=SPEC, quorum=10, max_rounds=None, late_policy="stale_weighted"
    )
    core = R.AggregatorCore(sync_cfg, tmp_path, initial_global=np.zeros(N, np.float32))
    assert _offer(core, "a", 0, _delta(1)).accepted
    core.close_round(now=2.0)
    assert _offer(core, "b", 0, _delta(2)).accepted  # stale in sync mode: discount in its weight
    path = tmp_path / STATE_FILE
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta_json"]).decode())
    for e in meta["buffer"]:
        e.pop("stale_on_update")
    arrays["meta_json"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    st = RoundState.load(tmp_path)
    assert st is not None and not st.buffer[0].stale_on_update
    buff = R.AggregatorCore(
        _config(buffer_k=2, norm_median_multiplier=2.0, samples_median_multiplier=1.0), tmp_path
    )
    assert buff.accepted_this_round == 1 and _offer(buff, "c", 1, _delta(3)).accepted
    assert buff.ready_to_close()
    buff.close_round(now=3.0)


# ---- the service's batch loop ----------------------------------------------------------------------


class _Handle:
    def is_published(self) -> bool:
        return True

    def wait(self, timeout: float | None = None, **kw: object) -> bool:
        return True


class _Transport:
    connected = True
    connect_count = 1

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.acked: list[int] = []

    def max_payload(self, topic: str) -> int:
        return 1 << 22

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> _Handle:
        self.sent.append((topic, payload))
        return _Handle()

    def ack(self, msg: Message) -> None:
        self.acked.append(msg.mid)


def test_service_steps_at_k_inside_one_batch(tmp_path: Path) -> None:
    cfg = load_aggregator_config(
        text=f'[fleet]\nname = "{FLEET}"\n[aggregator]\nstate_dir = "{tmp_path}"\n'
        f'spec_hash = "{SPEC}"\nround_mode = "fedbuff"\nbuffer_k = 2\n'
        "max_rounds = 10\nnorm_median_multiplier = 0\n"
    )
    svc = AggregatorService(cfg, initial_global=np.zeros(N, np.float32))
    fake = _Transport()
    svc.transport = fake  # type: ignore[assignment]
    lim = svc.limits
    sites = [f"site-{i}" for i in range(5)]
    batch = [
        Message(svc.topics.update(s), W.encode_update(_msg(s, 0, _delta(i)), lim), 1, False, i + 1)
        for i, s in enumerate(sites)
    ]
    svc.process_batch(batch, now=10.0)
    # 5 updates from global 0 in one batch: steps after the 2nd and the 4th; the 3rd-5th are 1-2 steps late
    assert svc.rounds_closed == 2 and svc.core.round == 2 and svc.core.accepted_this_round == 1
    assert [h["num_updates"] for h in svc.core.history] == [2, 2]
    assert [h["staleness"] for h in svc.core.history] == [[0, 0], [1, 1]]
    assert fake.acked == [1, 2, 3, 4, 5]
    globals_ = [W.decode_global(p, lim) for t, p in fake.sent if t == svc.topics.global_]
    assert [g.round for g in globals_] == [1, 2]
    acks = [notices.decode_ack(p, lim) for t, p in fake.sent if t.startswith(f"fedpeft/{FLEET}/ack/")]
    assert sorted((a.site, a.status) for a in acks) == [(s, "accepted") for s in sites]
    # the sent globals come before the batch's acks: the steps were durable by then (each close saves)
    first_ack = next(i for i, (t, _) in enumerate(fake.sent) if "/ack/" in t)
    last_global = max(i for i, (t, _) in enumerate(fake.sent) if t == svc.topics.global_)
    assert last_global < first_ack
    # a resend of the whole batch (e.g. after a crash before the PUBACKs) counts nothing twice
    svc.process_batch(batch, now=11.0)
    assert svc.core.counters["accepted"] == 5 and svc.core.counters["duplicate"] == 5
    assert svc.rounds_closed == 2
    # the state on disk holds the open buffer of one
    again = R.AggregatorCore(svc.core_config, tmp_path)
    assert again.round == 2 and again.accepted_this_round == 1
