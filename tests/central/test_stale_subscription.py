"""An aggregator keeps a persistent MQTT session (so QoS 1 updates wait for it while it is down). When
the same client id later serves another fleet, the broker still delivers the old fleet's topics: the
aggregator must drop those subscriptions and neither count nor log them as hostile input."""

from __future__ import annotations

import threading
from pathlib import Path

import mqtt_fixtures as mf

from fedpeft_edge.central.config import load_aggregator_config
from fedpeft_edge.central.service import AggregatorService
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig


def _config(port: int, fleet: str, state_dir: Path) -> str:
    return f"""
[connection]
port = {port}
[fleet]
name = "{fleet}"
[aggregator]
client_id = "aggregator-stale-test"
state_dir = "{state_dir}"
max_rounds = 1
[trainer]
kind = "factory"
factory = "fed_numpy_trainer:make"
"""


def _run_briefly(svc: AggregatorService) -> threading.Thread:
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    mf.wait_for(lambda: svc.serving.is_set() and svc.transport is not None and svc.transport.connected,
                15, "aggregator serving")
    return thread


def test_leftover_subscription_of_another_fleet_is_dropped(mosquitto_broker, tmp_path: Path) -> None:
    port = mosquitto_broker.port
    first = AggregatorService(load_aggregator_config(text=_config(port, "old-fleet", tmp_path / "old")))
    thread = _run_briefly(first)
    first.stop()
    thread.join(15)

    second = AggregatorService(load_aggregator_config(text=_config(port, "new-fleet", tmp_path / "new")))
    thread = _run_briefly(second)
    site = MqttTransport(TransportConfig(host=mosquitto_broker.host, port=port, client_id="stale-site"))
    site.connect(10)
    try:
        # Reaches the new aggregator only through the session the old one left behind.
        assert site.publish("fedpeft/old-fleet/update/site-9", b"old fleet's update").wait(5)
        mf.wait_for(lambda: "old-fleet" in second._stale_fleets, 10, "the stale fleet to be noticed")
        assert site.publish("fedpeft/old-fleet/update/site-9", b"again").wait(5)
        # A message on a malformed topic of its own fleet is still hostile input.
        assert site.publish("fedpeft/new-fleet/update/-x", b"x").wait(5)
        mf.wait_for(lambda: second.rejections.get("bad_topic", 0) == 1, 10, "bad_topic rejection")
    finally:
        site.close()
        second.stop()
        thread.join(15)
    # Only the malformed topic of its own fleet counts as hostile; the old fleet's messages do not.
    reasons = {k for k, v in second.core.counters.items() if k.startswith("rejected:") and v}
    assert reasons == {"rejected:bad_topic"}
    assert second.core.counters.get("rejected") == 1
