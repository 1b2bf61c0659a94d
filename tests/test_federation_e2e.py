"""End to end through a real Mosquitto: `fedpeft-edge aggregate` + three `fedpeft-edge agent` processes.

The sites train a small numpy softmax regression (tests/fed_numpy_trainer.py, a real LocalTrainer) on
their own synthetic data; two send top-k int8 updates, the third sends fp32 updates chunked because its
connection allows only ~1 KB packets. After three rounds the final global must equal FedAvg recomputed
offline from the exact envelopes the agents sent.
"""

from __future__ import annotations

from pathlib import Path

import mqtt_fixtures as mf
import numpy as np

from fedpeft_edge.federation.round_state import RoundState

mosquitto_broker = mf.mosquitto_broker  # drop once tests/conftest.py imports it

FLEET = "e2e"
FEATURES = 100  # 303 parameters: an fp32 update (~1.4 KB) needs two chunks under a 1200-byte packet cap


def common_toml(port: int, tmp: Path) -> str:
    return f"""
[connection]
port = {port}
[fleet]
name = "{FLEET}"
[aggregator]
state_dir = "{tmp}/agg"
max_rounds = 3
quorum = 3
min_clients = 3
round_deadline_s = 60
initial_global = "{tmp}/initial.npy"
[trainer]
kind = "factory"
factory = "fed_numpy_trainer:make"
options = {{ features = {FEATURES}, lr = 0.1 }}
"""


def agent_toml(i: int, tmp: Path, *, codec: str = "topk_int8", packet: int | None = None) -> str:
    conn = f"\n[connection]\nport = {{port}}\nmax_packet_size = {packet}\n" if packet else ""
    return f"""
[agent]
client_id = "site-{i}"
state_dir = "{tmp}/site-{i}"
dump_updates = true
idle_exit_s = 60
[codec]
mode = "{codec}"
topk_ratio = 0.25
block = 32
[data]
client_index = {i}
batch_size = 16
""" + conn


def test_three_sites_three_rounds_match_offline_fedavg(mosquitto_broker, tmp_path: Path) -> None:
    initial = (0.01 * np.random.default_rng(7).standard_normal(FEATURES * 3 + 3)).astype(np.float32)
    np.save(tmp_path / "initial.npy", initial)
    base = common_toml(mosquitto_broker.port, tmp_path)
    agg_cfg = mf.write_toml(tmp_path / "agg.toml", base)
    procs = [mf.spawn_cli(["aggregate", "--config", str(agg_cfg)], tmp_path / "agg.log")]
    for i in range(3):
        extra = agent_toml(i, tmp_path, codec="fp32", packet=1200) if i == 2 else agent_toml(i, tmp_path)
        # A TOML table may appear once: the chunking site overrides [connection] in its own file.
        text = base.replace(f"[connection]\nport = {mosquitto_broker.port}\n", "") if i == 2 else base
        cfg = mf.write_toml(tmp_path / f"site-{i}.toml",
                            text + extra.replace("{port}", str(mosquitto_broker.port)))
        procs.append(mf.spawn_cli(["agent", "--config", str(cfg)], tmp_path / f"site-{i}.log"))
    try:
        mf.wait_for(lambda: all(p.poll() is not None for p in procs), 90, "all services to finish",
                    interval=0.2, logs=tmp_path)
    finally:
        mf.stop_all(procs)
    logs = {f.name: f.read_text() for f in tmp_path.glob("*.log")}
    assert [p.returncode for p in procs] == [0, 0, 0, 0], logs

    metrics = mf.read_metrics(tmp_path / "agg" / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert all(sorted(m["participants"]) == ["site-0", "site-1", "site-2"] for m in metrics)
    assert all(m["bytes_in"] > 0 and m["bytes_out"] > 0 for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # the federation actually learns

    sent = {i: mf.sent_updates(tmp_path / f"site-{i}") for i in range(3)}
    assert all(sorted(s) == [0, 1, 2] for s in sent.values())
    assert all(not any((tmp_path / f"site-{i}" / "outbox").iterdir()) for i in range(3))  # all acked
    reference = mf.reference_fedavg(initial, [[sent[i][r] for i in range(3)] for r in range(3)])

    state = RoundState.load(tmp_path / "agg")
    assert state is not None and state.round == 3
    np.testing.assert_allclose(state.global_vec, reference, rtol=1e-5, atol=1e-6)
    assert state.counters.get("accepted") == 9 and not state.counters.get("rejected")

    final = mf.retained_global(mosquitto_broker, FLEET)
    assert final.round == 3 and final.meta["final"] is True
    from fedpeft_edge.federation.codec import decode_global

    np.testing.assert_array_equal(decode_global(final.vector), state.global_vec)
    # The chunked site really was chunked, and its chunks reassembled.
    assert "2 part(s)" in logs["site-2.log"]
    assert "round 2 closed" in logs["agg.log"] and "global published for round 3" in logs["agg.log"]
