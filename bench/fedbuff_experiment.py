"""FedBuff against synchronous FedAvg rounds with stragglers, on a simulated clock (issue 13 item 4).

What runs for real, in one process: MiniLM-L6 + LoRA r=8 on query/value + a new head (the grid's text task,
``faces/experiment/cell.py``: same trainer, artifacts, data loader and batches), every site's local training
(ORT Training, AdamW in the C core, the site's own optimizer state kept between its local rounds), every
site's ``UpdateEncoder``, the wire's ``UpdateMessage`` and the aggregator's own
:class:`~fedpeft_edge.central.core.AggregatorCore` (admission, dedup by (site, round), lateness, staleness,
the weighted sum in the C kernels, the server optimizer, the atomic state file in a temporary directory).
The global is evaluated on the global test set after every server step.

What is simulated: time. On 2 shared cores, real stragglers sleeping in real time would make the run long
and its timings noise, so each site's local round *costs* ``local_steps × step_cost × slowdown`` simulated
seconds (plus ``--comm-s`` per update), where ``step_cost`` is the median of measured training steps on
this machine (``--step-cost`` pins it), ``slowdown`` is 1 for a normal site, ``--slowdown`` (4) for a
straggler (``--lognormal-sigma``: a spread instead), and each local round also draws a jitter
``exp(N(0, --jitter))`` from the site's own random stream (so a site's k-th local round costs the same in
every variant, and normal sites do not finish in lockstep). An event queue orders the sites' finishes;
the aggregator decides at the simulated time a message arrives (``offer(now=t)``,
``ready_to_close(now=t)``, so the round deadline is the core's own).
Training, evaluation and aggregation take no simulated time beyond that cost.

Every site behaves like ``site/agent.py``: it trains as soon as a global newer than the one it last
trained from is there, from the newest one, and otherwise waits for the next global. The variants differ
only in the aggregator's policy:

* ``sync-all``: synchronous FedAvg, a round closes when every site's update is in (quorum = all);
* ``sync-q``: synchronous, quorum = the non-straggling sites (6 of 8): the stragglers' updates arrive
  after their round closed and are dropped as late (``late_policy = "drop"``);
* ``fedbuff-k2``, ``fedbuff-k4``: ``round_mode = "fedbuff"``, a server step every K updates, each update
  discounted by ``1/sqrt(1+τ)`` (τ = steps behind), refused beyond ``--max-staleness``.

FedAvg server optimizer with ``--server-lr`` everywhere; fp32 updates (no compression to confound); the
lying-site bounds off, as in the experiment grid. A run stops at ``--horizon`` simulated time, or once it
has reached the highest target and passed the largest budget. Reported per variant: the first simulated
time the global reached each target, its accuracy at each budget, its time-weighted mean accuracy between
the smallest and the largest budget (one reading of 200 test documents is noisy), server steps, updates
counted / trained, updates dropped as late, and the staleness of the counted updates.

    python3 bench/fedbuff_experiment.py --out docs/results/fedbuff
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from fedpeft_edge.central.core import AggregatorConfig, AggregatorCore
from fedpeft_edge.faces.experiment.cell import evaluate, make_trainer
from fedpeft_edge.faces.tasks import (
    SplitConfig,
    TaskConfig,
    get_bundle,
    iterate,
    load_task,
    method_spec,
    partition_indices,
    take,
)
from fedpeft_edge.protocol.codec import CodecConfig, decode_global
from fedpeft_edge.protocol.wire import UpdateMessage
from fedpeft_edge.site.encoder import UpdateEncoder

FLEET = "fedbuff-sim"
VARIANT_KEYS = ("sync-all", "sync-q", "fedbuff-k2", "fedbuff-k4")


@dataclass
class Site:
    name: str
    slowdown: float
    num_train: int
    batches: Any
    encoder: UpdateEncoder
    state: Path
    rng: np.random.Generator  # the site's own draws of its cost jitter: its k-th local round costs the same
    # in every variant
    trained_from: int = -1  # the global it last trained from (the agent's last_sent_round)
    busy: bool = False
    busy_time: float = 0.0  # simulated seconds spent training
    trained: int = 0


@dataclass
class Run:
    key: str
    label: str
    evals: list[dict[str, Any]] = field(default_factory=list)  # one per server step (and t = 0)
    decisions: dict[str, int] = field(default_factory=dict)
    trained: int = 0
    stopped_at: float = 0.0
    stop_reason: str = ""
    real_seconds: float = 0.0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    site_busy: list[float] = field(default_factory=list)  # fraction of the run each site spent training
    site_updates: list[int] = field(default_factory=list)  # local rounds each site trained


def policy_for(
    key: str, args: argparse.Namespace, n_sites: int, n_slow: int, round_cost: float
) -> tuple[str, dict[str, Any]]:
    """The variant's label and its RoundPolicy keys."""
    if key == "sync-all":
        return (
            f"sync FedAvg, wait for all {n_sites}",
            {"quorum": n_sites, "min_clients": n_sites, "late_policy": "drop"},
        )
    if key == "sync-q":
        q = n_sites - n_slow
        # the deadline would close a round with q updates if a normal site were late; here none is
        return (
            f"sync FedAvg, quorum {q} of {n_sites} (stragglers dropped)",
            {"quorum": q, "min_clients": q, "round_deadline_s": 2.0 * round_cost, "late_policy": "drop"},
        )
    if key.startswith("fedbuff-k"):
        k = int(key[len("fedbuff-k") :])
        return (
            f"FedBuff K={k}",
            {"round_mode": "fedbuff", "buffer_k": k, "max_staleness": args.max_staleness},
        )
    raise SystemExit(f"unknown variant {key!r}; known: {', '.join(VARIANT_KEYS)} or fedbuff-k<K>")


def measure_step_cost(trainer: Any, batches: Any, initial_state: Path, steps: int) -> float:
    """Median seconds of one local training step here (after one warm-up step)."""
    trainer.load_state(initial_state)
    trainer.train(batches, max_steps=1)
    times = []
    for _ in range(steps):
        times.append(trainer.train(batches, max_steps=1).seconds)
    trainer.load_state(initial_state)
    return float(np.median(times))


def run_variant(
    key: str,
    task: Any,
    bundle: Any,
    trainer: Any,
    initial_state: Path,
    parts: list[np.ndarray],
    slowdowns: list[float],
    args: argparse.Namespace,
    step_cost: float,
    work: Path,
) -> Run:
    started = time.perf_counter()
    round_cost = args.local_steps * step_cost  # a normal site's local round, in simulated seconds
    n_slow = sum(1 for s in slowdowns if s > 1)
    label, policy = policy_for(key, args, len(parts), n_slow, round_cost)
    run = Run(key, label)
    trainer.load_state(initial_state)
    initial = trainer.get_flat()
    n = int(initial.size)
    cfg = AggregatorConfig(
        fleet=FLEET,
        n_params=n,
        spec_hash=bundle.spec_hash,
        server_optimizer="fedavg",
        server_opt_params={"lr": args.server_lr},
        max_rounds=None,
        norm_median_multiplier=0.0,
        norm_reject_multiplier=0.0,
        samples_median_multiplier=0.0,
        **policy,
    )
    core = AggregatorCore(cfg, work / f"agg-{key}", initial_global=initial, now=0.0)
    codec = CodecConfig(mode="fp32")
    sites = [
        Site(
            f"site-{i + 1}",
            slowdowns[i],
            int(idx.size),
            iterate(
                take(task.train_inputs, idx),
                task.train_labels[idx],
                args.batch_size,
                shuffle=True,
                seed=args.seed * 7919 + i,
            ),
            UpdateEncoder(codec, n, seed=args.seed * 1000 + i, segments=trainer.layout.segments),
            work / f"{key}-site{i}.state",
            np.random.default_rng([args.seed, 31, i]),
        )
        for i, idx in enumerate(parts)
    ]
    queue: list[tuple[float, int, int, UpdateMessage]] = []
    seq = 0

    def current_global() -> np.ndarray:
        return decode_global(core.global_message().vector, n)  # what a site receives

    def evaluate_global(t: float, metrics: dict[str, Any] | None) -> None:
        e0 = time.perf_counter()
        trainer.set_flat(current_global())
        acc, loss = evaluate(trainer, task.test_inputs, task.test_labels, args.eval_batch_size)
        run.eval_seconds += time.perf_counter() - e0
        rec = {"t": t, "round": core.round, "accuracy": acc, "loss": loss}
        if metrics is not None:
            rec.update(
                updates=metrics["num_updates"],
                participants=metrics["participants"],
                staleness=metrics.get("staleness", []),
                late_accepted=metrics["late_accepted"],
            )
        run.evals.append(rec)
        print(
            f"  [{key}] t={t:8.1f} s ({t / round_cost:5.2f} rounds of a normal site) step {core.round:3d}: "
            f"acc {acc:.3f}" + (f", {metrics['num_updates']} updates" if metrics else ""),
            flush=True,
        )

    def start(site: Site, t: float) -> None:
        nonlocal seq
        rnd, g = core.round, current_global()
        trainer.load_state(site.state if site.state.exists() else initial_state)  # its optimizer state
        trainer.set_flat(g)
        m = trainer.train(site.batches, max_steps=args.local_steps)
        run.train_seconds += m.seconds
        trainer.save_state(site.state)
        enc = site.encoder.encode(trainer.get_flat() - g)
        msg = UpdateMessage(
            FLEET,
            rnd,
            site.name,
            bundle.spec_hash,
            site.num_train,
            {"loss": float(m.loss), "steps": float(m.steps)},
            enc,
        )
        jitter = math.exp(args.jitter * float(site.rng.standard_normal())) if args.jitter > 0 else 1.0
        cost = m.steps * step_cost * site.slowdown * jitter + args.comm_s
        site.busy, site.trained_from = True, rnd
        site.busy_time += cost
        site.trained += 1
        run.trained += 1
        seq += 1
        heapq.heappush(queue, (t + cost, seq, sites.index(site), msg))

    def server_step(t: float) -> None:
        _, metrics = core.close_round(now=t)
        evaluate_global(t, metrics)
        for s in sites:  # every waiting site trains from the new global at once
            if not s.busy and s.trained_from < core.round:
                start(s, t)

    evaluate_global(0.0, None)
    for s in sites:
        start(s, 0.0)
    top, last_budget = max(args.targets), max(args.budgets) * round_cost
    t = 0.0
    while queue:
        deadline = math.inf
        if not cfg.fedbuff and core.accepted_this_round >= cfg.min_clients:
            deadline = core.round_started_at + cfg.round_deadline_s
        t_next = min(queue[0][0], deadline)
        if t_next > args.horizon * round_cost:
            run.stop_reason = "horizon"
            break
        if deadline <= queue[0][0] and core.ready_to_close(now=deadline):  # the core's own deadline rule
            t = deadline
            server_step(t)
            continue
        t = queue[0][0]
        _, _, i, msg = heapq.heappop(queue)
        site = sites[i]
        site.busy = False
        decision = core.offer(msg, sender=site.name, now=t)
        run.decisions[decision.status] = run.decisions.get(decision.status, 0) + 1
        if core.ready_to_close(now=t):
            server_step(t)
        if not site.busy and core.round > site.trained_from:
            start(site, t)
        if max(e["accuracy"] for e in run.evals) >= top and t >= last_budget:
            run.stop_reason = f"reached {top:.2f} and passed the {max(args.budgets):g}-round budget"
            break
    run.stopped_at = t
    run.real_seconds = time.perf_counter() - started
    run.site_busy = [min(1.0, s.busy_time / max(t, 1e-9)) for s in sites]
    run.site_updates = [s.trained for s in sites]
    return run


def summarise(run: Run, args: argparse.Namespace, round_cost: float) -> dict[str, Any]:
    evals = run.evals
    steps = evals[1:]

    def time_to(target: float) -> float | None:
        return next((e["t"] for e in evals if e["accuracy"] >= target), None)

    def acc_at(budget_rounds: float) -> float:
        tb = budget_rounds * round_cost
        return [e for e in evals if e["t"] <= tb][-1]["accuracy"]

    taus = [x for e in steps for x in e.get("staleness", [])]
    used = sum(e["updates"] for e in steps)
    return {
        "key": run.key,
        "label": run.label,
        "time_to": {f"{tg:.2f}": time_to(tg) for tg in args.targets},
        "acc_at": {f"{b:g}": acc_at(b) for b in args.budgets},
        "server_steps": len(steps),
        "updates_used": used,
        "updates_trained": run.trained,
        "decisions": run.decisions,
        "best_accuracy": max(e["accuracy"] for e in evals),
        "final_accuracy": evals[-1]["accuracy"],
        "stopped_at": run.stopped_at,
        "stop_reason": run.stop_reason,
        "staleness_mean": float(np.mean(taus)) if taus else 0.0,
        "staleness_max": max(taus, default=0),
        "site_busy_fraction": run.site_busy,
        "site_updates": run.site_updates,
        "real_seconds": run.real_seconds,
        "train_seconds": run.train_seconds,
        "eval_seconds": run.eval_seconds,
        "evals": evals,
    }


def window_mean(s: dict[str, Any], start: float, end: float) -> float:
    """Time-weighted mean accuracy of the newest global over ``[start, end]`` simulated seconds (what a
    site picking up the global at a random moment of that window would get); less noisy than one reading."""
    evals, total, acc = s["evals"], 0.0, 0.0
    for e, nxt in zip(evals, [*evals[1:], None], strict=True):
        lo, hi = max(e["t"], start), min(nxt["t"] if nxt else s["stopped_at"], end)
        if hi > lo:
            total += hi - lo
            acc += (hi - lo) * e["accuracy"]
    return acc / total if total > 0 else math.nan


def markdown(
    summaries: list[dict[str, Any]], targets: list[float], budgets: list[float], round_cost: float
) -> str:
    def fmt_t(v: float | None) -> str:
        return "not reached" if v is None else f"{v:.0f} s ({v / round_cost:.1f})"

    a, b = min(budgets), max(budgets)
    head = (
        ["variant"]
        + [f"time to {tg:.2f}" for tg in targets]
        + [f"acc. at {x:g} rounds ({x * round_cost:.0f} s)" for x in budgets]
        + [f"mean acc. {a:g}-{b:g} rounds", "server steps", "updates used / trained", "late (dropped)"]
        + ["staleness mean / max"]
    )
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for s in summaries:
        horizon_steps = [e for e in s["evals"][1:] if e["t"] <= s["stopped_at"]]
        cells = (
            [s["label"]]
            + [fmt_t(s["time_to"][f"{tg:.2f}"]) for tg in targets]
            + [f"{s['acc_at'][f'{x:g}']:.3f}" for x in budgets]
            + [
                f"{window_mean(s, a * round_cost, b * round_cost):.3f}",
                str(len(horizon_steps)),
                f"{s['updates_used']} / {s['updates_trained']}",
                str(s["decisions"].get("late", 0)),
                f"{s['staleness_mean']:.1f} / {s['staleness_max']}",
            ]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(
    summaries: list[dict[str, Any]], targets: list[float], title: str, round_cost: float, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=110)
    try:
        for s in summaries:
            xs = [e["t"] / round_cost for e in s["evals"]] + [s["stopped_at"] / round_cost]
            ys = [e["accuracy"] for e in s["evals"]] + [s["evals"][-1]["accuracy"]]
            ax.plot(xs, ys, drawstyle="steps-post", label=s["label"])
        for tg in targets:
            ax.axhline(tg, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel(f"simulated time, in local rounds of a normal site ({round_cost:.1f} s each)")
        ax.set_ylabel("global test accuracy")
        ax.set_ylim(max(0.0, min(min(e["accuracy"] for e in s["evals"][1:]) for s in summaries) - 0.05), 1.0)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--variants", default=",".join(VARIANT_KEYS), help="comma-separated: sync-all, sync-q, fedbuff-k<K>"
    )
    ap.add_argument("--sites", type=int, default=8)
    ap.add_argument("--slow", type=int, default=2, help="stragglers (the last sites)")
    ap.add_argument("--slowdown", type=float, default=4.0, help="a straggler's local round costs this many x")
    ap.add_argument(
        "--lognormal-sigma",
        type=float,
        default=0.0,
        help="> 0: every site's slowdown is exp(N(0, sigma)) relative to the fastest instead",
    )
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--train-size", type=int, default=800)
    ap.add_argument("--test-size", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the label split")
    ap.add_argument("--lr", type=float, default=3e-3, help="the sites' AdamW learning rate")
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--max-staleness", type=int, default=16, help="FedBuff: refuse updates further behind")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.85, 0.90])
    ap.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[6.0, 12.0],
        help="fixed time budgets, in local rounds of a normal site",
    )
    ap.add_argument("--horizon", type=float, default=24.0, help="stop here, in local rounds of a normal site")
    ap.add_argument(
        "--step-cost",
        type=float,
        default=None,
        help="simulated seconds per local step (default: the median of measured steps here)",
    )
    ap.add_argument(
        "--jitter",
        type=float,
        default=0.1,
        help="each local round's cost is multiplied by exp(N(0, jitter)) (0: every normal site in lockstep)",
    )
    ap.add_argument("--comm-s", type=float, default=0.0, help="simulated seconds added per update")
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("reports/fedbuff"))
    ap.add_argument("--from-json", type=Path, help="only redo results.md and the plot from this results.json")
    args = ap.parse_args(argv)
    if args.from_json is not None:
        return render(args.out, json.loads(args.from_json.read_text()), f"--out {args.out}")
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    started = time.perf_counter()
    task = load_task(
        TaskConfig(
            kind="text",
            dataset="reuters_r8",
            train_size=args.train_size,
            test_size=args.test_size,
            max_len=args.max_len,
            seed=args.seed,
        )
    )
    spec = method_spec("lora", "text", task.num_classes)
    bundle = get_bundle(task.prepared, spec, log=print)
    trainer = make_trainer(bundle, threads=args.threads, lr=args.lr)
    parts = partition_indices(
        task.train_labels, task.train_groups, SplitConfig("dirichlet", args.alpha), args.sites, seed=args.seed
    )
    if args.lognormal_sigma > 0:
        raw = np.exp(np.random.default_rng(args.seed + 17).normal(0.0, args.lognormal_sigma, args.sites))
        slowdowns = [float(x) for x in raw / raw.min()]
    else:
        slowdowns = [1.0] * (args.sites - args.slow) + [args.slowdown] * args.slow
    args.slowdowns_used = slowdowns
    classes = [np.bincount(task.train_labels[p], minlength=task.num_classes).tolist() for p in parts]
    print(
        f"{args.sites} sites, training documents {[int(p.size) for p in parts]}, slowdowns "
        f"{[round(s, 2) for s in slowdowns]}",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    summaries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedbuff-") as tmp:
        work = Path(tmp)
        initial_state = work / "initial.state"
        trainer.save_state(initial_state)
        step_cost = args.step_cost
        if step_cost is None:
            calib = iterate(
                task.train_inputs, task.train_labels, args.batch_size, shuffle=True, seed=args.seed
            )
            step_cost = measure_step_cost(trainer, calib, initial_state, 8)
        round_cost = args.local_steps * step_cost
        print(
            f"step cost {step_cost:.3f} s: a normal site's local round = {round_cost:.2f} simulated s",
            flush=True,
        )
        for key in keys:
            print(f"variant {key}", flush=True)
            run = run_variant(
                key, task, bundle, trainer, initial_state, parts, slowdowns, args, step_cost, work
            )
            summaries.append(summarise(run, args, round_cost))
            s = summaries[-1]
            print(
                f"  [{key}] {s['label']}: time to {s['time_to']}, acc at {s['acc_at']}, "
                f"{s['server_steps']} steps, {s['updates_used']}/{s['updates_trained']} updates, "
                f"{s['decisions']}, {s['real_seconds']:.0f} s real",
                flush=True,
            )
            (args.out / "results.json").write_text(
                json.dumps(
                    {
                        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                        "step_cost_s": step_cost,
                        "round_cost_s": round_cost,
                        "site_train_docs": [int(p.size) for p in parts],
                        "site_classes": classes,
                        "slowdowns": slowdowns,
                        "results": summaries,
                        "seconds": time.perf_counter() - started,
                    },
                    indent=1,
                )
            )
    return render(args.out, json.loads((args.out / "results.json").read_text()), " ".join(sys.argv[1:]))


def render(out: Path, data: dict[str, Any], command: str) -> int:
    """results.md and accuracy_vs_time.png from a results.json (``--from-json``: without training)."""
    a, summaries, round_cost = data["args"], data["results"], data["round_cost_s"]
    slow = data["slowdowns"]
    title = (
        f"{len(slow)} sites (" + ", ".join(f"{x:.2g}" for x in slow) + "x a normal site's time): "
        "accuracy of the newest global"
    )
    table = markdown(summaries, a["targets"], a["budgets"], round_cost)
    plot(summaries, a["targets"], title, round_cost, out / "accuracy_vs_time.png")
    (out / "results.md").write_text(
        f"# FedBuff against synchronous rounds, with stragglers (simulated clock)\n\n"
        f"`python3 bench/fedbuff_experiment.py {command}`\n\n"
        f"Step cost {data['step_cost_s']:.3f} s (a normal site's local round {round_cost:.2f} s); times as "
        f"simulated seconds (in local rounds of a normal site). Slowdowns {slow}; training documents per "
        f"site {data['site_train_docs']}.\n\n{table}\n"
        f"Total {data['seconds']:.0f} s of real time.\n"
    )
    print(table)
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
