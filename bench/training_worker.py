"""Times N MiniLM LoRA training steps on one backend and prints one JSON line (a bench child process).

    python bench/training_worker.py '{"backend": "gradient", "model": DIR, "threads": 2, ...}'

Backends: ``gradient`` (GradientTrainer over a lowered gradient model; run it with a device venv's python
to measure *stock* onnxruntime), ``ort`` (OrtTrainer over an ORT Training bundle, needs the training
build) and ``torch`` (PyTorch eager + HF peft LoRA r=8 on query/value + head, same work; ``model`` is the
folder of the MiniLM safetensors). All three see the same fixed random batch. ``profile`` (gradient only)
turns on ORT's session profiling for the timed steps and adds a per-op summary (see :func:`op_profile`).

Printed: median and per-step times after ``warmup`` steps, peak RSS (``VmHWM``: per address space, reset
at exec, unlike ``ru_maxrss``), whether torch was imported, and the onnxruntime build used.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def hwm_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def _batch(n: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(1000, 20000, (n, seq)).astype(np.int64),
            "attention_mask": np.ones((n, seq), np.int64),
            "labels": rng.integers(0, 8, n).astype(np.int64)}


def op_profile(path: str | Path, steps: int) -> dict:
    """Per-op-type kernel time of an ORT profile (ms per step, share) and how much of it ran on the
    calling thread alone while the intra-op pool had nothing to do (``single_thread_ms``: nodes whose
    ``thread_scheduling_stats`` show no sub-thread work)."""
    events = sorted((e for e in json.loads(Path(path).read_text())
                     if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                    key=lambda e: e["ts"])
    per_op: dict[str, dict[str, float]] = defaultdict(lambda: {"ms": 0.0, "single_thread_ms": 0.0, "n": 0})
    total = 0.0
    runs: dict[str, int] = {}  # the pool threads' task counters are cumulative: the delta is this node's
    for e in events:
        args = e.get("args", {})
        op = args.get("op_name", "?")
        ms = e["dur"] / 1000.0
        stats = args.get("thread_scheduling_stats") or {}
        subs = stats.get("sub_threads") or {}
        helped = 0
        for tid, v in subs.items():
            n = int(v.get("num_run", 0))
            helped += n - runs.get(tid, n)
            runs[tid] = n
        entry = per_op[op]
        entry["ms"] += ms
        entry["n"] += 1
        if helped == 0 and subs:  # no pool thread ran a task of this node: the calling thread did it all
            entry["single_thread_ms"] += ms
        total += ms
    rows = sorted(per_op.items(), key=lambda kv: -kv[1]["ms"])
    return {"kernel_ms_per_step": round(total / steps, 2),
            "single_thread_ms_per_step": round(sum(v["single_thread_ms"] for v in per_op.values()) / steps,
                                               2),
            "ops": [{"op": op, "ms_per_step": round(v["ms"] / steps, 2), "share": round(v["ms"] / total, 3),
                     "single_thread_ms_per_step": round(v["single_thread_ms"] / steps, 2),
                     "nodes_per_step": v["n"] // steps} for op, v in rows]}


def _gradient(job: dict) -> tuple:
    from fedpeft_edge.training.gradient_trainer import GradientTrainer

    profile = job.get("profile")

    class Profiled(GradientTrainer):
        def _session_options(self):
            options = super()._session_options()
            if profile:
                options.enable_profiling = True
                options.profile_file_prefix = profile
            return options

    trainer = Profiled(job["model"], threads=job["threads"], lr=1e-3, micro_batch=job.get("micro_batch"))
    return trainer, lambda b: trainer.train_step(b)


def _ort(job: dict) -> tuple:
    from fedpeft_edge.training.ort_trainer import OrtTrainer

    trainer = OrtTrainer(job["model"], threads=job["threads"], optimizer="c_adamw", lr=1e-3)
    return trainer, lambda b: trainer.train_step(b)


def _torch(job: dict) -> tuple:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    bert = BertModel.from_pretrained(job["model"], attn_implementation="eager", add_pooling_layer=False,
                                     local_files_only=True)

    class Net(torch.nn.Module):
        def __init__(self, b):
            super().__init__()
            self.bert, self.head = b, torch.nn.Linear(384, 8)

        def forward(self, ids, mask):
            h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).float()
            return self.head((h * m).sum(1) / m.sum(1).clamp(min=1e-9))

    net = get_peft_model(Net(bert), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                              modules_to_save=["head"], lora_dropout=0.0))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    def step(b):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(b["ids"], b["mask"]), b["labels"])
        loss.backward()
        opt.step()

    return net, step


def main(job: dict) -> dict:
    backend = job["backend"]
    trainer, step = {"gradient": _gradient, "ort": _ort, "torch": _torch}[backend](job)
    batch = _batch(job["batch"], job["seq"])
    if backend == "torch":
        import torch
        batch = {"ids": torch.from_numpy(batch["input_ids"]),
                 "mask": torch.from_numpy(batch["attention_mask"]),
                 "labels": torch.from_numpy(batch["labels"])}
    times = []
    for _ in range(job["steps"]):
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    timed = times[job["warmup"]:]
    out = {"backend": backend, "median_step_s": float(np.median(timed)), "step_times_s": timed,
           "peak_rss_mb": round(hwm_mb(), 1), "torch_imported": "torch" in sys.modules}
    if backend != "torch":
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
        out["onnxruntime_training"] = (Path(onnxruntime.__file__).parent / "training" / "api").is_dir()
    if backend == "gradient" and job.get("profile"):
        path = trainer._train_run.session.end_profiling()
        out["profile"] = op_profile(path, job["steps"])
        out["profile_file"] = path
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
