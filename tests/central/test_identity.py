"""Broker identity on the plant broker (TLS + passwords + ACL, broker_config/mosquitto-plant.conf).

MQTT gives a subscriber no sender identity: what ties an update to its site is the topic ACL (``%u``)
plus the client id being bound to the authenticated user (``use_username_as_clientid``). Without that
binding any account could connect under another client's id, disconnect it, and with a clean start wipe
its persistent session — the aggregator's queue of updates.

- a site with valid credentials connecting as client id ``site-b`` or ``aggregator`` disconnects nobody;
- the aggregator's queued updates in its persistent session survive such an impostor;
- the same holds with client certificates, where the certificate CN is the user name;
- control: with the binding switched off, the same impostor does take the aggregator's connection over;
- acknowledgements: only the aggregator writes them, and a site reads only its own.
"""

from __future__ import annotations

import time
import uuid

import pytest
from mqtt_fixtures import PLANT_FLEET, PlantPki, drain, plant_client, require_mosquitto, wait_for

from fedpeft_edge.central.broker import BrokerHandle, PlantOptions, start_local_broker
from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol.topics import Topics

T = Topics(PLANT_FLEET)


def _plant_broker(pki: PlantPki, extra: list[str], *, require_certificate: bool = False) -> BrokerHandle:
    require_mosquitto()
    return start_local_broker(prefer="mosquitto", config="plant", extra_config=extra, plant=PlantOptions(
        cafile=pki.ca, certfile=pki.server_cert, keyfile=pki.server_key, password_file=pki.password_file,
        require_certificate=require_certificate, fleet=PLANT_FLEET))


def _impostors_disconnect_nobody(broker: BrokerHandle, pki: PlantPki, *, cert: bool) -> None:
    agg = plant_client(broker, pki, "aggregator", cert=cert)
    site_b = plant_client(broker, pki, "site-b", cert=cert)
    agg.connect(10)
    site_b.connect(10)
    try:
        for victim in ("site-b", "aggregator"):
            imp = plant_client(broker, pki, "site-a", client_id=victim, cert=cert)
            imp.connect(10)  # valid credentials: let in, but under its own name
            try:
                time.sleep(1.5)  # a takeover shows as a disconnect, and paho reconnects after ~1 s
                assert (agg.connect_count, site_b.connect_count) == (1, 1), f"impostor as {victim!r}"
                assert agg.connected and site_b.connected
            finally:
                imp.close()
    finally:
        agg.close()
        site_b.close()


@pytest.mark.slow  # several seconds (real broker, TLS or many examples): full suite only
def test_valid_account_under_another_client_id_disconnects_nobody(plant_broker: BrokerHandle,
                                                                  plant_pki: PlantPki) -> None:
    _impostors_disconnect_nobody(plant_broker, plant_pki, cert=False)


@pytest.mark.slow  # several seconds (real broker, TLS or many examples): full suite only
def test_aggregator_queue_survives_an_impostor_with_a_clean_start(plant_broker: BrokerHandle,
                                                                 plant_pki: PlantPki) -> None:
    agg = plant_client(plant_broker, plant_pki, "aggregator", clean=False)
    agg.subscribe(T.updates_filter, qos=1)
    agg.connect(10)
    time.sleep(0.3)  # SUBACK
    agg.close()  # persistent session: the broker queues QoS 1 updates for it from now on
    site = plant_client(plant_broker, plant_pki, "site-a")
    site.connect(10)
    payload = f"queued for the aggregator {uuid.uuid4()}".encode()
    try:
        assert site.publish(T.update("site-a"), payload).wait(5)
    finally:
        site.close()
    # With a clean start, a takeover of the id "aggregator" would wipe that session and its queue.
    imp = plant_client(plant_broker, plant_pki, "site-b", client_id="aggregator", clean=True)
    imp.connect(10)
    time.sleep(0.3)
    imp.close()
    agg2 = plant_client(plant_broker, plant_pki, "aggregator", clean=False)
    agg2.subscribe(T.updates_filter, qos=1)
    agg2.connect(10)
    try:
        assert (T.update("site-a"), payload) in drain(agg2, 1.5)
    finally:
        agg2.close()
        wipe = plant_client(plant_broker, plant_pki, "aggregator", clean=True)  # leave no session behind
        wipe.connect(10)
        wipe.close()


@pytest.mark.slow  # several seconds (real broker, TLS or many examples): full suite only
def test_certificate_cn_is_the_client_id(plant_pki: PlantPki) -> None:
    """Mutual TLS with use_identity_as_username: the CN becomes the user name, and so the client id."""
    broker = _plant_broker(plant_pki, ["use_identity_as_username true"], require_certificate=True)
    try:
        _impostors_disconnect_nobody(broker, plant_pki, cert=True)
    finally:
        broker.stop()


@pytest.mark.slow  # > 1 s: the full suite runs it, the fast tier leaves it out
def test_control_without_the_binding_an_impostor_takes_over(plant_pki: PlantPki) -> None:
    """The same impostor on a broker without use_username_as_clientid (the last setting wins): the
    aggregator is disconnected. This is what the plant configuration prevents."""
    broker = _plant_broker(plant_pki, ["use_username_as_clientid false"])
    agg = plant_client(broker, plant_pki, "aggregator")
    imp = plant_client(broker, plant_pki, "site-a", client_id="aggregator")
    try:
        agg.connect(10)
        imp.connect(10)
        wait_for(lambda: agg.connect_count >= 2 or not agg.connected, 5, "the aggregator to be kicked")
    finally:
        imp.close()
        agg.close()
        broker.stop()


@pytest.mark.slow  # > 1.4 s: the full suite runs it, the fast tier leaves it out
def test_only_the_aggregator_writes_acks_and_a_site_reads_only_its_own(plant_broker: BrokerHandle,
                                                                     plant_pki: PlantPki) -> None:
    agg = plant_client(plant_broker, plant_pki, "aggregator")
    site_a = plant_client(plant_broker, plant_pki, "site-a")
    spy = plant_client(plant_broker, plant_pki, "site-b")
    site_a.subscribe(T.ack("site-a"))
    spy.subscribe(T.acks_filter)
    spy.subscribe("fedpeft/#")
    for c in (agg, site_a, spy):
        c.connect(10)
    try:
        time.sleep(0.3)  # SUBACKs
        ack_a = notices.encode_ack(notices.AckMessage(PLANT_FLEET, "site-a", 4, "accepted", "", time.time()))
        ack_b = notices.encode_ack(notices.AckMessage(PLANT_FLEET, "site-b", 4, "duplicate", "", time.time()))
        forged = notices.encode_ack(notices.AckMessage(PLANT_FLEET, "site-a", 5, "accepted", "", time.time()))
        assert agg.publish(T.ack("site-a"), ack_a).wait(5)
        assert agg.publish(T.ack("site-b"), ack_b).wait(5)
        spy.publish(T.ack("site-a"), forged).wait(5)  # acknowledged by the broker (3.1.1 style), dropped
        got_a = [p for _, p in drain(site_a, 1.0)]
        got_spy = [p for _, p in drain(spy, 0.3)]
        assert ack_a in got_a and forged not in got_a
        assert ack_b in got_spy and ack_a not in got_spy  # its own ack only
    finally:
        for c in (agg, site_a, spy):
            c.close()

