"""A site's secure-aggregation state machine (site/secure_sum.py) against an in-process SecAggServer, no MQTT.

Every message goes through its byte encoding both ways: the sites' Publish payloads are decoded and fed to
the server, the server's outputs are encoded and fed back. Covered: the mean of 4 sites; kill -9 (a new
object on the same state dir) at each phase — never twice in one session, never in a second session once
our masked input or shares are out; hostile bytes at every entry point; identical resends; counting at
the next global; damaged files on the safe side; and the agent glue with a fake transport.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fed_numpy_trainer as fnt
import msgpack
import numpy as np
import pytest

from fedpeft_edge.protocol import wire
from fedpeft_edge.protocol.codec import encode_global
from fedpeft_edge.protocol.secagg import (
    AdvertiseKeys,
    AggregateResult,
    ForwardedShares,
    KeyDirectory,
    MaskedInput,
    QuantSpec,
    SecAggParams,
    SecAggServer,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    dequantize_mean,
    quantize,
)
from fedpeft_edge.protocol.secagg_wire import decode_message, encode_message, encode_params
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import Message
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.site.agent import EdgeAgent
from fedpeft_edge.site.config import load_agent_config
from fedpeft_edge.site.secure_sum import MARKERS, PENDING, SECAGG_DIR, Publish, SecureContribution

FLEET = "line-3"
TOPICS = Topics(FLEET)
DIM = 64
QUANT = QuantSpec(clip=0.5, bits=16, max_sites=8, stochastic=False)
NAMES = tuple(f"site-{i}" for i in range(4))


def make_params(rnd: int = 3, seed: int = 1, sites: tuple[str, ...] = NAMES, dim: int = DIM,
                fleet: str = FLEET) -> SecAggParams:
    k = len(sites) - 1
    return SecAggParams(fleet, rnd, sites, k, SecAggParams.default_threshold(k), dim, QUANT,
                        bytes([seed]) * 32)


def make_site(tmp: Path, name: str) -> SecureContribution:
    return SecureContribution(name, TOPICS, DIM, tmp / name)


def deltas(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0, 0.2, DIM).astype(np.float32) for n in NAMES}


class Aggregator:
    """The server's side, as central/secure_round.py would drive it (bytes in, bytes out)."""

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self.server = SecAggServer(params)
        self.announcement = encode_params(params)
        self.received: list[Any] = []

    def up(self, site: str, pubs: list[Publish]) -> None:
        receive: dict[type, Callable[[Any], bool]] = {
            AdvertiseKeys: self.server.receive_advertise, ShareKeys: self.server.receive_shares,
            MaskedInput: self.server.receive_masked_input,
            UnmaskResponse: self.server.receive_unmask_response}
        for p in pubs:
            assert (p.topic, p.qos, p.retain) == (TOPICS.secagg_up(site), 1, False)
            msg = decode_message(p.payload, self.params)
            assert getattr(msg, "site", None) == site
            receive[type(msg)](msg)
            self.received.append(msg)

    def directories(self) -> dict[str, bytes]:
        return {s: encode_message(d, self.params) for s, d in self.server.key_directories().items()}

    def forwarded(self) -> dict[str, bytes]:
        return {s: encode_message(f, self.params) for s, f in self.server.forward_shares().items()}

    def unmask(self) -> bytes:
        return encode_message(self.server.unmask_request(), self.params)


def announce(agg: Aggregator, sites: dict[str, SecureContribution]) -> None:
    for name, site in sites.items():
        agg.up(name, site.take_params(agg.announcement))


def share(agg: Aggregator, sites: dict[str, SecureContribution]) -> dict[str, bytes]:
    dirs = agg.directories()
    for name, site in sites.items():
        if name in dirs:
            agg.up(name, site.take_down(dirs[name]))
    return dirs


def mask(agg: Aggregator, sites: dict[str, SecureContribution], skip: frozenset[str] = frozenset()
         ) -> dict[str, bytes]:
    fwd = agg.forwarded()
    for name, site in sites.items():
        if name in fwd and name not in skip:
            agg.up(name, site.take_down(fwd[name]))
    return fwd


def reveal(agg: Aggregator, sites: dict[str, SecureContribution]) -> bytes:
    req = agg.unmask()
    for name, site in sites.items():
        agg.up(name, site.take_unmask(req))
    return req


def run_round(agg: Aggregator, sites: dict[str, SecureContribution], skip_masked: frozenset[str] = frozenset()
              ) -> AggregateResult:
    announce(agg, sites)
    share(agg, sites)
    mask(agg, sites, skip_masked)
    reveal(agg, sites)
    return agg.server.finish()


def contributed(tmp: Path) -> tuple[SecAggParams, dict[str, np.ndarray], Aggregator,
                                     dict[str, SecureContribution]]:
    """The common start: round 3's session, its aggregator, and every site with its update pending."""
    params, ds = make_params(), deltas()
    sites = {n: make_site(tmp, n) for n in NAMES}
    for n, s in sites.items():
        s.contribute(3, ds[n])
    return params, ds, Aggregator(params), sites


def meta_of(params: SecAggParams, survivors: int) -> dict[str, Any]:
    return {"secagg_session": params.session_id.hex()[:16], "secagg_survivors": survivors}


def files(tmp: Path, name: str) -> tuple[bytes | None, bytes | None]:
    d = tmp / name / SECAGG_DIR
    return tuple((d / f).read_bytes() if (d / f).exists() else None for f in (PENDING, MARKERS))  # type: ignore


# --------------------------------------------------------------------------------------------------
def test_four_sites_mean_is_the_mean_of_their_quantised_updates(tmp_path: Path) -> None:
    params, ds = make_params(), deltas()
    agg = Aggregator(params)
    sites = {n: make_site(tmp_path, n) for n in NAMES}
    # Two sites train before the session is announced (they join on the announcement), two after (they
    # join when their update is ready).
    for n in NAMES[:2]:
        assert sites[n].contribute(3, ds[n]) == [] and sites[n].phase == "waiting"
    announce(agg, sites)
    for n in NAMES[2:]:
        assert sites[n].phase == "idle"
        agg.up(n, sites[n].contribute(3, ds[n]))
    assert {s.phase for s in sites.values()} == {"advertised"}
    assert {s.session_id for s in sites.values()} == {params.session_id.hex()}
    share(agg, sites)
    assert {s.phase for s in sites.values()} == {"shared"}
    mask(agg, sites)
    assert {s.phase for s in sites.values()} == {"masked"}
    reveal(agg, sites)
    assert {s.phase for s in sites.values()} == {"revealed"}
    result = agg.server.finish()
    assert result.survivors == NAMES

    total = np.zeros(DIM, np.uint32)
    for n in NAMES:
        total += quantize(ds[n], QUANT)
    np.testing.assert_array_equal(result.mean(), dequantize_mean(total, QUANT, 4))
    plain = np.mean([np.clip(ds[n], -QUANT.clip, QUANT.clip) for n in NAMES], axis=0)
    assert np.max(np.abs(result.mean() - plain)) <= QUANT.error_bound(4) / 4 + 1e-6

    for n, site in sites.items():
        site.on_global(4, meta_of(params, 4))
        assert (site.counted_rounds, site.dropped_rounds) == (1, 0)
        assert (site.pending_round, site.phase) == (None, "idle")
        assert files(tmp_path, n) == (None, None)


def test_a_site_killed_after_advertising_stays_out_of_that_session_and_joins_the_next(tmp_path: Path) -> None:
    _params, ds, agg, sites = contributed(tmp_path)
    announce(agg, sites)
    sites["site-3"] = again = make_site(tmp_path, "site-3")  # kill -9: secrets gone, the disk stays
    assert (again.pending_round, again.phase, again.session_id) == (3, "waiting", None)
    np.testing.assert_array_equal(again._pending, ds["site-3"])
    assert again.take_params(agg.announcement) == [] and again.resend() == []  # never re-advertises
    share(agg, sites)  # site-3 gets its key directory but has no keys to answer with
    assert again.phase == "waiting"
    mask(agg, sites)
    reveal(agg, sites)
    result = agg.server.finish()
    assert result.survivors == NAMES[:3] and result.dropped == ()
    total = np.zeros(DIM, np.uint32)
    for n in NAMES[:3]:
        total += quantize(ds[n], QUANT)
    np.testing.assert_array_equal(result.mean(), dequantize_mean(total, QUANT, 3))

    # A new session of the same round (fresh seed): the restarted site had not revealed, so it joins; the
    # others revealed shares in round 3 and sit it out.
    retry = Aggregator(make_params(seed=2))
    out = {n: s.take_params(retry.announcement) for n, s in sites.items()}
    assert [n for n, o in out.items() if o] == ["site-3"]
    assert isinstance(decode_message(out["site-3"][0].payload, retry.params), AdvertiseKeys)
    assert again.session_id == retry.params.session_id.hex()


@pytest.mark.parametrize(("killed_after", "rejoins"), [
    ("contribute", True), ("advertised", True), ("shared", True), ("masked", False), ("revealed", False)])
def test_which_restarted_site_joins_a_new_session_of_its_round(tmp_path: Path, killed_after: str,
                                                               rejoins: bool) -> None:
    _params, _ds, agg, sites = contributed(tmp_path)
    steps = [("advertised", lambda: announce(agg, sites)), ("shared", lambda: share(agg, sites)),
             ("masked", lambda: mask(agg, sites)), ("revealed", lambda: reveal(agg, sites))]
    for phase, step in steps:
        if killed_after == "contribute":
            break
        step()
        assert sites["site-0"].phase == phase
        if phase == killed_after:
            break
    before = files(tmp_path, "site-0")
    again = make_site(tmp_path, "site-0")
    assert again.pending_round == 3 and again.resend() == []
    assert again.outstanding is rejoins  # the agent's drain waits only while there is something to send
    if killed_after != "contribute":  # the first session: joined before the kill, never again
        assert again.take_params(agg.announcement) == []
    retry = Aggregator(make_params(seed=9))
    out = again.take_params(retry.announcement)
    assert bool(out) is rejoins
    if not rejoins:
        assert files(tmp_path, "site-0") == before and again.phase in ("masked", "revealed")
    else:
        assert isinstance(decode_message(out[0].payload, retry.params), AdvertiseKeys)


def test_after_revealing_no_new_session_of_the_round_is_joined(tmp_path: Path) -> None:
    _params, _ds, agg, sites = contributed(tmp_path)
    run_round(agg, sites)
    retry = Aggregator(make_params(seed=2))
    for s in sites.values():  # the same objects (no restart)...
        assert s.take_params(retry.announcement) == [] and s.phase == "revealed"
    for n in NAMES:  # ...and after a restart
        assert make_site(tmp_path, n).take_params(retry.announcement) == []
    # A session of the next round is not for this update either.
    assert sites["site-0"].take_params(Aggregator(make_params(rnd=4, seed=3)).announcement) == []


def _hostile_common(params: SecAggParams) -> list[bytes]:
    valid = encode_params(params)
    return [b"\x00", b"\xff" * 40, bytes(range(256)), msgpack.packb({"v": 1}), msgpack.packb([1, 2, 3]),
            msgpack.packb({"v": 1, "t": "sa_params"}), valid[:-3], valid + b"\x00",
            valid.replace(b"sa_params", b"sa_paramz")]


def _snapshot(site: SecureContribution, tmp: Path, name: str) -> tuple[Any, ...]:
    return (site.phase, site.session_id, site.pending_round, [p.payload for p in site.resend()],
            files(tmp, name), site.counted_rounds, site.dropped_rounds)


def test_hostile_payloads_at_every_entry_point_change_nothing(tmp_path: Path) -> None:
    params, _ds, agg, sites = contributed(tmp_path)
    other = make_params(seed=7)  # same sites and round, another session
    lonely = make_params(dim=DIM + 1)
    raw = {"v": 1, "t": "sa_params", "fl": FLEET, "r": 3, "st": list(NAMES), "k": 3, "th": 2, "n": DIM,
           "qc": 0.5, "qb": 16, "qm": 8, "qs": False, "rs": b"\x01" * 32, "prg": "aes256-ctr"}
    bad_params = [
        *_hostile_common(params), encode_params(make_params(fleet="other-fleet")), encode_params(lonely),
        msgpack.packb(raw | {"k": 5}), msgpack.packb(raw | {"th": True}), msgpack.packb(raw | {"th": 1}),
        msgpack.packb(raw | {"st": ["site-0", "site/1", "site-2", "site-3"]}),
        msgpack.packb(raw | {"n": 1 << 40}), msgpack.packb(raw | {"extra": 1})]
    s0 = sites["site-0"]
    checked: dict[str, int] = {}

    def feed_all(dirs: dict[str, bytes] | None = None) -> None:
        snap = _snapshot(s0, tmp_path, "site-0")
        req_other = encode_message(UnmaskRequest(other.session_id, NAMES, ()), other)
        both_ways = encode_message(UnmaskRequest(params.session_id, NAMES, ("site-0",)), params)
        not_listed = encode_message(UnmaskRequest(params.session_id, NAMES[1:], ()), params)
        dir_other = encode_message(KeyDirectory(other.session_id, "site-0", {}), other)
        fwd_other = encode_message(ForwardedShares(other.session_id, "site-0", {}), other)
        empty_dirs = [encode_message(KeyDirectory(params.session_id, to, {}), params) for to in NAMES[:2]]
        down = [*_hostile_common(params), b"", dir_other, fwd_other, req_other, agg.announcement, *empty_dirs]
        if dirs is not None:  # the real directory again (already answered), whole and truncated
            real = dirs["site-0"]
            down += [real, real[:-1] + bytes([real[-1] ^ 1]), real[:20]]
        unmask = [*_hostile_common(params), b"", req_other, both_ways, not_listed, dir_other]
        for payload in [*bad_params, b""]:
            assert s0.take_params(payload) == []
        for payload in down:
            assert s0.take_down(payload) == []
        for payload in unmask:
            assert s0.take_unmask(payload) == []
        assert _snapshot(s0, tmp_path, "site-0") == snap
        checked[s0.phase] = len(bad_params) + len(down) + len(unmask)

    feed_all()  # waiting: an update, no session
    announce(agg, sites)
    feed_all()  # advertised
    dirs = share(agg, sites)
    feed_all(dirs)  # shared
    mask(agg, sites)
    feed_all()  # masked
    reveal(agg, sites)
    feed_all()  # revealed
    assert set(checked) == {"waiting", "advertised", "shared", "masked", "revealed"}
    result = agg.server.finish()  # nothing above disturbed the session
    assert result.survivors == NAMES


def test_tampered_forwarded_shares_are_refused_and_the_genuine_ones_still_work(tmp_path: Path) -> None:
    params, _ds, agg, sites = contributed(tmp_path)
    announce(agg, sites)
    share(agg, sites)
    fwd = agg.forwarded()
    msg = decode_message(fwd["site-0"], params, expect=ForwardedShares)
    assert isinstance(msg, ForwardedShares)
    sender = sorted(msg.sealed)[0]
    blob = msg.sealed[sender]
    tampered = ForwardedShares(msg.session, msg.to, {**msg.sealed, sender: blob[:-1] + bytes([blob[-1] ^ 1])})
    assert sites["site-0"].take_down(encode_message(tampered, params)) == []
    assert sites["site-0"].phase == "shared"
    for n, s in sites.items():
        agg.up(n, s.take_down(fwd[n]))
    reveal(agg, sites)
    assert agg.server.finish().survivors == NAMES


def test_a_session_without_us_is_not_joined_and_supersedes_ours(tmp_path: Path) -> None:
    params, ds = make_params(), deltas()
    site = make_site(tmp_path, "site-0")
    site.contribute(3, ds["site-0"])
    assert site.take_params(encode_params(params))
    assert site.take_params(encode_params(make_params(seed=5, sites=NAMES[1:]))) == []
    assert (site.session_id, site.params, site.resend(), site.phase) == (None, None, [], "waiting")


def test_resend_returns_identical_bytes_in_every_phase(tmp_path: Path) -> None:
    params, _ds, agg, sites = contributed(tmp_path)
    s0 = sites["site-0"]
    assert s0.resend() == []
    seen = []
    for step in (lambda: announce(agg, sites), lambda: share(agg, sites), lambda: mask(agg, sites),
                 lambda: reveal(agg, sites)):
        step()
        last = agg.received[-len(sites)]  # site-0's message of this phase (sites answer in order)
        first = s0.resend()
        assert len(first) == 1 and first == s0.resend()  # the very same Publish, the very same bytes
        assert decode_message(first[0].payload, params) == last
        assert s0.take_params(agg.announcement) == first  # the retained params announced again
        before = len(agg.received)
        agg.up("site-0", first)  # the server takes the copy as a no-op
        assert len(agg.received) == before + 1
        seen.append(type(last))
    assert seen == [AdvertiseKeys, ShareKeys, MaskedInput, UnmaskResponse]
    assert agg.server.finish().survivors == NAMES
    assert make_site(tmp_path, "site-0").resend() == []  # after a restart nothing is left to resend


def test_on_global_counts_and_clears(tmp_path: Path) -> None:
    params, ds, agg, sites = contributed(tmp_path)
    # site-3's masked input never reaches the server: it is listed as dropped and its update not counted.
    result = run_round(agg, sites, skip_masked=frozenset({"site-3"}))
    assert result.survivors == NAMES[:3] and result.dropped == ("site-3",)
    assert sites["site-3"].phase == "shared"
    sites["site-2"] = make_site(tmp_path, "site-2")  # restarted after revealing: the disk knows
    late = make_site(tmp_path / "late", "site-9")  # trained, but never in a session
    late.contribute(3, ds["site-0"])
    for s in (*sites.values(), late):
        s.on_global(3, meta_of(params, 3))  # the global it trained from, again: nothing closes
        assert s.pending_round == 3
    for s in (*sites.values(), late):
        s.on_global(4, meta_of(params, 3))
        s.on_global(4, meta_of(params, 3))  # idempotent
        assert s.pending_round is None and s.phase == "idle" and s.resend() == []
    assert [(s.counted_rounds, s.dropped_rounds) for s in sites.values()] == [(1, 0), (1, 0), (1, 0), (0, 1)]
    assert (late.counted_rounds, late.dropped_rounds) == (0, 1)
    for n in NAMES:
        assert files(tmp_path, n) == (None, None) and make_site(tmp_path, n).pending_round is None

    # A global naming another session (or none) does not count the update.
    s = make_site(tmp_path, "site-0")
    s.contribute(7, ds["site-0"])
    s.on_global(8, {"secagg_session": "00" * 8})
    s.contribute(8, ds["site-0"])
    s.on_global(9, {})
    assert (s.counted_rounds, s.dropped_rounds) == (0, 2)


def test_damaged_files_take_the_safe_side(tmp_path: Path) -> None:
    params, ds = make_params(), deltas()
    site = make_site(tmp_path, "site-0")
    site.contribute(3, ds["site-0"])
    d = tmp_path / "site-0" / SECAGG_DIR
    (d / MARKERS).write_bytes(b'{"v": 1, "token": ')  # torn
    again = make_site(tmp_path, "site-0")
    assert again.pending_round == 3 and again.phase == "revealed" and not again.outstanding
    assert again.take_params(encode_params(params)) == []
    assert list(d.glob(f"{MARKERS}.corrupt-*")) and (d / MARKERS).exists()  # the safe side, on disk too
    assert make_site(tmp_path, "site-0").take_params(encode_params(make_params(seed=4))) == []

    (d / PENDING).write_bytes(b"not an npz")
    lost = make_site(tmp_path, "site-0")
    assert lost.pending_round is None and lost.phase == "idle" and list(d.glob(f"{PENDING}.corrupt-*"))

    # Markers of an earlier update (a kill between a new pending update and its first marker) are stale.
    other = tmp_path / "other"
    fresh = make_site(other, "site-0")
    fresh.contribute(3, ds["site-0"])
    assert fresh.take_params(encode_params(params))
    stale = (other / "site-0" / SECAGG_DIR / MARKERS).read_bytes()
    fresh.on_global(4, {})
    fresh.contribute(3, ds["site-1"])  # a new federation reached round 3 again
    (other / "site-0" / SECAGG_DIR / MARKERS).write_bytes(stale)
    assert make_site(other, "site-0").take_params(encode_params(params))


def test_contribute_checks_its_input_and_keeps_a_pending_update_of_the_same_round(tmp_path: Path) -> None:
    site = make_site(tmp_path, "site-0")
    with pytest.raises(InvalidValueError):
        site.contribute(3, np.zeros(DIM + 1, np.float32))
    with pytest.raises(InvalidValueError):
        site.contribute(3, np.full(DIM, np.nan, np.float32))
    assert site.pending_round is None and not (tmp_path / "site-0" / SECAGG_DIR / PENDING).exists()
    first = deltas()["site-0"]
    site.contribute(3, first)
    site.contribute(3, first + 1)  # retrained after a kill before state.json: the first one stays
    np.testing.assert_array_equal(make_site(tmp_path, "site-0")._pending, first)


# --- the agent glue (fake transport) ----------------------------------------------------------------------
class _Handle:
    def is_published(self) -> bool:
        return True


class _FakeTransport:
    connected = True
    connect_count = 1

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.inbox: queue.Queue[Message] = queue.Queue()

    def max_payload(self, topic: str) -> int:
        return 1 << 20

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> _Handle:
        self.published.append((topic, payload, qos, retain))
        return _Handle()

    def get(self, timeout: float | None = None) -> Message | None:
        try:
            return self.inbox.get_nowait()
        except queue.Empty:
            return None

    def deliver(self, topic: str, payload: bytes) -> None:
        self.inbox.put(Message(topic, payload, 1, True, 0))

    def secure(self) -> list[bytes]:
        return [p for t, p, _, _ in self.published if t == TOPICS.secagg_up("site-0")]


def _agent_config(tmp: Path, codec: str = "fp32") -> Any:
    return load_agent_config(text=f"""
[fleet]
name = "{FLEET}"
[agent]
client_id = "site-0"
state_dir = "{tmp}/site-0"
drain_timeout_s = 0.2
[codec]
mode = "{codec}"
[secagg]
enabled = true
""")


def _agent(tmp: Path) -> EdgeAgent:
    cfg = _agent_config(tmp)
    s = fnt.make(cfg)
    agent = EdgeAgent(cfg, s.trainer, s.train_batches_fn, s.eval_batches_fn, spec_hash="00112233aabbccdd")
    agent.transport = _FakeTransport()  # type: ignore[assignment]
    return agent


def test_agent_refuses_a_sparse_codec_with_secagg(tmp_path: Path) -> None:
    cfg = _agent_config(tmp_path, codec="topk_int8")
    s = fnt.make(cfg)
    with pytest.raises(InvalidValueError, match=r"dense vectors only.*fp32"):
        EdgeAgent(cfg, s.trainer, s.train_batches_fn, s.eval_batches_fn)


def test_agent_contributes_through_the_state_machine_and_survives_a_restart(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    assert agent.secure is not None
    n = agent.n_params
    sites = ("site-0", "site-1")
    params = SecAggParams(FLEET, 0, sites, 1, 1, n, QUANT, b"\x03" * 32)
    t: _FakeTransport = agent.transport  # type: ignore[assignment]
    t.deliver(TOPICS.secagg_params, encode_params(params))  # the session opens while the site trains
    agent._poll()
    assert t.secure() == [] and agent.secure.phase == "idle"
    g = wire.GlobalMessage(FLEET, 0, "00112233aabbccdd", encode_global(np.zeros(n, np.float32)),
                           {"final": False})
    agent._train_round(g)
    assert agent._outgoing == [] and agent.last_sent_round == 0 and agent.rounds_sent == [0]
    assert not any((tmp_path / "site-0" / "outbox").iterdir())
    [adv] = t.secure()
    assert isinstance(decode_message(adv, params), AdvertiseKeys) and agent.secure.phase == "advertised"
    assert agent._secure_outstanding()

    # The aggregator's other participant and the phases, through the agent's poll.
    peer = SecureContribution("site-1", TOPICS, n, tmp_path / "site-1")
    peer.contribute(0, np.full(n, 0.1, np.float32))
    agg = Aggregator(params)
    agg.up("site-1", peer.take_params(agg.announcement))
    agg.up("site-0", [Publish(TOPICS.secagg_up("site-0"), adv)])
    dirs = agg.directories()
    t.deliver(TOPICS.secagg_down("site-0"), dirs["site-0"])
    agent._poll()
    agg.up("site-1", peer.take_down(dirs["site-1"]))
    agg.up("site-0", [Publish(TOPICS.secagg_up("site-0"), t.secure()[-1])])
    # A reconnect: the last message goes out again, byte for byte.
    t.connect_count = 2
    agent._pump_outbox()
    assert t.secure()[-1] == t.secure()[-2] and len(t.secure()) == 3
    fwd = agg.forwarded()
    t.deliver(TOPICS.secagg_down("site-0"), fwd["site-0"])
    agent._poll()
    agg.up("site-1", peer.take_down(fwd["site-1"]))
    agg.up("site-0", [Publish(TOPICS.secagg_up("site-0"), t.secure()[-1])])
    req = agg.unmask()
    t.deliver(TOPICS.secagg_unmask, req)
    agent._poll()
    agg.up("site-1", peer.take_unmask(req))
    agg.up("site-0", [Publish(TOPICS.secagg_up("site-0"), t.secure()[-1])])
    result = agg.server.finish()
    assert result.survivors == sites and agent.secure.phase == "revealed"
    assert not agent._secure_outstanding()
    agent._drain_outbox(timeout=5)  # nothing to wait for: returns at once

    # kill -9 now: a restart keeps the pending update and the round sent, and joins nothing again.
    again = _agent(tmp_path)
    assert again.secure is not None and again.last_sent_round == 0 and again.secure.pending_round == 0
    assert again.secure.phase == "revealed"
    again._latest_global = wire.GlobalMessage(FLEET, 1, "00112233aabbccdd",
                                              encode_global(np.zeros(n, np.float32)),
                                              {"final": False, **meta_of(params, 2)})
    assert not again._secure_outstanding()  # the global closed the round: counted
    assert again.secure.counted_rounds == 1 and again.secure.pending_round is None
