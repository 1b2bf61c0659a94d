"""Heterogeneous LoRA ranks across sites (issue 13 item 2), measured in one process on the grid's text task.

MiniLM-L6 + LoRA on query/value + a new head, Reuters R8, Dirichlet(0.5) over 4 sites (the split, batches,
trainers and seeds of ``fedpeft-edge experiment``'s cells, ``faces/experiment/cell.py``). A site of rank
``r`` trains the artifacts of a ``PeftSpec`` with ``rank = r`` (alpha 16 at every rank, the spec default,
so its scale is 16/r). The server keeps a rank-R global (R = the largest site rank) and, per round,

* sends each site the first ``r`` slots of the global (``truncate_rank``; for FlexLoRA the global's slots
  are SVD-ordered, so that is the best rank-``r`` approximation of the aggregated ``ΔW``),
* gets back the site's fp32 delta through the site's own ``UpdateEncoder`` (the bytes are the codec's),
* aggregates with ``hetlora_aggregate`` or ``flexlora_aggregate`` (``central/hetero_rank.py``); the
  homogeneous baselines go through the aggregator's own core (``CentralEndpoint``: FedAvg, fp32), as the
  grid's cells do.

The global (rank R, head averaged by samples) is evaluated on the test set after every round.

    python3 bench/hetero_rank_experiment.py --out docs/results/hetero-rank
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from fedpeft_edge.central.hetero_rank import (
    RankedUpdate,
    flexlora_aggregate,
    hetlora_aggregate,
    pairs_from_sites,
    truncate_rank,
)
from fedpeft_edge.faces.experiment.cell import CentralEndpoint, evaluate, make_trainer
from fedpeft_edge.faces.tasks import (
    SplitConfig,
    TaskConfig,
    get_bundle,
    iterate,
    load_task,
    method_spec,
    split_sites,
    take,
)
from fedpeft_edge.protocol.codec import CodecConfig, decode_dense, decode_global, encode_global
from fedpeft_edge.site.encoder import UpdateEncoder

ALPHA = 16.0


@dataclass(frozen=True)
class Variant:
    label: str
    ranks: tuple[int, ...]
    # fedavg (homogeneous, the aggregator's core) | hetlora | hetlora_norm | hetlora_paper | flexlora
    aggregation: str


VARIANTS = {
    "r8": Variant("homogeneous r=8, FedAvg", (8, 8, 8, 8), "fedavg"),
    "r4": Variant("homogeneous r=4, FedAvg", (4, 4, 4, 4), "fedavg"),
    "8844-hetlora": Variant("ranks 8/8/4/4, HetLoRA", (8, 8, 4, 4), "hetlora"),
    "8844-flexlora": Variant("ranks 8/8/4/4, FlexLoRA", (8, 8, 4, 4), "flexlora"),
    "8442-hetlora": Variant("ranks 8/4/4/2, HetLoRA", (8, 4, 4, 2), "hetlora"),
    "8442-flexlora": Variant("ranks 8/4/4/2, FlexLoRA", (8, 4, 4, 2), "flexlora"),
    "r8-flexlora": Variant("homogeneous r=8, FlexLoRA", (8, 8, 8, 8), "flexlora"),
    # HetLoRA's sparsity-weighted aggregation: each site's weight times ‖ΔW_k‖ per LoRA pair
    "8844-hetlora-norm": Variant("ranks 8/8/4/4, HetLoRA, norm-weighted", (8, 8, 4, 4), "hetlora_norm"),
    # HetLoRA as published: zero-padded mean over all sites (padding zeros count), norm-weighted
    "8844-hetlora-paper": Variant("ranks 8/8/4/4, HetLoRA as published", (8, 8, 4, 4), "hetlora_paper"),
    "8442-hetlora-paper": Variant("ranks 8/4/4/2, HetLoRA as published", (8, 4, 4, 2), "hetlora_paper"),
}


class RankModels:
    """One bundle, trainer and initial state per rank, made once (artifacts come from the project's cache)."""

    def __init__(self, task: Any, work: Path, *, lr: float, threads: int) -> None:
        self.task, self.work, self.lr, self.threads = task, work, lr, threads
        self._by_rank: dict[int, tuple[Any, Any, Path]] = {}

    def get(self, rank: int) -> tuple[Any, Any, Path]:
        if rank not in self._by_rank:
            spec = method_spec("lora", "text", self.task.num_classes, {"rank": rank, "alpha": ALPHA})
            bundle = get_bundle(self.task.prepared, spec, log=print)
            trainer = make_trainer(bundle, threads=self.threads, lr=self.lr)
            initial = self.work / f"initial-r{rank}.state"
            trainer.save_state(initial)
            self._by_rank[rank] = (bundle, trainer, initial)
        return self._by_rank[rank]


def to_flat(layout: Any, tensors: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(tensors[s.name], np.float32).reshape(-1) for s in layout.slots])


def run_variant(key: str, task: Any, models: RankModels, args: argparse.Namespace, work: Path) -> dict:
    v = VARIANTS[key]
    started = time.perf_counter()
    big = max(v.ranks)
    bundle_r, trainer_r, initial_r = models.get(big)
    pairs = pairs_from_sites(bundle_r.plan.lora_sites)
    scale_big = ALPHA / big
    shards = split_sites(task, SplitConfig("dirichlet", args.alpha), len(v.ranks), seed=args.seed,
                         local_test_fraction=0.25)
    batches = [iterate(take(task.train_inputs, sh.train_idx), task.train_labels[sh.train_idx],
                       args.batch_size, shuffle=True, seed=args.seed * 7919 + i)
               for i, sh in enumerate(shards)]
    trainer_r.load_state(initial_r)
    global_flat = trainer_r.get_flat()
    codec = CodecConfig(mode="fp32")
    encoders = [UpdateEncoder(codec, models.get(r)[1].layout.total, seed=args.seed * 1000 + i,
                              segments=models.get(r)[1].layout.segments) for i, r in enumerate(v.ranks)]
    central = None
    if v.aggregation == "fedavg":
        central = CentralEndpoint(global_flat, spec_hash=bundle_r.spec_hash, sites=len(v.ranks),
                                  rounds=args.rounds, strategy="fedavg", server_lr=1.0)
        global_flat = central.global_flat
    init_acc, _ = evaluate(trainer_r, task.test_inputs, task.test_labels, 64)
    states = [work / f"{key}-site{i}.state" for i in range(len(v.ranks))]
    acc, losses, up_bytes, down_bytes, train_s, steps = [], [], [0] * len(v.ranks), [0] * len(v.ranks), 0.0, 0
    for rnd in range(args.rounds):
        global_t = {k: val.copy() for k, val in trainer_r.layout.split(global_flat).items()}
        updates, round_losses = [], []
        for i, (r, shard) in enumerate(zip(v.ranks, shards, strict=True)):
            _, trainer, initial = models.get(r)
            sent = truncate_rank(global_t, pairs, r, scale_from=scale_big, scale_to=ALPHA / r)
            down = encode_global(to_flat(trainer.layout, sent), "fp32")  # what the downlink carries
            down_bytes[i] += down.nbytes
            start = decode_global(down, trainer.layout.total)
            trainer.load_state(states[i] if rnd > 0 else initial)  # the site's own optimizer state
            trainer.set_flat(start)
            m = trainer.train(batches[i], max_steps=args.local_steps)
            train_s += m.seconds
            steps += m.steps
            round_losses.append(m.loss)
            trainer.save_state(states[i])
            enc = encoders[i].encode(trainer.get_flat() - start)
            up_bytes[i] += enc.nbytes
            if central is not None:
                central.submit(f"site-{i + 1}", enc, shard.num_train, {"loss": m.loss, "steps": m.steps})
            else:  # the server reads the update back exactly as sent
                trained = start + decode_dense(enc, trainer.layout.total)
                tensors = {k: val.copy() for k, val in trainer.layout.split(trained).items()}
                updates.append(RankedUpdate(tensors, r, ALPHA / r, float(shard.num_train)))
        if central is not None:
            global_flat = central.close_round()
        else:
            if v.aggregation == "flexlora":
                merged = flexlora_aggregate(updates, pairs, big, scale=scale_big)
            else:
                merged = hetlora_aggregate(updates, pairs, big, scale=scale_big,
                                           norm_weighted=v.aggregation in ("hetlora_norm", "hetlora_paper"),
                                           slotwise=v.aggregation != "hetlora_paper")
            global_flat = to_flat(trainer_r.layout, merged)
        trainer_r.set_flat(global_flat)
        a, _ = evaluate(trainer_r, task.test_inputs, task.test_labels, 64)
        acc.append(a)
        losses.append(float(np.mean(round_losses)))
        print(f"  [{key}] round {rnd + 1}/{args.rounds}: train loss {losses[-1]:.3f}, global acc {a:.3f}",
              flush=True)
    # What each site runs at the end: the global cut to its rank, on its own held-out documents; and the
    # global cut to the smallest rank on the global test set.
    global_t = {k: val.copy() for k, val in trainer_r.layout.split(global_flat).items()}
    site_acc = []
    for r, shard in zip(v.ranks, shards, strict=True):
        _, trainer, _ = models.get(r)
        trainer.set_flat(to_flat(trainer.layout, truncate_rank(global_t, pairs, r, scale_from=scale_big,
                                                               scale_to=ALPHA / r)))
        site_acc.append(evaluate(trainer, take(task.train_inputs, shard.test_idx),
                                 task.train_labels[shard.test_idx], 64)[0])
    small = min(v.ranks)
    _, trainer_s, _ = models.get(small)
    trainer_s.set_flat(to_flat(trainer_s.layout, truncate_rank(global_t, pairs, small, scale_from=scale_big,
                                                               scale_to=ALPHA / small)))
    acc_small = evaluate(trainer_s, task.test_inputs, task.test_labels, 64)[0]
    seconds = time.perf_counter() - started
    result = {
        "key": key, "label": v.label, "ranks": list(v.ranks), "aggregation": v.aggregation,
        "initial_accuracy": init_acc, "accuracy_per_round": acc, "loss_per_round": losses,
        "final_accuracy": acc[-1], "accuracy_at_min_rank": acc_small, "site_accuracy_own_rank": site_acc,
        "site_train_docs": [int(s.num_train) for s in shards],
        "trainable_per_site": [models.get(r)[1].layout.total for r in v.ranks],
        "bytes_up_per_update_per_site": [b / args.rounds for b in up_bytes],
        "bytes_down_per_round_per_site": [b / args.rounds for b in down_bytes],
        "step_ms": 1000.0 * train_s / max(1, steps), "seconds": seconds,
    }
    print(f"  [{key}] final {acc[-1]:.3f} (cut to r={small}: {acc_small:.3f}), "
          f"sites {np.round(site_acc, 3)}, {seconds:.0f} s", flush=True)
    return result


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    rounds = args.rounds
    head = ("| variant | ranks | " + " | ".join(f"r{i + 1}" for i in range(rounds))
            + " | cut to min rank | sites, own rank | bytes up / update (per site) | mean bytes up"
            + " | step ms | s |")
    lines = [head, "|" + "---|" * 2 + "---:|" * (rounds + 6)]
    for r in results:
        per_site = " / ".join(f"{b / 1000:.1f}K" for b in r["bytes_up_per_update_per_site"])
        lines.append(
            f"| {r['label']} | {'/'.join(map(str, r['ranks']))} | "
            + " | ".join(f"{a:.3f}" for a in r["accuracy_per_round"])
            + f" | {r['accuracy_at_min_rank']:.3f} | {np.mean(r['site_accuracy_own_rank']):.3f} | "
            f"{per_site} | {np.mean(r['bytes_up_per_update_per_site']):,.0f} | {r['step_ms']:.0f} | "
            f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="r8,r4,8844-hetlora,8844-flexlora",
                    help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--train-size", type=int, default=480)
    ap.add_argument("--test-size", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the label split")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("reports/hetero-rank"))
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    started = time.perf_counter()
    task = load_task(TaskConfig(kind="text", dataset="reuters_r8", train_size=args.train_size,
                                test_size=args.test_size, max_len=args.max_len, seed=args.seed))
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="hetero-rank-") as tmp:
        models = RankModels(task, Path(tmp), lr=args.lr, threads=args.threads)
        for key in keys:
            print(f"variant {key}: {VARIANTS[key].label}", flush=True)
            results.append(run_variant(key, task, models, args, Path(tmp)))
            (args.out / "results.json").write_text(json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                 "seconds": time.perf_counter() - started}, indent=1))
    table = markdown(results, args)
    (args.out / "results.md").write_text(
        f"# Heterogeneous LoRA ranks\n\n"
        f"`python3 bench/hetero_rank_experiment.py {' '.join(sys.argv[1:])}`\n\n{table}\n"
        f"Total {time.perf_counter() - started:.0f} s.\n")
    print(table)
    print(f"wrote {args.out / 'results.md'} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
