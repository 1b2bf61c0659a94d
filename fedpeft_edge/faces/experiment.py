"""``fedpeft-edge experiment``: the PEFT × split × compression × task grid, in one process.

Each cell runs a whole federation in-process (no broker, for speed) with the very codec and aggregation
code the services use: every site trains its adapter locally from the current global, encodes the delta
with its own :class:`~fedpeft_edge.protocol.codec.UpdateEncoder` (error-feedback residual kept per site
across rounds), the server accumulates the encoded updates weighted by sample count and applies its
strategy. Measured per cell: global accuracy per round, per-site accuracy of the global model and after
local personalisation (a few local steps from the global adapter, tested on the site's own held-out data),
bytes up per round (the codec's exact payload accounting), client step time and peak RSS.

Artifacts are generated once per (task, method) and shared by all cells; one trainer serves all sites of
a cell, each site's adapter and optimizer state being swapped in and out through ``save_state`` /
``load_state`` (exactly what a long-running agent keeps between rounds).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.faces import report as rep
from fedpeft_edge.faces.tasks import (
    PeakRss,
    SplitConfig,
    TaskConfig,
    TaskData,
    get_bundle,
    iterate,
    load_task,
    method_spec,
    split_sites,
    take,
)
from fedpeft_edge.runtime.errors import FedPeftError, InvalidValueError, ensure

MINILM_PARAMS = 22_713_216  # all-MiniLM-L6-v2 parameter count (embeddings + 6 layers), for fp32 comparisons
COMPRESSIONS = {
    "fp32": {"mode": "fp32"},
    "int8": {"mode": "int8"},
    "topk_int8": {"mode": "topk_int8", "topk_ratio": 0.01},
    "topk_fp32": {"mode": "topk_fp32", "topk_ratio": 0.01},
    "topk10_int8": {"mode": "topk_int8", "topk_ratio": 0.1},
}


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FederationSettings:
    """How each federation of the grid runs (the same for every cell)."""

    rounds: int = 3
    clients: int = 4
    local_steps: int = 5
    batch_size: int = 16
    eval_batch_size: int = 64
    personalise_steps: int = 3
    local_test_fraction: float = 0.25
    threads: int = 1
    seed: int = 0
    strategy: str = "fedavg"
    server_lr: float = 1.0
    eval_every_round: bool = True

    def __post_init__(self) -> None:
        for name in ("rounds", "clients", "local_steps", "batch_size", "eval_batch_size", "threads"):
            value = getattr(self, name)
            ensure(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"experiment.{name} must be a positive integer, got {value!r}",
            )
        ensure(
            isinstance(self.personalise_steps, int) and self.personalise_steps >= 0,
            f"experiment.personalise_steps must be >= 0, got {self.personalise_steps!r}",
        )


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    settings: FederationSettings
    tasks: dict[str, TaskConfig]
    methods: tuple[str, ...]
    splits: tuple[SplitConfig, ...]
    compressions: tuple[str, ...]
    lr: dict[str, dict[str, float]]  # task -> method -> lr ("*" = default)
    spec_overrides: dict[str, dict[str, dict[str, Any]]]  # task -> method -> spec keys
    compression_overrides: dict[str, dict[str, Any]]
    skip_cells: tuple[str, ...] = ()  # "task/method" pairs known to be infeasible (e.g. full on text)
    out_dir: Path | None = None

    @classmethod
    def load(cls, path: Path) -> ExperimentConfig:
        try:
            import tomllib
        except ImportError:  # pragma: no cover - Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        path = Path(path)
        ensure(path.is_file(), f"experiment config not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise InvalidValueError(f"{path}: not valid TOML: {exc}") from exc
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        known_top = {"experiment", "grid", "tasks", "methods", "compression"}
        unknown = sorted(set(data) - known_top)
        ensure(not unknown, f"unknown experiment config tables: {', '.join(unknown)}")
        exp = dict(data.get("experiment", {}))
        name = str(exp.pop("name", "experiment"))
        out_dir = exp.pop("out_dir", None)
        settings = FederationSettings(**_only_known(FederationSettings, exp, "experiment"))
        grid = dict(data.get("grid", {}))
        task_names = tuple(grid.pop("tasks", ["text"]))
        methods = tuple(grid.pop("methods", ["lora"]))
        splits = tuple(SplitConfig.parse(s) for s in grid.pop("splits", ["iid"]))
        compressions = tuple(grid.pop("compressions", ["fp32"]))
        skip = tuple(grid.pop("skip", []))
        ensure(not grid, f"unknown [grid] keys: {', '.join(sorted(grid))}")
        for c in compressions:
            ensure(c in COMPRESSIONS, f"unknown compression {c!r}; known: {', '.join(COMPRESSIONS)}")
        ensure(task_names and methods and splits and compressions, "every grid axis needs at least one value")
        tasks: dict[str, TaskConfig] = {}
        lr: dict[str, dict[str, float]] = {}
        overrides: dict[str, dict[str, dict[str, Any]]] = {}
        task_tables = data.get("tasks", {})
        method_tables = data.get("methods", {})
        for t in task_names:
            ensure(t in task_tables, f"grid task {t!r} has no [tasks.{t}] table")
            table = dict(task_tables[t])
            lr[t] = {"*": float(table.pop("lr", 3e-3))}
            per_method_lr = table.pop("method_lr", {})
            for m, value in per_method_lr.items():
                lr[t][m] = float(value)
            tasks[t] = TaskConfig.from_mapping(table)
            overrides[t] = {}
            for m in methods:
                spec_keys = dict(method_tables.get(m, {}))
                spec_keys.update(dict(method_tables.get(f"{m}.{tasks[t].kind}", {})))
                overrides[t][m] = spec_keys
        comp_over = {k: dict(v) for k, v in data.get("compression", {}).items()}
        return cls(
            name=name,
            settings=settings,
            tasks=tasks,
            methods=methods,
            splits=splits,
            compressions=compressions,
            lr=lr,
            spec_overrides=overrides,
            compression_overrides=comp_over,
            skip_cells=skip,
            out_dir=Path(out_dir) if out_dir else None,
        )

    def lr_for(self, task: str, method: str) -> float:
        return self.lr[task].get(method, self.lr[task]["*"])

    def codec_config(self, compression: str) -> Any:
        from fedpeft_edge.protocol.codec import CodecConfig

        params = dict(COMPRESSIONS[compression])
        params.update(self.compression_overrides.get(compression, {}))
        return CodecConfig(**params)

    def cells(self) -> list[tuple[str, str, SplitConfig, str]]:
        out = []
        for t, m in itertools.product(self.tasks, self.methods):
            if f"{t}/{m}" in self.skip_cells:
                continue
            for s, c in itertools.product(self.splits, self.compressions):
                out.append((t, m, s, c))
        return out


def _only_known(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    ensure(not unknown, f"unknown [{what}] keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return dict(data)


# ---------------------------------------------------------------------------------------- federation


@dataclass
class CellResult:
    task: str
    method: str
    split: str
    compression: str
    trainable_params: int
    rounds: int
    clients: int
    initial_accuracy: float
    global_accuracy: float
    accuracy_per_round: list[float]
    loss_per_round: list[float]
    site_accuracy_global: list[float]
    site_accuracy_personalised: list[float]
    bytes_up_per_round: float
    bytes_up_per_client_update: float
    dense_fp32_bytes: int
    full_model_fp32_bytes: int
    step_ms: float
    peak_rss_mb: float
    seconds: float
    lr: float
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.method}/{self.split}/{self.compression}"

    @property
    def personalised_mean(self) -> float:
        sites = self.site_accuracy_personalised
        return float(np.mean(sites)) if sites else math.nan

    @property
    def personalised_worst(self) -> float:
        return float(np.min(self.site_accuracy_personalised)) if self.site_accuracy_personalised else math.nan

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["personalised_mean"] = self.personalised_mean
        d["personalised_worst"] = self.personalised_worst
        d["bytes_ratio_vs_full_fp32"] = self.bytes_up_per_client_update / max(1, self.full_model_fp32_bytes)
        return d


def make_trainer(bundle: Any, *, threads: int, lr: float) -> Any:
    from fedpeft_edge.training.ort_trainer import OrtTrainer

    return OrtTrainer(bundle, threads=threads, lr=lr)


def evaluate(
    trainer: Any, inputs: Mapping[str, np.ndarray], labels: np.ndarray, batch_size: int
) -> tuple[float, float]:
    """(accuracy, loss) of the trainer's current parameters."""
    if labels.size == 0:
        return math.nan, math.nan
    metrics = trainer.evaluate(iterate(inputs, labels, batch_size, shuffle=False))
    return float(metrics.accuracy), float(metrics.loss)


class ServerAggregation:
    """The aggregator's maths, via the same accumulator and server optimizer as the MQTT aggregator."""

    def __init__(self, initial: np.ndarray, strategy: str, server_lr: float) -> None:
        from fedpeft_edge.central.accumulator import RoundAccumulator
        from fedpeft_edge.central.strategy import make_server_optimizer

        self.n = int(initial.size)
        self.global_flat = initial.astype(np.float32, copy=True)
        self.optimizer = make_server_optimizer(strategy, self.n, lr=server_lr)
        self.accumulator = RoundAccumulator(self.n)

    def begin_round(self) -> None:
        self.accumulator.reset()

    def add(self, encoded: Any, weight: float) -> None:
        self.accumulator.accumulate(encoded, weight)

    def end_round(self) -> np.ndarray:
        self.global_flat = self.optimizer.step(self.global_flat, self.accumulator.mean())
        return self.global_flat


def run_cell(
    task: TaskData,
    task_name: str,
    bundle: Any,
    method: str,
    split: SplitConfig,
    compression: str,
    config: ExperimentConfig,
    *,
    trainer: Any,
    initial_state: Path,
    work_dir: Path,
    peak: PeakRss,
    log: Callable[[str], None] = print,
) -> CellResult:
    """One federation: ``rounds`` rounds over ``clients`` sites, then personalisation per site."""
    from fedpeft_edge.site.encoder import UpdateEncoder

    s = config.settings
    started = time.perf_counter()
    peak.reset()
    shards = split_sites(task, split, s.clients, seed=s.seed, local_test_fraction=s.local_test_fraction)
    trainer.load_state(initial_state)
    initial = trainer.get_flat()
    n = int(initial.size)
    codec = config.codec_config(compression)
    encoders = [UpdateEncoder(codec, n, seed=s.seed * 1000 + i) for i in range(s.clients)]
    server = ServerAggregation(initial, s.strategy, s.server_lr)
    init_acc, _ = evaluate(trainer, task.test_inputs, task.test_labels, s.eval_batch_size)
    site_state = [work_dir / f"site{i}.state" for i in range(s.clients)]
    site_batches = [
        iterate(
            take(task.train_inputs, sh.train_idx),
            task.train_labels[sh.train_idx],
            s.batch_size,
            shuffle=True,
            seed=s.seed * 7919 + i,
        )
        for i, sh in enumerate(shards)
    ]
    acc_rounds: list[float] = []
    loss_rounds: list[float] = []
    bytes_rounds: list[int] = []
    updates = 0
    step_seconds, steps = 0.0, 0
    for rnd in range(s.rounds):
        server.begin_round()
        round_bytes, losses = 0, []
        for i, shard in enumerate(shards):
            trainer.load_state(site_state[i] if rnd > 0 else initial_state)
            trainer.set_flat(server.global_flat)
            metrics = trainer.train(site_batches[i], max_steps=s.local_steps)
            step_seconds += metrics.seconds
            steps += metrics.steps
            losses.append(metrics.loss)
            trainer.save_state(site_state[i])
            delta = trainer.get_flat() - server.global_flat
            encoded = encoders[i].encode(delta)
            round_bytes += encoded.nbytes
            updates += 1
            server.add(encoded, float(shard.num_train))
        global_flat = server.end_round()
        bytes_rounds.append(round_bytes)
        loss_rounds.append(float(np.mean(losses)))
        if s.eval_every_round or rnd == s.rounds - 1:
            trainer.set_flat(global_flat)
            acc, _ = evaluate(trainer, task.test_inputs, task.test_labels, s.eval_batch_size)
            acc_rounds.append(acc)
            log(
                f"    round {rnd + 1}/{s.rounds}: train loss {loss_rounds[-1]:.3f}, global acc {acc:.3f}, "
                f"up {rep.human_bytes(round_bytes)}"
            )
        else:
            acc_rounds.append(math.nan)
    final_acc = acc_rounds[-1]

    # Per-site accuracy of the global model, then after a few local steps from it (personalisation).
    site_global, site_personal = [], []
    for i, shard in enumerate(shards):
        if shard.test_idx.size == 0:
            continue
        local_test = take(task.train_inputs, shard.test_idx)
        local_labels = task.train_labels[shard.test_idx]
        trainer.load_state(site_state[i])
        trainer.set_flat(server.global_flat)
        site_global.append(evaluate(trainer, local_test, local_labels, s.eval_batch_size)[0])
        if s.personalise_steps > 0:
            trainer.train(site_batches[i], max_steps=s.personalise_steps)
        site_personal.append(evaluate(trainer, local_test, local_labels, s.eval_batch_size)[0])
    full_params = _full_model_params(task)
    return CellResult(
        task=task_name,
        method=method,
        split=split.label,
        compression=compression,
        trainable_params=n,
        rounds=s.rounds,
        clients=s.clients,
        initial_accuracy=init_acc,
        global_accuracy=final_acc,
        accuracy_per_round=acc_rounds,
        loss_per_round=loss_rounds,
        site_accuracy_global=site_global,
        site_accuracy_personalised=site_personal,
        bytes_up_per_round=float(np.mean(bytes_rounds)),
        bytes_up_per_client_update=float(np.sum(bytes_rounds)) / max(1, updates),
        dense_fp32_bytes=4 * n,
        full_model_fp32_bytes=4 * full_params,
        step_ms=1000.0 * step_seconds / max(1, steps),
        peak_rss_mb=peak.peak_mb,
        seconds=time.perf_counter() - started,
        lr=config.lr_for(task_name, method),
    )


def _full_model_params(task: TaskData) -> int:
    """Parameters of the whole backbone + head (what full fine-tuning would send), read from the ONNX."""
    cached = task.prepared.meta.get("_param_count")
    if cached is None:
        import onnx

        model = onnx.load(str(task.prepared.onnx_path), load_external_data=False)
        floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims)]
        cached = sum(int(np.prod(t.dims)) for t in floats)
        task.prepared.meta["_param_count"] = cached
    return int(cached) + (int(task.prepared.feature_dim) + 1) * task.num_classes


# ---------------------------------------------------------------------------------------------- runner


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
        f"experiment {config.name!r}: {len(cells)} cells, {s.clients} sites x {s.rounds} rounds x "
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
                            failures.append({"cell": f"{c[0]}/{c[1]}/{c[2].label}/{c[3]}", "error": str(exc)})
                        log(f"  {task_name}/{method}: cannot set up: {exc}")
                        continue
                    work = work_root / f"{task_name}-{method}"
                    work.mkdir()
                    initial_state = work / "initial.state"
                    trainer.save_state(initial_state)
                    for _, _, split, compression in method_cells:
                        log(f"  cell {task_name} / {method} / {split.label} / {compression}")
                        try:
                            result = run_cell(
                                task,
                                task_name,
                                bundle,
                                method,
                                split,
                                compression,
                                config,
                                trainer=trainer,
                                initial_state=initial_state,
                                work_dir=work,
                                peak=peak,
                                log=log,
                            )
                        except FedPeftError as exc:
                            failures.append(
                                {
                                    "cell": f"{task_name}/{method}/{split.label}/{compression}",
                                    "error": str(exc),
                                }
                            )
                            log(f"    failed: {exc}")
                            continue
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
        },
        "cells": [r.to_dict() for r in results],
        "failures": failures,
        "seconds": seconds,
    }


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


RESULT_COLUMNS = (
    "task",
    "method",
    "split",
    "compression",
    "params",
    "global acc",
    "site acc (global)",
    "personalised mean",
    "personalised worst",
    "bytes up / update",
    "% of full FT fp32",
    "step ms",
    "peak RSS MB",
)


def result_rows(cells: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    rows = []
    for c in cells:
        site_global = c["site_accuracy_global"]
        rows.append(
            [
                c["task"],
                c["method"],
                c["split"],
                c["compression"],
                int(c["trainable_params"]),
                c["global_accuracy"],
                float(np.mean(site_global)) if site_global else None,
                c["personalised_mean"],
                c["personalised_worst"],
                round(c["bytes_up_per_client_update"]),
                100.0 * c["bytes_ratio_vs_full_fp32"],
                c["step_ms"],
                c["peak_rss_mb"],
            ]
        )
    return rows


def write_experiment_report(summary: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": rep.write_json(out_dir / "results.json", summary)}
    cells = summary["cells"]
    lines = [f"# Experiment `{summary['name']}`", ""]
    st = summary["settings"]
    lines.append(
        f"{st['clients']} sites, {st['rounds']} rounds, {st['local_steps']} local steps of batch "
        f"{st['batch_size']}, {st['personalise_steps']} personalisation steps, strategy "
        f"{st['strategy']}; {len(cells)} cells in {summary['seconds']:.0f} s."
    )
    lines.append("")
    for name, t in summary["tasks"].items():
        lines.append(
            f"- task `{name}`: {t['kind']} on `{t['dataset']}`, {t['train_size']} training / "
            f"{t['test_size']} test samples"
        )
    lines.append("")
    lines.append(rep.markdown_table(RESULT_COLUMNS, result_rows(cells)))
    if summary.get("failures"):
        lines.append("## Cells that could not run\n")
        lines.extend(f"- `{f['cell']}`: {f['error']}" for f in summary["failures"])
        lines.append("")
    plots: dict[str, Path] = {}
    if cells and rep.plots_available():
        for task in sorted({c["task"] for c in cells}):
            task_cells = [c for c in cells if c["task"] == task]
            series = {
                f"{c['method']}/{c['split']}/{c['compression']}": (
                    list(range(1, len(c["accuracy_per_round"]) + 1)),
                    c["accuracy_per_round"],
                )
                for c in task_cells
            }
            # one point per cell (eval_every_round = false) makes no curve: the bar charts carry it then
            if any(
                sum(1 for a in c["accuracy_per_round"] if a is not None and math.isfinite(a)) > 1
                for c in task_cells
            ):
                plots[f"accuracy_{task}"] = rep.line_plot(
                    out_dir / f"accuracy_{task}.png",
                    series,
                    title=f"{task}: global test accuracy per round",
                    xlabel="round",
                    ylabel="accuracy",
                )
            labels = [f"{c['method']}/{c['split']}/{c['compression']}" for c in task_cells]
            plots[f"bytes_{task}"] = rep.bar_plot(
                out_dir / f"bytes_{task}.png",
                labels,
                {"bytes up per update": [c["bytes_up_per_client_update"] for c in task_cells]},
                title=f"{task}: bytes uploaded per site update",
                ylabel="bytes",
                log_y=True,
            )
            plots[f"personalised_{task}"] = rep.bar_plot(
                out_dir / f"personalised_{task}.png",
                labels,
                {
                    "global model, global test": [c["global_accuracy"] for c in task_cells],
                    "global model, sites' own test (mean)": [
                        float(np.mean(c["site_accuracy_global"])) if c["site_accuracy_global"] else None
                        for c in task_cells
                    ],
                    "personalised, sites' own test (mean)": [c["personalised_mean"] for c in task_cells],
                    "personalised, sites' own test (worst)": [c["personalised_worst"] for c in task_cells],
                },
                title=f"{task}: accuracy, global vs personalised",
                ylabel="accuracy",
            )
        lines.append("## Plots\n")
        lines.extend(f"![{k}]({p.name})" for k, p in plots.items())
        lines.append("")
    elif cells:
        lines.append(f"(plots skipped: matplotlib is not installed; `{rep.REPORT_INSTALL_HINT}`)\n")
    md = out_dir / "results.md"
    md.write_text("\n".join(lines))
    paths["markdown"] = md
    paths.update(plots)
    return paths


def main_experiment(
    config_path: Path,
    out_dir: Path | None = None,
    *,
    cache_dir: Path | None = None,
    threads: int | None = None,
    tasks: Sequence[str] | None = None,
) -> dict[str, Any]:
    import dataclasses

    config = ExperimentConfig.load(config_path)
    if threads is not None:
        config = _with_threads(config, threads)
    if tasks:
        unknown = sorted(set(tasks) - set(config.tasks))
        ensure(not unknown, f"--tasks {unknown} not in the config's grid ({', '.join(config.tasks)})")
        config = dataclasses.replace(config, tasks={t: config.tasks[t] for t in config.tasks if t in tasks})
    target = out_dir or config.out_dir or Path("reports") / f"experiment-{config.name}"
    with contextlib.suppress(OSError):
        Path(target).mkdir(parents=True, exist_ok=True)
    return run_experiment(config, Path(target), cache_dir=cache_dir)


def _with_threads(config: ExperimentConfig, threads: int) -> ExperimentConfig:
    import dataclasses

    return dataclasses.replace(config, settings=dataclasses.replace(config.settings, threads=int(threads)))
