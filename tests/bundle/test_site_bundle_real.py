"""The real MiniLM LoRA model end to end: ``prepare --site-bundle --classes <names> --sign-key`` →
``bundle verify`` → a site's ``[bundle]`` config → the gradient trainer trains a step on the site's own
texts, tokenised with the bundle's tokenizer. Uses the shared prepared-model cache (slow on a cold one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedpeft_edge.site.config import load_agent_config
from fedpeft_edge.site.trainer_setup import build_trainer_setup

REPO = Path(__file__).resolve().parents[2]
R8 = ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]

pytestmark = pytest.mark.slow


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "fedpeft_edge", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=1800)


def test_minilm_prepare_sign_verify_and_train_from_the_bundle(tmp_path: Path) -> None:
    assert _cli("bundle", "keygen", "--out", "keys", cwd=tmp_path).returncode == 0
    r = _cli("prepare", "--task", "text", "--method", "lora", "--classes", ",".join(R8), "--max-len", "32",
             "--site-bundle", "site.bundle", "--sign-key", "keys/bundle-signing.key", "--fleet", "line-3",
             "--codec", "int8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "site bundle: site.bundle" in r.stdout and "signed" in r.stdout
    r = _cli("bundle", "verify", "site.bundle", "--pubkey", "keys/bundle-signing.pub", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("verified: "), r.stderr
    r = _cli("bundle", "inspect", "site.bundle", "--json", cwd=tmp_path)
    manifest = json.loads(r.stdout)
    assert manifest["labels"] == R8 and manifest["head_classes"] == 8 and manifest["fleet"] == "line-3"
    assert manifest["model"]["preprocessing"] == {"max_len": 32} and manifest["codec"]["mode"] == "int8"
    assert manifest["files"]["gradient/base.data"]["bytes"] > 50_000_000
    assert manifest["peft"]["method"] == "lora" and manifest["runtime"]["onnxruntime"] == ">=1.19"

    texts = {"acq": "company agreed to acquire the shares of the firm", "crude": "oil prices rose per barrel",
             "earn": "net profit per share rose in the quarter", "grain": "wheat and corn exports",
             "interest": "the central bank cut interest rates", "money-fx": "the dollar fell against the yen",
             "ship": "the tanker was loaded at the port", "trade": "the trade deficit with japan widened"}
    data = tmp_path / "site-data.jsonl"
    data.write_text("".join(json.dumps({"text": f"{t} {i}", "label": c}) + "\n"
                            for i in range(4) for c, t in texts.items()))
    cfg = load_agent_config(text=f"""
[agent]
client_id = "site-real"
state_dir = "{tmp_path}/state"
threads = 2
[bundle]
path = "{tmp_path / 'site.bundle'}"
public_key = "{tmp_path / 'keys' / 'bundle-signing.pub'}"
[data]
path = "{data}"
classes = {json.dumps(R8)}
batch_size = 8
""")
    setup = build_trainer_setup(cfg)
    assert setup.bundle_id == manifest["bundle_id"] and cfg.fleet.name == "line-3"
    assert cfg.codec.mode == "int8" and cfg.data.options["max_len"] == 32
    before = setup.trainer.get_flat().copy()
    batch = next(iter(setup.train_batches_fn()))
    assert batch["input_ids"].shape[1] == 32  # tokenised with the bundle's tokenizer, the bundle's length
    metrics = setup.trainer.train(iter([batch]), max_steps=1)
    assert metrics.steps == 1 and np.isfinite(metrics.loss)
    assert not np.array_equal(setup.trainer.get_flat(), before)
