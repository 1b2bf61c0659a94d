"""Demo options: defaults per task, the quick reduction for CI, and the ``[demo]`` table of a TOML file."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft_edge.runtime import names
from fedpeft_edge.runtime.errors import InvalidValueError, ensure

QUICK_ENV = "FEDPEFT_EDGE_DEMO_QUICK"
BACKENDS = ("gradient", "ort")  # GradientTrainer (default) or OrtTrainer, for agents and the evaluator


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
    # top-k sparsity warm-up (CodecConfig.warmup_rounds, from a dense first round): the best measured
    # codec for the demo's task (docs/experiments.md, compression tools); 0 turns it off
    codec_warmup_rounds: int | None = None
    split: str | None = None
    train_size: int | None = None
    test_size: int | None = None
    max_len: int | None = None
    image_size: int | None = None
    threads_per_agent: int = 1
    broker: str = "embedded"
    backend: str = "gradient"  # the agents' trainer: gradient (stock onnxruntime) | ort (ORT Training)
    prox_mu: float = 0.0  # FedProx's proximal term of every agent ([trainer] prox_mu); 0: plain FedAvg
    # client-level differential privacy ([privacy]): the ε to spend over the demo's rounds (δ = 1e-5),
    # added centrally by the aggregator or by each site ("distributed"); None: off
    dp: float | None = None
    dp_mode: str = "central"
    dp_clip: float | None = None  # C; default: half of AdamW's largest move, lr·local_steps·√n / 2
    # secure aggregation ([secagg]): the aggregator sees only the masked sum of the sites' updates; the
    # sites send dense vectors (the codec defaults to fp32: top-k cannot be masked)
    secagg: bool = False
    # LoRA rank per site ([agent] lora_rank; "8,8,4,4", 0: the bundle's rank) and how the aggregator
    # combines them ([aggregator] rank_aggregation); None: every site at the bundle's rank
    ranks: str | None = None
    rank_aggregation: str | None = None  # None: the aggregator's default (central/policy.py)
    out: Path | None = None
    work_dir: Path | None = None
    cache_dir: Path | None = None
    quick: bool = False
    plain: bool = False
    console: bool = False  # serve the operator console beside the federation (faces/demo/console.py)
    console_port: int = 0
    console_users: Path | None = None
    round_deadline_s: float = 600.0
    timeout_s: float = 1800.0
    seed: int = 0

    def site_ranks(self) -> list[int]:
        """``ranks`` as integers (empty when unset)."""
        if not self.ranks:
            return []
        try:
            ranks = [int(x) for x in str(self.ranks).split(",")]
        except ValueError as exc:
            raise InvalidValueError(f"--ranks must be comma-separated integers, got {self.ranks!r}") from exc
        ensure(all(r >= 0 for r in ranks), f"--ranks must be >= 0 (0: the bundle's rank), got {self.ranks!r}")
        return ranks

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
            "codec_warmup_rounds",
            "split",
            "broker",
            "backend",
            "prox_mu",
            "dp",
            "dp_mode",
            "dp_clip",
            "secagg",
            "ranks",
            "rank_aggregation",
            "out",
            "work_dir",
            "cache_dir",
            "plain",
            "console",
            "console_port",
            "console_users",
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
        if self.secagg and values.get("codec") is None:
            values["codec"] = "fp32"  # SecAgg masks dense vectors; the site lifts them to its own grid
        for key, value in defaults.items():
            # Quick mode caps sizes even when the config asked for more; explicit flags otherwise win.
            if values.get(key) is None or (self.quick and key in QUICK_CAPS and values[key] > value):
                values[key] = value
        if self.secagg and self.quick:
            values["agents"] = max(int(values["agents"]), 3)  # a secure sum needs three sites
        out = DemoOptions(**values)
        for name in ("agents", "rounds", "local_steps", "batch_size", "train_size", "test_size"):
            v = getattr(out, name)
            ensure(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        ensure(out.agents <= 16, "the demo runs at most 16 agents on one machine")
        ensure(out.codec in ("fp32", "int8", "topk_int8"), f"unknown codec {out.codec!r}")
        ensure(out.broker in ("embedded", "mosquitto", "auto"), f"unknown broker {out.broker!r}")
        ensure(out.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {out.backend!r}")
        ensure(out.lr is not None and out.lr > 0, "lr must be > 0")
        if out.dp is not None:
            ensure(isinstance(out.dp, int | float) and 0 < out.dp < float("inf"),
                   f"--dp must be an epsilon > 0, got {out.dp!r}")
            ensure(out.dp_mode in ("central", "distributed"), "--dp-mode must be central or distributed")
            ensure(out.codec != "topk_int8" or out.dp_mode == "central",
                   "distributed DP adds dense noise at each site: use --codec fp32 or int8 with it")
        if out.secagg:
            ensure(out.codec != "topk_int8", "--secagg masks dense updates: top-k cannot be masked (use "
                                             "--codec fp32 or int8)")
            ensure(out.agents >= 3,
                   "--secagg needs at least 3 agents (a sum of two reveals each one to the other)")
            ensure(out.dp is None or out.dp_mode == "distributed",
                   "--secagg hides each update from the aggregator: it cannot add central DP noise; use "
                   "--dp-mode distributed")
        if out.ranks is not None:
            ranks = out.site_ranks()
            ensure(len(ranks) == out.agents, f"--ranks gives {len(ranks)} ranks for {out.agents} agents")
            ensure(out.method == "lora", f"--ranks needs a LoRA method, got {out.method!r}")
            ensure(not out.secagg and out.dp is None, "--ranks cannot be combined with --secagg or --dp")
        ensure(out.rank_aggregation is None or out.rank_aggregation in names.RANK_RULES,
               f"--rank-aggregation must be one of {names.RANK_RULES}, got {out.rank_aggregation!r}")
        mu = out.prox_mu
        ensure(isinstance(mu, int | float) and not isinstance(mu, bool) and 0 <= mu < float("inf"),
               f"prox_mu must be a finite number >= 0, got {mu!r}")
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
    "codec_warmup_rounds": 5,
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
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

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
    for key in ("out", "work_dir", "cache_dir", "console_users"):
        if key in table:
            table[key] = Path(table[key])
    return table

