"""Prometheus metrics over real HTTP and real Mosquitto: the aggregator's /metrics after a round with two
numpy sites and one malformed update, and an agent's textfile and HTTP endpoint.

One federation run serves every assertion (module fixture): a round is a few seconds of real MQTT."""

from __future__ import annotations

import math
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mqtt_fixtures as mf
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedpeft_edge.central.config import load_aggregator_config
from fedpeft_edge.central.service import AggregatorService
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig
from fedpeft_edge.site.agent import EdgeAgent
from fedpeft_edge.site.config import load_agent_config

FLEET = "metrics"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and parse it: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return parse(resp.read().decode())


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _toml(port: int, tmp: Path, metrics_port: int) -> str:
    return f"""
[connection]
port = {port}
[fleet]
name = "{FLEET}"
[aggregator]
state_dir = "{tmp}/agg"
max_rounds = 2  # round 1 stays open: the service (and /metrics) keeps serving
quorum = 2
round_deadline_s = 60
metrics_port = {metrics_port}
final_linger_s = 0
[trainer]
kind = "factory"
factory = "fed_numpy_trainer:make"
[codec]
mode = "int8"
block = 16
"""


@dataclass
class Run:
    before: dict  # aggregator scrape while round 0 is open, after the malformed update
    after: dict  # aggregator scrape after the round closed (service still serving)
    agent_http_before: dict  # site-1's HTTP endpoint, scraped once while it waited for the round
    textfile: Path  # site-0's node_exporter textfile, after its run
    agent_ports: list[int]


@pytest.fixture(scope="module")
def federation(mosquitto_broker, tmp_path_factory: pytest.TempPathFactory) -> Run:
    import fed_numpy_trainer as fnt

    tmp = tmp_path_factory.mktemp("metrics")
    mport = free_port()
    base = _toml(mosquitto_broker.port, tmp, mport)
    svc = AggregatorService(load_aggregator_config(text=base))
    agg_thread = threading.Thread(target=svc.run, daemon=True)
    agg_thread.start()
    mallory = MqttTransport(TransportConfig(host=mosquitto_broker.host, port=mosquitto_broker.port,
                                            client_id="mallory"))
    agents: list[EdgeAgent] = []
    threads: list[threading.Thread] = []
    try:
        mf.wait_for(lambda: svc.serving.is_set(), 10, "aggregator")
        mallory.connect(10)
        assert mallory.publish(Topics(FLEET).update("mallory"), b"\xc1\xff not msgpack").wait(5)
        mf.wait_for(lambda: svc.rejections.get("malformed") == 1, 10, "the rejection")
        before = scrape(mport)

        textfile = tmp / "textfile" / "fedpeft_agent.prom"
        textfile.parent.mkdir()
        agent_ports = [0, free_port()]
        for i in range(2):
            extra = (f'metrics_textfile = "{textfile}"\n' if i == 0 else f"metrics_port = {agent_ports[i]}\n")
            cfg = load_agent_config(text=base + f'[agent]\nclient_id = "site-{i}"\n'
                                    f'state_dir = "{tmp}/site-{i}"\nidle_exit_s = 30\nmax_rounds = 1\n'
                                    f'drain_timeout_s = 10\n{extra}[data]\nclient_index = {i}\n')
            setup = fnt.make(cfg)
            agent = EdgeAgent(cfg, setup.trainer, setup.train_batches_fn, setup.eval_batches_fn)
            agents.append(agent)
            if i == 1:  # its endpoint serves before the round: scrape once while it is up
                agent.metrics.start()
        agent_http_before = scrape(agent_ports[1])
        for agent in agents:
            threads.append(threading.Thread(target=agent.run, daemon=True))
            threads[-1].start()
        mf.wait_for(lambda: svc.core.round == 1, 30, "the round to close")
        for t in threads:
            t.join(30)
        after = scrape(mport)
    finally:
        for agent in agents:
            agent.stop()
        svc.stop()
        agg_thread.join(15)
        mallory.close()
    assert not agg_thread.is_alive()
    return Run(before, after, agent_http_before, textfile, agent_ports)


@pytest.mark.slow  # > 1 s: the full suite runs it, the fast tier leaves it out
def test_aggregator_metrics_count_the_round_and_rejections(federation: Run) -> None:
    b, a = federation.before, federation.after
    assert b[("fedpeft_aggregator_round", ())] == 0
    assert b[("fedpeft_aggregator_rejections_total", (("reason", "malformed"),))] == 1
    assert b[("fedpeft_aggregator_accepted_updates_total", ())] == 0
    assert b[("fedpeft_aggregator_paused", ())] == 0
    assert b[("fedpeft_aggregator_bytes_out_total", ())] > 0  # the initial global
    assert a[("fedpeft_aggregator_round", ())] == 1
    assert a[("fedpeft_aggregator_rounds_closed_total", ())] == 1
    assert a[("fedpeft_aggregator_accepted_updates_total", ())] == 2
    assert a[("fedpeft_aggregator_round_participants", ())] == 0  # round 1 is open and empty
    assert a[("fedpeft_aggregator_rejections_total", (("reason", "malformed"),))] == 1
    assert a[("fedpeft_aggregator_bytes_in_total", ())] > 0
    assert a[("fedpeft_aggregator_bytes_out_total", ())] > b[("fedpeft_aggregator_bytes_out_total", ())]
    assert a[("fedpeft_aggregator_last_round_duration_seconds", ())] > 0
    assert a[("process_start_time_seconds", ())] > 0


def test_agent_textfile_after_a_round(federation: Run) -> None:
    m = parse(federation.textfile.read_text())
    assert not list(federation.textfile.parent.glob("*.tmp*"))  # written atomically, nothing left over
    assert m[("fedpeft_agent_rounds_sent_total", ())] == 1
    assert m[("fedpeft_agent_last_global_round", ())] in (0, 1)  # round 1's global may come before it stops
    assert m[("fedpeft_agent_outbox_depth", ())] == 0  # acknowledged by the aggregator
    assert m[("fedpeft_agent_paused", ())] == 0
    assert math.isfinite(m[("fedpeft_agent_last_train_loss", ())])
    steps = m[("fedpeft_agent_step_seconds_count", ())]
    assert steps >= 1 and m[("fedpeft_agent_step_seconds_bucket", (("le", "+Inf"),))] == steps
    assert m[("fedpeft_agent_last_step_seconds", ())] > 0


def test_agent_http_endpoint(federation: Run) -> None:
    m = federation.agent_http_before
    assert m[("fedpeft_agent_rounds_sent_total", ())] == 0
    assert m[("fedpeft_agent_last_global_round", ())] == -1
    assert m[("fedpeft_agent_outbox_depth", ())] == 0
    assert m[("fedpeft_agent_step_seconds_count", ())] == 0
    assert math.isnan(m[("fedpeft_agent_last_train_loss", ())])
    with pytest.raises(OSError):  # closed with the agent's run
        scrape(federation.agent_ports[1])
