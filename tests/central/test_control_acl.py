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
