"""A site agent's configuration: ONE dataclass, :class:`AgentConfig`, filled from TOML and the CLI alike.

Example::

    [connection]
    host = "broker.plant.local"
    port = 8883
    username = "site-07"
    password_file = "/etc/fedpeft/site-07.pass"
    tls_ca = "/etc/fedpeft/ca.crt"

    [fleet]
    name = "line-3"

    [agent]
    client_id = "site-07"
    state_dir = "/var/lib/fedpeft/agent"
    local_steps = 50

    [codec]
    mode = "topk_int8"
    topk_ratio = 0.01

    [trainer]
    kind = "gradient"                              # the default (stock onnxruntime); "ort": ORT Training
    gradient_dir = "/var/lib/fedpeft/gradient"     # lowered centrally; or bundle_dir, lowered on first start
    prox_mu = 0.01                                 # optional FedProx term toward the round's global (0: off)

    [data]
    path = "/var/lib/fedpeft/site-data.jsonl"   # or: dataset = "20newsgroups" + client_index, num_clients
    classes = ["normal", "bearing_fault", "misalignment"]
    options = { prepared_dir = "/var/lib/fedpeft/model", max_len = 64 }

    [governor]                                  # optional; the default restricts nothing
    windows = ["22:00-06:00"]                   # local time; several allowed
    max_other_cpu_percent = 50                  # pause while the plant's processes use more
    min_available_mb = 512
    max_threads = 2

    [bundle]                                    # optional: one signed file instead of [trainer] folders
    path = "/var/lib/fedpeft/site.bundle"       # from `fedpeft-edge prepare --site-bundle`
    public_key = "/etc/fedpeft/bundle-signing.pub"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft_edge.data.local_files import LocalDataLimits, check_classes
from fedpeft_edge.protocol.codec import CodecConfig
from fedpeft_edge.protocol.config import (
    ConnectionSettings,
    FleetSettings,
    TrainerSettings,
    load_service_config,
)
from fedpeft_edge.protocol.privacy import PrivacyPolicy
from fedpeft_edge.protocol.secagg_policy import SecAggPolicy
from fedpeft_edge.runtime.errors import InvalidValueError


@dataclass
class AgentSettings:
    """``fedpeft-edge agent``: one site's training agent."""

    client_id: str = ""
    state_dir: str = "fedpeft-state/agent"
    local_epochs: int = 1
    local_steps: int | None = None  # cap on optimizer steps per round (None: full epochs)
    # Capability-aware local work: train this many seconds per round instead of a fixed amount (checked
    # between steps; the data is cycled, local_epochs does not apply), at least min_local_steps and at
    # most local_steps if set. None: the fixed local_steps / local_epochs.
    time_budget_s: float | None = None
    min_local_steps: int = 1
    threads: int = 1
    max_rounds: int | None = None  # stop after this many rounds even if the aggregator goes on
    newer_global_policy: str = "finish"  # finish | abandon (a newer global arrived while training)
    dump_updates: bool = False  # keep a copy of every sent update in <state_dir>/sent/ (audit, tests)
    evaluate: bool = True
    # FedPer-style personalisation (site/personal.py): trainable tensors matching these patterns (e.g.
    # ["head.*"]) stay on the site; it sends only the shared part and keeps its own values of these.
    private_tensors: list[str] = field(default_factory=list)
    # FedRep (with private_tensors): each round first trains the private tensors alone (the shared ones
    # frozen) for this many steps, then the shared ones alone (the private ones frozen); 0: FedPer, both
    # together.
    fedrep_head_steps: int = 0
    # The LoRA rank this site trains (peft/rank_slots.py): the first lora_rank rank slots of the bundle's
    # rank-R adapter, the rest held at zero; it sends only those. 0: the bundle's rank R. A weaker link
    # takes a smaller rank; the aggregator averages each slot over the sites that train it. "auto": the
    # largest rank whose update, under this site's [codec], fits update_budget_bytes (once a top-k
    # warm-up is over: its first, denser updates are larger).
    lora_rank: int | str = 0
    update_budget_bytes: int = 0  # the site's uplink per round, for lora_rank = "auto"
    idle_exit_s: float | None = None  # stop when no new global arrived for this long (tests, demos)
    # Publish an update again when the aggregator's acknowledgement has not come this long after the
    # last send (doubling per timer resend, up to 8x); reconnects and re-announced globals resend at once.
    resend_after_s: float = 60.0
    drain_timeout_s: float = 30.0  # at the end, wait this long for outstanding acknowledgements
    # After the aggregator's final round: false (a service) waits for a new federation and joins it;
    # true (demos, tests, one-shot runs) drains the outbox and returns.
    exit_after_final: bool = False
    # Disk bounds for an agent that runs for months: updates waiting for an ack (oldest dropped beyond
    # this, with a WARNING) and audit copies in sent/ (oldest deleted).
    max_outbox_updates: int = 100
    max_sent_updates: int = 1000
    # Prometheus metrics of this site (site/metrics.py), both off by default: an HTTP /metrics on
    # metrics_bind:metrics_port (0: off), and/or a textfile for node_exporter's textfile collector.
    metrics_port: int = 0
    metrics_bind: str = "127.0.0.1"
    metrics_textfile: str | None = None


@dataclass
class GovernorSettings:
    """``[governor]``: when the site may train (site/governor.py). The default restricts nothing."""

    windows: list[str] = field(default_factory=list)  # local time, e.g. ["22:00-06:00", "12:00-13:00"]
    max_other_cpu_percent: float | None = None  # pause while other processes use more (of all cores)
    min_available_mb: float | None = None  # pause while less memory is available
    max_threads: int | None = None  # cap on the trainer's intra-op threads ([agent] threads above it)
    check_interval_s: float = 5.0  # how often the conditions are re-evaluated (between training steps)
    cpu_window_s: float = 10.0  # the CPU reading is an average over this span
    hysteresis_percent: float = 10.0  # resume only this far (points of CPU, % of memory) inside the limit

    def __post_init__(self) -> None:
        from fedpeft_edge.site.governor import Governor

        Governor.from_settings(self)  # validates every value (windows, ranges) when the file is read


@dataclass
class DataSettings:
    """The site's data: either its own file (``path`` + ``classes``) or a share of a benchmark dataset
    (``dataset`` + partition keys, for demos). ``options``: model input settings (``prepared_dir``, ...)."""

    dataset: str | None = None  # benchmark dataset name (exclusive with path)
    path: str | None = None  # the site's own .jsonl / .csv / .npz file (fedpeft_edge/data/local_files.py)
    classes: list[str] = field(default_factory=list)  # with path: label names in the head's output order
    eval_fraction: float = 0.2  # with path: held-out local test part (fixed by seed)
    max_file_bytes: int = 512 * 1024 * 1024  # with path: limits checked while reading the file
    max_rows: int = 200_000
    max_text_chars: int = 20_000
    split: str = "train"
    client_index: int = 0
    num_clients: int = 1
    partition: str = "dirichlet"
    alpha: float = 0.5
    seed: int = 0
    max_samples: int | None = None
    batch_size: int = 16
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Source keys must agree (also re-checked after command-line overrides)."""
        if self.dataset and self.path:
            raise InvalidValueError(
                "[data] set either dataset (a benchmark share) or path (the site's own file), "
                             "not both")
        if self.path:
            check_classes(self.classes)
            self.limits()
        elif self.classes:
            raise InvalidValueError(
                "[data] classes applies to path only (a named dataset has its own classes)")
        if not (isinstance(self.eval_fraction, (int, float)) and 0.0 <= self.eval_fraction < 1.0):
            raise InvalidValueError(f"[data] eval_fraction must be in [0, 1), got {self.eval_fraction!r}")

    def limits(self) -> LocalDataLimits:
        return LocalDataLimits(max_file_bytes=self.max_file_bytes, max_rows=self.max_rows,
                               max_text_chars=self.max_text_chars)


@dataclass
class BundleSettings:
    """``[bundle]``: the site bundle (site/bundle_setup.py), verified before anything else and extracted
    into ``<state_dir>/bundles/<bundle id>``; it then provides the gradient model, the tokenizer or image
    settings, the label names and the fleet's codec defaults."""

    path: str | None = None  # the bundle file; None: no bundle, [trainer] names the folders
    public_key: str | None = None  # trusted Ed25519 public key (PEM) that must have signed it
    allow_unsigned: bool = False  # development only: accept an unsigned bundle (or no public key)
    max_bytes: int = 8 << 30  # refuse bigger bundle files before reading them


@dataclass
class AgentConfig:
    """Everything ``fedpeft-edge agent`` reads: ``[connection] [fleet] [agent] [codec] [trainer] [data]
    [governor] [bundle] [privacy] [secagg]``."""

    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    codec: CodecConfig = field(default_factory=CodecConfig)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    data: DataSettings = field(default_factory=DataSettings)
    governor: GovernorSettings = field(default_factory=GovernorSettings)
    bundle: BundleSettings = field(default_factory=BundleSettings)
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)  # distributed DP: clip + noise here
    secagg: SecAggPolicy = field(default_factory=SecAggPolicy)  # secure aggregation (site/secure_sum.py)
    source: str | None = None  # the file it came from (for log messages)


def load_agent_config(path: str | Path | None = None, text: str | None = None) -> AgentConfig:
    """Read a TOML file (or text); missing sections take their defaults, other services' are ignored."""
    return load_service_config(AgentConfig, path, text)


__all__ = ["AgentConfig", "AgentSettings", "BundleSettings", "DataSettings", "GovernorSettings",
           "load_agent_config"]
