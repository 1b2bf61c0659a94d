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
    # The site default: the gradient model on a plain InferenceSession, named with its runtime.
    assert t["backend"] == "gradient" and t["trainer"].startswith("onnxruntime")
    assert not t["trainer"].endswith("(training API)")
    assert t["trainable_params"] > 1000 and t["loss_finite"] and t["step_seconds_median"] > 0
    assert data["memory"]["peak_rss_mb"] > 50
    modes = data["codec"]["modes"]
    assert modes["fp32"]["bytes"] == 4 * t["trainable_params"]
    assert modes["topk_int8"]["bytes"] < modes["int8"]["bytes"] < modes["fp32"]["bytes"]
    assert data["mqtt"]["ok"] is True and data["mqtt"]["rtt_update_ms"] > 0
    checks = {v["check"]: v["status"] for v in data["verdicts"]}
    assert checks["MQTT round trip"] == "ok" and checks["training step"] in ("ok", "warn")


def test_bench_ort_backend_names_the_training_api_and_trains_the_same_parameters(tmp_path: Path) -> None:
    """--backend ort (central side, comparison): same bundle, same trainable count, the training API named."""
    results = {}
    for backend in ("gradient", "ort"):
        out = tmp_path / f"{backend}.json"
        code = cli_main(["bench", "--task", "image", "--backend", backend, "--steps", "1",
                         "--batch-size", "4",
                         "--kernel-elements", "4096", "--out", str(out), "--rss-limit-mb", "4000"])
        assert code == 0
        results[backend] = load_bench_json(out)["training"]
    assert results["ort"]["trainer"].endswith("(training API)")
    assert results["ort"]["trainable_params"] == results["gradient"]["trainable_params"]
    assert results["ort"]["spec_hash"] == results["gradient"]["spec_hash"]
    # Same initial parameters and the same synthetic batch: the first loss agrees across backends.
    assert results["ort"]["losses"][0] == pytest.approx(results["gradient"]["losses"][0], rel=1e-4)


def test_bench_rejects_a_gradient_model_for_the_ort_backend(tmp_path: Path) -> None:
    from fedpeft_edge.faces.tasks import (
        TaskConfig,
        get_bundle,
        get_gradient_model,
        method_spec,
        prepare_backbone,
    )

    prepared = prepare_backbone(TaskConfig(kind="image", dataset="mnist5k", max_len=64, image_size=32), None)
    gradient = get_gradient_model(get_bundle(prepared, method_spec("lora", "image", 10), None), None)
    result = run_bench(BenchOptions(backend="ort", bundle_dir=gradient.directory, kernel_elements=1 << 12),
                       log=lambda _: None)
    assert result["passed"] is False
    assert "artifact bundle" in result["training"]["error"]


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


def _image_gradient_dir() -> Path:
    from fedpeft_edge.faces.tasks import (
        TaskConfig,
        get_bundle,
        get_gradient_model,
        method_spec,
        prepare_backbone,
    )

    prepared = prepare_backbone(TaskConfig(kind="image", dataset="mnist5k", max_len=64, image_size=32), None)
    return get_gradient_model(get_bundle(prepared, method_spec("lora", "image", 10), None), None).directory


def _site_toml(tmp_path: Path, broker, pki, gradient: Path, *, local_steps: int) -> Path:
    pw = tmp_path / "site-a.pw"
    pw.write_text(pki.passwords["site-a"] + "\n")
    path = tmp_path / "site.toml"
    path.write_text(f"""
[connection]
host = "localhost"
port = {broker.port}
password_file = "{pw}"
tls_ca = "{pki.ca}"
[fleet]
name = "plant"
[agent]
client_id = "site-a"
threads = 1
local_steps = {local_steps}
[data]
batch_size = 4
[trainer]
kind = "gradient"
gradient_dir = "{gradient}"
""")
    return path


def test_bench_with_the_site_config_goes_the_agents_way_through_the_plant_broker(
        plant_broker, plant_pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """TLS + login + ACL from the site's own TOML; batch, threads and steps per round from it too."""
    config = _site_toml(tmp_path, plant_broker, plant_pki, _image_gradient_dir(), local_steps=5)
    out = tmp_path / "bench.json"
    code = cli_main(["bench", "--config", str(config), "--steps", "2", "--kernel-elements", "4096",
                     "--deadline", "600", "--rss-limit-mb", "4000", "--out", str(out)])
    printed = capsys.readouterr().out
    data = load_bench_json(out)
    assert code == 0, data["verdicts"]
    assert data["training"]["batch_size"] == 4 and data["training"]["threads"] == 1
    assert data["mqtt"]["ok"] is True and data["mqtt"]["tls"] is True and data["mqtt"]["login"] is True
    r = data["round"]
    assert r["steps"] == 5
    assert r["round_seconds"] == pytest.approx(5 * data["training"]["step_seconds_median"])
    assert "VERDICT: GOOD ENOUGH for site site-a" in printed


def test_bench_says_not_good_enough_when_the_round_misses_the_deadline_or_memory_the_limit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gradient = _image_gradient_dir()
    out = tmp_path / "bench.json"
    code = cli_main(["bench", "--bundle", str(gradient), "--steps", "1", "--kernel-elements", "4096",
                     "--batch-size", "4", "--round-steps", "100000", "--deadline", "1",
                     "--rss-limit-mb", "10", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1
    data = load_bench_json(out)
    checks = {v["check"]: v["status"] for v in data["verdicts"]}
    assert checks["round time"] == "fail" and checks["peak memory"] == "fail"
    verdict = [ln for ln in printed.splitlines() if ln.startswith("VERDICT:")]
    assert len(verdict) == 1 and "NOT GOOD ENOUGH" in verdict[0] and "round time" in verdict[0]


def test_bench_with_wrong_site_credentials_names_the_reason(plant_broker, plant_pki, tmp_path: Path) -> None:
    config = _site_toml(tmp_path, plant_broker, plant_pki, _image_gradient_dir(), local_steps=1)
    (tmp_path / "site-a.pw").write_text("wrong\n")
    out = tmp_path / "bench.json"
    code = cli_main(["bench", "--config", str(config), "--skip-training", "--kernel-elements", "4096",
                     "--out", str(out)])
    assert code == 1
    mqtt = load_bench_json(out)["mqtt"]
    assert mqtt["ok"] is False and "not authorised" in mqtt["error"]
    assert f":{plant_broker.port}" in mqtt["error"]
