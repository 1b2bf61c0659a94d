"""The control topic on the plant broker (broker_config/acl.conf filled by central/broker.py): only the
operator account may publish on fedpeft/<fleet>/control; the aggregator and every site read it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mqtt_fixtures import PLANT_FLEET, PlantPki, drain, make_test_pki, plant_client, start_plant_broker

from fedpeft_edge.central.broker import BrokerHandle
from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol.topics import Topics

T = Topics(PLANT_FLEET)
USERS = {"aggregator": "agg-secret", "operator": "op-secret", "site-a": "a-secret", "site-b": "b-secret"}


@pytest.fixture(scope="module")
def operator_plant(tmp_path_factory: pytest.TempPathFactory) -> tuple[BrokerHandle, PlantPki]:
    pki = make_test_pki(tmp_path_factory.mktemp("pki-op"), USERS)
    broker = start_plant_broker(pki)
    yield broker, pki
    broker.stop()


def _command(by: str, n: int) -> bytes:
    return notices.encode_control(notices.ControlCommand(f"{n:032x}", "pause", None, by, time.time()))


def test_generated_acl_has_the_control_rules(operator_plant: tuple[BrokerHandle, PlantPki]) -> None:
    broker, _ = operator_plant
    acl = (Path(broker.data_dir) / "acl.conf").read_text()
    assert f"topic write fedpeft/{PLANT_FLEET}/control" in acl  # the operator block
    assert f"topic read fedpeft/{PLANT_FLEET}/control" in acl  # the aggregator block
    assert f"pattern read fedpeft/{PLANT_FLEET}/control" in acl  # every site
    assert "{fleet}" not in acl


def test_generated_acl_has_the_report_and_info_rules(operator_plant: tuple[BrokerHandle, PlantPki]) -> None:
    broker, _ = operator_plant
    acl = (Path(broker.data_dir) / "acl.conf").read_text()
    assert f"topic readwrite fedpeft/{PLANT_FLEET}/federation" in acl  # the aggregator block
    assert f"topic read fedpeft/{PLANT_FLEET}/federation" in acl  # the operator block
    assert f"topic read fedpeft/{PLANT_FLEET}/info/+" in acl
    assert f"pattern readwrite fedpeft/{PLANT_FLEET}/info/%u" in acl  # every site, its own card


@pytest.mark.slow  # a plant broker with its own PKI
def test_operator_reads_the_report_and_every_info_card(operator_plant: tuple[BrokerHandle, PlantPki]
                                                       ) -> None:
    broker, pki = operator_plant
    agg, site_a, site_b = (plant_client(broker, pki, u) for u in ("aggregator", "site-a", "site-b"))
    for c in (agg, site_a, site_b):
        c.connect(10)
    op = plant_client(broker, pki, "operator")
    try:
        # Retained before the operator subscribes: what the console finds when it starts.
        assert agg.publish(T.federation, b"report", retain=True).wait(5)
        assert site_a.publish(T.info("site-a"), b"card a", retain=True).wait(5)
        assert site_b.publish(T.info("site-b"), b"card b", retain=True).wait(5)
        assert site_a.publish(T.federation, b"forged report", retain=True).wait(5)  # dropped
        assert site_a.publish(T.info("site-b"), b"forged card", retain=True).wait(5)  # dropped
        op.subscribe(T.federation)
        op.subscribe(T.info_filter)
        op.connect(10)
        got = dict(drain(op, 1.0))
        assert got == {T.federation: b"report", T.info("site-a"): b"card a", T.info("site-b"): b"card b"}
        # A site reads neither the report nor the other cards.
        site_b.subscribe(T.federation)
        site_b.subscribe(T.info_filter)
        time.sleep(0.3)
        assert all(topic == T.info("site-b") for topic, _ in drain(site_b, 0.5))
    finally:
        for c in (agg, site_a, site_b):
            c.publish(T.federation if c is agg else T.info(c.cfg.client_id), b"", retain=True).wait(5)
            c.close()
        op.close()


@pytest.mark.slow  # a plant broker with its own PKI
def test_only_the_operator_may_publish_control(operator_plant: tuple[BrokerHandle, PlantPki]) -> None:
    broker, pki = operator_plant
    agg, site_a, site_b, op = (plant_client(broker, pki, u) for u in ("aggregator", "site-a", "site-b",
                                                                       "operator"))
    for c in (agg, site_a, site_b, op):
        c.connect(10)
    try:
        agg.subscribe(T.control)
        site_b.subscribe(T.control)
        time.sleep(0.3)  # SUBACK
        forged, genuine = _command("mallory", 1), _command("alice", 2)
        # Mosquitto acknowledges a forbidden QoS 1 publish (MQTT 3.1.1 cannot say no) but drops it.
        assert site_a.publish(T.control, forged).wait(5)
        assert agg.publish(T.control, forged).wait(5)  # the aggregator only reads it
        assert op.publish(T.control, genuine).wait(5)
        for reader in (agg, site_b):
            got = drain(reader, 1.0)
            assert (T.control, genuine) in got  # the positive control: the operator's arrives
            assert all(payload != forged for _, payload in got)
    finally:
        for c in (agg, site_a, site_b, op):
            c.close()
