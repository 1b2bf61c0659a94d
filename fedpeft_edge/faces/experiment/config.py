"""The experiment grid: its TOML config, the federation settings shared by every cell, and the cells."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft_edge.faces.tasks import SplitConfig, TaskConfig
from fedpeft_edge.runtime.errors import InvalidValueError, ensure
from fedpeft_edge.runtime.names import AGGREGATIONS, ROBUST_RULES

ATTACKS = ("none", "signflip", "scaled", "labelflip")

MINILM_PARAMS = 22_713_216  # all-MiniLM-L6-v2 parameter count (embeddings + 6 layers), for fp32 comparisons
COMPRESSIONS = {
    "fp32": {"mode": "fp32"},
    "int8": {"mode": "int8"},
    "topk_int8": {"mode": "topk_int8", "topk_ratio": 0.01},
    "topk_fp32": {"mode": "topk_fp32", "topk_ratio": 0.01},
    "topk10_int8": {"mode": "topk_int8", "topk_ratio": 0.1},
}



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
    # Unequal local work: site i trains max(1, round(local_steps × site_speed[i])) steps per round, as a
    # fixed time budget ([agent] time_budget_s) gives a slower CPU. None: every site local_steps.
    site_speed: tuple[float, ...] | None = None
    aggregation: str = "fedavg"  # the aggregator's [aggregator] aggregation: fedavg or fednova
    # FedPer: tensors (patterns, as [agent] private_tensors) every site keeps to itself; () = plain FedAvg
    private_tensors: tuple[str, ...] = ()
    # FedRep (with private_tensors): steps on the private tensors alone before local_steps on the shared
    # ones alone, each round ([agent] fedrep_head_steps); 0: FedPer (both trained together)
    fedrep_head_steps: int = 0
    # Byzantine-robust rule at close ([robust] rule: none, median, trimmed_mean with 25 % each side,
    # multi_krum with f = malicious); the grid's median-relative lying-site bounds are off unless bounds
    robust_rule: str = "none"
    bounds: bool = False
    # Client-level DP: the ε to spend over the rounds (δ = 1e-5; 0: off), who adds the noise, the clip
    # norm C (0: half of AdamW's largest move, lr·local_steps·√n / 2)
    dp_epsilon: float = 0.0
    dp_mode: str = "central"
    dp_clip: float = 0.0
    # Poisoning: the last `malicious` sites attack: signflip (send −10 × the delta), scaled (+20 ×),
    # labelflip (train on labels shifted by one class)
    malicious: int = 0
    attack: str = "none"

    def site_steps(self) -> list[int]:
        """The local steps of each site per round."""
        speed = self.site_speed or (1.0,) * self.clients
        return [max(1, round(self.local_steps * v)) for v in speed]

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
        ensure(self.aggregation in AGGREGATIONS,
               f"experiment.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        ensure(isinstance(self.private_tensors, list | tuple)
               and all(isinstance(x, str) and x for x in self.private_tensors),
               "experiment.private_tensors must be a list of tensor-name patterns")
        object.__setattr__(self, "private_tensors", tuple(self.private_tensors))
        ensure(isinstance(self.fedrep_head_steps, int) and not isinstance(self.fedrep_head_steps, bool)
               and self.fedrep_head_steps >= 0, "experiment.fedrep_head_steps must be an int >= 0")
        ensure(not self.fedrep_head_steps or self.private_tensors,
               "experiment.fedrep_head_steps (FedRep) needs private_tensors: the head it trains first")
        ensure(self.robust_rule in ROBUST_RULES,
               f"experiment.robust_rule must be one of {ROBUST_RULES}, got {self.robust_rule!r}")
        ensure(self.dp_mode in ("central", "distributed"),
               "experiment.dp_mode must be central or distributed")
        for name in ("dp_epsilon", "dp_clip"):
            v = getattr(self, name)
            ensure(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < math.inf,
                   f"experiment.{name} must be a finite number >= 0, got {v!r}")
        ensure(self.attack in ATTACKS, f"experiment.attack must be one of {ATTACKS}, got {self.attack!r}")
        ensure(isinstance(self.malicious, int) and 0 <= self.malicious < self.clients,
               f"experiment.malicious must be an int in [0, clients), got {self.malicious!r}")
        if self.site_speed is not None:
            speed = self.site_speed
            ok = isinstance(speed, list | tuple) and len(speed) == self.clients and all(
                isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < math.inf for v in speed)
            ensure(ok, f"experiment.site_speed must list one finite number > 0 per site ({self.clients}), "
                       f"got {speed!r}")
            object.__setattr__(self, "site_speed", tuple(float(v) for v in speed))


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
    prox_mus: tuple[float, ...] = (0.0,)  # FedProx's mu of every site (0: plain local training, FedAvg)
    # [variants.<label>]: the whole grid is run once per variant, its keys replacing [experiment]'s
    # (e.g. site_speed, aggregation); () runs it once with [experiment] as it is.
    variants: tuple[tuple[str, FederationSettings], ...] = ()

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
        known_top = {"experiment", "grid", "tasks", "methods", "compression", "variants"}
        unknown = sorted(set(data) - known_top)
        ensure(not unknown, f"unknown experiment config tables: {', '.join(unknown)}")
        exp = dict(data.get("experiment", {}))
        name = str(exp.pop("name", "experiment"))
        out_dir = exp.pop("out_dir", None)
        settings = FederationSettings(**_only_known(FederationSettings, exp, "experiment"))
        variants = _variants(data.get("variants", {}), exp)
        grid = dict(data.get("grid", {}))
        task_names = tuple(grid.pop("tasks", ["text"]))
        methods = tuple(grid.pop("methods", ["lora"]))
        splits = tuple(SplitConfig.parse(s) for s in grid.pop("splits", ["iid"]))
        compressions = tuple(grid.pop("compressions", ["fp32"]))
        skip = tuple(grid.pop("skip", []))
        prox_mus = tuple(_prox_mu(v) for v in grid.pop("prox_mus", [0.0]))
        ensure(len(set(prox_mus)) == len(prox_mus), f"[grid] prox_mus repeats a value: {list(prox_mus)}")
        ensure(not grid, f"unknown [grid] keys: {', '.join(sorted(grid))}")
        custom = data.get("compression", {})
        # a name of its own is a codec variant that [compression.<name>] defines (with its mode)
        for c in compressions:
            ensure(c in COMPRESSIONS or "mode" in custom.get(c, {}),
                   f"unknown compression {c!r}; known: {', '.join(COMPRESSIONS)}, or define "
                   f"[compression.{c}] with a mode")
        ensure(task_names and methods and splits and compressions and prox_mus,
               "every grid axis needs at least one value")
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
            prox_mus=prox_mus,
            variants=variants,
        )

    def runs(self) -> list[tuple[str, ExperimentConfig]]:
        """``(variant label, config)`` to run every cell under: each variant's settings, or the config
        itself (label "") when it has no variants."""
        if not self.variants:
            return [("", self)]
        return [(label, dataclasses.replace(self, settings=vs)) for label, vs in self.variants]

    def lr_for(self, task: str, method: str) -> float:
        return self.lr[task].get(method, self.lr[task]["*"])

    def codec_config(self, compression: str) -> Any:
        from fedpeft_edge.protocol.codec import CodecConfig

        params = dict(COMPRESSIONS.get(compression, {}))
        params.update(self.compression_overrides.get(compression, {}))
        return CodecConfig(**params)

    def cells(self) -> list[tuple[str, str, SplitConfig, str, float]]:
        """(task, method, split, compression, prox_mu) of every cell to run."""
        out = []
        for t, m in itertools.product(self.tasks, self.methods):
            if f"{t}/{m}" in self.skip_cells:
                continue
            for s, c, mu in itertools.product(self.splits, self.compressions, self.prox_mus):
                out.append((t, m, s, c, mu))
        return out


def _prox_mu(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < float("inf")
    ensure(ok, f"[grid] prox_mus: every value must be a finite number >= 0, got {value!r}")
    return float(value)


def _variants(tables: Any, base: Mapping[str, Any]) -> tuple[tuple[str, FederationSettings], ...]:
    """``[variants.<label>]`` tables: [experiment]'s settings with the variant's keys replaced."""
    ensure(isinstance(tables, Mapping), "[variants] must hold tables: [variants.<label>]")
    out = []
    for label, table in tables.items():
        ensure(isinstance(table, Mapping) and label, f"[variants.{label}] must be a table with a label")
        out.append((str(label), FederationSettings(**{**base, **_only_known(FederationSettings, table,
                                                                             f"variants.{label}")})))
    return tuple(out)


def _only_known(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    ensure(not unknown, f"unknown [{what}] keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return dict(data)
