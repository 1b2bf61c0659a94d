"""What a site below the bundle's LoRA rank saves in compute: the shared rank-8 gradient model with a rank
cut (``[agent] lora_rank``, the other slots frozen at zero) against a gradient model built for that rank.

Run: ``pytest bench/bench_rank_cut.py --benchmark-only -p no:cacheprovider`` (under a minute, model cached).

MiniLM-L6 with LoRA on query/value (the demo's adapter), batch 16 x 64 tokens, 2 intra-op threads,
GradientTrainer on onnxruntime, one full training step (forward, backward, C AdamW). The variants are
timed alternately in the same process, ``ROUNDS`` steps each per pass, so machine noise hits all of them;
``test_rank_cut_against_per_rank_graphs`` records every variant's median and its ratio to the shared
rank-8 graph at full rank in ``extra_info``. bench/RESULTS.md has the figures.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from fedpeft_edge.peft.artifacts import generate_artifacts
from fedpeft_edge.peft.lowering import lower_to_gradient_model
from fedpeft_edge.peft.rank_slots import RankSlots
from fedpeft_edge.peft.spec import PeftSpec
from fedpeft_edge.training.gradient_trainer import GradientTrainer

BATCH, SEQ, THREADS, ROUNDS, PASSES = 16, 64, 2, 3, 4
QV = [r"attention\.self\.(query|value)"]


def _spec(rank: int) -> PeftSpec:
    return PeftSpec("lora", targets=QV, rank=rank, alpha=16, head_classes=8)


def _gradient_model(model_path: Path, rank: int, work: Path) -> Path:
    bundle = generate_artifacts(model_path, _spec(rank), work / f"bundle-r{rank}")
    lower_to_gradient_model(bundle, work / f"grad-r{rank}")
    return work / f"grad-r{rank}"


def _trainer(directory: Path) -> GradientTrainer:
    return GradientTrainer(directory, threads=THREADS, lr=1e-3)


def test_rank_cut_against_per_rank_graphs(benchmark, tmp_path: Path) -> None:
    from fedpeft_edge.models.prepare import prepare_text_model

    model = prepare_text_model(max_len=SEQ).onnx_path
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(1000, 20000, (BATCH, SEQ)).astype(np.int64),
             "attention_mask": np.ones((BATCH, SEQ), np.int64),
             "labels": rng.integers(0, 8, BATCH).astype(np.int64)}
    r8 = _gradient_model(model, 8, tmp_path)
    shared = _trainer(r8)
    slots = RankSlots.from_layout(shared.layout)
    assert slots is not None and slots.max_rank == 8
    variants: dict[str, GradientTrainer] = {"r8 graph": shared}
    cuts = {"r8 graph, cut to r4": 4, "r8 graph, cut to r2": 2}
    for name in cuts:
        variants[name] = _trainer(r8)  # the same gradient model, its own session and state
    for rank in (4, 2):
        variants[f"r{rank} graph"] = _trainer(_gradient_model(model, rank, tmp_path))
    start = shared.get_flat()
    for name, rank in cuts.items():
        t = variants[name]
        t.set_flat(np.where(slots.keep(rank), start, np.float32(0.0)))
        t.set_always_frozen(~slots.keep(rank))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for t in variants.values():
        t.train_step(batch)  # warm-up: the first run plans memory
    for _ in range(PASSES):  # alternate, so noise hits every variant alike
        for name, t in variants.items():
            for _ in range(ROUNDS):
                t0 = time.perf_counter()
                t.train_step(batch)
                times[name].append(time.perf_counter() - t0)
    for name, rank in cuts.items():  # the cut held: nothing beyond the site's slots moved
        assert not variants[name].get_flat()[~slots.keep(rank)].any()
    benchmark.group = "rank-cut"
    benchmark.pedantic(lambda: shared.train_step(batch), rounds=3, iterations=1)
    base = float(np.median(times["r8 graph"]))
    benchmark.extra_info.update({
        "median_step_s": {k: round(float(np.median(v)), 4) for k, v in times.items()},
        "ratio_to_r8_graph": {k: round(float(np.median(v)) / base, 3) for k, v in times.items()},
        "trainable_params": {k: int(v.layout.total) for k, v in variants.items()},
        "sent_params": {**{k: int(v.layout.total) for k, v in variants.items() if k not in cuts},
                        **{k: slots.size(r) for k, r in cuts.items()}},
    })
