"""The round metrics file loses no line to a kill: torn lines are cut, missing lines come back from the
closed-round history in the saved round state."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import mqtt_fixtures as mf
import numpy as np

from fedpeft_edge.central.config import load_aggregator_config
from fedpeft_edge.central.core import AggregatorConfig, AggregatorCore
from fedpeft_edge.central.metrics_log import MetricsLog
from fedpeft_edge.central.service import AggregatorService
from fedpeft_edge.protocol import wire
from fedpeft_edge.protocol.codec import CodecConfig
from fedpeft_edge.protocol.config import default_spec_hash
from fedpeft_edge.site.encoder import UpdateEncoder

N = 64
FLEET = "metricslog"


def _update(client: str, seed: int) -> wire.UpdateMessage:
    delta = np.random.default_rng(seed).standard_normal(N).astype(np.float32) * 0.01
    enc = UpdateEncoder(CodecConfig(mode="fp32"), N).encode(delta)
    return wire.UpdateMessage(FLEET, 0, client, default_spec_hash(N), 10, {"loss": 0.5}, enc)


def _closed_round_state(state_dir: Path) -> AggregatorCore:
    """A saved round state whose round 0 is closed (as if the kill came before the metrics line)."""
    cfg = AggregatorConfig(fleet=FLEET, n_params=N, spec_hash=default_spec_hash(N), quorum=2,
                           min_clients=2, max_rounds=3)
    core = AggregatorCore(cfg, state_dir, initial_global=np.zeros(N, np.float32))
    assert core.offer(_update("site-0", 1)).accepted and core.offer(_update("site-1", 2)).accepted
    core.close_round()
    return core


def test_torn_line_is_cut_and_missing_rounds_are_restored(tmp_path: Path) -> None:
    core = _closed_round_state(tmp_path / "agg")
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0, "torn')  # a kill in the middle of the append
    log = MetricsLog(path)
    assert log.restore(core.history) == 1
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["round"] for r in rows] == [0] and rows[0]["restored"] is True
    assert rows[0]["participants"] == ["site-0", "site-1"] and rows[0]["next_round"] == 1
    assert log.restore(core.history) == 0  # idempotent: a line that is there is never written twice


def test_service_restores_the_line_a_kill_lost(mosquitto_broker, tmp_path: Path) -> None:
    _closed_round_state(tmp_path / "agg")  # round 0 closed and saved; metrics.jsonl never written
    np.save(tmp_path / "initial.npy", np.zeros(N, np.float32))
    cfg = load_aggregator_config(text=f"""
[connection]
port = {mosquitto_broker.port}
[fleet]
name = "{FLEET}"
[aggregator]
client_id = "agg-{FLEET}"
state_dir = "{tmp_path}/agg"
initial_global = "{tmp_path}/initial.npy"
max_rounds = 3
quorum = 2
min_clients = 2
final_linger_s = 0
""")
    svc = AggregatorService(cfg)
    runner = threading.Thread(target=svc.run, daemon=True)
    runner.start()
    try:
        mf.wait_for(lambda: svc.serving.is_set() or not runner.is_alive(), 20, "the aggregator to serve")
    finally:
        svc.stop()
        runner.join(15)
    assert not runner.is_alive()
    rows = [json.loads(line) for line in (tmp_path / "agg" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r.get("restored")) for r in rows] == [(0, True)]
    assert svc.core.round == 1  # resumed at the next round, nothing re-closed
