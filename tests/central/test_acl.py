"""Access control on the plant broker: TLS, passwords and the per-site ACL of broker_config/acl.conf."""

from __future__ import annotations

import time

import numpy as np
import pytest
from mqtt_fixtures import PLANT_FLEET, PlantPki, drain, plant_client, start_plant_broker

from fedpeft_edge.central.broker import BrokerHandle
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import TransportError

T = Topics(PLANT_FLEET)


@pytest.mark.slow  # > 1.4 s: the full suite runs it, the fast tier leaves it out
def test_site_cannot_publish_on_another_sites_topic(plant_broker: BrokerHandle, plant_pki: PlantPki) -> None:
    agg = plant_client(plant_broker, plant_pki, "aggregator")
    site_a = plant_client(plant_broker, plant_pki, "site-a")
    agg.connect(10)
    agg.subscribe(T.updates_filter)
    site_a.connect(10)
    try:
        time.sleep(0.3)  # SUBACK
        # Mosquitto acknowledges a forbidden QoS 1 publish (MQTT 3.1.1 cannot say no) but drops it.
        site_a.publish(T.update("site-b"), b"forged").wait(5)
        site_a.publish(T.update("site-a"), b"genuine").wait(5)
        got = drain(agg, 1.0)
        assert (T.update("site-a"), b"genuine") in got  # the control message does arrive
        assert all(payload != b"forged" for _, payload in got)
        # A site cannot overwrite the retained global either.
        site_a.publish(T.global_, b"fake global", retain=True).wait(5)
        assert all(payload != b"fake global" for _, payload in drain(agg, 0.3))
    finally:
        site_a.close()
        agg.close()


@pytest.mark.slow  # > 1.4 s: the full suite runs it, the fast tier leaves it out
def test_site_cannot_read_other_updates_but_reads_global(plant_broker: BrokerHandle,
                                                          plant_pki: PlantPki) -> None:
    agg = plant_client(plant_broker, plant_pki, "aggregator")
    site_a = plant_client(plant_broker, plant_pki, "site-a")
    spy = plant_client(plant_broker, plant_pki, "site-b")
    for c in (agg, site_a, spy):
        c.connect(10)
    try:
        spy.subscribe(T.updates_filter)
        spy.subscribe(T.update("site-a"))
        spy.subscribe("fedpeft/#")
        spy.subscribe(T.global_)
        time.sleep(0.3)
        site_a.publish(T.update("site-a"), b"secret update").wait(5)
        agg.publish(T.global_, b"global v1", retain=False).wait(5)
        got = drain(spy, 1.0)
        assert (T.global_, b"global v1") in got  # the positive control: reads on global work
        assert all(payload != b"secret update" for _, payload in got)
    finally:
        for c in (agg, site_a, spy):
            c.close()


@pytest.mark.slow  # > 1.4 s: the full suite runs it, the fast tier leaves it out
def test_site_cannot_forge_the_federation_report_or_another_sites_info(plant_broker: BrokerHandle,
                                                                        plant_pki: PlantPki) -> None:
    """fedpeft/<fleet>/federation is the aggregator's, fedpeft/<fleet>/info/<site> that site's own."""
    agg = plant_client(plant_broker, plant_pki, "aggregator")
    site_a = plant_client(plant_broker, plant_pki, "site-a")
    site_b = plant_client(plant_broker, plant_pki, "site-b")
    for c in (agg, site_a, site_b):
        c.connect(10)
    try:
        agg.subscribe(T.federation)
        site_a.subscribe(T.info("site-a"))
        time.sleep(0.3)  # SUBACK
        assert site_a.publish(T.federation, b"forged report").wait(5)
        assert site_b.publish(T.info("site-a"), b"forged card").wait(5)
        assert agg.publish(T.federation, b"genuine report").wait(5)
        assert site_a.publish(T.info("site-a"), b"genuine card").wait(5)
        got = drain(agg, 1.0) + drain(site_a, 0.2)
        assert (T.federation, b"genuine report") in got  # the positive controls
        assert (T.info("site-a"), b"genuine card") in got
        assert all(payload not in (b"forged report", b"forged card") for _, payload in got)
    finally:
        for c in (agg, site_a, site_b):
            c.close()


def test_wrong_password_is_refused(plant_broker: BrokerHandle, plant_pki: PlantPki) -> None:
    bad = plant_client(plant_broker, plant_pki, "site-a", password="not-the-password")
    with pytest.raises(TransportError, match="refused"):
        bad.connect(10)
    unknown = plant_client(plant_broker, plant_pki, "site-a", client_id="x")
    unknown.cfg.username = "nobody"
    with pytest.raises(TransportError, match="refused"):
        unknown.connect(10)


@pytest.mark.slow  # several seconds (real broker, TLS or many examples): full suite only
def test_plain_tcp_to_tls_listener_fails(plant_broker: BrokerHandle, plant_pki: PlantPki) -> None:
    plain = plant_client(plant_broker, plant_pki, "site-a", tls=False)
    with pytest.raises(TransportError):
        plain.connect(1)
    plain.close()


def test_tls_connection_works_and_reports_protocol(plant_broker: BrokerHandle, plant_pki: PlantPki) -> None:
    c = plant_client(plant_broker, plant_pki, "site-a")
    c.connect(10)
    try:
        assert c.connected and c.protocol_used == "5"
        assert c.publish(T.status("site-a"), b"online", retain=True).wait(5)
    finally:
        c.close()


@pytest.mark.slow  # several seconds (real broker, TLS or many examples): full suite only
def test_mutual_tls_requires_client_certificate(plant_pki: PlantPki) -> None:
    broker = start_plant_broker(plant_pki, require_certificate=True)
    try:
        without = plant_client(broker, plant_pki, "site-a")
        with pytest.raises(TransportError):
            without.connect(1)
        without.close()
        with_cert = plant_client(broker, plant_pki, "site-a", cert=True)
        with_cert.connect(10)
        assert with_cert.connected
        with_cert.close()
    finally:
        broker.stop()


def test_federation_round_over_tls_with_passwords_and_acl(plant_broker: BrokerHandle, plant_pki: PlantPki,
                                                          tmp_path) -> None:
    """The services work within the ACL they are given: aggregator + two sites over TLS with passwords
    (each site's last will and status on its own topic, updates on its own topic, global read-only)."""
    import threading

    import fed_numpy_trainer as fnt

    from fedpeft_edge.central.config import load_aggregator_config
    from fedpeft_edge.central.service import AggregatorService
    from fedpeft_edge.site.agent import EdgeAgent
    from fedpeft_edge.site.config import load_agent_config

    def conn(user: str) -> str:
        (tmp_path / f"{user}.pass").write_text(plant_pki.passwords[user] + "\n")
        return f"""
[connection]
host = "localhost"
port = {plant_broker.port}
username = "{user}"
password_file = "{tmp_path / (user + '.pass')}"
tls_ca = "{plant_pki.ca}"
[fleet]
name = "{PLANT_FLEET}"
"""

    agg_cfg = load_aggregator_config(text=conn("aggregator") + f"""
[aggregator]
state_dir = "{tmp_path}/agg"
max_rounds = 2
quorum = 2
""")
    svc = AggregatorService(agg_cfg, initial_global=np.zeros(27, np.float32))
    threads = [threading.Thread(target=svc.run, daemon=True)]
    agents = []
    for i, site in enumerate(("site-a", "site-b")):
        cfg = load_agent_config(text=conn(site) + f"""
[agent]
client_id = "{site}"
state_dir = "{tmp_path}/{site}"
idle_exit_s = 20
exit_after_final = true
[data]
client_index = {i}
""")
        s = fnt.make(cfg)
        agents.append(EdgeAgent(cfg, s.trainer, s.train_batches_fn, s.eval_batches_fn))
        threads.append(threading.Thread(target=agents[-1].run, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert not any(t.is_alive() for t in threads)
    assert svc.core.finished and svc.core.counters["accepted"] == 4
    assert not svc.core.counters.get("rejected")
    assert all(a.rounds_sent == [0, 1] for a in agents)


@pytest.mark.slow  # > 1.4 s: the full suite runs it, the fast tier leaves it out
def test_secagg_topics_a_site_reads_only_its_own_directory_and_writes_only_its_own_messages(
        plant_broker: BrokerHandle, plant_pki: PlantPki) -> None:
    """Who shares with whom (secagg/down/<site>) is that site's; a site cannot speak for another site in a
    secure session, nor announce a session of its own."""
    agg = plant_client(plant_broker, plant_pki, "aggregator")
    site_a = plant_client(plant_broker, plant_pki, "site-a")
    spy = plant_client(plant_broker, plant_pki, "site-b")
    for c in (agg, site_a, spy):
        c.connect(10)
    try:
        agg.subscribe(T.secagg_up_filter)
        agg.subscribe(T.secagg_params)
        site_a.subscribe(T.secagg_down("site-a"))
        site_a.subscribe(T.secagg_params)
        spy.subscribe(T.secagg_down("site-a"))
        spy.subscribe("fedpeft/#")
        time.sleep(0.3)  # SUBACK
        assert agg.publish(T.secagg_down("site-a"), b"directory of a").wait(5)
        assert agg.publish(T.secagg_params, b"genuine params").wait(5)
        assert site_a.publish(T.secagg_up("site-a"), b"keys of a").wait(5)
        assert spy.publish(T.secagg_up("site-a"), b"forged keys").wait(5)
        assert spy.publish(T.secagg_params, b"forged params").wait(5)
        at_agg, at_a, at_spy = drain(agg, 1.0), drain(site_a, 0.3), drain(spy, 0.3)
        assert (T.secagg_up("site-a"), b"keys of a") in at_agg  # the positive controls
        assert (T.secagg_down("site-a"), b"directory of a") in at_a
        assert (T.secagg_params, b"genuine params") in at_spy  # every site reads the session's params
        assert all(p != b"directory of a" for _, p in at_spy)
        assert all(p not in (b"forged keys", b"forged params") for _, p in at_agg + at_a)
    finally:
        for c in (agg, site_a, spy):
            c.close()
