"""`fedpeft-edge bench` runs on this machine and writes JSON with the expected keys and sane figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft_edge.central.broker import free_port, start_local_broker
from fedpeft_edge.faces.cli import main as cli_main
from fedpeft_edge.faces.device_bench import BENCH_KEYS, BenchOptions, bench_mqtt, load_bench_json, run_bench

pytestmark = pytest.mark.slow


def test_bench_cli_writes_json_with_every_check(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    with start_local_broker(port=0, prefer="embedded") as broker:
        code = cli_main(["bench", "--task", "image", "--method", "lora", "--steps", "2", "--batch-size", "8",
                     "--broker", f"{broker.host}:{broker.port}", "--out", str(out), "--rss-limit-mb", "4000"])
    assert code == 0
    data = load_bench_json(out)
    assert set(BENCH_KEYS) <= set(data)
    assert data["passed"] is True
    assert data["kernels"]["backend"] in ("c", "numpy")
    assert all(v > 0 for v in data["kernels"]["throughput_melem_s"].values())
    t = data["training"]
    assert t["trainable_params"] > 1000 and t["loss_finite"] and t["step_seconds_median"] > 0
    assert data["memory"]["peak_rss_mb"] > 50
    modes = data["codec"]["modes"]
    assert modes["fp32"]["bytes"] == 4 * t["trainable_params"]
    assert modes["topk_int8"]["bytes"] < modes["int8"]["bytes"] < modes["fp32"]["bytes"]
    assert data["mqtt"]["ok"] is True and data["mqtt"]["rtt_update_ms"] > 0
    checks = {v["check"]: v["status"] for v in data["verdicts"]}
    assert checks["MQTT round trip"] == "ok" and checks["training step"] in ("ok", "warn")


def test_bench_reports_unreachable_broker_as_failure(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    result = run_bench(BenchOptions(skip_training=True, kernel_elements=1 << 14, broker=f"127.0.0.1:{port}"),
                       log=lambda _: None)
    assert result["passed"] is False
    assert result["mqtt"]["ok"] is False and "connect" in result["mqtt"]["error"]
    assert {v["check"]: v["status"] for v in result["verdicts"]}["training step"] == "skipped"
    json.dumps(result)  # JSON-ready as returned


def test_bad_broker_address_is_a_typed_error() -> None:
    from fedpeft_edge.runtime.errors import InvalidValueError

    with pytest.raises(InvalidValueError):
        bench_mqtt("no-port-here", 100)
