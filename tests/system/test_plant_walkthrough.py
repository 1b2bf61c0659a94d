"""README's "Deploy to a plant", run as written: every bash block of the section, in order, in a fresh folder.

Fresh venvs (a central one with torch and ORT Training, one device venv per site installed offline from the
wheelhouse with CC=/bin/false), a signed site bundle, a TLS + password + ACL Mosquitto, an aggregator and
two sites with their own data files, three rounds, then `infer` on a site. The test only adds the free
port and the folder; if README changes, this runs the new text.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from fedpeft_edge.central.broker import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Deploy to a plant"
CLASSES = ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]


def walkthrough_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end > 0 else None]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def _kill_session(sid: int) -> None:
    import psutil

    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.send_signal(signal.SIGKILL)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue


def test_the_section_has_every_step() -> None:
    script = "\n".join(walkthrough_blocks())
    for needed in ("python3 -m venv central", "bundle keygen", "--site-bundle", "wheelhouse", "--kind plant",
                   "aggregate --config", "CC=/bin/false", "--no-index --find-links wheels", "bench --config",
                   "agent --config", "infer --model"):
        assert needed in script, needed
    assert "torch" not in script.split("python3 -m venv \"device-$site\"")[1]  # devices never get torch


def test_deploy_to_a_plant_walkthrough(tmp_path: Path) -> None:
    work = tmp_path / "plant"
    script = tmp_path / "walkthrough.sh"
    script.write_text("set -euo pipefail\n" + "\n".join(walkthrough_blocks()))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(SRC=str(ROOT), WORK=str(work), PORT=str(free_port()), PYTHONUNBUFFERED="1")
    log = tmp_path / "walkthrough.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=2400)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            # The script's own `kill` ends broker and aggregator; after a failure, everything the script
            # started is still in its session (background jobs may have process groups of their own).
            _kill_session(proc.pid)
    tails = log.read_text(errors="replace")[-4000:]
    for name in ("broker.log", "aggregator.log", "site-a.log", "site-b.log"):
        if (work / name).exists():
            lines = (work / name).read_text(errors="replace").splitlines()
            tails += f"\n--- {name}\n" + "\n".join(lines[-12:])
    assert code == 0, tails

    # Devices: installed offline, without torch or the training build.
    listed = subprocess.run([str(work / "device-site-a" / "bin" / "python"), "-m", "pip", "list",
                             "--format", "json"], capture_output=True, text=True, check=True)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "onnxruntime" in names and "torch" not in names
    assert not [n for n in names if n.startswith("onnxruntime-training")]
    # Each site's bench said the box is good enough, through the TLS broker with its own login.
    for site in ("site-a", "site-b"):
        bench = json.loads((work / f"bench-{site}.json").read_text())
        assert bench["verdict"].startswith("GOOD ENOUGH"), bench["verdicts"]
        assert bench["mqtt"]["ok"] and bench["mqtt"]["tls"] and bench["mqtt"]["login"]
    # Three rounds, both sites in each.
    rounds = [json.loads(line) for line in (work / "aggregator" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["num_updates"] == 2 for r in rounds), rounds
    # The trained model, used on site: one prediction per new document, with the bundle's label names.
    predictions = [json.loads(line) for line in (work / "predictions.jsonl").read_text().splitlines()]
    new_docs = (work / "data" / "new-docs.jsonl").read_text().splitlines()
    truth = [json.loads(line)["label"] for line in new_docs]
    assert len(predictions) == len(truth) == 64
    assert {p["label"] for p in predictions} <= set(CLASSES)
    accuracy = sum(p["label"] == t for p, t in zip(predictions, truth, strict=True)) / len(truth)
    print(f"walkthrough: site-a's model after 3 rounds: accuracy {accuracy:.3f} on 64 new documents")
    assert accuracy > 0.6  # majority class ('earn') alone gives about 0.5 on Reuters R8's test part
    assert "Traceback" not in (work / "aggregator.log").read_text() + (work / "site-a.log").read_text()
