"""The trained model, used on site: merged export per global, versions with an atomic ``current``, rollback,
and ``fedpeft-edge infer`` (also in a device venv with stock onnxruntime only, and on the real MiniLM)."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from lowering_cases import case_data, make_cache

from fedpeft_edge.data.image_files import read_image
from fedpeft_edge.data.images import preprocess_images
from fedpeft_edge.faces.cli import main as cli_main
from fedpeft_edge.faces.model_commands import run_infer
from fedpeft_edge.protocol import wire
from fedpeft_edge.protocol.codec import encode_global
from fedpeft_edge.site import model_export
from fedpeft_edge.site.model_export import DeployedModel, ModelStore, export_global, export_version
from fedpeft_edge.training.gradient_trainer import GradientTrainer

ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
IMAGE_PRE = {"kind": "image", "image_size": 8, "mean": MEAN, "std": STD, "channels": 3}


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("export"))[1]


def _global(gm, seed: int = 3) -> np.ndarray:
    """A trained-looking global: starting values plus noise (LoRA B starts at zero)."""
    rng = np.random.default_rng(seed)
    return (gm.initial_vector() + rng.normal(0, 0.2, gm.num_trainable)).astype(np.float32)


def _eval_logits(gm, flat: np.ndarray, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The oracle: the gradient model's eval graph with the global applied (what the agent evaluates)."""
    trainer = GradientTrainer(gm)
    trainer.set_flat(flat)
    return trainer.predict(inputs)


# ---- export == eval graph with the global ---------------------------------------------------------------
@pytest.mark.parametrize(("case", "merged"), [("lora", True), ("ffa_lora", True), ("gemm_lora", True),
                                              ("conv_lora", True), ("adapter", False), ("bitfit", False)])
def test_exported_model_gives_the_eval_graphs_predictions(lowered, tmp_path, case, merged):
    gm = lowered(case)
    flat = _global(gm)
    store = ModelStore(tmp_path / "model")
    export_version(store, gm, flat, 4, labels=["a", "b", "c"], preprocessing=None)
    assert store.current() == 4
    record = store.deploy_info(4)
    assert record["merged"] is merged and record["version"] == record["round"] == 4
    assert record["labels"] == ["a", "b", "c"] and record["spec_hash"] == gm.spec_hash
    deployed = DeployedModel.current(store.root)
    inputs = {k: v for k, v in case_data(case, n=12).items() if k != "labels"}
    want = _eval_logits(gm, flat, inputs)
    got = deployed.logits(inputs)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert (got.argmax(1) == want.argmax(1)).all()
    if merged:  # no LoRA branch is left: the merged graph has only the base's MatMuls/Convs
        import onnx

        graph = onnx.load(str(deployed.directory / "model.onnx"), load_external_data=False).graph
        assert not [t for t in graph.initializer if "lora" in t.name]
        assert not [n for n in graph.node if n.name.startswith("peft/lora")]


# ---- the store: versions, atomicity, pruning, rollback --------------------------------------------------
def test_versions_are_pruned_to_the_newest_three_and_same_global_is_not_rebuilt(lowered, tmp_path):
    gm = lowered("lora")
    store = ModelStore(tmp_path / "model")
    for rnd in range(1, 6):
        export_version(store, gm, _global(gm, rnd), rnd, labels=["a", "b", "c"], preprocessing=None)
    assert store.versions() == [3, 4, 5] and store.current() == 5
    assert os.readlink(store.root / "current") == "5"  # a relative symlink, swapped atomically
    before = (store.path(5) / "deploy.json").stat().st_mtime_ns
    export_version(store, gm, _global(gm, 5), 5, labels=["a", "b", "c"], preprocessing=None)
    assert (store.path(5) / "deploy.json").stat().st_mtime_ns == before
    # the same round with another global (a new federation reusing round numbers) replaces it
    export_version(store, gm, _global(gm, 99), 5, labels=["a", "b", "c"], preprocessing=None)
    assert (store.path(5) / "deploy.json").stat().st_mtime_ns != before
    # a new federation's rounds start again at 0: versions are ordered by export, not by round
    export_version(store, gm, _global(gm, 50), 0, labels=["a", "b", "c"], preprocessing=None)
    export_version(store, gm, _global(gm, 51), 1, labels=["a", "b", "c"], preprocessing=None)
    assert store.versions() == [5, 0, 1] and store.current() == 1
    assert store.rollback() == 0


def test_a_crash_in_the_middle_of_an_export_leaves_the_previous_version_current(lowered, tmp_path,
                                                                                 monkeypatch):
    gm = lowered("lora")
    store = ModelStore(tmp_path / "model")
    export_version(store, gm, _global(gm, 1), 1, labels=["a", "b", "c"], preprocessing=None)
    from fedpeft_edge.peft import merge

    real = merge.export_from_gradient_model

    def half_then_crash(model, flat, out_dir, **kw):
        real(model, flat, out_dir, **kw)  # model.onnx + model.data written ...
        raise OSError("disk full")  # ... and then the export dies before deploy.json

    monkeypatch.setattr(merge, "export_from_gradient_model", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        export_version(store, gm, _global(gm, 2), 2, labels=["a", "b", "c"], preprocessing=None)
    assert store.current() == 1 and store.versions() == [1]
    assert not store.path(2).exists()
    # a kill -9 leaves the temp folder behind (simulated): never visible as a version, removed next time
    leftover = store.root / ".tmp-2-killed"
    leftover.mkdir()
    (leftover / "model.onnx").write_bytes(b"half")
    assert store.versions() == [1]
    monkeypatch.setattr(merge, "export_from_gradient_model", real)
    export_version(store, gm, _global(gm, 2), 2, labels=["a", "b", "c"], preprocessing=None)
    assert store.current() == 2 and not leftover.exists()
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []


def test_export_global_logs_failures_and_never_raises(lowered, tmp_path, caplog, monkeypatch):
    gm = lowered("lora")
    agent = _agent(gm, tmp_path)
    monkeypatch.setattr(model_export, "export_in_child",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    g = wire.GlobalMessage("f", 3, gm.spec_hash, encode_global(_global(gm)))
    with caplog.at_level("ERROR"):
        assert export_global(agent, g) is None
    assert "model export for round 3 failed" in caplog.text
    broken = SimpleNamespace(trainer=None, cfg=None, state_dir=tmp_path, client_id="x")
    assert export_global(broken, g) is None  # no gradient model: off, quietly


def test_the_export_child_writes_the_version_and_reports_its_failures(lowered, tmp_path, caplog):
    """The merge runs in a child process (the agent keeps its own footprint); a failing child is one
    logged line and the previous version stays current."""
    gm = lowered("lora")
    agent = _agent(gm, tmp_path)
    g = wire.GlobalMessage("f", 1, gm.spec_hash, encode_global(_global(gm)))
    path = export_global(agent, g)
    assert path is not None and path.name == "1" and (path / "deploy.json").is_file()
    store = ModelStore(tmp_path / "model")
    assert store.current() == 1
    (tmp_path / "gone").mkdir()
    agent.__dict__["_model_export"].model = SimpleNamespace(
        directory=tmp_path / "gone", spec_hash=gm.spec_hash, num_trainable=gm.num_trainable)
    g2 = wire.GlobalMessage("f", 2, gm.spec_hash, encode_global(_global(gm, 2)))
    with caplog.at_level("ERROR"):
        assert export_global(agent, g2) is None
    assert "the export process exited with" in caplog.text
    assert store.current() == 1 and store.versions() == [1]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".job-")]  # the job folder is gone


def test_rollback_pins_and_latest_follows_again(lowered, tmp_path, capsys):
    gm = lowered("lora")
    store = ModelStore(tmp_path / "model")
    for rnd in (1, 2, 3):
        export_version(store, gm, _global(gm, rnd), rnd, labels=["a", "b", "c"], preprocessing=None)
    assert cli_main(["model", "list", "--model", str(store.root)]) == 0
    assert "*      3" in capsys.readouterr().out
    assert cli_main(["model", "rollback", "--model", str(store.root)]) == 0
    assert store.current() == 2 and store.pinned
    export_version(store, gm, _global(gm, 4), 4, labels=["a", "b", "c"], preprocessing=None)
    assert store.current() == 2 and store.versions() == [2, 3, 4]  # kept, not made current
    assert cli_main(["model", "rollback", "--model", str(store.root)]) == 2  # nothing older than 2 kept
    assert cli_main(["model", "latest", "--model", str(store.root)]) == 0
    assert store.current() == 4 and not store.pinned


# ---- the agent's hook, and infer on images ---------------------------------------------------------------
def _agent(gm, state_dir: Path, *, options: dict | None = None):
    from fedpeft_edge.site.agent import EdgeAgent
    from fedpeft_edge.site.config import AgentConfig

    cfg = AgentConfig()
    cfg.agent.client_id = "site-1"
    cfg.agent.state_dir = str(state_dir)
    cfg.data.classes = ["zero", "one", "two"]
    cfg.data.options = dict(options or {})
    return EdgeAgent(cfg, GradientTrainer(gm), lambda: iter(()), spec_hash=gm.spec_hash)


def _png(img: np.ndarray) -> bytes:
    h, w, _ = img.shape

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.slow  # ~1 s: the full suite runs it, the fast tier leaves it out
def test_agent_exports_each_global_and_infer_reads_an_image_folder(lowered, tmp_path):
    gm = lowered("conv_lora")
    opts = {"model_kind": "image", "image_size": 8, "mean": MEAN, "std": STD}
    agent = _agent(gm, tmp_path / "state", options=opts)
    flat = _global(gm)
    for rnd, vec in ((0, gm.initial_vector()), (1, flat)):
        g = wire.GlobalMessage("fleet", rnd, gm.spec_hash, encode_global(vec), {"final": rnd == 1})
        assert export_global(agent, g) == tmp_path / "state" / "model" / str(rnd)
    store = ModelStore(tmp_path / "state" / "model")
    assert store.current() == 1
    record = store.deploy_info(1)
    assert record["preprocessing"] == {**IMAGE_PRE, "kind": "image"} and record["final"] is True
    assert record["labels"] == ["zero", "one", "two"] and record["site"] == "site-1"

    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (6, 12, 12, 3), dtype=np.uint8)  # 12x12: resized to 8 like training
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(images):
        (folder / f"img{i}.png").write_bytes(_png(img))
    np.testing.assert_array_equal(read_image(folder / "img3.png"), images[3])
    want = _eval_logits(gm, flat, {"pixel_values": preprocess_images(images, 8, MEAN, STD)})
    out = io.StringIO()
    summary = run_infer(store.root, folder, out, batch_size=4)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert summary["rows"] == 6 and summary["version"] == 1
    assert [r["id"] for r in rows] == [f"img{i}.png" for i in range(6)]
    probs = np.array([[r["probabilities"][n] for n in ("zero", "one", "two")] for r in rows])
    z = np.exp(want - want.max(1, keepdims=True))
    np.testing.assert_allclose(probs, z / z.sum(1, keepdims=True), atol=2e-5)
    assert [r["label"] for r in rows] == [["zero", "one", "two"][k] for k in want.argmax(1)]


def test_png_reader_matches_pillow_for_every_filter_and_colour_type(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    base = np.clip(np.cumsum(rng.integers(-9, 10, (17, 23, 4)), axis=1) + 128, 0, 255).astype(np.uint8)
    for mode, img in (("RGB", base[..., :3]), ("L", base[..., 0]), ("RGBA", base), ("LA", base[..., :2])):
        path = tmp_path / f"{mode}.png"
        pil.fromarray(img, mode).save(path, optimize=True)  # Pillow picks filters per row
        want = img if mode in ("RGB", "L") else img[..., :-1]
        want = want[..., 0] if want.ndim == 3 and want.shape[2] == 1 else want
        np.testing.assert_array_equal(read_image(path), want)
    pil.fromarray(base[..., :3], "RGB").convert("P").save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"),
                                  np.asarray(pil.open(tmp_path / "p.png").convert("RGB")))


# ---- the real MiniLM LoRA model, and a device venv ------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory):
    """MiniLM LoRA (the demo's spec) exported with a perturbed global, as an agent would after a round."""
    from fedpeft_edge.data.datasets import load_dataset
    from fedpeft_edge.faces.tasks import (
        TaskConfig,
        get_bundle,
        get_gradient_model,
        method_spec,
        prepare_backbone,
    )

    task = TaskConfig(kind="text", dataset="reuters_r8", max_len=64)
    prepared = prepare_backbone(task)
    test = load_dataset("reuters_r8", "test")
    gm = get_gradient_model(get_bundle(prepared, method_spec("lora", "text", test.num_classes)))
    root = tmp_path_factory.mktemp("minilm")
    flat = _global(gm, 11)
    state = root / "state"
    agent = _agent(gm, state, options={"prepared_dir": str(prepared.onnx_path.parent), "max_len": 64})
    agent.cfg.data.classes = list(test.classes)
    g = wire.GlobalMessage("fleet", 7, gm.spec_hash, encode_global(flat))
    t0 = time.perf_counter()
    assert export_global(agent, g) is not None
    seconds = time.perf_counter() - t0
    texts = [test.texts[i] for i in range(0, 400, 50)]
    labels = [test.classes[test.labels[i]] for i in range(0, 400, 50)]
    jsonl = root / "r8.jsonl"
    jsonl.write_text("".join(json.dumps({"id": f"doc{i}", "text": t, "label": lab}) + "\n"
                             for i, (t, lab) in enumerate(zip(texts, labels, strict=True))))
    from fedpeft_edge.data.text import TextEncoder

    inputs = TextEncoder(prepared.meta["tokenizer_json"]).encode(texts, 64)
    want = _eval_logits(gm, flat, inputs)
    return {"store": state / "model", "jsonl": jsonl, "want": want, "classes": list(test.classes),
            "seconds": seconds, "gm": gm}


@pytest.mark.slow
def test_infer_on_the_real_minilm_export_matches_the_eval_graph(minilm_export, tmp_path):
    store = ModelStore(minilm_export["store"])
    record = store.deploy_info(7)
    assert record["merged"] and record["lora_weights_folded"] == 12  # q and v of 6 layers
    assert record["preprocessing"] == {"kind": "text", "max_len": 64, "tokenizer": "tokenizer.json"}
    out = tmp_path / "preds.jsonl"
    assert cli_main(["infer", "--model", str(store.root), "--input", str(minilm_export["jsonl"]),
                     "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = minilm_export["want"]
    assert [r["label_id"] for r in rows] == want.argmax(1).tolist()
    probs = np.array([[r["probabilities"][c] for c in minilm_export["classes"]] for r in rows])
    z = np.exp(want - want.max(1, keepdims=True))
    np.testing.assert_allclose(probs, z / z.sum(1, keepdims=True), atol=1e-4)
    size = sum(f["bytes"] for f in record["files"].values())
    print(f"MiniLM export: {minilm_export['seconds']:.2f} s, {size / 1e6:.1f} MB")


@pytest.mark.slow
def test_infer_runs_in_a_device_venv_with_stock_onnxruntime(minilm_export, tmp_path):
    """`fedpeft-edge infer` where a site runs it: scripts/device_venv.sh (no training build, no torch)."""
    venv = Path(os.environ.get("FEDPEFT_TEST_DEVICE_VENV", tmp_path / "venv"))
    made = subprocess.run(["bash", str(ROOT / "scripts" / "device_venv.sh"), str(venv)],
                          capture_output=True, text=True, timeout=1200)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # a copy of the store: the device reads only what the export wrote (no gradient model, no cache)
    store = tmp_path / "model"
    shutil.copytree(minilm_export["store"], store, symlinks=True)
    out = tmp_path / "preds.jsonl"
    run = subprocess.run([str(venv / "bin" / "fedpeft-edge"), "infer", "--model", str(store), "--input",
                          str(minilm_export["jsonl"]), "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "8 predictions with model version 7" in run.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label_id"] for r in rows] == minilm_export["want"].argmax(1).tolist()
    code = ("import importlib.metadata as m, onnxruntime as o; "
            "print(sorted(d.metadata['Name'].lower() for d in m.distributions()), o.__file__)")
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", code],
                           capture_output=True, text=True, env=env, check=True)
    assert "torch" not in probe.stdout and "onnxruntime-training" not in probe.stdout
    assert str(venv) in probe.stdout


def test_label_names_come_from_the_config_a_site_bundle_or_the_head(tmp_path):
    cfg = SimpleNamespace(data=SimpleNamespace(classes=[], dataset=None, split="train"))
    gradient = tmp_path / "bundle" / "gradient"
    gradient.mkdir(parents=True)
    assert model_export._label_names(cfg, 2, gradient) == ["class_0", "class_1"]
    (gradient.parent / "manifest.json").write_text(json.dumps(
        {"format": "fedpeft-edge-site-bundle", "labels": ["ok", "fault"]}))
    assert model_export._label_names(cfg, 2, gradient) == ["ok", "fault"]
    cfg.data.classes = ["normal", "bearing"]
    assert model_export._label_names(cfg, 2, gradient) == ["normal", "bearing"]
