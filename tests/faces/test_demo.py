"""The demo end to end in its reduced configuration, on the embedded broker and on Mosquitto, and README's
main-job command exactly as written (reduced through FEDPEFT_EDGE_DEMO_QUICK=1)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedpeft_edge.central.broker import find_mosquitto
from fedpeft_edge.faces.demo import QUICK_ENV, DemoOptions, load_shard, run_demo, save_shard
from fedpeft_edge.protocol import wire
from fedpeft_edge.protocol.codec import expected_payload_len
from fedpeft_edge.runtime.errors import InvalidValueError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _check_report(summary: dict, out: Path, work: Path, agents: int, rounds: int) -> None:
    assert summary["ok"], summary["failure"]
    for name in ("report.json", "report.md", "accuracy.png", "bytes.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 100, name
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["global"]["accuracy_after"] == pytest.approx(summary["global"]["accuracy_after"])

    # Accuracy: clearly above the untrained head (same global test set, same evaluator).
    g = summary["global"]
    assert 0.0 <= g["accuracy_before"] <= 1.0 and 0.0 <= g["accuracy_after"] <= 1.0
    assert g["accuracy_after"] >= g["accuracy_before"] + 0.1, g
    assert len(g["accuracy_per_round"]) == rounds + 1
    assert len(summary["sites"]) == agents
    for site in summary["sites"]:
        assert 0.0 <= site["accuracy_after"] <= 1.0

    # Bytes: every update the agents sent, decoded from their audit copies, is exactly what the codec's own
    # accounting says its fields imply; the aggregator's byte count per round equals the wire bytes sent.
    assert len(summary["rounds"]) == rounds
    for r in summary["rounds"]:
        assert r["participants"] == agents
        rnd = r["round"] - 1
        wire_total, payload_total = 0, 0
        for i in range(agents):
            sent = work / f"site-{i + 1}" / "sent" / f"r{rnd:08d}.msg"
            data = sent.read_bytes()
            enc = wire.decode_update(data).update
            assert enc.nbytes == expected_payload_len(enc.mode, enc.n, enc.k, enc.block, enc.index_nbytes)
            assert enc.n == summary["peft"]["trainable_params"]
            wire_total += len(data)
            payload_total += enc.nbytes
        assert r["payload_bytes_up"] == payload_total
        assert r["wire_bytes_up"] == wire_total
        assert r["bytes_in_aggregator"] == wire_total
        assert r["bytes_per_site_vs_full_ft_percent"] < 1.0
        assert r["local_train_seconds_mean"] > 0
    md = (out / "report.md").read_text()
    assert "Accuracy before and after" in md and "site-1" in md


@pytest.mark.slow  # long end-to-end run; the fast tier leaves it to the full suite
@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
def test_quick_demo_end_to_end(tmp_path: Path, broker: str) -> None:
    if broker == "mosquitto":
        assert find_mosquitto() is not None, "Mosquitto must be installed for this test (scripts/install.sh)"
    out, work = tmp_path / "report", tmp_path / "work"
    summary = run_demo(DemoOptions(quick=True, broker=broker, out=out, work_dir=work, plain=True))
    assert summary["options"]["agents"] == 2 and summary["options"]["rounds"] == 2
    _check_report(summary, out, work, agents=2, rounds=2)


@pytest.mark.slow  # long end-to-end run; the fast tier leaves it to the full suite
def test_quick_demo_with_secure_aggregation(tmp_path: Path) -> None:
    """`demo --secagg`: every round closes on a secure session of three real agents; the bytes up are what
    the aggregator received over the four phases (no plain update exists to count)."""
    out, work = tmp_path / "report", tmp_path / "work"
    summary = run_demo(DemoOptions(quick=True, secagg=True, broker="mosquitto", out=out, work_dir=work,
                                   plain=True))
    assert summary["ok"], summary["failure"]
    assert summary["options"]["agents"] == 3 and summary["options"]["codec"] == "fp32"
    assert summary["global"]["accuracy_after"] > summary["global"]["accuracy_before"]
    lines = [json.loads(x) for x in (work / "aggregator" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(m["secagg_session"] and len(m["participants"]) == 3 for m in lines)
    for r, m in zip(summary["rounds"], lines, strict=True):
        masked = 3 * 4 * summary["peft"]["trainable_params"]  # three masked uint32 vectors at least
        assert r["participants"] == 3 and r["wire_bytes_up"] == m["bytes_in"] > masked
    assert not list(work.glob("site-*/sent/*.msg"))  # nothing was sent in the clear


@pytest.mark.slow  # long end-to-end run; the fast tier leaves it to the full suite
@pytest.mark.parametrize("rule", ["slotwise", "hetlora", "flexlora"])
def test_quick_demo_with_mixed_lora_ranks(tmp_path: Path, rule: str) -> None:
    """`demo --ranks 8,2`: MiniLM on Reuters R8 over Mosquitto, one site at the bundle's rank 8 and one at
    rank 2. The rank-2 site sends only its slots' values and says its rank; the aggregator books it per
    rank. Slot-wise: slots 2-7 are trained by the rank-8 site alone, so the final global there is the
    initial one plus exactly that site's decoded updates (whatever the weights). HetLoRA and FlexLoRA
    combine the sites' adapters (the rank-2 site's zeros shrink those slots, or the SVD mixes them), and
    the rounds say so."""
    from fedpeft_edge.central.store import RoundState
    from fedpeft_edge.peft.lowering import GradientModel
    from fedpeft_edge.peft.rank_slots import RANK_METRIC, RankSlots
    from fedpeft_edge.protocol.codec import decode_dense
    from fedpeft_edge.site.config import load_agent_config

    out, work = tmp_path / "report", tmp_path / "work"
    summary = run_demo(DemoOptions(quick=True, ranks="8,2", rank_aggregation=rule, broker="mosquitto",
                                   out=out, work_dir=work, plain=True))
    assert summary["ok"], summary["failure"]
    assert summary["global"]["accuracy_after"] >= summary["global"]["accuracy_before"] + 0.1
    n = summary["peft"]["trainable_params"]
    site = load_agent_config(work / "site-1.toml")  # the agents' gradient model: its layout
    slots = RankSlots.from_layout(GradientModel.load(site.trainer.gradient_dir).layout)
    assert slots is not None and slots.max_rank == 8
    lines = [json.loads(x) for x in (work / "aggregator" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for m in lines:
        assert set(m["rank_cut_weight"]) == {"2"} and RANK_METRIC not in m
        assert m.get("rank_aggregation", "slotwise") == rule
    deltas = []
    for rnd in range(2):
        full = wire.decode_update((work / "site-1" / "sent" / f"r{rnd:08d}.msg").read_bytes())
        cut = wire.decode_update((work / "site-2" / "sent" / f"r{rnd:08d}.msg").read_bytes())
        assert full.update.n == n and RANK_METRIC not in full.metrics
        assert cut.update.n == slots.size(2) < n and cut.metrics[RANK_METRIC] == 2.0
        deltas.append(decode_dense(full.update, n))
    initial = np.load(work / "initial.npy")
    final = RoundState.load(work / "aggregator").global_vec
    high = ~slots.keep(2)
    moved = final[high] - initial[high]
    if rule == "slotwise":
        np.testing.assert_allclose(moved, (deltas[0] + deltas[1])[high], rtol=1e-5, atol=1e-6)
    else:
        assert not np.allclose(moved, (deltas[0] + deltas[1])[high], atol=1e-6)
    assert (summary["sites"][1]["updates"][0]["n"]) == slots.size(2)


def test_readme_main_job_command_as_written(tmp_path: Path) -> None:
    """README's main-job command is `fedpeft-edge demo`; here reduced by the documented env var."""
    exe = shutil.which("fedpeft-edge")
    assert exe is not None, "the fedpeft-edge command is not installed (pip install -e .)"
    env = dict(os.environ, **{QUICK_ENV: "1"})
    proc = subprocess.run(["fedpeft-edge", "demo"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = sorted((tmp_path / "reports").glob("demo-*/report.json"))
    assert len(reports) == 1, proc.stdout[-2000:]
    summary = json.loads(reports[0].read_text())
    assert summary["ok"] and summary["options"]["quick"]
    assert summary["global"]["accuracy_after"] > summary["global"]["accuracy_before"]
    assert "| global test set |" in proc.stdout and "report.md" in proc.stdout


def test_quick_env_var_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(QUICK_ENV, "1")
    from fedpeft_edge.faces.demo import quick_requested

    assert quick_requested()
    quick = DemoOptions(quick=True, agents=8, rounds=9).resolved()
    assert (quick.agents, quick.rounds) == (2, 2)  # quick caps even explicit sizes
    full = DemoOptions(agents=3).resolved()
    assert full.agents == 3 and full.rounds >= 3 and full.method == "lora"
    with pytest.raises(InvalidValueError):
        DemoOptions(task="audio").resolved()
    with pytest.raises(InvalidValueError):
        DemoOptions(agents=0).resolved()
    with pytest.raises(InvalidValueError):
        DemoOptions(codec="zip").resolved()
    assert DemoOptions(secagg=True).resolved().codec == "fp32"  # SecAgg masks dense updates
    with pytest.raises(InvalidValueError, match="top-k"):
        DemoOptions(secagg=True, codec="topk_int8").resolved()
    with pytest.raises(InvalidValueError, match="distributed"):
        DemoOptions(secagg=True, dp=4.0).resolved()


def test_shard_round_trip_and_bad_file(tmp_path: Path) -> None:
    import numpy as np

    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    path = tmp_path / "s.npz"
    save_shard(path, {"input_ids": ids}, np.array([0, 1, 2]), {"input_ids": ids[:1]}, np.array([1]))
    train, ty, _test, tey = load_shard(path)
    assert np.array_equal(train["input_ids"], ids) and ty.tolist() == [0, 1, 2] and tey.tolist() == [1]
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InvalidValueError):
        load_shard(tmp_path / "bad.npz")


def test_demo_help_is_instant() -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "fedpeft_edge", "demo", "--help"],
                          capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 0 and "FEDPEFT_EDGE_DEMO_QUICK" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "onnxruntime" not in imported


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_quick_demo_with_differential_privacy(tmp_path: Path, mode: str) -> None:
    """`demo --dp 8`: the aggregator (or every site) adds the calibrated noise; ε after each round is in
    metrics.jsonl, grows, and ends at the target without passing it."""
    out, work = tmp_path / "report", tmp_path / "work"
    codec = "int8" if mode == "distributed" else None  # distributed noise is dense: no top-k
    summary = run_demo(DemoOptions(quick=True, out=out, work_dir=work, plain=True, dp=8.0, dp_mode=mode,
                                   codec=codec))
    assert summary["ok"], summary["failure"]
    lines = [json.loads(x) for x in (work / "aggregator" / "metrics.jsonl").read_text().splitlines()]
    eps = [m["epsilon"] for m in lines]
    assert len(eps) == 2 and eps[0] < eps[1] <= 8.0 and eps[1] > 7.0, eps
    assert all(m["dp_mode"] == mode for m in lines)
    agent_cfg = (work / "site-1.toml").read_text()
    assert ("[privacy]" in agent_cfg) == (mode == "distributed")
