"""The demo run: central preparation, the local fleet followed live, then evaluation and the report."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.faces.demo.fleet import LocalFleet, write_shards
from fedpeft_edge.faces.demo.options import DemoOptions
from fedpeft_edge.faces.demo.progress import Progress, live_status, new_lines, round_line, say
from fedpeft_edge.faces.demo.summary import (
    build_summary,
    evaluator_accuracy,
    full_model_params,
    print_final_table,
    site_entries,
    write_demo_report,
)
from fedpeft_edge.faces.tasks import (
    SplitConfig,
    TaskConfig,
    TaskData,
    get_bundle,
    get_gradient_model,
    load_task,
    method_spec,
    split_sites,
)
from fedpeft_edge.site.rank_cut import RankCut


@dataclass
class Prepared:
    """What central preparation hands over: the task, the bundle, the sites' shards, the evaluator."""

    task: TaskData
    bundle: Any
    gradient_dir: Path | None  # the lowered bundle the agents train on (backend "gradient"), else None
    shards: list[Any]
    shard_paths: list[Path]
    evaluator: Any
    initial: np.ndarray
    full_params: int
    seconds: float

    @property
    def n_params(self) -> int:
        return int(self.initial.size)


@dataclass
class Observed:
    """What this process saw while the fleet ran."""

    rounds: list[dict[str, Any]] = field(default_factory=list)  # the aggregator's metrics lines
    acc_per_round: dict[int, float | None] = field(default_factory=dict)  # global test accuracy
    site_before: dict[int, float | None] = field(default_factory=dict)  # sites' accuracy of the initial


def _cut_finals(opts: DemoOptions, layout: Any, final: np.ndarray) -> dict[int, np.ndarray]:
    """The final global cut to each site's LoRA rank (``--ranks``): what a site below the rank runs."""
    out: dict[int, np.ndarray] = {}
    for site, rank in enumerate(opts.site_ranks()):
        cut = RankCut.for_layout(layout, rank)
        if cut is not None:
            out[site] = cut.start_from(final)
    return out

def prepare(opts: DemoOptions, work: Path, log: Callable[[str], None]) -> Prepared:
    """Model, artifacts and data (cached), each site's shard file, and the initial global on disk."""
    t0 = time.perf_counter()
    kind = "text" if opts.task == "text" else "image"
    task_cfg = TaskConfig(
        kind=kind,
        dataset=opts.dataset,
        train_size=opts.train_size,  # type: ignore[arg-type]
        test_size=opts.test_size,
        max_len=opts.max_len or 64,  # type: ignore[arg-type]
        image_size=opts.image_size or 32,
        seed=opts.seed,
    )
    log("preparing model, artifacts and data (cached after the first run) ...")
    task = load_task(task_cfg, cache_dir=opts.cache_dir)
    spec = method_spec(opts.method, kind, task.num_classes)  # type: ignore[arg-type]
    bundle = get_bundle(task.prepared, spec, opts.cache_dir, log=log)
    split = SplitConfig.parse(opts.split)  # type: ignore[arg-type]
    shards = split_sites(task, split, opts.agents, seed=opts.seed)  # type: ignore[arg-type]
    shard_paths = write_shards(task, shards, work / "sites")
    evaluator: Any
    gradient_dir = None
    if opts.backend == "gradient":  # the evaluator uses the agents' backend too
        from fedpeft_edge.training.gradient_trainer import GradientTrainer

        model = get_gradient_model(bundle, opts.cache_dir, log=log)
        gradient_dir = Path(model.directory)
        evaluator = GradientTrainer(model, threads=2, lr=float(opts.lr))  # type: ignore[arg-type]
    else:
        from fedpeft_edge.training.ort_trainer import OrtTrainer

        evaluator = OrtTrainer(bundle, threads=2, lr=float(opts.lr))  # type: ignore[arg-type]
    initial = evaluator.get_flat()
    np.save(work / "initial.npy", initial, allow_pickle=False)
    prep = Prepared(task, bundle, gradient_dir, shards, shard_paths, evaluator, initial,
                    full_model_params(task), time.perf_counter() - t0)
    log(
        f"  {prep.n_params:,} trainable parameters ({100 * prep.n_params / prep.full_params:.2f} % of "
        f"{prep.full_params:,}); sites hold {[s.num_train for s in shards]} training samples; "
        f"ready in {prep.seconds:.1f} s"
    )
    return prep


def follow(fleet: LocalFleet, prep: Prepared, opts: DemoOptions, seen: Observed) -> str:
    """Follow the rounds until the aggregator is done; returns the failure ("" when all went well).

    While the sites train, this process evaluates each published global on the global test set (one
    evaluation per loop turn, so the display keeps moving) and the sites' starting accuracy.
    """
    collector = fleet.collector
    assert collector is not None
    failure = ""
    deadline = time.monotonic() + opts.timeout_s
    with Progress(opts.rounds, opts.plain) as progress:

        def read_metrics() -> None:
            for line in new_lines(fleet.metrics_path, len(seen.rounds)):
                seen.rounds.append(line)
                progress.advance(len(seen.rounds))
                progress.line(round_line(line, opts.rounds, opts.agents, prep.full_params))

        while True:
            collector.poll()
            read_metrics()
            pending = [r for r in sorted(collector.globals) if r not in seen.acc_per_round]
            if pending:
                seen.acc_per_round[pending[0]] = evaluator_accuracy(
                    prep.evaluator, prep.task, collector.globals[pending[0]], None
                )
            elif len(seen.site_before) < len(prep.shards):
                site = len(seen.site_before)
                seen.site_before[site] = evaluator_accuracy(
                    prep.evaluator, prep.task, prep.initial, prep.shards[site]
                )
            agg = fleet.aggregator
            if not agg.alive():
                read_metrics()  # it may have written its last metrics line just before exiting
                if agg.popen.returncode == 0 and len(seen.rounds) >= opts.rounds:
                    break
                failure = f"aggregator exited with code {agg.popen.returncode}:\n{agg.tail()}"
                break
            dead = [p for p in fleet.agents if not p.alive() and p.popen.returncode != 0]
            if dead:
                failure = f"{dead[0].name} exited with code {dead[0].popen.returncode}:\n{dead[0].tail()}"
                break
            if time.monotonic() > deadline:
                failure = f"the demo did not finish within {opts.timeout_s:.0f} s"
                break
            progress.status(live_status(len(seen.rounds), fleet.sent_so_far()))
            time.sleep(0.5)
        # agents leave once they saw the final global; give them a moment to say goodbye
        end = time.monotonic() + 60
        while any(p.alive() for p in fleet.agents) and time.monotonic() < end and not failure:
            collector.poll()
            time.sleep(0.2)
        collector.poll()
    return failure


def run_demo(options: DemoOptions, *, log: Callable[[str], None] = say) -> dict[str, Any]:
    """Run the whole demo; returns the report summary (also written to ``<out>/report.json``)."""
    opts = options.resolved()
    if not sys.stdout.isatty():  # logs and pipes get plain lines and Markdown tables, not live widgets
        opts = dataclasses.replace(opts, plain=True)
    started = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(opts.out) if opts.out else Path("reports") / f"demo-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    own_work = opts.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="fedpeft-demo-")) if own_work else Path(opts.work_dir)  # type: ignore[arg-type]
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    log(
        f"fedpeft-edge demo: {opts.agents} agents, {opts.rounds} rounds, {opts.method} on "
        f"{'MiniLM-L6' if opts.task == 'text' else 'EfficientNet-Lite0'} / {opts.dataset}"
        f"{' (quick mode)' if opts.quick else ''}"
    )

    # 1. central preparation; 2. broker and services; 3. follow the rounds
    prep = prepare(opts, work, log)
    fleet = LocalFleet(opts, work, spec_hash=prep.bundle.spec_hash, bundle_dir=Path(prep.bundle.directory),
                       gradient_dir=prep.gradient_dir, shard_paths=prep.shard_paths, n_params=prep.n_params,
                       log=log)
    seen = Observed()
    console = None
    try:
        if opts.console:  # before the services, so it sees every site arrive
            from fedpeft_edge.faces.demo.console import start_demo_console

            console = start_demo_console(opts, fleet.connection, work, log)
        fleet.start()
        log(f"started the aggregator and {opts.agents} agents (logs in {work})")
        failure = follow(fleet, prep, opts, seen)
        if console is not None and sys.stdin.isatty():
            log(f"the federation is over; the console stays at {console.url} until you press Enter")
            with contextlib.suppress(EOFError, KeyboardInterrupt):
                input()
    finally:
        if console is not None:
            console.stop()
        fleet.close()
    ok = not failure
    if failure:
        log(f"demo FAILED: {failure}")
    fed_seconds = time.perf_counter() - started - prep.seconds

    # 4. evaluation and report
    globals_by_round = dict(fleet.collector.globals) if fleet.collector is not None else {}
    globals_by_round.setdefault(0, prep.initial)
    log("evaluating the final global adapter on the global test set and on each site's own test data ...")
    for rnd in sorted(globals_by_round):
        if rnd not in seen.acc_per_round:
            seen.acc_per_round[rnd] = evaluator_accuracy(
                prep.evaluator, prep.task, globals_by_round[rnd], None
            )
    final = globals_by_round[max(globals_by_round)]
    sites = site_entries(prep.task, prep.shards, fleet.agent_dirs, prep.evaluator, prep.initial, final,
                         seen.site_before, site_finals=_cut_finals(opts, prep.evaluator.layout, final))
    summary = build_summary(
        opts,
        prep.task,
        prep.bundle,
        prep.n_params,
        prep.full_params,
        seen.rounds,
        seen.acc_per_round,  # type: ignore[arg-type]
        sites,
        ok=ok,
        failure=failure,
        prep_seconds=prep.seconds,
        fed_seconds=fed_seconds,
        total_seconds=time.perf_counter() - started,
    )
    write_demo_report(summary, out_dir)
    print_final_table(summary, opts.plain)
    log(f"report: {out_dir / 'report.md'}  (total {summary['timing']['total_seconds']:.0f} s)")
    if own_work and ok:
        shutil.rmtree(work, ignore_errors=True)
    elif not ok:
        log(f"service logs kept in {work}")
    return summary
