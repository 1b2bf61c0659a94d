"""A plant-style federation with the real model and site-local data files, through a real Mosquitto.

Central side: MiniLM-L6 exported to ONNX (shared prepared-model cache) and a LoRA (query/value, rank 8)
training bundle with an 8-class head. Two sites each hold their own ``.jsonl`` file (a disjoint slice of
Reuters R8) and run ``python -m fedpeft_edge.faces.cli agent`` with ``[data] path`` and either
``[trainer] kind = "gradient"`` (the default: stock onnxruntime over the lowered bundle; one site is given
the lowered folder, the other only the bundle, which it lowers on start) or ``kind = "ort"`` (ORT
Training); the aggregator runs ``... aggregate`` with the same bundle. Two rounds of a few local steps,
top-k int8 updates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mqtt_fixtures as mf
import numpy as np
import pytest

from fedpeft_edge.central.store import RoundState
from fedpeft_edge.protocol import wire
from fedpeft_edge.protocol.codec import decode_global
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig

pytestmark = pytest.mark.slow

FLEET = "realmodel"
SITES = 2
DOCS_PER_SITE = 64
ROUNDS = 2
QV = [r"attention\.self\.(query|value)"]


@pytest.fixture(scope="module")
def central(tmp_path_factory: pytest.TempPathFactory):
    """The prepared MiniLM (shared cache), a fresh LoRA artifact bundle made from it, and the bundle
    lowered to a gradient model."""
    from fedpeft_edge.models.prepare import prepare_text_model
    from fedpeft_edge.peft.artifacts import generate_artifacts
    from fedpeft_edge.peft.lowering import lower_to_gradient_model
    from fedpeft_edge.peft.spec import PeftSpec

    prepared = prepare_text_model(max_len=32)
    spec = PeftSpec("lora", targets=QV, rank=8, alpha=16, head_classes=8)
    root = tmp_path_factory.mktemp("central")
    bundle = generate_artifacts(prepared.onnx_path, spec, root / "bundle")
    return prepared, bundle, lower_to_gradient_model(bundle, root / "gradient")


def trainer_section(kind: str, bundle, lowered, site: int | None) -> str:
    """``[trainer]`` for a kind; with "gradient", site 1 gets only the bundle (it lowers it itself)."""
    if kind == "ort":
        return f'kind = "ort"\nbundle_dir = "{bundle.directory}"\n'
    if site == 1:
        return f'bundle_dir = "{bundle.directory}"\n'  # kind = "gradient" is the default
    return f'kind = "gradient"\ngradient_dir = "{lowered.directory}"\n'


def write_site_files(tmp: Path) -> tuple[list[str], list[Path], list[list[str]]]:
    """Disjoint Reuters R8 slices as each site's own JSON Lines file (labels as class names)."""
    from fedpeft_edge.data.datasets import load_reuters_r8

    r8 = load_reuters_r8("train")
    order = np.random.default_rng(11).permutation(len(r8))
    paths, texts = [], []
    for i in range(SITES):
        idx = order[i * DOCS_PER_SITE:(i + 1) * DOCS_PER_SITE]
        path = tmp / f"site-{i}-data.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for j in idx.tolist():
                fh.write(json.dumps({"text": r8.texts[j], "label": r8.classes[int(r8.labels[j])]}) + "\n")
        paths.append(path)
        texts.append([r8.texts[j] for j in idx.tolist()])
    return list(r8.classes), paths, texts


@pytest.mark.parametrize("kind", ["gradient", "ort"])
def test_two_sites_train_minilm_lora_on_their_own_files(mosquitto_broker, central, tmp_path: Path,
                                                        kind: str) -> None:
    prepared, bundle, lowered = central
    fleet = f"{FLEET}-{kind}"  # the broker is shared: a fleet's retained final global would end the next run
    classes, data_files, site_texts = write_site_files(tmp_path)
    assert not set(site_texts[0]) & set(site_texts[1])  # the sites' data really is disjoint

    common = f"""
[connection]
port = {mosquitto_broker.port}
[fleet]
name = "{fleet}"
"""

    def trainer(site: int | None) -> str:
        return f"[trainer]\n{trainer_section(kind, bundle, lowered, site)}options = {{ lr = 0.005 }}\n"

    agg_cfg = mf.write_toml(tmp_path / "agg.toml", common + trainer(None) + f"""
[aggregator]
state_dir = "{tmp_path}/agg"
max_rounds = {ROUNDS}
quorum = {SITES}
min_clients = {SITES}
round_deadline_s = 80
""")
    listener = MqttTransport(TransportConfig(host=mosquitto_broker.host, port=mosquitto_broker.port,
                                             client_id="test-globals", clean_start=True))
    listener.subscribe(Topics(fleet).global_, qos=1)
    listener.connect(10)
    procs = [mf.spawn_cli(["aggregate", "--config", str(agg_cfg)], tmp_path / "agg.log")]
    for i in range(SITES):
        cfg = mf.write_toml(tmp_path / f"site-{i}.toml", common + trainer(i) + f"""
[agent]
client_id = "site-{i}"
state_dir = "{tmp_path}/site-{i}"
dump_updates = true
idle_exit_s = 60
exit_after_final = true
local_steps = 3
threads = 1
[codec]
mode = "topk_int8"
topk_ratio = 0.05
[data]
path = "{data_files[i]}"
classes = {json.dumps(classes)}
eval_fraction = 0.25
seed = {i}
batch_size = 8
options = {{ prepared_dir = "{prepared.onnx_path.parent}", max_len = 32 }}
""")
        procs.append(mf.spawn_cli(["agent", "--config", str(cfg)], tmp_path / f"site-{i}.log"))

    globals_seen: dict[int, wire.GlobalMessage] = {}

    def collect_and_check_done() -> bool:
        while (msg := listener.get(0)) is not None:
            g = wire.decode_global(msg.payload)
            globals_seen[g.round] = g
        return all(p.poll() is not None for p in procs)

    started = time.monotonic()
    try:
        mf.wait_for(collect_and_check_done, 150, "aggregator and sites to finish", interval=0.2,
                    procs=procs, logs=tmp_path)
        collect_and_check_done()
    finally:
        mf.stop_all(procs)
        listener.close()
    elapsed = time.monotonic() - started
    logs = {f.name: f.read_text(errors="replace") for f in tmp_path.glob("*.log")}
    assert [p.returncode for p in procs] == [0] * (SITES + 1), logs

    # Every round closed with both sites counted.
    metrics = mf.read_metrics(tmp_path / "agg" / "metrics.jsonl")
    assert [m["round"] for m in metrics] == list(range(ROUNDS)), metrics
    assert all(sorted(m["participants"]) == [f"site-{i}" for i in range(SITES)] for m in metrics)
    state = RoundState.load(tmp_path / "agg")
    assert state is not None and state.round == ROUNDS
    assert state.counters.get("accepted") == SITES * ROUNDS and not state.counters.get("rejected")

    # The global moved away from the bundle's initial adapter, and it carries the bundle's spec hash.
    assert sorted(globals_seen) == list(range(ROUNDS + 1)), sorted(globals_seen)
    initial = decode_global(globals_seen[0].vector)
    final = decode_global(globals_seen[ROUNDS].vector)
    assert initial.size == final.size == bundle.num_trainable
    assert np.all(np.isfinite(final)) and not np.array_equal(final, initial)
    np.testing.assert_array_equal(final, state.global_vec.astype(np.float32))
    assert {g.spec_hash for g in globals_seen.values()} == {bundle.spec_hash}
    assert globals_seen[ROUNDS].meta.get("final") is True

    # The site given only the bundle lowered it into its state dir on start.
    assert (tmp_path / "site-1" / "gradient_model" / "gradient.json").is_file() == (kind == "gradient")
    for i in range(SITES):
        site_log = logs[f"site-{i}.log"]
        # eval_fraction 0.25 of 64 documents held out locally
        assert f"{DOCS_PER_SITE} samples (48 train, 16 held out)" in site_log, site_log[-2000:]
        sent = mf.sent_updates(tmp_path / f"site-{i}")
        assert sorted(sent) == list(range(ROUNDS))
        assert not any((tmp_path / f"site-{i}" / "outbox").iterdir())  # every update acknowledged
        for rnd, envelope in sent.items():
            msg = wire.decode_update(envelope)
            assert (msg.client_id, msg.round, msg.spec_hash) == (f"site-{i}", rnd, bundle.spec_hash)
            assert msg.num_samples == 3 * 8  # local_steps x batch_size
            assert msg.update.mode == "topk_int8" and msg.update.k < msg.update.n
            assert "global_eval_accuracy" in msg.metrics
            # No document text (nor a distinctive piece of one) is in any byte the site sent.
            for text in site_texts[i]:
                for piece in (text[:40], text[len(text) // 2:len(text) // 2 + 40]):
                    if len(piece.strip()) >= 20:
                        assert piece.encode() not in envelope, (i, rnd, piece)
    print(f"\nreal-model federation ({kind}): {elapsed:.1f} s for {ROUNDS} rounds x {SITES} sites")


@pytest.mark.parametrize("kind", ["gradient", "ort"])
def test_site_config_errors_stop_the_agent_before_it_connects(central, tmp_path: Path, kind: str) -> None:
    """A class list that does not fit the head, or a label outside it, ends `agent` with exit code 2 and
    a message naming the problem (file and line), before any connection is attempted."""
    import subprocess
    import sys

    prepared, bundle, lowered = central
    data = tmp_path / "site.jsonl"
    data.write_text(json.dumps({"text": "pump 3 running hot", "label": "acq"}) + "\n"
                    + json.dumps({"text": "pump 4 fine", "label": "overheating"}) + "\n", encoding="utf-8")
    base = f"""
[connection]
port = 9
[agent]
client_id = "site-x"
state_dir = "{tmp_path}/state"
[trainer]
{trainer_section(kind, bundle, lowered, 0)}
[data]
path = "{data}"
options = {{ prepared_dir = "{prepared.onnx_path.parent}", max_len = 32 }}
"""
    eight = ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]
    cases = {
        'classes = ["acq", "crude", "earn"]\n': "names 3 classes but the bundle's head has 8 outputs",
        f"classes = {json.dumps(eight)}\n": f"{data}:2: unknown label 'overheating'",
    }
    for extra, message in cases.items():
        cfg = mf.write_toml(tmp_path / "site.toml", base + extra)
        proc = subprocess.run([sys.executable, "-m", "fedpeft_edge.faces.cli", "agent", "--config", str(cfg)],
                              env=mf.service_env(), cwd=str(mf.REPO_DIR), capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert "connected" not in proc.stderr
