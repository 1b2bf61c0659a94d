"""Peak RSS of a whole running site agent (``fedpeft-edge agent``), end to end, on stock onnxruntime.

A local broker (Mosquitto when installed), an aggregator (this interpreter) and one agent started with a
device venv's python, exactly as an operator starts it (the ``agent`` sub-command with a TOML file),
training MiniLM LoRA on a local JSON Lines file (Reuters R8 documents, batch 16 x 64 tokens, evaluation
on). The agent runs under a small wrapper (this file with ``--child``) that reports the process's
``VmHWM`` when it exits: that is the peak of everything the agent does (imports, data, sessions,
evaluation, training, MQTT), in its own address space.

    python3 bench/agent_rss.py DEVICE_PYTHON [--micro-batch 8] [--rounds 2] [--local-steps 6]

``bench_training.py::test_agent_peak_rss`` runs it (with the device venv it makes) and records the result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(out: str, argv: list[str]) -> None:
    """Run the agent CLI in this process; write VmHWM and the exit code to ``out`` when it exits."""
    import atexit

    def report(code: list[int | None] = [None]) -> None:  # noqa: B006 - filled below
        with open("/proc/self/status") as fh:
            status = dict(line.split(":", 1) for line in fh if ":" in line)
        kb = {k: int(status[k].split()[0]) for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")
              if k in status}
        mods = sorted(m for m in ("onnx", "torch", "rich", "tokenizers", "onnxruntime")
                      if m in sys.modules)
        Path(out).write_text(json.dumps({"kb": kb, "exit_code": code[0], "modules": mods}))

    code: list[int | None] = [None]
    atexit.register(report, code)
    from fedpeft_edge.faces.cli import main

    code[0] = main(argv)
    sys.exit(code[0])


def _sample_rss(proc: subprocess.Popen, timeout: float, every: float = 0.05) -> list[tuple[float, float]]:
    """(seconds, VmRSS MB) of ``proc`` until it exits: where in the run the peak falls."""
    out: list[tuple[float, float]] = []
    start = time.monotonic()
    while proc.poll() is None:
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"the agent did not finish within {timeout} s")
        try:
            with open(f"/proc/{proc.pid}/status") as fh:
                kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS"))
            out.append((round(time.monotonic() - start, 2), round(kb / 1024, 1)))
        except (OSError, StopIteration):
            pass
        time.sleep(every)
    return out


def _write_data(path: Path, n: int) -> list[str]:
    from fedpeft_edge.data.datasets import load_reuters_r8, subsample

    ds = subsample(load_reuters_r8("train"), n, seed=0)
    with open(path, "w", encoding="utf-8") as fh:
        for text, label in zip(ds.texts, ds.labels, strict=True):
            fh.write(json.dumps({"text": text, "label": ds.classes[int(label)]}) + "\n")
    return list(ds.classes)


def _toml(sections: dict[str, dict]) -> str:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def measure_agent_peak(device_python: str, gradient_dir: Path, prepared_dir: Path, work: Path, *,
                       micro_batch: int | None = None, rounds: int = 2, local_steps: int = 6,
                       threads: int = 2, samples: int = 400, timeout: float = 900.0) -> dict:
    """Run broker + aggregator + one agent (see the module docstring); returns the agent's figures."""
    import numpy as np

    from fedpeft_edge.central.broker import start_local_broker
    from fedpeft_edge.peft.lowering import GradientModel

    work.mkdir(parents=True, exist_ok=True)
    gm = GradientModel.load(gradient_dir)
    classes = _write_data(work / "site.jsonl", samples)
    np.save(work / "initial.npy", gm.initial_vector())
    broker = start_local_broker(port=0, prefer="auto")
    conn = {"host": broker.host, "port": broker.port,
            **({"protocol": "3.1.1"} if broker.kind == "embedded" else {})}
    fleet = {"name": "rssbench"}
    (work / "aggregator.toml").write_text(_toml({
        "connection": conn, "fleet": fleet,
        "aggregator": {"client_id": "aggregator", "state_dir": str(work / "aggregator"), "max_rounds": rounds,
                       "quorum": 1, "min_clients": 1, "round_deadline_s": 600.0,
                       "initial_global": str(work / "initial.npy"), "spec_hash": gm.spec_hash}}))
    options = {"micro_batch": micro_batch} if micro_batch else {}
    agent_toml = _toml({
        "connection": conn, "fleet": fleet,
        "agent": {"client_id": "site-1", "state_dir": str(work / "site-1"), "local_steps": local_steps,
                  "threads": threads, "evaluate": True, "idle_exit_s": 3.0},
        "trainer": {"kind": "gradient", "gradient_dir": str(gradient_dir)},
        "data": {"path": str(work / "site.jsonl"), "classes": classes, "batch_size": 16,
                 "eval_fraction": 0.2},
        "data.options": {"prepared_dir": str(prepared_dir), "max_len": 64},
    })
    if options:
        agent_toml += _toml({"trainer.options": options})
    (work / "agent.toml").write_text(agent_toml)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    report = work / "agent_rss.json"
    procs: list[subprocess.Popen] = []
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    try:
        with open(work / "aggregator.log", "wb") as agg_log, open(work / "agent.log", "wb") as agent_log:
            procs.append(subprocess.Popen([sys.executable, "-m", "fedpeft_edge", "aggregate", "--config",
                                           str(work / "aggregator.toml")], stdout=agg_log,
                                          stderr=subprocess.STDOUT, env=env))
            agent = subprocess.Popen([device_python, str(Path(__file__).resolve()), "--child", str(report),
                                      "agent", "--config", str(work / "agent.toml")], stdout=agent_log,
                                     stderr=subprocess.STDOUT, env=env)
            procs.append(agent)
            samples = _sample_rss(agent, timeout)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        broker.stop()
    if not report.is_file():
        tail = (work / "agent.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the agent wrote no report:\n{tail}")
    result = json.loads(report.read_text())
    outbox = work / "site-1" / "outbox"
    sent = sorted(p.name for p in outbox.glob("*")) if outbox.is_dir() else []
    return {"peak_rss_mb": round(result["kb"]["VmHWM"] / 1024, 1),
            "rss_at_exit_mb": {k: round(v / 1024, 1) for k, v in result["kb"].items()},
            "exit_code": result["exit_code"], "modules": result["modules"], "micro_batch": micro_batch,
            "rounds": rounds, "local_steps": local_steps, "seconds": round(time.monotonic() - started, 1),
            "outbox_left": sent, "broker": broker.kind, "rss_samples": samples}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--child"]:
        _child(args[1], args[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("device_python")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=6)
    a = p.parse_args(args)
    import tempfile

    from fedpeft_edge.models.prepare import prepare_text_model
    from fedpeft_edge.peft.artifacts import generate_artifacts
    from fedpeft_edge.peft.lowering import lower_to_gradient_model
    from fedpeft_edge.peft.spec import PeftSpec

    work = a.work or Path(tempfile.mkdtemp(prefix="agent-rss-"))
    prepared = prepare_text_model(max_len=64)
    spec = PeftSpec("lora", targets=[r"attention\.self\.(query|value)"], rank=8, alpha=16, head_classes=8)
    bundle = generate_artifacts(prepared.onnx_path, spec, work / "bundle")
    gm = lower_to_gradient_model(bundle, work / "gradient", overwrite=True)
    result = measure_agent_peak(a.device_python, gm.directory, prepared.onnx_path.parent, work / "run",
                                micro_batch=a.micro_batch, rounds=a.rounds, local_steps=a.local_steps)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
