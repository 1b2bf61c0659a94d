"""The gateway tier in process: the partial envelope decoded as hostile input, the central core counting
a partial exactly like its members (FedAvg and FedNova), once per (gateway, seq), never a member twice,
only from listed gateways, and a gateway restarted between sealing and forgetting its batch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedpeft_edge.central import core as R
from fedpeft_edge.gateway.config import GatewayServiceConfig, GatewaySettings, load_gateway_config
from fedpeft_edge.gateway.service import GatewayService
from fedpeft_edge.protocol import codec as C
from fedpeft_edge.protocol import partial as P
from fedpeft_edge.protocol import wire as W
from fedpeft_edge.protocol.codec import CodecConfig
from fedpeft_edge.protocol.reasons import WireFormatError
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.site.encoder import UpdateEncoder

N = 3000
SPEC = "abcd0123" * 4
FLEET = "tier"
BOUNDS_OFF = {
    "norm_median_multiplier": 0,
    "norm_reject_multiplier": 0,
    "samples_median_multiplier": 0,
    "steps_median_multiplier": 0,
}


def _cfg(**kw: object) -> R.AggregatorConfig:
    base: dict[str, object] = {
        "fleet": FLEET,
        "n_params": N,
        "spec_hash": SPEC,
        "min_clients": 1,
        "quorum": 100,
        "max_rounds": None,
        "gateways": ("gw-a", "gw-b"),
    }
    base.update(kw)
    return R.AggregatorConfig(**base)  # type: ignore[arg-type]


def _updates(n_sites: int, rnd: int = 0, mode: str = "topk_int8") -> list[W.UpdateMessage]:
    rng = np.random.default_rng(rnd + 7)
    out = []
    for i in range(n_sites):
        delta = rng.standard_normal(N).astype(np.float32) * np.float32(0.01 * (1 + i % 3))
        enc = UpdateEncoder(CodecConfig(mode=mode, topk_ratio=0.1), N, seed=i).encode(delta)
        metrics = {"loss": 1.0 + i, "steps": float(3 + 2 * i)}
        out.append(W.UpdateMessage(FLEET, rnd, f"site-{i}", SPEC, 50 + 37 * i, metrics, enc))
    return out


def _seal(gateway: str, seq: int, core: R.AggregatorCore) -> P.PartialMessage:
    mean, w, sw, metrics, buf = core.open_batch_partial()
    members = tuple(P.Member(e.client_id, e.round, e.samples) for e in buf)
    msg = P.PartialMessage(
        FLEET,
        core.round,
        gateway,
        seq,
        SPEC,
        w,
        sw,
        metrics,
        members,
        P.member_digest(members),
        C.encode_global(mean, "fp32"),
    )
    return P.decode_partial(P.encode_partial(msg))  # through the wire, as the aggregator sees it


def _gateway_core(**kw: object) -> R.AggregatorCore:
    return R.AggregatorCore(_cfg(**kw))


@pytest.mark.parametrize("aggregation", ["fedavg", "fednova"])
@pytest.mark.parametrize("bounds", ["off", "default"])
def test_two_gateways_give_the_global_of_counting_every_site_directly(aggregation: str, bounds: str) -> None:
    extra = dict(BOUNDS_OFF) if bounds == "off" else {}
    if (
        bounds == "default"
    ):  # the defaults' weight cap binds on unequal samples: equal claims keep tiers equal
        extra = {"samples_median_multiplier": 0}
    ups = _updates(6)
    direct = R.AggregatorCore(_cfg(aggregation=aggregation, **extra))
    for u in ups:
        assert direct.offer(u).accepted
    want, m_direct = direct.close_round()

    central = R.AggregatorCore(_cfg(aggregation=aggregation, **extra))
    for gw, part in (("gw-a", ups[:3]), ("gw-b", ups[3:])):
        # a gateway keeps the buffer: with the bounds "off", one that never binds
        g_extra = dict(extra, norm_median_multiplier=1e6) if bounds == "off" else extra
        g = _gateway_core(aggregation=aggregation, **g_extra)
        for u in part:
            assert g.offer(u).accepted
        d = central.offer_partial(_seal(gw, 0, g), sender=gw)
        assert d.accepted, d
    assert central.accepted_this_round == 6
    got, m_tier = central.close_round()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert sorted(m_tier["participants"]) == sorted(m_direct["participants"])
    assert m_tier["total_weight"] == pytest.approx(m_direct["total_weight"])
    assert m_tier["loss"] == pytest.approx(m_direct["loss"])
    assert central.site_records()["site-4"].samples == ups[4].num_samples


def test_a_partial_counts_once_and_never_a_member_twice() -> None:
    ups = _updates(4)
    central = R.AggregatorCore(_cfg())
    g = _gateway_core()
    for u in ups[:3]:
        g.offer(u)
    part = _seal("gw-a", 0, g)
    assert central.offer_partial(part, sender="gw-a").accepted
    assert central.offer_partial(part, sender="gw-a").status == "duplicate"  # a resend after a lost ack
    # the same site sent directly too: not counted again
    assert central.offer(ups[0]).status == "duplicate"
    # another gateway claiming a member already counted: the whole partial is refused, the sum untouched
    g2 = _gateway_core()
    g2.offer(ups[2])
    g2.offer(ups[3])
    before = np.array(central.round_sum)
    d = central.offer_partial(_seal("gw-b", 0, g2), sender="gw-b")
    assert (d.status, d.reason) == ("rejected", "overlap")
    np.testing.assert_array_equal(central.round_sum, before)
    assert central.accepted_this_round == 3
    # a second batch of the same gateway and round (a site that came after the first seal) counts
    g.reset_batch()
    g.offer(ups[3])
    assert central.offer_partial(_seal("gw-a", 1, g), sender="gw-a").accepted
    assert central.accepted_this_round == 4


def test_only_listed_gateways_on_their_own_topic_with_honest_weights() -> None:
    central = R.AggregatorCore(_cfg())
    g = _gateway_core()
    for u in _updates(2):
        g.offer(u)
    part = _seal("gw-a", 0, g)
    assert central.offer_partial(part, sender="site-9").reason == "client_mismatch"
    assert central.offer_partial(replace(part, gateway="site-9"), sender="site-9").reason == "not_a_gateway"
    assert (
        central.offer_partial(replace(part, total_weight=part.total_weight * 10), sender="gw-a").reason
        == "bad_weight"
    )
    assert central.offer_partial(replace(part, spec_hash="00" * 16), sender="gw-a").reason == "spec_hash"
    assert central.offer_partial(replace(part, round=3), sender="gw-a").reason == "future_round"
    limited = R.AggregatorCore(_cfg(sites=("site-0",)))
    assert limited.offer_partial(part, sender="gw-a").reason == "unknown_site"
    assert central.accepted_this_round == 0 and limited.accepted_this_round == 0
    assert central.offer_partial(part, sender="gw-a").accepted


def test_partial_decoding_refuses_what_does_not_add_up() -> None:
    g = _gateway_core()
    for u in _updates(2):
        g.offer(u)
    part = _seal("gw-a", 5, g)
    data = P.encode_partial(part)
    assert P.decode_partial(data) == part
    assert part.message_id == P.partial_id("gw-a", 5) and len(part.message_id) == 32
    bad_cases = {
        "digest": replace(part, digest="0" * 64),
        "dup member": replace(part, members=part.members + part.members[:1]),
        "member after round": replace(
            part, members=(P.Member("site-0", 9, 10),), digest=P.member_digest([P.Member("site-0", 9, 10)])
        ),
        "weight nan": replace(part, total_weight=float("nan")),
        "weight 0": replace(part, total_weight=0.0),
        "sparse vector": replace(part, vector=_updates(1)[0].update),
    }
    for name, bad in bad_cases.items():
        with pytest.raises(WireFormatError):
            P.encode_partial(bad)
            pytest.fail(f"{name} was encoded")
    import msgpack

    obj = msgpack.unpackb(data, raw=False)
    obj["mb"] = b"site-0 0 10\n../x 0 1"
    with pytest.raises(WireFormatError):
        P.decode_partial(msgpack.packb(obj, use_bin_type=True))
    obj["mb"] = b""
    with pytest.raises(WireFormatError):
        P.decode_partial(msgpack.packb(obj, use_bin_type=True))
    with pytest.raises(WireFormatError):
        P.decode_partial(data, W.WireLimits(max_message_bytes=len(data) - 1))


def test_restart_between_sealing_and_forgetting_sends_the_batch_once(tmp_path: Path) -> None:
    cfg = load_gateway_config(
        text=f'[fleet]\nname = "{FLEET}"\n[gateway]\nclient_id = "gw-a"\n'
        f'state_dir = "{tmp_path}/gw"\nquorum = 3\n'
    )
    svc = GatewayService(cfg)
    core = svc._make_core(N, SPEC, np.zeros(N, np.float32))
    for u in _updates(3):
        assert core.offer(u).accepted
    core.checkpoint()
    # what seal() does first, then "kill -9" before the batch is reset
    mean, w, sw, metrics, buf = core.open_batch_partial()
    members = tuple(P.Member(e.client_id, e.round, e.samples) for e in buf)
    msg = P.PartialMessage(
        FLEET,
        0,
        "gw-a",
        core.sealed_batches,
        SPEC,
        w,
        sw,
        metrics,
        members,
        P.member_digest(members),
        C.encode_global(mean, "fp32"),
    )
    svc.outbox.put(msg.seq, P.encode_partial(msg))
    restarted = GatewayService(cfg)
    assert restarted.core is not None
    assert restarted.core.accepted_this_round == 0 and restarted.core.sealed_batches == 1
    assert [seq for seq, _ in restarted.outbox.pending()] == [0]
    # the members are still known: a redelivered update is a duplicate, not a second count
    assert restarted.core.offer(_updates(3)[1]).status == "duplicate"
    # a restart with nothing sealed leaves an open batch alone
    again = GatewayService(cfg)
    assert again.core is not None and again.core.sealed_batches == 1


def test_gateway_config_refuses_a_policy_without_the_buffer() -> None:
    with pytest.raises(InvalidValueError, match="close-time"):
        load_gateway_config(text="[gateway]\n" + "\n".join(f"{k} = 0" for k in BOUNDS_OFF))
    s = GatewaySettings()
    assert s.policy.max_rounds is None and s.policy.min_clients == 1
    assert isinstance(GatewayServiceConfig().gateway, GatewaySettings)


def test_the_aggregator_service_rejects_bad_partials_and_counts_a_good_one(tmp_path: Path) -> None:
    """Through AggregatorService.handle (no broker): each bad partial is rejected with its reason and the
    acks name the partial's id; the state is untouched until the good one."""
    from fedpeft_edge.central.config import load_aggregator_config
    from fedpeft_edge.central.service import AggregatorService
    from fedpeft_edge.protocol.topics import Topics
    from fedpeft_edge.protocol.transport import Message

    cfg = load_aggregator_config(
        text=f'[fleet]\nname = "{FLEET}"\n[aggregator]\nstate_dir = "{tmp_path}/agg"\n'
        f'spec_hash = "{SPEC}"\nquorum = 10\ngateways = ["gw-a"]\n'
    )
    svc = AggregatorService(cfg, initial_global=np.zeros(N, np.float32))
    topics = Topics(FLEET)
    g = _gateway_core()
    for u in _updates(3):
        g.offer(u)
    good = P.encode_partial(_seal("gw-a", 0, g))

    def send(who: str, payload: bytes) -> str:
        return svc.handle(Message(topics.partial(who), payload, 1, False, 1))

    assert send("gw-a", b"\xc1garbage") == "rejected"
    assert send("gw-a", good[:-3]) == "rejected"
    assert send("gw-b", good) == "rejected"  # gw-a's partial on gw-b's topic
    assert send("site-1", good) == "rejected"
    assert svc.core.accepted_this_round == 0
    assert svc.rejections["client_mismatch"] == 2 and sum(svc.rejections.values()) == 4
    assert send("gw-a", good) == "accepted"
    assert send("gw-a", good) == "duplicate"
    assert svc.core.accepted_this_round == 3
    pending = list(svc.acks._pending.values())
    assert {a.msg for a in pending if a.site == "gw-a"} == {P.partial_id("gw-a", 0)}
