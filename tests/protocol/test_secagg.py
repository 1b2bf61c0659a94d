"""Secure aggregation (protocol/secagg + secagg_wire): exact sums under dropouts, the privacy rules, hostile
messages and bytes, quantisation bounds, the communication graph, and masked vectors that look uniform."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft_edge.protocol import secagg as sa
from fedpeft_edge.protocol import secagg_wire as sw
from fedpeft_edge.protocol.reasons import Reason, WireFormatError
from fedpeft_edge.runtime.errors import InvalidTypeError, InvalidValueError, NonFiniteError

SEED = b"\x5a" * 32


def seeded(label: str) -> Callable[[int], bytes]:
    """Deterministic randomness for tests: SHA-256 in counter mode over a label."""
    counter = itertools.count()

    def draw(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(label.encode() + next(counter).to_bytes(8, "little")).digest()
        return out[:n]

    return draw


def make_params(n: int, k: int, *, t: int | None = None, dim: int = 257, prg: str = "aes256-ctr",
                stochastic: bool = False, seed: bytes = SEED) -> sa.SecAggParams:
    quant = sa.QuantSpec(clip=0.5, bits=16, max_sites=64, stochastic=stochastic)
    sites = tuple(f"site-{i:02d}" for i in range(n))
    return sa.SecAggParams("line-3", 7, sites, k, t or sa.SecAggParams.default_threshold(k), dim, quant, seed,
                           prg)


@dataclass
class Outcome:
    params: sa.SecAggParams
    server: sa.SecAggServer
    clients: dict[str, sa.SecAggClient]
    quantised: dict[str, np.ndarray]
    floats: dict[str, np.ndarray]
    request: sa.UnmaskRequest | None = None


def run_until_unmask(params: sa.SecAggParams, *, skip_share: frozenset[str] = frozenset(),
                     skip_masked: frozenset[str] = frozenset(), wire: bool = True, label: str = "r"
                     ) -> Outcome:
    """Phases 0-2 with every message through the byte encoding; ``skip_*`` sites drop before that phase."""
    def via(msg: Any) -> Any:  # the message types vary
        return sw.decode_message(sw.encode_message(msg, params), params, expect=type(msg)) if wire else msg

    server = sa.SecAggServer(params)
    clients = {s: sa.SecAggClient(params, s, randomness=seeded(f"{label}/{s}")) for s in params.sites}
    for c in clients.values():
        assert server.receive_advertise(via(c.advertise()))
    dirs = server.key_directories()
    for s, c in clients.items():
        if s not in skip_share:
            assert server.receive_shares(via(c.share_keys(via(dirs[s]))))
    fwd = server.forward_shares()
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(label.encode()).digest()[:4], "little"))
    floats = {s: rng.normal(0, 0.2, params.n_params).astype(np.float32) for s in params.sites}
    quantised = {s: sa.quantize(floats[s], params.quant, randomness=seeded(f"q/{label}/{s}"))
                 for s in params.sites}
    for s in fwd:
        if s not in skip_masked:
            assert server.receive_masked_input(via(clients[s].masked_input(via(fwd[s]), quantised[s])))
    out = Outcome(params, server, clients, quantised, floats)
    out.request = via(server.unmask_request())
    return out


def finish(o: Outcome, *, silent: frozenset[str] = frozenset(), wire: bool = True) -> sa.AggregateResult:
    assert o.request is not None
    for s in o.request.survivors:
        if s not in silent:
            resp = o.clients[s].unmask(o.request)
            if wire:
                resp = sw.decode_message(sw.encode_message(resp, o.params), o.params)
            assert o.server.receive_unmask_response(resp)
    return o.server.finish()


def plain_sum(o: Outcome, sites: tuple[str, ...]) -> np.ndarray:
    total = np.zeros(o.params.n_params, dtype=np.uint32)
    for s in sites:
        total += o.quantised[s]
    return total


def pick(sites: tuple[str, ...], fraction: float, label: str) -> frozenset[str]:
    count = round(len(sites) * fraction)
    order = sorted(sites, key=lambda s: hashlib.sha256((label + s).encode()).digest())
    return frozenset(order[:count])


# --------------------------------------------------------------------------------------------------
# The unmasked sum is the plain sum of the quantised integers, bit for bit


@pytest.mark.parametrize(("n", "k", "fraction"), [
    (4, 3, 0.0), (5, 4, 0.0), (10, 4, 0.0), (10, 9, 0.1), (10, 6, 0.1), (20, 10, 0.1),
    (10, 9, 0.3), (20, 12, 0.3), (16, 15, 0.3),
])
def test_unmasked_sum_equals_plain_sum_bit_for_bit(n: int, k: int, fraction: float) -> None:
    params = make_params(n, k)
    dropped = pick(params.sites, fraction, f"{n}/{k}")
    o = run_until_unmask(params, skip_masked=dropped, label=f"exact/{n}/{k}/{fraction}")
    assert o.request is not None and set(o.request.dropped) == dropped
    res = finish(o)
    assert res.survivors == tuple(s for s in params.sites if s not in dropped)
    assert res.total.dtype == np.uint32
    np.testing.assert_array_equal(res.total, plain_sum(o, res.survivors))


def test_sites_that_never_shared_are_simply_absent() -> None:
    params = make_params(12, 8)
    no_share = frozenset({"site-02", "site-09"})
    no_masked = frozenset({"site-05"})
    o = run_until_unmask(params, skip_share=no_share, skip_masked=no_masked, label="absent")
    assert o.request is not None and o.request.dropped == ("site-05",)
    res = finish(o)
    np.testing.assert_array_equal(res.total, plain_sum(o, res.survivors))
    assert not (set(res.survivors) & (no_share | no_masked))


@pytest.mark.parametrize("prg", sa.PRGS)
def test_both_prgs_and_stochastic_rounding_give_exact_sums(prg: str) -> None:
    params = make_params(6, 4, prg=prg, stochastic=True, dim=1000)
    o = run_until_unmask(params, skip_masked=frozenset({"site-01"}), label=prg)
    res = finish(o)
    np.testing.assert_array_equal(res.total, plain_sum(o, res.survivors))
    clipped = sum(np.clip(o.floats[s], -0.5, 0.5).astype(np.float64) for s in res.survivors)
    assert np.abs(res.sum() - clipped).max() <= params.quant.error_bound(len(res.survivors))
    np.testing.assert_allclose(res.mean(), clipped / len(res.survivors),
                               atol=params.quant.error_bound(1) * 1.0001)


def test_dropouts_after_masked_input_complete_while_t_neighbours_respond() -> None:
    params = make_params(10, 9, t=5)  # each secret has 9 holders: 4 may stay silent
    o = run_until_unmask(params, label="silent")
    silent = frozenset({"site-00", "site-03", "site-06", "site-08"})
    res = finish(o, silent=silent)
    assert res.survivors == params.sites  # silent responders' inputs are still counted: their b_u is rebuilt
    np.testing.assert_array_equal(res.total, plain_sum(o, params.sites))


def test_dropouts_in_both_phases_sparse_graph() -> None:
    params = make_params(16, 8, t=5)
    no_masked = frozenset({"site-04", "site-11"})
    o = run_until_unmask(params, skip_masked=no_masked, label="both")
    assert o.request is not None
    assert len(o.server.missing_shares()) == 16  # nothing revealed yet
    # Two survivors stay silent too; every secret still has >= t responding holders (checked here, so the
    # test stays meaningful if the graph construction changes).
    silent = frozenset({"site-00", "site-13"})
    responders = set(o.request.survivors) - silent
    for u in (*o.request.survivors, *o.request.dropped):
        assert len(params.graph[u] & responders) >= params.threshold
    res = finish(o, silent=silent)
    np.testing.assert_array_equal(res.total, plain_sum(o, res.survivors))


def test_below_threshold_fails_with_a_clear_error() -> None:
    params = make_params(6, 5, t=3)  # each secret has 5 holders: 3 silent survivors leave 2 < t for some
    o = run_until_unmask(params, label="short")
    silent = frozenset({"site-01", "site-02", "site-03"})
    assert o.request is not None
    for s in o.request.survivors:
        if s not in silent:
            o.server.receive_unmask_response(o.clients[s].unmask(o.request))
    short = o.server.missing_shares()
    assert short and all(v >= 1 for v in short.values())
    with pytest.raises(sa.ThresholdError, match="cannot be rebuilt") as info:
        o.server.finish()
    assert "site-0" in str(info.value) and isinstance(info.value, InvalidValueError)


def test_too_few_participants_stop_each_phase() -> None:
    params = make_params(6, 4)  # t = 3: a phase needs at least 4 sites
    server = sa.SecAggServer(params)
    clients = {s: sa.SecAggClient(params, s, randomness=seeded(s)) for s in params.sites}
    for s in params.sites[:3]:
        server.receive_advertise(clients[s].advertise())
    with pytest.raises(sa.ThresholdError, match="advertised"):
        server.key_directories()


def test_site_refuses_to_share_with_fewer_than_t_neighbours() -> None:
    params = make_params(6, 4)
    server = sa.SecAggServer(params)
    clients = {s: sa.SecAggClient(params, s, randomness=seeded(s)) for s in params.sites}
    for c in clients.values():
        server.receive_advertise(c.advertise())
    d = server.key_directories()["site-00"]
    few = replace(d, keys=dict(list(d.keys.items())[:2]))
    with pytest.raises(sa.ThresholdError, match="cannot take part"):
        clients["site-00"].share_keys(few)
    assert clients["site-00"].phase == sa.Phase.SHARE_KEYS  # refused without changing state
    clients["site-00"].share_keys(d)


def test_site_refuses_to_mask_with_fewer_than_t_neighbours() -> None:
    params = make_params(6, 4)
    o_server = sa.SecAggServer(params)
    clients = {s: sa.SecAggClient(params, s, randomness=seeded(s)) for s in params.sites}
    for c in clients.values():
        o_server.receive_advertise(c.advertise())
    dirs = o_server.key_directories()
    for s, c in clients.items():
        o_server.receive_shares(c.share_keys(dirs[s]))
    fwd = o_server.forward_shares()["site-00"]
    few = replace(fwd, sealed=dict(list(fwd.sealed.items())[:2]))
    with pytest.raises(sa.ThresholdError):
        clients["site-00"].masked_input(few, np.zeros(params.n_params, np.uint32))


# --------------------------------------------------------------------------------------------------
# Privacy rules


def _ready_to_unmask(label: str = "priv") -> Outcome:
    params = make_params(8, 7, t=4)
    return run_until_unmask(params, label=label, wire=False)


def test_a_site_never_reveals_both_kinds_of_share_for_one_site() -> None:
    o = _ready_to_unmask()
    assert o.request is not None
    w = o.clients["site-00"]
    first = w.unmask(o.request)  # everyone survived: b shares of all 7 neighbours
    assert set(first.self_mask_shares) == set(o.params.graph["site-00"]) and not first.mask_key_shares
    # A second request now claims site-03 dropped: revealing its mask-key share would let the server
    # strip every mask of y_03 (it already has b_03) → refused.
    liar = sa.UnmaskRequest(o.params.session_id, tuple(s for s in o.params.sites if s != "site-03"),
                            ("site-03",))
    with pytest.raises(sa.PrivacyRefusal, match="site-03"):
        w.unmask(liar)
    assert w.unmask(o.request) == first  # the same request again is fine (MQTT redelivery)


def test_refusal_also_holds_in_the_other_order_and_within_one_request() -> None:
    o = _ready_to_unmask("priv2")
    p = o.params
    w = o.clients["site-01"]
    first = sa.UnmaskRequest(p.session_id, tuple(s for s in p.sites if s != "site-05"), ("site-05",))
    resp = w.unmask(first)
    assert set(resp.mask_key_shares) == {"site-05"}
    with pytest.raises(sa.PrivacyRefusal, match="site-05"):
        w.unmask(o.request)  # now "site-05 survived": its b share would complete the pair
    both = sa.UnmaskRequest(p.session_id, p.sites, ("site-02",))
    with pytest.raises(sa.PrivacyRefusal):
        o.clients["site-02"].unmask(both)


def test_site_not_listed_as_survivor_refuses_and_isolating_request_is_refused() -> None:
    o = _ready_to_unmask("priv3")
    p = o.params
    req = sa.UnmaskRequest(p.session_id, tuple(s for s in p.sites if s != "site-04"), ("site-04",))
    with pytest.raises(sa.ProtocolStateError, match="not listed as a survivor"):
        o.clients["site-04"].unmask(req)
    # "Only site-00 and site-01 survived": revealing b_00 would leave y_00 with one pairwise mask (< t).
    lonely = sa.UnmaskRequest(p.session_id, ("site-00", "site-01"), tuple(p.sites[2:]))
    with pytest.raises(sa.ThresholdError, match="surviving neighbours"):
        o.clients["site-01"].unmask(lonely)


def test_threshold_must_exceed_half_the_degree() -> None:
    quant = sa.QuantSpec(clip=1.0)
    sites = tuple(f"s{i}" for i in range(8))
    with pytest.raises(InvalidValueError, match="threshold"):
        sa.SecAggParams("f", 1, sites, 6, 3, 10, quant, SEED)  # 2t <= k: both kinds could be gathered
    sa.SecAggParams("f", 1, sites, 6, 4, 10, quant, SEED)


def test_tampered_or_misdirected_share_ciphertext_is_refused() -> None:
    params = make_params(6, 4)
    server = sa.SecAggServer(params)
    clients = {s: sa.SecAggClient(params, s, randomness=seeded(s)) for s in params.sites}
    for c in clients.values():
        server.receive_advertise(c.advertise())
    dirs = server.key_directories()
    for s, c in clients.items():
        server.receive_shares(c.share_keys(dirs[s]))
    fwd = server.forward_shares()
    target = "site-00"
    f = fwd[target]
    sender = sorted(f.sealed)[0]
    q = np.zeros(params.n_params, np.uint32)
    for pos in (0, 12, 40, len(f.sealed[sender]) - 1):  # nonce, body, tag
        blob = bytearray(f.sealed[sender])
        blob[pos] ^= 0x01
        bad = replace(f, sealed={**f.sealed, sender: bytes(blob)})
        with pytest.raises(sa.TamperedShareError, match=sender):
            clients[target].masked_input(bad, q)
    # A valid bundle of the same sender for another receiver, replayed to this one.
    other = next(v for v in fwd if v != target and sender in fwd[v].sealed)
    bad = replace(f, sealed={**f.sealed, sender: fwd[other].sealed[sender]})
    with pytest.raises(sa.TamperedShareError):
        clients[target].masked_input(bad, q)
    with pytest.raises(sa.TamperedShareError, match="bytes"):
        clients[target].masked_input(replace(f, sealed={**f.sealed, sender: f.sealed[sender][:-1]}), q)
    assert clients[target].phase == sa.Phase.MASKED_INPUT
    clients[target].masked_input(f, q)  # the genuine bundle still works


def test_corrupted_revealed_share_is_detected_at_reconstruction() -> None:
    o = _ready_to_unmask("corrupt")
    assert o.request is not None
    for s in o.request.survivors:
        resp = o.clients[s].unmask(o.request)
        if s == "site-00":  # a lying holder: a valid field element, but the wrong one
            share = resp.self_mask_shares["site-01"]
            flipped = bytes([share[0] ^ 1]) + share[1:]
            resp = replace(resp, self_mask_shares={**resp.self_mask_shares, "site-01": flipped})
        o.server.receive_unmask_response(resp)
    with pytest.raises(sa.ReconstructionError, match="site-01"):
        o.server.finish()


def test_server_never_holds_an_individual_input_and_drops_nothing_silently() -> None:
    params = make_params(5, 4)
    o = run_until_unmask(params, label="hold", wire=False)
    # The server's only vector state before unmasking is the masked running sum.
    vectors = [v for v in vars(o.server).values() if isinstance(v, np.ndarray)]
    assert len(vectors) == 1 and not np.array_equal(vectors[0], plain_sum(o, params.sites))


# --------------------------------------------------------------------------------------------------
# A masked update looks uniformly random


def chi_square_bytes(vec: np.ndarray) -> float:
    counts = np.bincount(vec.astype("<u4").view(np.uint8), minlength=256).astype(np.float64)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


# 255 degrees of freedom: mean 255, sd 22.6; 360 is about +4.6 sd (p ~ 1e-5). Seeds are fixed.
CHI2_LIMIT = 360.0


def test_masked_update_of_a_constant_input_looks_uniform() -> None:
    params = make_params(6, 4, dim=16384)
    server = sa.SecAggServer(params)
    clients = {s: sa.SecAggClient(params, s, randomness=seeded(f"u/{s}")) for s in params.sites}
    for c in clients.values():
        server.receive_advertise(c.advertise())
    dirs = server.key_directories()
    for s, c in clients.items():
        server.receive_shares(c.share_keys(dirs[s]))
    fwd = server.forward_shares()
    const = sa.quantize(np.full(params.n_params, 0.25, np.float32), params.quant)
    assert chi_square_bytes(const) > 100 * CHI2_LIMIT  # the plain input clearly fails the test
    masked = clients["site-00"].masked_input(fwd["site-00"], const).masked
    assert chi_square_bytes(masked) < CHI2_LIMIT
    top = np.bincount(masked >> 24, minlength=256)  # the high byte of each coordinate, too
    assert float(((top - top.mean()) ** 2 / top.mean()).sum()) < CHI2_LIMIT
    # A PRG output itself passes, and a slightly biased vector clearly does not.
    rng = np.random.default_rng(1)
    biased = np.where(rng.random(params.n_params) < 0.1, 0, masked).astype(np.uint32)
    assert chi_square_bytes(biased) > CHI2_LIMIT


# --------------------------------------------------------------------------------------------------
# Communication graph


@pytest.mark.parametrize(("n", "k"), [(2, 1), (4, 3), (6, 3), (7, 4), (10, 4), (16, 5), (33, 8), (64, 63)])
def test_graph_is_symmetric_k_regular_and_deterministic(n: int, k: int) -> None:
    sites = [f"plant-{i}" for i in range(n)]
    g = sa.neighbour_graph(sites, k, SEED)
    assert set(g) == set(sites)
    for s, nb in g.items():
        assert len(nb) == k and s not in nb
        assert all(s in g[v] for v in nb)
    assert sa.neighbour_graph(list(reversed(sites)), k, SEED) == g  # input order does not matter
    assert sa.neighbour_graph(sites, k, bytes(32)) == sa.neighbour_graph(sites, k, bytes(32))
    if k < n - 1:
        assert sa.neighbour_graph(sites, k, bytes(32)) != g  # the seed places the sites
    else:
        assert all(nb == set(sites) - {s} for s, nb in g.items())  # classic SecAgg: all pairs


def test_graph_rejects_impossible_degrees() -> None:
    with pytest.raises(InvalidValueError, match="regular"):
        sa.neighbour_graph(["a", "b", "c"], 1, SEED)  # n*k odd
    with pytest.raises(InvalidValueError):
        sa.neighbour_graph(["a", "b", "c"], 3, SEED)
    with pytest.raises(InvalidValueError, match="n\\*k"):
        make_params(5, 3)


# --------------------------------------------------------------------------------------------------
# Quantisation


@pytest.mark.parametrize("stochastic", [False, True])
def test_dequantised_sum_is_within_the_bound(stochastic: bool) -> None:
    spec = sa.QuantSpec(clip=0.1, bits=12, max_sites=40, stochastic=stochastic)
    rng = np.random.default_rng(3)
    xs = [rng.normal(0, 0.05, 5000).astype(np.float32) for _ in range(40)]
    total = np.zeros(5000, np.uint32)
    for i, x in enumerate(xs):
        q = sa.quantize(x, spec, randomness=seeded(f"dq{i}"))
        assert np.abs(q.view(np.int32)).max() <= spec.levels
        total += q
    clipped = sum(np.clip(x.astype(np.float64), -0.1, 0.1) for x in xs)
    err = np.abs(sa.dequantize_sum(total, spec, 40) - clipped)
    assert err.max() <= spec.error_bound(40) * (1 + 1e-9)
    mean_err = np.abs(sa.dequantize_mean(total, spec, 40) - clipped / 40).max()
    assert mean_err <= spec.error_bound(1) * 1.0001
    if stochastic:  # unbiased: the mean error over coordinates is far below one level
        assert abs(float((sa.dequantize_sum(total, spec, 40) - clipped).mean())) < spec.scale


def test_extreme_sums_do_not_wrap_and_the_rule_is_enforced() -> None:
    spec = sa.QuantSpec(clip=1.0, bits=sa.QuantSpec.largest_bits(64), max_sites=64, stochastic=False)
    assert spec.bits == 26 and 64 * spec.levels <= 2**31 - 1
    for sign in (1.0, -1.0):
        total = np.zeros(3, np.uint32)
        for _ in range(64):
            total += sa.quantize(np.full(3, sign * 5.0, np.float32), spec)  # clipped to ±1
        np.testing.assert_allclose(sa.dequantize_sum(total, spec, 64), sign * 64.0, rtol=1e-12)
    with pytest.raises(InvalidValueError, match="wrap"):
        sa.QuantSpec(clip=1.0, bits=27, max_sites=64)
    with pytest.raises(InvalidValueError):
        sa.dequantize_sum(total, spec, 65)
    assert sa.clipped_count(np.array([0.5, 1.5, -2.0], np.float32), spec) == 2


def test_quantize_rejects_bad_input() -> None:
    spec = sa.QuantSpec(clip=1.0)
    with pytest.raises(NonFiniteError):
        sa.quantize(np.array([0.0, np.nan], np.float32), spec)
    with pytest.raises(InvalidTypeError):
        sa.quantize(np.zeros((2, 2), np.float32), spec)
    with pytest.raises(InvalidTypeError):
        sa.quantize(np.zeros(3, np.int32), spec)
    with pytest.raises(InvalidValueError):
        sa.QuantSpec(clip=float("inf"))
    with pytest.raises(InvalidValueError):
        sa.QuantSpec(clip=-1.0)


# --------------------------------------------------------------------------------------------------
# Shamir


def test_shamir_any_t_shares_rebuild_fewer_do_not() -> None:
    secret = hashlib.sha256(b"secret").digest()
    xs = [3, 5, 6, 9, 11]
    shares = sa.shamir_split(secret, xs, 3, seeded("shamir"))
    assert all(len(s) == sa.SHARE_BYTES for s in shares.values())
    for subset in itertools.combinations(xs, 3):
        assert sa.shamir_combine({x: shares[x] for x in subset}, 3) == secret
    with pytest.raises(sa.ThresholdError):
        sa.shamir_combine({x: shares[x] for x in xs[:2]}, 3)
    # Two shares with t = 3 fit every secret equally: read as if t were 2 they give a random field element,
    # which (almost surely) does not even fit the limb sizes.
    with pytest.raises(sa.ReconstructionError):
        sa.shamir_combine({x: shares[x] for x in xs[:2]}, 2)
    with pytest.raises(InvalidValueError):
        sa.shamir_split(secret, [0, 1], 2)  # x = 0 would be the secret itself
    with pytest.raises(sa.SecAggError):
        sa.shamir_combine({1: b"\xff" * 48, 2: shares[3]}, 2)  # element >= p


# --------------------------------------------------------------------------------------------------
# State machine validation


def test_server_checks_session_membership_duplicates_and_order() -> None:
    params = make_params(5, 4)
    other = make_params(5, 4, seed=b"\x01" * 32)
    server = sa.SecAggServer(params)
    c = sa.SecAggClient(params, "site-00", randomness=seeded("v"))
    adv = c.advertise()
    assert server.receive_advertise(adv) is True
    assert server.receive_advertise(adv) is False  # an identical copy: no-op, never counted twice
    with pytest.raises(sa.ConflictingMessageError):
        server.receive_advertise(replace(adv, mask_public=sa.SecAggClient(params, "site-00").advertise()
                                         .mask_public))
    with pytest.raises(sa.ProtocolStateError, match="another round"):
        server.receive_advertise(replace(adv, session=other.session_id))
    with pytest.raises(sa.ProtocolStateError, match="not a participant"):
        server.receive_advertise(replace(adv, site="site-99"))
    with pytest.raises(sa.SecAggError, match="unusable"):
        server.receive_advertise(replace(adv, site="site-01", channel_public=bytes(32)))  # small order
    with pytest.raises(sa.SecAggError, match="32 bytes"):
        server.receive_advertise(replace(adv, site="site-01", channel_public=b"x"))
    with pytest.raises(sa.ProtocolStateError, match="phase"):
        server.forward_shares()
    with pytest.raises(sa.ProtocolStateError, match="phase"):
        c.masked_input(None, np.zeros(1, np.uint32))  # type: ignore[arg-type]
    with pytest.raises(sa.ProtocolStateError):
        sa.SecAggClient(params, "nobody")


def test_server_checks_masked_inputs_and_responses() -> None:
    params = make_params(6, 5)
    o = run_until_unmask(params, skip_masked=frozenset({"site-05"}), label="srv", wire=False)
    # Phase 2 is closed: late masked inputs are refused, not silently added.
    with pytest.raises(sa.ProtocolStateError):
        o.server.receive_masked_input(sa.MaskedInput(params.session_id, "site-05",
                                                     np.zeros(params.n_params, np.uint32)))
    assert o.request is not None
    resp = o.clients["site-00"].unmask(o.request)
    extra = replace(resp, mask_key_shares={**resp.mask_key_shares, "site-01": b"\0" * sa.SHARE_BYTES})
    with pytest.raises(sa.SecAggError, match="must reveal"):
        o.server.receive_unmask_response(extra)
    with pytest.raises(sa.ProtocolStateError, match="not a survivor"):
        o.server.receive_unmask_response(replace(resp, site="site-05"))
    assert o.server.receive_unmask_response(resp) and not o.server.receive_unmask_response(resp)


def test_masked_input_size_and_duplicates() -> None:
    params = make_params(5, 4)
    server = sa.SecAggServer(params)
    clients = {s: sa.SecAggClient(params, s, randomness=seeded(s)) for s in params.sites}
    for c in clients.values():
        server.receive_advertise(c.advertise())
    dirs = server.key_directories()
    for s, c in clients.items():
        server.receive_shares(c.share_keys(dirs[s]))
    fwd = server.forward_shares()
    with pytest.raises(InvalidValueError, match="values"):
        clients["site-00"].masked_input(fwd["site-00"], np.zeros(params.n_params + 1, np.uint32))
    msg = clients["site-00"].masked_input(fwd["site-00"], np.zeros(params.n_params, np.uint32))
    with pytest.raises(sa.SecAggError, match="values"):
        server.receive_masked_input(replace(msg, masked=msg.masked[:-1]))
    with pytest.raises(sa.SecAggError, match="uint32"):
        server.receive_masked_input(replace(msg, masked=msg.masked.astype(np.int64)))
    assert server.receive_masked_input(msg) and not server.receive_masked_input(msg)
    bumped = msg.masked.copy()
    bumped[0] += 1
    with pytest.raises(sa.ConflictingMessageError):
        server.receive_masked_input(replace(msg, masked=bumped))


def test_same_randomness_gives_the_same_round_bytes() -> None:
    def transcript(label: str) -> list[bytes]:
        params = make_params(5, 4)
        o = run_until_unmask(params, label=label, wire=False)
        assert o.request is not None
        out = []
        for s in params.sites:
            resp = o.clients[s].unmask(o.request)
            o.server.receive_unmask_response(resp)
            out.append(sw.encode_message(resp, params))
        out.append(o.server.finish().total.tobytes())
        return out

    assert transcript("det") == transcript("det")
    assert transcript("det") != transcript("det2")


# --------------------------------------------------------------------------------------------------
# Wire encodings


def test_params_round_trip_and_bad_params() -> None:
    params = make_params(9, 4, prg="chacha20", stochastic=True)
    back = sw.decode_params(sw.encode_params(params))
    assert back == params and back.session_id == params.session_id
    obj = msgpack.unpackb(sw.encode_params(params))
    for change, reason in [({"th": 2}, Reason.OUT_OF_RANGE), ({"k": True}, Reason.BAD_TYPE),
                           ({"prg": "rc4"}, Reason.BAD_MODE), ({"qc": float("nan")}, Reason.NON_FINITE),
                           ({"rs": b"x"}, Reason.LENGTH_MISMATCH), ({"st": ["a", "a"]}, Reason.BAD_INDEX),
                           ({"v": 2}, Reason.BAD_VERSION), ({"extra": 1}, Reason.BAD_KEYS),
                           ({"fl": "a/b"}, Reason.BAD_STRING), ({"qb": 31}, Reason.OUT_OF_RANGE)]:
        with pytest.raises(WireFormatError) as info:
            sw.decode_params(msgpack.packb({**obj, **change}, use_bin_type=True))
        assert info.value.reason == reason, change


def test_every_message_round_trips() -> None:
    params = make_params(6, 4)
    o = run_until_unmask(params, skip_masked=frozenset({"site-03"}), label="wire")  # wire=True inside
    res = finish(o)
    np.testing.assert_array_equal(res.total, plain_sum(o, res.survivors))


def _valid_wire_messages() -> tuple[sa.SecAggParams, list[bytes]]:
    params = make_params(5, 4, dim=8)
    server = sa.SecAggServer(params)
    clients = {s: sa.SecAggClient(params, s, randomness=seeded(f"w/{s}")) for s in params.sites}
    msgs: list[object] = []
    for c in clients.values():
        msgs.append(c.advertise())
        server.receive_advertise(msgs[-1])
    dirs = server.key_directories()
    for s, c in clients.items():
        msgs += [dirs[s], c.share_keys(dirs[s])]
        server.receive_shares(msgs[-1])
    fwd = server.forward_shares()
    for s, c in clients.items():
        msgs += [fwd[s], c.masked_input(fwd[s], np.arange(8, dtype=np.uint32))]
        server.receive_masked_input(msgs[-1])
    req = server.unmask_request()
    msgs += [req, clients["site-00"].unmask(req)]
    return params, [sw.encode_message(m, params) for m in msgs]  # type: ignore[arg-type]


PARAMS_W, VALID_W = _valid_wire_messages()


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda b: b[:-1], Reason.TRUNCATED),
    (lambda b: b + b"\0", Reason.TRAILING),
    (lambda b: b"", Reason.TRUNCATED),
    (lambda b: b"\xc1", Reason.MALFORMED),
    (lambda b: msgpack.packb([1, 2]), Reason.MALFORMED),
    (lambda b: msgpack.packb({"v": 1, "t": "sa_nope"}), Reason.BAD_KIND),
    (lambda b: msgpack.packb({"v": 1, "t": "sa_adv", "x": msgpack.ExtType(1, b"")}), Reason.MALFORMED),
    (lambda b: b"\0" * (sw.max_message_bytes(PARAMS_W) + 1), Reason.OVERSIZED),
])
def test_hostile_bytes_get_a_reason(mutate: Callable[[bytes], bytes], reason: str) -> None:
    with pytest.raises(WireFormatError) as info:
        sw.decode_message(mutate(VALID_W[0]), PARAMS_W)
    assert info.value.reason == reason


@pytest.mark.parametrize(("index", "change", "reason"), [
    (0, {"ck": b"x" * 31}, Reason.LENGTH_MISMATCH),
    (0, {"u": "bad id"}, Reason.BAD_STRING),
    (0, {"u": 7}, Reason.BAD_TYPE),
    (0, {"s": "x"}, Reason.BAD_TYPE),
    (0, {"v": True}, Reason.BAD_VERSION),
    (0, {"mk": None}, Reason.BAD_TYPE),
    (5, {"keys": {"site-01": b"k" * 63}}, Reason.LENGTH_MISMATCH),
    (6, {"sh": {"site-01": "text"}}, Reason.BAD_TYPE),
    (6, {"sh": {f"s{i}": b"x" * 125 for i in range(6)}}, Reason.OVERSIZED),
    (-3, {"y": b"\0" * 31}, Reason.LENGTH_MISMATCH),
    (-2, {"sv": ["site-00", "site-00"]}, Reason.BAD_INDEX),
    (-2, {"dr": "site-01"}, Reason.BAD_TYPE),
    (-1, {"b": {"site-01": b"s" * 47}}, Reason.LENGTH_MISMATCH),
])
def test_bad_fields_get_a_reason(index: int, change: dict, reason: str) -> None:
    obj = msgpack.unpackb(VALID_W[index])
    with pytest.raises(WireFormatError) as info:
        sw.decode_message(msgpack.packb({**obj, **change}, use_bin_type=True), PARAMS_W)
    assert info.value.reason == reason, info.value


def test_expect_refuses_other_kinds() -> None:
    with pytest.raises(WireFormatError) as info:
        sw.decode_message(VALID_W[0], PARAMS_W, expect=sa.MaskedInput)
    assert info.value.reason == Reason.BAD_KIND


def test_encoder_refuses_what_the_decoder_would() -> None:
    msg = sa.MaskedInput(PARAMS_W.session_id, "site-00", np.zeros(8, np.float32))  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError):
        sw.encode_message(msg, PARAMS_W)
    with pytest.raises(WireFormatError):
        sw.encode_message(sa.AdvertiseKeys(PARAMS_W.session_id, "site-00", b"k", b"m"), PARAMS_W)


@given(st.integers(0, len(VALID_W) - 1), st.integers(0, 10**6), st.integers(0, 255))
def test_fuzz_only_typed_errors_come_out(which: int, pos: int, value: int) -> None:
    """A byte changed anywhere in any valid message: the decoder, then a fresh state machine in the right
    phase, raise only WireFormatError / SecAggError (or accept a harmless change)."""
    data = bytearray(VALID_W[which])
    data[pos % len(data)] = value
    try:
        msg = sw.decode_message(bytes(data), PARAMS_W)
    except WireFormatError:
        return
    try:
        server = sa.SecAggServer(PARAMS_W)
        if isinstance(msg, sa.AdvertiseKeys):
            server.receive_advertise(msg)
        elif isinstance(msg, sa.KeyDirectory | sa.ForwardedShares):
            c = sa.SecAggClient(PARAMS_W, msg.to if PARAMS_W.is_site(msg.to) else "site-00")
            c.advertise()
            if isinstance(msg, sa.KeyDirectory):
                c.share_keys(msg)
        elif isinstance(msg, sa.UnmaskRequest):
            sa.SecAggClient(PARAMS_W, "site-00").unmask(msg)
    except sa.SecAggError:
        pass


# --------------------------------------------------------------------------------------------------
# Garbage in any field of an in-process message: only SecAggError comes out


def _snapshots() -> tuple[sa.SecAggParams, dict[str, object], dict[str, sa.SecAggServer], sa.SecAggClient]:
    params = make_params(5, 4, dim=8)
    server = sa.SecAggServer(params)
    clients = {s: sa.SecAggClient(params, s, randomness=seeded(f"g/{s}")) for s in params.sites}
    msgs: dict[str, object] = {}
    snaps: dict[str, sa.SecAggServer] = {"adv": copy.deepcopy(server)}
    for c in clients.values():
        msgs["adv"] = c.advertise()
        server.receive_advertise(msgs["adv"])
    dirs = server.key_directories()
    snaps["share"] = copy.deepcopy(server)
    msgs["dir"] = dirs["site-00"]
    for s, c in clients.items():
        msgs["share"] = c.share_keys(dirs[s])
        server.receive_shares(msgs["share"])
    fwd = server.forward_shares()
    snaps["masked"] = copy.deepcopy(server)
    msgs["fwd"] = fwd["site-00"]
    for s, c in clients.items():
        msgs["masked"] = c.masked_input(fwd[s], np.zeros(8, np.uint32))
        server.receive_masked_input(msgs["masked"])
    msgs["req"] = server.unmask_request()
    snaps["reveal"] = copy.deepcopy(server)
    msgs["reveal"] = clients["site-00"].unmask(msgs["req"])  # type: ignore[arg-type]
    ready = copy.deepcopy(clients["site-01"])  # holds no key objects any more: copyable
    return params, msgs, snaps, ready


G_PARAMS, G_MSGS, G_SNAPS, G_CLIENT = _snapshots()
GARBAGE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=70),
    st.binary(max_size=200), st.lists(st.one_of(st.text(max_size=8), st.integers()), max_size=4),
    st.tuples(st.binary(max_size=40), st.binary(max_size=40)),
    st.dictionaries(st.one_of(st.text(max_size=9), st.sampled_from(G_PARAMS.sites)),
                    st.one_of(st.binary(max_size=130), st.none(), st.tuples(st.binary(max_size=33))),
                    max_size=5),
    st.sampled_from([*G_PARAMS.sites, G_PARAMS.session_id]),
)


@settings(max_examples=80)  # ~8 ms an example (a state machine per example); 4,000 passed when written
@given(st.sampled_from(sorted(G_MSGS)), st.integers(0, 10), GARBAGE)
def test_garbage_fields_only_raise_secagg_errors(kind: str, which: int, value: object) -> None:
    msg = G_MSGS[kind]
    names = [f.name for f in dataclasses.fields(msg)]  # type: ignore[arg-type]
    bad = replace(msg, **{names[which % len(names)]: value})  # type: ignore[type-var]
    try:
        if kind in G_SNAPS:
            server = copy.deepcopy(G_SNAPS[kind])
            {"adv": server.receive_advertise, "share": server.receive_shares,
             "masked": server.receive_masked_input, "reveal": server.receive_unmask_response}[kind](bad)
        elif kind == "req":
            copy.deepcopy(G_CLIENT).unmask(bad)  # type: ignore[arg-type]
        else:
            c = sa.SecAggClient(G_PARAMS, "site-00", randomness=seeded("garbage"))
            c.advertise()
            if kind == "dir":
                c.share_keys(bad)  # type: ignore[arg-type]
            else:
                c.share_keys(G_MSGS["dir"])  # type: ignore[arg-type]
                c.masked_input(bad, np.zeros(8, np.uint32))  # type: ignore[arg-type]
    except sa.SecAggError:
        pass
