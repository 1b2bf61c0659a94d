"""Running a grid: every cell in turn, partial results on disk, the summary; and the CLI entry point."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedpeft_edge.faces import report as rep
from fedpeft_edge.faces.experiment.cell import CellResult, make_trainer, run_cell
from fedpeft_edge.faces.experiment.config import ExperimentConfig
from fedpeft_edge.faces.experiment.results import write_experiment_report
from fedpeft_edge.faces.tasks import PeakRss, get_bundle, load_task, method_spec
from fedpeft_edge.runtime.errors import FedPeftError, ensure


def run_experiment(
    config: ExperimentConfig,
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every cell of the grid; write ``results.json``, ``results.md`` and plots into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = config.settings
    os.environ.setdefault("OMP_NUM_THREADS", str(s.threads))
    started = time.perf_counter()
    results: list[CellResult] = []
    failures: list[dict[str, str]] = []
    cells = config.cells()
    log(
        f"experiment {config.name!r}: {len(cells)} cells"
        f"{f' x {len(config.variants)} variants' if config.variants else ''}, "
        f"{s.clients} sites x {s.rounds} rounds x "
        f"{s.local_steps} local steps"
    )
    work_root = Path(tempfile.mkdtemp(prefix="fedpeft-exp-"))
    try:
        with PeakRss() as peak:
            for task_name, task_cfg in config.tasks.items():
                log(
                    f"task {task_name}: {task_cfg.kind} / {task_cfg.dataset} "
                    f"(train {task_cfg.train_size}, test {task_cfg.test_size})"
                )
                task = load_task(task_cfg, cache_dir=cache_dir)
                for method in config.methods:
                    method_cells = [c for c in cells if c[0] == task_name and c[1] == method]
                    if not method_cells:
                        continue
                    try:
                        spec = method_spec(
                            method, task.kind, task.num_classes, config.spec_overrides[task_name][method]
                        )
                        bundle = get_bundle(task.prepared, spec, cache_dir, log=log)
                        trainer = make_trainer(bundle, threads=s.threads, lr=config.lr_for(task_name, method))
                    except FedPeftError as exc:
                        for c in method_cells:
                            failures.append({"cell": cell_name(c[0], c[1], c[2].label, c[3], c[4]),
                                             "error": str(exc)})
                        log(f"  {task_name}/{method}: cannot set up: {exc}")
                        continue
                    work = work_root / f"{task_name}-{method}"
                    work.mkdir()
                    initial_state = work / "initial.state"
                    trainer.save_state(initial_state)
                    # every cell once per [variants.<label>] (site_speed, aggregation, ...), or once
                    runs = [(c, variant, run_config) for c in method_cells
                            for variant, run_config in config.runs()]
                    for (_, _, split, compression, prox_mu), variant, run_config in runs:
                        prox = f" / prox {prox_mu:g}" if prox_mu else ""
                        shown = f" / {variant}" if variant else ""
                        log(f"  cell {task_name} / {method} / {split.label} / {compression}{prox}{shown}")
                        try:
                            result = run_cell(
                                task,
                                task_name,
                                bundle,
                                method,
                                split,
                                compression,
                                run_config,
                                trainer=trainer,
                                initial_state=initial_state,
                                work_dir=work,
                                peak=peak,
                                log=log,
                                prox_mu=prox_mu,
                            )
                        except FedPeftError as exc:
                            failures.append(
                                {
                                    "cell": cell_name(task_name, method, split.label, compression, prox_mu)
                                    + (f"/{variant}" if variant else ""),
                                    "error": str(exc),
                                }
                            )
                            log(f"    failed: {exc}")
                            continue
                        result.variant = variant
                        results.append(result)
                        # a long grid leaves its finished cells on disk even if it is stopped
                        rep.write_json(
                            out_dir / "results.partial.json",
                            _summary(config, results, failures, time.perf_counter() - started),
                        )
                        log(
                            f"    -> global {result.global_accuracy:.3f}, personalised mean "
                            f"{result.personalised_mean:.3f} / worst {result.personalised_worst:.3f}, "
                            f"{rep.human_bytes(result.bytes_up_per_client_update)} per update, "
                            f"{result.step_ms:.0f} ms/step ({result.seconds:.1f} s)"
                        )
                    del trainer
                    shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    summary = _summary(config, results, failures, time.perf_counter() - started)
    write_experiment_report(summary, out_dir)
    (out_dir / "results.partial.json").unlink(missing_ok=True)
    log(
        f"wrote {out_dir / 'results.md'} ({len(results)} cells, {len(failures)} failed, "
        f"{summary['seconds']:.0f} s)"
    )
    return summary


def _summary(
    config: ExperimentConfig, results: list[CellResult], failures: list[dict[str, str]], seconds: float
) -> dict[str, Any]:
    return {
        "name": config.name,
        "settings": asdict(config.settings),
        "tasks": {k: asdict(v) for k, v in config.tasks.items()},
        "grid": {
            "methods": list(config.methods),
            "splits": [s_.label for s_ in config.splits],
            "compressions": list(config.compressions),
            "prox_mus": list(config.prox_mus),
        },
        "variants": {label: asdict(vs) for label, vs in config.variants},
        "cells": [r.to_dict() for r in results],
        "failures": failures,
        "seconds": seconds,
    }


def cell_name(task: str, method: str, split: str, compression: str, prox_mu: float) -> str:
    """A cell's name in failures and logs; the FedProx axis is named only where it is not 0."""
    return f"{task}/{method}/{split}/{compression}" + (f"/prox {prox_mu:g}" if prox_mu else "")


def merge_summaries(parts: Sequence[Mapping[str, Any]], name: str) -> dict[str, Any]:
    """One summary from runs of the same grid split by task (e.g. run in parallel processes)."""
    ensure(len(parts) > 0, "nothing to merge")
    merged = dict(parts[0])
    merged["name"] = name
    merged["tasks"] = {k: v for p in parts for k, v in p["tasks"].items()}
    merged["cells"] = [c for p in parts for c in p["cells"]]
    merged["failures"] = [f for p in parts for f in p["failures"]]
    merged["seconds"] = max(p["seconds"] for p in parts)
    return merged


def main_experiment(
    config_path: Path,
    out_dir: Path | None = None,
    *,
    cache_dir: Path | None = None,
    threads: int | None = None,
    tasks: Sequence[str] | None = None,
    compressions: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
) -> dict[str, Any]:
    config = ExperimentConfig.load(config_path)
    if threads is not None:
        config = _with_threads(config, threads)
    if tasks:
        unknown = sorted(set(tasks) - set(config.tasks))
        ensure(not unknown, f"--tasks {unknown} not in the config's grid ({', '.join(config.tasks)})")
        config = dataclasses.replace(config, tasks={t: config.tasks[t] for t in config.tasks if t in tasks})
    if compressions:  # a grid run in parts (e.g. over two processes or two sittings)
        unknown = sorted(set(compressions) - set(config.compressions))
        ensure(not unknown, f"--compressions {unknown} not in the grid ({', '.join(config.compressions)})")
        kept = tuple(c for c in config.compressions if c in compressions)
        config = dataclasses.replace(config, compressions=kept)
    if variants:
        labels = [label for label, _ in config.variants]
        unknown = sorted(set(variants) - set(labels))
        ensure(not unknown, f"--variants {unknown} not in the config ({', '.join(labels) or 'none'})")
        config = dataclasses.replace(config, variants=tuple(v for v in config.variants if v[0] in variants))
    target = out_dir or config.out_dir or Path("reports") / f"experiment-{config.name}"
    with contextlib.suppress(OSError):
        Path(target).mkdir(parents=True, exist_ok=True)
    return run_experiment(config, Path(target), cache_dir=cache_dir)


def _with_threads(config: ExperimentConfig, threads: int) -> ExperimentConfig:
    return dataclasses.replace(config, settings=dataclasses.replace(config.settings, threads=int(threads)))
