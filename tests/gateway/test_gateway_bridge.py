"""The gateway tier end to end: two real Mosquitto brokers bridged with
broker_config/bridge-gateway-to-central.conf, the aggregator on the central one, ``fedpeft-edge gateway``
and four light sites on the line's one — and the gateway killed with SIGKILL at random moments, 25 times,
while rounds run. Exactly once is checked against the arithmetic: every round holds the four sites
once (metrics.jsonl), and the final global equals FedAvg recomputed offline from the sites' updates."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from mqtt_fixtures import REPO_DIR, require_mosquitto, spawn_cli, stop_all, wait_for, write_toml
from paho.mqtt.enums import CallbackAPIVersion

from fedpeft_edge.central.broker import start_local_broker
from fedpeft_edge.central.store import RoundState
from fedpeft_edge.protocol import codec as C
from fedpeft_edge.protocol import notices, wire
from fedpeft_edge.protocol.codec import CodecConfig
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.site.encoder import UpdateEncoder

pytestmark = pytest.mark.slow

FLEET = "line"
GW = "line-a-gw"
N = 4000
SITES = [f"dev-{i}" for i in range(4)]
SPEC = "5eed" * 8
ROUNDS = 100
KILLS = 25
TRAIN_S = 0.25  # a light site "trains" this long after a new global before it sends


def bridge_config(central_port: int) -> list[str]:
    """The shipped bridge file, pointed at the test's central broker (plain TCP, anonymous)."""
    out = []
    for line in (REPO_DIR / "broker_config" / "bridge-gateway-to-central.conf").read_text().splitlines():
        key = line.split(" ", 1)[0]
        if not line.strip() or line.startswith("#") or key in ("remote_password", "bridge_cafile"):
            continue
        out.append(f"address 127.0.0.1:{central_port}" if key == "address" else line)
    return out


def envelope(rnd: int, i: int) -> bytes:
    delta = np.random.default_rng(1000 * rnd + i).standard_normal(N).astype(np.float32) * np.float32(1e-2)
    enc = UpdateEncoder(CodecConfig(mode="topk_int8", topk_ratio=0.05), N, seed=i).encode(delta)
    msg = wire.UpdateMessage(FLEET, rnd, SITES[i], SPEC, 100 + 10 * i, {"loss": 1.0 + i}, enc)
    return wire.encode_update(msg)


def expected_global(rounds: int) -> np.ndarray:
    g = np.zeros(N, np.float64)
    for r in range(rounds):
        msgs = [wire.decode_update(envelope(r, i)) for i in range(len(SITES))]
        total = sum(m.num_samples for m in msgs)
        g += sum(m.num_samples * C.decode_dense(m.update, N).astype(np.float64) for m in msgs) / total
    return g


class LightSite:
    """A site that resends its update until acknowledged, as the real agent's outbox does."""

    def __init__(self, port: int, i: int) -> None:
        self.i, self.topics = i, Topics(FLEET)
        self.round = -1  # newest global seen
        self.final = False
        self.pending: tuple[int, bytes] | None = None
        self.acked: dict[int, list[str]] = {}
        self.seen_at = 0.0
        self.lock = threading.Lock()
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=SITES[i], protocol=mqtt.MQTTv311, clean_session=False
        )
        c.on_connect = lambda cl, *a: cl.subscribe([(self.topics.global_, 1), (self.topics.ack(SITES[i]), 1)])
        c.on_message = self._on_message
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            if msg.topic == self.topics.global_:
                g = wire.decode_global(msg.payload)
                if g.round > self.round:
                    self.round, self.final, self.seen_at = (
                        g.round,
                        bool(g.meta.get("final")),
                        time.monotonic(),
                    )
                return
            ack = notices.decode_ack(msg.payload)
            self.acked.setdefault(ack.round, []).append(ack.status)
            if self.pending is not None and ack.round == self.pending[0]:
                self.pending = None

    def tick(self, now: float, resend_s: float = 1.0) -> None:
        with self.lock:
            if (
                self.pending is None
                and not self.final
                and self.round >= 0
                and self.round not in self.acked
                and now - self.seen_at >= TRAIN_S
            ):
                self.pending = (self.round, envelope(self.round, self.i))
                self.sent_at = 0.0
            if self.pending is not None and now - self.sent_at >= resend_s:
                self.client.publish(self.topics.update(SITES[self.i]), self.pending[1], qos=1)
                self.sent_at = now

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_gateway_killed_25_times_loses_nothing_and_counts_nothing_twice(tmp_path: Path) -> None:
    require_mosquitto()
    central = start_local_broker(prefer="mosquitto", data_dir=tmp_path / "central-broker")
    line = start_local_broker(
        prefer="mosquitto", data_dir=tmp_path / "line-broker", extra_config=bridge_config(central.port)
    )
    np.save(tmp_path / "initial.npy", np.zeros(N, np.float32))
    agg_toml = write_toml(
        tmp_path / "agg.toml",
        f"""
[connection]
port = {central.port}
[fleet]
name = "{FLEET}"
[aggregator]
state_dir = "{tmp_path}/agg"
initial_global = "{tmp_path}/initial.npy"
spec_hash = "{SPEC}"
max_rounds = {ROUNDS}
quorum = {len(SITES)}
min_clients = {len(SITES)}
round_deadline_s = 600
server_optimizer = "fedavg"
final_linger_s = 2
gateways = ["{GW}"]
""",
    )
    gw_toml = write_toml(
        tmp_path / "gw.toml",
        f"""
[connection]
port = {line.port}
[fleet]
name = "{FLEET}"
[gateway]
client_id = "{GW}"
state_dir = "{tmp_path}/gw"
quorum = {len(SITES)}
round_deadline_s = 3
samples_median_multiplier = 0
resend_s = 2
final_linger_s = 2
""",
    )
    procs: list = []
    sites: list[LightSite] = []
    rng = random.Random(20261202)
    try:
        agg = spawn_cli(["aggregate", "--config", str(agg_toml)], tmp_path / "agg.log")
        procs.append(agg)
        gw = spawn_cli(["gateway", "--config", str(gw_toml)], tmp_path / "gw.log")
        procs.append(gw)
        sites = [LightSite(line.port, i) for i in range(len(SITES))]
        stop = threading.Event()

        def drive() -> None:
            while not stop.is_set():
                for s in sites:
                    s.tick(time.monotonic())
                time.sleep(0.02)

        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        metrics = tmp_path / "agg" / "metrics.jsonl"

        def closed() -> int:
            return len(metrics.read_text().splitlines()) if metrics.exists() else 0

        wait_for(
            lambda: closed() >= 2, 120, "the first rounds through the gateway", procs=procs, logs=tmp_path
        )
        kills = 0
        while kills < KILLS and agg.poll() is None:
            time.sleep(rng.uniform(0.05, 2.0))
            gw.kill()  # SIGKILL: no handler, no flush
            gw.wait(10)
            kills += 1
            gw = spawn_cli(["gateway", "--config", str(gw_toml)], tmp_path / "gw.log")
            procs.append(gw)
        rounds_at_last_kill = closed()
        wait_for(lambda: agg.poll() is not None, 300, "the federation to finish", procs=procs, logs=tmp_path)
        stop.set()
        assert agg.returncode == 0, (tmp_path / "agg.log").read_text()[-3000:]
        assert kills >= 20 and rounds_at_last_kill < ROUNDS, (kills, rounds_at_last_kill)

        lines = [json.loads(x) for x in metrics.read_text().splitlines()]
        assert [m["round"] for m in lines] == list(range(ROUNDS))
        for m in lines:  # every site exactly once in every round: nothing lost, nothing counted twice
            assert sorted(m["participants"]) == SITES, m
            assert m["total_weight"] == pytest.approx(sum(100 + 10 * i for i in range(len(SITES))))
        final = RoundState.load(tmp_path / "agg")
        assert final is not None and final.round == ROUNDS
        np.testing.assert_allclose(final.global_vec, expected_global(ROUNDS), rtol=1e-4, atol=1e-5)
        counters = final.counters
        assert counters.get("rejected", 0) == 0, counters
        gw_log = (tmp_path / "gw.log").read_text()
        resent = gw_log.count("publishing unacknowledged partial")
        finished_seals = gw_log.count("was sealed before a restart")
        print(
            f"\n{kills} kills over {rounds_at_last_kill} rounds; partials accepted "
            f"{counters.get('partials_accepted')}, duplicates at the aggregator "
            f"{counters.get('duplicate', 0)}, "
            f"resends after restarts {resent}, seals finished by a restart {finished_seals}"
        )
    finally:
        for s in sites:
            s.close()
        stop_all(procs)
        line.stop()
        central.stop()
