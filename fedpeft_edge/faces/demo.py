"""``fedpeft-edge demo``: a whole federation on this machine, with real processes, a real model, real data.

What happens, in order:

1. *Central preparation* (cached): export the pretrained backbone to ONNX, build the ORT training
   artifacts for the PEFT spec, load a subset of the data set, split it non-IID over the sites, and write
   each site's shard (its local training part and a held-out local test part) into the run folder.
   Raw data is then only ever read by the site that owns the shard.
2. Start a local MQTT broker (embedded amqtt by default, or Mosquitto), the aggregator and N agents, each
   a separate OS process running the real services (``AggregatorService``, ``EdgeAgent``).
3. Follow the federation live from the aggregator's round metrics (participants, client loss, accuracy
   of the global on each site's own test data, bytes up); collect every published global adapter.
4. Evaluate the global adapter of every round on the global test set and each site's accuracy before and
   after, then write a report folder: ``report.json``, ``report.md``, ``accuracy.png``, ``bytes.png``.

``FEDPEFT_EDGE_DEMO_QUICK=1`` (or ``--quick``) shrinks everything for CI: 2 agents, 2 rounds, a small subset.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.faces import report as rep
from fedpeft_edge.faces.tasks import (
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

QUICK_ENV = "FEDPEFT_EDGE_DEMO_QUICK"
FLEET = "demo"
FACTORY = "fedpeft_edge.faces.demo:site_trainer_setup"


# ------------------------------------------------------------------------------------------ options


@dataclass
class DemoOptions:
    """Everything the demo can be told; ``resolved()`` fills the task's defaults and the quick reduction."""

    task: str = "text"  # text | cv
    dataset: str | None = None
    method: str | None = None
    agents: int | None = None
    rounds: int | None = None
    local_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    codec: str | None = None
    topk_ratio: float | None = None
    split: str | None = None
    train_size: int | None = None
    test_size: int | None = None
    max_len: int | None = None
    image_size: int | None = None
    threads_per_agent: int = 1
    broker: str = "embedded"
    out: Path | None = None
    work_dir: Path | None = None
    cache_dir: Path | None = None
    quick: bool = False
    plain: bool = False
    round_deadline_s: float = 600.0
    timeout_s: float = 1800.0
    seed: int = 0

    @classmethod
    def from_args(cls, args: Any) -> DemoOptions:
        base: dict[str, Any] = {}
        if getattr(args, "config", None) is not None:
            base = load_demo_config(args.config)
        for name in (
            "task",
            "dataset",
            "method",
            "agents",
            "rounds",
            "local_steps",
            "codec",
            "topk_ratio",
            "split",
            "broker",
            "out",
            "work_dir",
            "cache_dir",
            "plain",
        ):
            value = getattr(args, name, None)
            if value is not None and value is not False:
                base[name] = value
        base["quick"] = quick_requested(bool(getattr(args, "quick", False)))
        return cls(**base)

    def resolved(self) -> DemoOptions:
        ensure(self.task in ("text", "cv"), f"--task must be text or cv, got {self.task!r}")
        defaults = dict(TEXT_DEFAULTS if self.task == "text" else CV_DEFAULTS)
        if self.quick:
            defaults.update(QUICK_TEXT if self.task == "text" else QUICK_CV)
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in defaults.items():
            # Quick mode caps sizes even when the config asked for more; explicit flags otherwise win.
            if values.get(key) is None or (self.quick and key in QUICK_CAPS and values[key] > value):
                values[key] = value
        out = DemoOptions(**values)
        for name in ("agents", "rounds", "local_steps", "batch_size", "train_size", "test_size"):
            v = getattr(out, name)
            ensure(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        ensure(out.agents <= 16, "the demo runs at most 16 agents on one machine")
        ensure(out.codec in ("fp32", "int8", "topk_int8"), f"unknown codec {out.codec!r}")
        ensure(out.broker in ("embedded", "mosquitto", "auto"), f"unknown broker {out.broker!r}")
        ensure(out.lr is not None and out.lr > 0, "lr must be > 0")
        return out


TEXT_DEFAULTS: dict[str, Any] = {
    "dataset": "reuters_r8",
    "method": "lora",
    "agents": 4,
    "rounds": 5,
    "local_steps": 12,
    "batch_size": 16,
    "lr": 3e-3,
    "codec": "topk_int8",
    "topk_ratio": 0.1,
    "split": "dirichlet:0.5",
    "train_size": 1600,
    "test_size": 400,
    "max_len": 64,
    "image_size": 32,
}
# The image task trains a smaller network on easier data: more, larger steps fit the same time budget.
CV_DEFAULTS: dict[str, Any] = {**TEXT_DEFAULTS, "dataset": "mnist5k", "rounds": 10, "local_steps": 20,
                               "batch_size": 32}
QUICK_TEXT: dict[str, Any] = {
    "agents": 2,
    "rounds": 2,
    "local_steps": 4,
    "train_size": 160,
    "test_size": 96,
    "max_len": 32,
}
QUICK_CV: dict[str, Any] = {"agents": 2, "rounds": 2, "local_steps": 4, "train_size": 160, "test_size": 96}
QUICK_CAPS = ("agents", "rounds", "local_steps", "train_size", "test_size", "max_len")


def quick_requested(flag: bool = False) -> bool:
    """The documented reduction switch: ``--quick`` or ``FEDPEFT_EDGE_DEMO_QUICK=1``."""
    return flag or os.environ.get(QUICK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def load_demo_config(path: Path) -> dict[str, Any]:
    """``[demo]`` table of a TOML file; keys are DemoOptions fields."""
    import tomllib

    path = Path(path)
    ensure(path.is_file(), f"demo config not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise InvalidValueError(f"{path}: not valid TOML: {exc}") from exc
    table = dict(raw.get("demo", {}))
    known = {f.name for f in dataclasses.fields(DemoOptions)}
    unknown = sorted(set(table) - known)
    ensure(not unknown, f"{path}: unknown [demo] keys {unknown}; known: {sorted(known)}")
    for key in ("out", "work_dir", "cache_dir"):
        if key in table:
            table[key] = Path(table[key])
    return table


# ----------------------------------------------------------------------------- site side (agents)


def site_trainer_setup(cfg: Any) -> Any:
    """Agent factory (``trainer.kind = "factory"``): the site's OrtTrainer and its own shard.

    ``trainer.options``: ``shard`` (npz written by the demo), ``lr``, ``batch_size``, ``seed``. The shard
    holds ``train/<input>``, ``train/labels``, ``test/<input>``, ``test/labels`` arrays.
    """
    from fedpeft_edge.peft.artifacts import ArtifactBundle
    from fedpeft_edge.site.trainer_setup import TrainerSetup
    from fedpeft_edge.training.ort_trainer import OrtTrainer

    opts = dict(cfg.trainer.options)
    ensure(cfg.trainer.bundle_dir, "trainer.bundle_dir is required")
    ensure("shard" in opts, "trainer.options.shard (the site's data file) is required")
    bundle = ArtifactBundle.load(cfg.trainer.bundle_dir)
    trainer = OrtTrainer(bundle, threads=max(1, int(cfg.agent.threads)), lr=float(opts.get("lr", 3e-3)))
    train_in, train_y, test_in, test_y = load_shard(Path(opts["shard"]))
    batch_size = int(opts.get("batch_size", 16))
    seed = int(opts.get("seed", 0))
    rounds = [0]

    def train_batches() -> Iterator[dict[str, np.ndarray]]:
        rounds[0] += 1  # a fresh order each round; endless, the agent stops at local_steps
        return iterate(train_in, train_y, batch_size, shuffle=True, seed=seed * 1000 + rounds[0])

    def eval_batches() -> Iterator[dict[str, np.ndarray]]:
        return iterate(test_in, test_y, 64, shuffle=False)

    return TrainerSetup(trainer, train_batches, eval_batches if test_y.size else None, bundle.spec_hash)


def save_shard(
    path: Path,
    train: Mapping[str, np.ndarray],
    train_y: np.ndarray,
    test: Mapping[str, np.ndarray],
    test_y: np.ndarray,
) -> None:
    arrays = {f"train/{k}": v for k, v in train.items()}
    arrays.update({f"test/{k}": v for k, v in test.items()})
    arrays["train/labels"] = train_y.astype(np.int64)
    arrays["test/labels"] = test_y.astype(np.int64)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def load_shard(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray], np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, builtins.ValueError) as exc:  # numpy raises the builtin (e.g. "pickled data")
        raise InvalidValueError(f"unreadable site shard {path}: {exc}") from exc
    for key in ("train/labels", "test/labels"):
        ensure(key in data, f"site shard {path} lacks {key}")
    train = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith("train/") and k != "train/labels"}
    test = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith("test/") and k != "test/labels"}
    return train, data["train/labels"], test, data["test/labels"]


# ----------------------------------------------------------------------------------- the services


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_service_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """A service TOML; keys the installed services do not know are dropped (their config is strict)."""
    from fedpeft_edge.protocol import config as service_config

    known = {f.name: f for f in dataclasses.fields(service_config.ServiceConfig)}
    lines = []
    for section, values in sections.items():
        ensure(section in known, f"unknown service config section {section!r}")
        cls = type(known[section].default_factory())  # type: ignore[misc]
        allowed = {f.name for f in dataclasses.fields(cls)}
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if k in allowed and v is not None)
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def service_command(role: str, config_path: Path) -> list[str]:
    """A service process is started exactly as an operator would: the ``fedpeft-edge`` sub-command."""
    return [sys.executable, "-m", "fedpeft_edge", role, "--config", str(config_path), "--log-level", "INFO"]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _spawn(name: str, cmd: list[str], log_path: Path, env: Mapping[str, str]) -> Proc:
    fh = open(log_path, "wb")
    try:
        popen = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            start_new_session=True,
        )
    finally:
        fh.close()
    return Proc(name, popen, log_path)


def _stop(procs: list[Proc], timeout: float = 10.0) -> None:
    """SIGTERM every still-running child we started, then SIGKILL the ones that do not exit."""
    for p in procs:
        if p.alive():
            with contextlib.suppress(ProcessLookupError):
                p.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(max(0.1, deadline - time.monotonic()))
        if p.alive():
            with contextlib.suppress(ProcessLookupError):
                p.popen.kill()
            p.popen.wait(5)


class GlobalCollector:
    """Subscribes to the fleet's global topic and keeps every round's global adapter (decoded)."""

    def __init__(self, host: str, port: int, n_params: int, protocol: str = "auto") -> None:
        from fedpeft_edge.protocol.topics import Topics
        from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig

        self.topics = Topics(FLEET)
        self.n = n_params
        self.globals: dict[int, np.ndarray] = {}
        self.final_round: int | None = None
        self.transport = MqttTransport(
            TransportConfig(
                host=host, port=port, client_id="demo-observer", protocol=protocol, clean_start=True
            )
        )
        self.transport.subscribe(self.topics.global_, qos=1)
        self.transport.connect(30.0)

    def poll(self) -> None:
        from fedpeft_edge.protocol import wire
        from fedpeft_edge.protocol.codec import decode_global

        while True:
            msg = self.transport.get(0.0)
            if msg is None:
                return
            try:
                g = wire.decode_global(msg.payload)
            except FedPeftError:
                continue
            self.globals[g.round] = decode_global(g.vector, self.n)
            if g.meta.get("final"):
                self.final_round = g.round

    def close(self) -> None:
        self.transport.close()


# ------------------------------------------------------------------------------------------ progress


class Progress:
    """Live display: rich progress bar + one line per closed round, or plain lines without rich/TTY."""

    def __init__(self, rounds: int, plain: bool) -> None:
        self.rounds = rounds
        self._rich: Any = None
        if not plain:
            try:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                self.console = Console()
                self._rich = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TextColumn("{task.fields[status]}"),
                    console=self.console,
                    transient=False,
                )
            except ImportError:
                self._rich = None

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.__enter__()
            self._task = self._rich.add_task("rounds", total=self.rounds, status="starting services ...")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def status(self, text: str) -> None:
        if self._rich is not None:
            self._rich.update(self._task, status=text)

    def line(self, text: str) -> None:
        if self._rich is not None:
            self._rich.console.print(text, highlight=False)
        else:
            print(text, flush=True)

    def advance(self, done: int) -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=done)


def say(text: str) -> None:
    print(text, flush=True)


# ----------------------------------------------------------------------------------------------- run


def full_model_params(task: TaskData) -> int:
    """Parameters of backbone + head: what a full fine-tuning update would carry."""
    import onnx

    model = onnx.load(str(task.prepared.onnx_path), load_external_data=False)
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims)]
    return sum(int(np.prod(t.dims)) for t in floats) + (int(task.prepared.feature_dim) + 1) * task.num_classes


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
    kind = "text" if opts.task == "text" else "image"
    log(
        f"fedpeft-edge demo: {opts.agents} agents, {opts.rounds} rounds, {opts.method} on "
        f"{'MiniLM-L6' if kind == 'text' else 'EfficientNet-Lite0'} / {opts.dataset}"
        f"{' (quick mode)' if opts.quick else ''}"
    )

    # 1. central preparation -------------------------------------------------------------------
    t0 = time.perf_counter()
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
    sites_dir = work / "sites"
    sites_dir.mkdir(exist_ok=True)
    shard_paths = []
    for shard in shards:
        path = sites_dir / f"site-{shard.site + 1}.npz"
        save_shard(
            path,
            take(task.train_inputs, shard.train_idx),
            task.train_labels[shard.train_idx],
            take(task.train_inputs, shard.test_idx),
            task.train_labels[shard.test_idx],
        )
        shard_paths.append(path)
    from fedpeft_edge.training.ort_trainer import OrtTrainer

    evaluator = OrtTrainer(bundle, threads=2, lr=float(opts.lr))  # type: ignore[arg-type]
    initial = evaluator.get_flat()
    n_params = int(initial.size)
    np.save(work / "initial.npy", initial, allow_pickle=False)
    full_params = full_model_params(task)
    prep_seconds = time.perf_counter() - t0
    log(
        f"  {n_params:,} trainable parameters ({100 * n_params / full_params:.2f} % of {full_params:,}); "
        f"sites hold {[s.num_train for s in shards]} training samples; ready in {prep_seconds:.1f} s"
    )

    # 2. broker and services -------------------------------------------------------------------
    from fedpeft_edge.central.broker import start_local_broker

    # The embedded broker runs in this process; its per-connection chatter would drown the progress display.
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    broker = start_local_broker(port=0, prefer=opts.broker)  # type: ignore[arg-type]
    log(f"broker: {broker.kind} on {broker.host}:{broker.port}")
    procs: list[Proc] = []
    collector: GlobalCollector | None = None
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(opts.threads_per_agent)
    env["PYTHONUNBUFFERED"] = "1"
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, *filter(None, [env.get("PYTHONPATH")])])
    # amqtt speaks MQTT 3.1.1 only: asking for it directly spares every client a refused MQTT 5 attempt.
    protocol = "3.1.1" if broker.kind == "embedded" else "auto"
    connection = {"host": broker.host, "port": broker.port, "protocol": protocol}
    agg_dir = work / "aggregator"
    metrics_path = agg_dir / "metrics.jsonl"
    agg_cfg = write_service_config(
        work / "aggregator.toml",
        {
            "connection": connection,
            "fleet": {"name": FLEET},
            "aggregator": {
                "client_id": "aggregator",
                "state_dir": str(agg_dir),
                "max_rounds": opts.rounds,
                "quorum": opts.agents,
                "min_clients": opts.agents,
                "round_deadline_s": opts.round_deadline_s,
                "initial_global": str(work / "initial.npy"),
                "spec_hash": bundle.spec_hash,
                "metrics_file": str(metrics_path),
                "server_optimizer": "fedavg",
            },
        },
    )
    agent_dirs = []
    codec = {"mode": opts.codec, "topk_ratio": float(opts.topk_ratio or 0.01), "error_feedback": True}
    rounds_seen: list[dict[str, Any]] = []
    acc_per_round: dict[int, float | None] = {}
    site_before: dict[int, float | None] = {}
    ok = False
    failure = ""
    try:
        collector = GlobalCollector(broker.host, broker.port, n_params, protocol)
        procs.append(
            _spawn("aggregator", service_command("aggregate", agg_cfg), work / "aggregator.log", env)
        )
        for i, shard_path in enumerate(shard_paths):
            name = f"site-{i + 1}"
            adir = work / name
            agent_dirs.append(adir)
            cfg_path = write_service_config(
                work / f"{name}.toml",
                {
                    "connection": connection,
                    "fleet": {"name": FLEET},
                    "agent": {
                        "client_id": name,
                        "state_dir": str(adir),
                        "local_steps": opts.local_steps,
                        "threads": opts.threads_per_agent,
                        "dump_updates": True,
                        "evaluate": True,
                        "idle_exit_s": opts.round_deadline_s,
                    },
                    "codec": codec,
                    "trainer": {
                        "kind": "factory",
                        "factory": FACTORY,
                        "bundle_dir": str(bundle.directory),
                        "options": {
                            "shard": str(shard_path),
                            "lr": float(opts.lr),  # type: ignore[arg-type]
                            "batch_size": opts.batch_size,
                            "seed": opts.seed + i + 1,
                        },
                    },
                },
            )
            procs.append(_spawn(name, service_command("agent", cfg_path), work / f"{name}.log", env))
        log(f"started the aggregator and {opts.agents} agents (logs in {work})")

        def accuracy_of(vec: np.ndarray, shard: Any) -> float | None:
            return evaluator_accuracy(evaluator, task, vec, shard)

        # 3. follow the rounds -------------------------------------------------------------------
        # While the sites train, this process evaluates each published global on the global test set
        # (one evaluation per loop turn, so the display keeps moving) and the sites' starting accuracy.
        deadline = time.monotonic() + opts.timeout_s
        with Progress(opts.rounds, opts.plain) as progress:
            while True:
                collector.poll()
                for line in _new_lines(metrics_path, len(rounds_seen)):
                    rounds_seen.append(line)
                    progress.advance(len(rounds_seen))
                    progress.line(_round_line(line, opts.rounds, opts.agents, full_params))
                pending = [r for r in sorted(collector.globals) if r not in acc_per_round]
                if pending:
                    acc_per_round[pending[0]] = accuracy_of(collector.globals[pending[0]], None)
                elif len(site_before) < len(shards):
                    site = len(site_before)
                    site_before[site] = accuracy_of(initial, shards[site])
                agg = procs[0]
                if not agg.alive():
                    # it may have written its last metrics line just before exiting
                    for line in _new_lines(metrics_path, len(rounds_seen)):
                        rounds_seen.append(line)
                        progress.advance(len(rounds_seen))
                        progress.line(_round_line(line, opts.rounds, opts.agents, full_params))
                    if agg.popen.returncode == 0 and len(rounds_seen) >= opts.rounds:
                        break
                    failure = f"aggregator exited with code {agg.popen.returncode}:\n{agg.tail()}"
                    break
                dead = [p for p in procs[1:] if not p.alive() and p.popen.returncode != 0]
                if dead:
                    failure = f"{dead[0].name} exited with code {dead[0].popen.returncode}:\n{dead[0].tail()}"
                    break
                if time.monotonic() > deadline:
                    failure = f"the demo did not finish within {opts.timeout_s:.0f} s"
                    break
                progress.status(_live_status(work, agent_dirs, len(rounds_seen)))
                time.sleep(0.5)
            # agents leave once they saw the final global; give them a moment to say goodbye
            end = time.monotonic() + 60
            while any(p.alive() for p in procs[1:]) and time.monotonic() < end and not failure:
                collector.poll()
                time.sleep(0.2)
            collector.poll()
        ok = not failure
    finally:
        _stop(procs)
        if collector is not None:
            # paho logs an error when asked to disconnect a session the broker already dropped; at the
            # end of the demo that is expected, not news
            paho_log = logging.getLogger("fedpeft_edge.protocol.transport.paho")
            level = paho_log.level
            paho_log.setLevel(logging.CRITICAL)
            with contextlib.suppress(Exception):
                collector.close()
            paho_log.setLevel(level)
        broker.stop()
    if failure:
        log(f"demo FAILED: {failure}")
    fed_seconds = time.perf_counter() - started - prep_seconds

    # 4. evaluation and report ------------------------------------------------------------------
    globals_by_round = dict(collector.globals) if collector is not None else {}
    globals_by_round.setdefault(0, initial)
    log("evaluating the final global adapter on the global test set and on each site's own test data ...")
    for rnd in sorted(globals_by_round):
        if rnd not in acc_per_round:
            acc_per_round[rnd] = evaluator_accuracy(evaluator, task, globals_by_round[rnd], None)
    final_round = max(globals_by_round)
    sites = []
    for shard, adir in zip(shards, agent_dirs, strict=False):
        test_y = task.train_labels[shard.test_idx]
        entry: dict[str, Any] = {
            "site": f"site-{shard.site + 1}",
            "train_samples": shard.num_train,
            "test_samples": int(test_y.size),
            "label_counts": np.bincount(
                task.train_labels[shard.train_idx], minlength=task.num_classes
            ).tolist(),
        }
        if test_y.size:
            before = site_before.get(shard.site)
            if before is None:
                before = evaluator_accuracy(evaluator, task, initial, shard)
            entry["accuracy_before"] = before
            entry["accuracy_after"] = evaluator_accuracy(
                evaluator, task, globals_by_round[final_round], shard
            )
        entry["updates"] = read_sent_updates(adir)
        sites.append(entry)
    summary = build_summary(
        opts,
        task,
        bundle,
        n_params,
        full_params,
        rounds_seen,
        acc_per_round,
        sites,
        ok=ok,
        failure=failure,
        prep_seconds=prep_seconds,
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


def evaluator_accuracy(evaluator: Any, task: TaskData, vec: np.ndarray, shard: Any) -> float | None:
    """Accuracy of an adapter on the global test set (``shard`` None) or on a site's own test data."""
    if shard is None:
        inputs, labels = task.test_inputs, task.test_labels
    else:
        inputs, labels = take(task.train_inputs, shard.test_idx), task.train_labels[shard.test_idx]
    if labels.size == 0:
        return None
    evaluator.set_flat(vec)
    return float(evaluator.evaluate(iterate(inputs, labels, 64, shuffle=False)).accuracy)


def _new_lines(path: Path, already: int) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for text in lines[already:]:
        try:
            out.append(json.loads(text))
        except json.JSONDecodeError:
            break  # a line being written; read it next time
    return out


def _round_line(m: Mapping[str, Any], rounds: int, agents: int, full_params: int) -> str:
    parts = [
        f"round {int(m.get('round', 0)) + 1}/{rounds}",
        f"{len(m.get('participants', []))}/{agents} sites",
    ]
    if "loss" in m:
        parts.append(f"loss {m['loss']:.3f}")
    if "global_eval_accuracy" in m:
        parts.append(f"sites' acc of incoming global {m['global_eval_accuracy']:.3f}")
    if "accuracy" in m:
        parts.append(f"train acc {m['accuracy']:.3f}")
    bytes_in = m.get("bytes_in")
    if bytes_in:
        per = bytes_in / max(1, len(m.get("participants", [])) or 1)
        parts.append(
            f"up {rep.human_bytes(bytes_in)} ({100 * per / (4 * full_params):.3f} % of full FT/site)"
        )
    if "train_seconds" in m:
        parts.append(f"local train {m['train_seconds']:.1f} s")
    return " · ".join(parts)


def _live_status(work: Path, agent_dirs: list[Path], done: int) -> str:
    sent = sum(len(list((d / "sent").glob("r*.msg"))) for d in agent_dirs if (d / "sent").is_dir())
    return f"round {done + 1}: {sent} updates sent so far"


def read_sent_updates(agent_dir: Path) -> list[dict[str, Any]]:
    """What the agent actually sent (its audit copies): wire bytes, codec payload bytes, metrics."""
    from fedpeft_edge.protocol import wire

    out = []
    sent = agent_dir / "sent"
    if not sent.is_dir():
        return out
    for path in sorted(sent.glob("r*.msg")):
        data = path.read_bytes()
        try:
            msg = wire.decode_update(data)
        except FedPeftError:
            continue
        out.append(
            {
                "round": msg.round,
                "wire_bytes": len(data),
                "payload_bytes": msg.update.nbytes,
                "codec": msg.update.mode,
                "k": msg.update.k,
                "n": msg.update.n,
                "block": msg.update.block,
                "index_nbytes": msg.update.index_nbytes,
                "num_samples": msg.num_samples,
                "metrics": dict(msg.metrics),
            }
        )
    return out


def build_summary(
    opts: DemoOptions,
    task: TaskData,
    bundle: Any,
    n_params: int,
    full_params: int,
    rounds_seen: list[dict[str, Any]],
    acc_per_round: Mapping[int, float],
    sites: list[dict[str, Any]],
    *,
    ok: bool,
    failure: str,
    prep_seconds: float,
    fed_seconds: float,
    total_seconds: float,
) -> dict[str, Any]:
    full_bytes = 4 * full_params
    per_round = []
    for rnd in range(len(rounds_seen)):
        ups = [u for s in sites for u in s["updates"] if u["round"] == rnd]
        payload = sum(u["payload_bytes"] for u in ups)
        wire_bytes = sum(u["wire_bytes"] for u in ups)
        train_s = [u["metrics"].get("train_seconds") for u in ups if "train_seconds" in u["metrics"]]
        m = rounds_seen[rnd]
        per_round.append(
            {
                "round": rnd + 1,
                "participants": len(m.get("participants", [])),
                "client_loss": m.get("loss"),
                "site_accuracy_of_global": m.get("global_eval_accuracy"),
                "global_test_accuracy": acc_per_round.get(rnd + 1),
                "bytes_in_aggregator": m.get("bytes_in"),
                "wire_bytes_up": wire_bytes,
                "payload_bytes_up": payload,
                "payload_bytes_per_site": payload / max(1, len(ups)),
                "bytes_per_site_vs_full_ft_percent": 100.0 * (wire_bytes / max(1, len(ups))) / full_bytes,
                "local_train_seconds_mean": float(np.mean(train_s)) if train_s else None,
                "local_train_seconds_max": float(np.max(train_s)) if train_s else None,
                "round_seconds": m.get("duration_s"),
            }
        )
    accs = [acc_per_round[r] for r in sorted(acc_per_round)]
    majority = task.majority_accuracy()
    return {
        "ok": ok,
        "failure": failure or None,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()},
        "model": {
            "kind": task.kind,
            "onnx": str(task.prepared.onnx_path),
            "full_params": full_params,
            "full_ft_fp32_bytes": full_bytes,
        },
        "peft": {
            "method": bundle.spec.method,
            "spec": bundle.spec.to_dict(),
            "spec_hash": bundle.spec_hash,
            "trainable_params": n_params,
            "dense_fp32_bytes": 4 * n_params,
        },
        "data": {
            "dataset": task.config.dataset,
            "classes": task.classes,
            "train_pool": int(task.train_labels.size),
            "global_test": int(task.test_labels.size),
            "split": opts.split,
            "majority_class_accuracy": majority,
        },
        "global": {
            "accuracy_before": accs[0] if accs else None,
            "accuracy_after": accs[-1] if accs else None,
            "accuracy_per_round": {str(k): v for k, v in sorted(acc_per_round.items())},
        },
        "rounds": per_round,
        "sites": sites,
        "bytes": {
            "payload_bytes_per_site_update_mean": float(
                np.mean([r["payload_bytes_per_site"] for r in per_round])
            )
            if per_round
            else None,
            "wire_bytes_per_round_mean": float(np.mean([r["wire_bytes_up"] for r in per_round]))
            if per_round
            else None,
            "full_ft_fp32_bytes_per_site_update": full_bytes,
            "max_percent_of_full_ft": max(
                (r["bytes_per_site_vs_full_ft_percent"] for r in per_round), default=None
            ),
        },
        "timing": {
            "prepare_seconds": prep_seconds,
            "federation_seconds": fed_seconds,
            "total_seconds": total_seconds,
        },
    }


FINAL_COLUMNS = ("", "accuracy before", "accuracy after", "train samples", "test samples")


def final_rows(summary: Mapping[str, Any]) -> list[list[Any]]:
    g = summary["global"]
    rows: list[list[Any]] = [
        [
            "global test set",
            g["accuracy_before"],
            g["accuracy_after"],
            summary["data"]["train_pool"],
            summary["data"]["global_test"],
        ]
    ]
    for s in summary["sites"]:
        rows.append(
            [
                f"{s['site']} (own test data)",
                s.get("accuracy_before"),
                s.get("accuracy_after"),
                s["train_samples"],
                s["test_samples"],
            ]
        )
    return rows


ROUND_COLUMNS = (
    "round",
    "sites",
    "client loss",
    "global test acc",
    "site acc of incoming global",
    "bytes up (all sites)",
    "per site vs full FT",
    "local train s (mean)",
    "round s",
)


def round_rows(summary: Mapping[str, Any]) -> list[list[Any]]:
    return [
        [
            r["round"],
            r["participants"],
            r["client_loss"],
            r["global_test_accuracy"],
            r["site_accuracy_of_global"],
            rep.human_bytes(r["wire_bytes_up"]),
            f"{r['bytes_per_site_vs_full_ft_percent']:.4f} %",
            r["local_train_seconds_mean"],
            r["round_seconds"],
        ]
        for r in summary["rounds"]
    ]


def write_demo_report(summary: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": rep.write_json(out_dir / "report.json", summary)}
    o, p, b = summary["options"], summary["peft"], summary["bytes"]
    lines = ["# fedpeft-edge demo report", ""]
    if not summary["ok"]:
        lines += [f"**The run failed:** {summary['failure']}", ""]
    lines.append(
        f"{o['agents']} sites, {o['rounds']} rounds of {o['local_steps']} local steps (batch "
        f"{o['batch_size']}), `{p['method']}` on the {summary['model']['kind']} model, data "
        f"`{summary['data']['dataset']}` split `{o['split']}`, codec `{o['codec']}`"
        f"{' (top ' + format(100 * o['topk_ratio'], 'g') + ' %)' if o['codec'] == 'topk_int8' else ''}."
    )
    lines.append("")
    lines.append(
        f"- trainable parameters: {p['trainable_params']:,} of {summary['model']['full_params']:,} "
        f"({100 * p['trainable_params'] / summary['model']['full_params']:.2f} %)"
    )
    if b["payload_bytes_per_site_update_mean"] is not None:
        lines.append(
            f"- bytes up per site update: {rep.human_bytes(b['payload_bytes_per_site_update_mean'])} "
            f"codec payload; full fine-tuning in fp32 would send "
            f"{rep.human_bytes(b['full_ft_fp32_bytes_per_site_update'])} "
            f"(at most {b['max_percent_of_full_ft']:.4f} % of it, envelope included)"
        )
    lines.append(
        f"- majority-class accuracy on the global test set (the floor): "
        f"{summary['data']['majority_class_accuracy']:.3f}"
    )
    t = summary["timing"]
    lines.append(
        f"- time: preparation {t['prepare_seconds']:.0f} s, federation {t['federation_seconds']:.0f} s, "
        f"total {t['total_seconds']:.0f} s"
    )
    lines += ["", "## Accuracy before and after", "", rep.markdown_table(FINAL_COLUMNS, final_rows(summary))]
    lines += ["## Rounds", "", rep.markdown_table(ROUND_COLUMNS, round_rows(summary))]
    plots: dict[str, Path] = {}
    if rep.plots_available():
        acc = summary["global"]["accuracy_per_round"]
        xs = [int(k) for k in acc]
        series: dict[str, tuple[list[float], list[float | None]]] = {
            "global test set": (xs, list(acc.values()))
        }
        site_x = [r["round"] - 1 for r in summary["rounds"]]
        series["sites' own test data (mean)"] = (
            site_x,
            [r["site_accuracy_of_global"] for r in summary["rounds"]],
        )
        plots["accuracy"] = rep.line_plot(
            out_dir / "accuracy.png",
            series,
            title="Accuracy of the global adapter",
            xlabel="round (0 = before training)",
            ylabel="accuracy",
            hline=(summary["data"]["majority_class_accuracy"], "majority class"),
        )
        rounds = [r["round"] for r in summary["rounds"]]
        plots["bytes"] = rep.line_plot(
            out_dir / "bytes.png",
            {
                "bytes up per site (wire)": (
                    rounds,
                    [r["wire_bytes_up"] / max(1, r["participants"]) for r in summary["rounds"]],
                ),
                f"dense fp32 adapter ({p['method']})": (rounds, [p["dense_fp32_bytes"]] * len(rounds)),
                "full fine-tuning fp32": (rounds, [summary["model"]["full_ft_fp32_bytes"]] * len(rounds)),
            },
            title="Bytes uploaded per site per round",
            xlabel="round",
            ylabel="bytes (log)",
            log_y=True,
        )
        lines += ["## Plots", ""] + [f"![{k}]({v.name})" for k, v in plots.items()] + [""]
    else:
        lines.append(f"(plots skipped: matplotlib is not installed; `{rep.REPORT_INSTALL_HINT}`)")
    md = out_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    paths["markdown"] = md
    paths.update(plots)
    return paths


def print_final_table(summary: Mapping[str, Any], plain: bool) -> None:
    text = (
        rep.markdown_table(FINAL_COLUMNS, final_rows(summary))
        + "\n"
        + rep.markdown_table(ROUND_COLUMNS, round_rows(summary))
    )
    if plain:
        print(text, flush=True)
        return
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(text, flush=True)
        return
    console = Console()
    for title, cols, rows in (
        ("Accuracy before / after", FINAL_COLUMNS, final_rows(summary)),
        ("Rounds", ROUND_COLUMNS, round_rows(summary)),
    ):
        table = Table(title=title)
        for c in cols:
            table.add_column(c, justify="right" if c else "left")
        for row in rows:
            table.add_row(*[rep.format_cell(v) for v in row])
        console.print(table)


__all__ = ["DemoOptions", "quick_requested", "run_demo", "site_trainer_setup", "write_demo_report"]
