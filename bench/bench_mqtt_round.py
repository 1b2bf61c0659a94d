"""One federated round with many simulated sites through a local Mosquitto.

Each site is an MQTT client (its own paho connection) publishing a pre-encoded update (top-k int8 of a
LoRA-sized adapter by default); the real aggregator service counts them, closes the round on quorum and
publishes the new global. Reported: round time (first publish → global published), updates counted,
bytes received and broker → aggregator throughput.

    python bench/bench_mqtt_round.py --sites 100 --params 73728 --mode topk_int8 --ratio 0.05
    pytest bench/bench_mqtt_round.py --benchmark-only      # pytest-benchmark, 100 sites
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fedpeft_edge.central.broker import start_local_broker
from fedpeft_edge.central.config import load_aggregator_config
from fedpeft_edge.central.service import AggregatorService
from fedpeft_edge.protocol import chunking, wire
from fedpeft_edge.protocol.codec import CodecConfig
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig
from fedpeft_edge.site.encoder import UpdateEncoder

FLEET = "bench"


def run_round(sites: int = 100, params: int = 73_728, mode: str = "topk_int8", ratio: float = 0.05,
              prefer: str = "mosquitto", timeout: float = 120.0) -> dict[str, float]:
    broker = start_local_broker(prefer=prefer)  # type: ignore[arg-type]
    tmp = Path(tempfile.mkdtemp(prefix="fedpeft-bench-"))
    clients: list[MqttTransport] = []
    try:
        cfg = load_aggregator_config(text=f"""
[connection]
port = {broker.port}
[fleet]
name = "{FLEET}"
[aggregator]
state_dir = "{tmp}/agg"
max_rounds = 1
quorum = {sites}
min_clients = {sites}
round_deadline_s = {timeout}
""")
        svc = AggregatorService(cfg, initial_global=np.zeros(params, np.float32))
        agg = threading.Thread(target=svc.run, daemon=True)
        agg.start()
        topics = Topics(FLEET)
        # Pre-encode outside the timed part: this measures transport + aggregation, not training.
        rng = np.random.default_rng(0)
        payloads: list[list[bytes]] = []
        for i in range(sites):
            enc = UpdateEncoder(CodecConfig(mode=mode, topk_ratio=ratio), params).encode(
                rng.standard_normal(params).astype(np.float32) * 1e-3)
            data = wire.encode_update(wire.UpdateMessage(FLEET, 0, f"site-{i:04d}", svc.spec_hash, 100,
                                                         {"loss": 1.0}, enc))
            payloads.append(chunking.split_message(data, 1_000_000))
        for i in range(sites):
            t = MqttTransport(TransportConfig(host=broker.host, port=broker.port, client_id=f"site-{i:04d}",
                                              clean_start=True))
            t.connect(30)
            clients.append(t)
        deadline = time.monotonic() + 30
        while not (svc.transport and svc.transport.connected) and time.monotonic() < deadline:
            time.sleep(0.01)
        total_bytes = sum(len(p) for parts in payloads for p in parts)
        t0 = time.perf_counter()
        handles = [c.publish(topics.update(c.cfg.client_id), p)
                   for c, parts in zip(clients, payloads, strict=True) for p in parts]
        agg.join(timeout)
        t_round = time.perf_counter() - t0
        if agg.is_alive():
            raise RuntimeError(f"round did not complete: {svc.core.accepted_this_round}/{sites} counted")
        hist = svc.core.history
        counted = len(hist[0]["participants"]) if hist else 0
        return {
            "sites": sites, "params": params, "mode": mode, "counted": counted,
            "all_acked": float(all(h.is_published() for h in handles)),
            "round_s": t_round, "bytes_in": total_bytes,
            "throughput_MBps": total_bytes / t_round / 1e6, "updates_per_s": sites / t_round,
            "update_bytes": total_bytes / sites, "broker": broker.kind,
        }
    finally:
        for c in clients:
            c.close()
        broker.stop()


def test_mqtt_round_100_sites(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = "mqtt round"
    result = benchmark.pedantic(run_round, kwargs={"sites": 100}, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["counted"] == 100  # every update counted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--params", type=int, default=73_728)
    ap.add_argument("--mode", default="topk_int8", choices=["fp32", "int8", "topk_fp32", "topk_int8"])
    ap.add_argument("--ratio", type=float, default=0.05)
    ap.add_argument("--prefer", default="mosquitto", choices=["mosquitto", "embedded"])
    args = ap.parse_args()
    print(json.dumps(run_round(args.sites, args.params, args.mode, args.ratio, args.prefer), indent=2))


if __name__ == "__main__":
    main()
