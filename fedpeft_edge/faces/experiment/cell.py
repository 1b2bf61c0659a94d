"""One cell of the grid: a whole federation in one process, through the real site encoder and central core."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.faces import report as rep
from fedpeft_edge.faces.experiment.config import ExperimentConfig
from fedpeft_edge.faces.tasks import PeakRss, SplitConfig, TaskData, iterate, split_sites, take
from fedpeft_edge.runtime.errors import ensure

FLEET = "experiment"  # the fleet name on the in-memory messages; no broker sees it


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
    prox_mu: float = 0.0  # FedProx's mu of every site of the cell (0: FedAvg's plain local training)
    variant: str = ""  # the [variants.<label>] it ran under ("" without variants)
    aggregation: str = "fedavg"  # the aggregator's rule: fedavg or fednova
    site_steps: list[int] = field(default_factory=list)  # local steps of each site per round

    @property
    def key(self) -> str:
        prox = f"/prox {self.prox_mu:g}" if self.prox_mu else ""
        variant = f"/{self.variant}" if self.variant else ""
        return f"{self.task}/{self.method}/{self.split}/{self.compression}{prox}{variant}"

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


class CentralEndpoint:
    """The aggregator of one cell: :class:`~fedpeft_edge.central.core.AggregatorCore` kept in memory.

    Only the glue the MQTT service and the agent would otherwise provide lives here: updates arrive as the
    :class:`~fedpeft_edge.protocol.wire.UpdateMessage` an agent builds, the round closes when every site
    was accepted, and the global is read back by decoding the core's ``GlobalMessage`` as a site does.
    Validation, FedAvg weighting and the server optimizer are all the core's.
    """

    def __init__(self, initial: np.ndarray, *, spec_hash: str, sites: int, rounds: int, strategy: str,
                 server_lr: float, aggregation: str = "fedavg", robust_rule: str = "none",
                 privacy: Any = None, krum_byzantine: int = 1, bounds: bool = False) -> None:
        from fedpeft_edge.central.core import AggregatorConfig, AggregatorCore
        from fedpeft_edge.protocol.privacy import PrivacyPolicy

        self.n_params = int(initial.size)
        config = AggregatorConfig(
            fleet=FLEET,
            n_params=self.n_params,
            spec_hash=spec_hash,
            min_clients=sites,
            quorum=sites,  # every site takes part in every round, as in the grid's design
            server_optimizer=strategy,
            server_opt_params={"lr": float(server_lr)},
            aggregation=aggregation,  # fednova: each update normalised by its "steps" metric
            max_rounds=rounds,
            # The grid compares PEFT methods and codecs under plain FedAvg weighting (the figures in
            # docs/experiments.md); the service's lying-site bounds only with [experiment] bounds = true.
            **({} if bounds else {"norm_median_multiplier": 0.0, "norm_reject_multiplier": 0.0,
                                  "samples_median_multiplier": 0.0, "steps_median_multiplier": 0.0}),
            robust_rule=robust_rule,
            krum_byzantine=krum_byzantine,
            trim_fraction=0.25,
            privacy=privacy or PrivacyPolicy(),
        )
        self.core = AggregatorCore(config, None, initial_global=initial)
        self.global_flat = self._received_global()

    def _received_global(self) -> np.ndarray:
        """What a site gets: the core's global message, decoded by the site's codec."""
        from fedpeft_edge.protocol.codec import decode_global

        return decode_global(self.core.global_message().vector, self.n_params)

    def submit(self, client_id: str, encoded: Any, num_samples: int, metrics: Mapping[str, float]) -> None:
        """Offer one site's encoded update for the open round, in the message the agent sends."""
        from fedpeft_edge.protocol.wire import UpdateMessage

        finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        msg = UpdateMessage(FLEET, self.core.round, client_id, self.core.config.spec_hash, int(num_samples),
                            finite, encoded)
        decision = self.core.offer(msg, sender=client_id)
        # In one process nothing can be late or duplicated: a refusal is a real fault (e.g. NaN update).
        ensure(decision.accepted, f"the aggregator refused {client_id}'s update for round {msg.round}: "
                                  f"{decision.status} ({decision.reason})")

    def close_round(self) -> np.ndarray:
        """Close the round (the core applies its server optimizer) and return the new global as received."""
        ensure(self.core.ready_to_close(), "round not ready to close: not every site's update was accepted")
        self.core.close_round()
        self.global_flat = self._received_global()
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
    prox_mu: float = 0.0,
) -> CellResult:
    """One federation: ``rounds`` rounds over ``clients`` sites, then personalisation per site.

    Each site trains from the current global, encodes its delta with its own
    :class:`~fedpeft_edge.site.encoder.UpdateEncoder` (error-feedback residual kept across rounds) and
    submits it to the :class:`CentralEndpoint`, weighted by its training-set size. ``prox_mu`` > 0 is
    FedProx: every local training (personalisation too) is pulled toward the global it started from.
    """
    from fedpeft_edge.site.encoder import UpdateEncoder
    from fedpeft_edge.site.personal import PrivateParts, train_fedrep

    s = config.settings
    started = time.perf_counter()
    peak.reset()
    shards = split_sites(task, split, s.clients, seed=s.seed, local_test_fraction=s.local_test_fraction)
    trainer.load_state(initial_state)
    trainer.prox_mu = float(prox_mu)  # the trainer is shared by the cells; its anchor: each train()'s start
    initial = trainer.get_flat()
    n = int(initial.size)
    codec = config.codec_config(compression)
    encoders = [UpdateEncoder(codec, n, seed=s.seed * 1000 + i, segments=trainer.layout.segments)
                for i in range(s.clients)]
    privacy = _privacy(s, n, config.lr_for(task_name, method))
    central = CentralEndpoint(initial, spec_hash=bundle.spec_hash, sites=s.clients, rounds=s.rounds,
                              strategy=s.strategy, server_lr=s.server_lr, aggregation=s.aggregation,
                              robust_rule=s.robust_rule, privacy=privacy, krum_byzantine=max(1, s.malicious),
                              bounds=s.bounds)
    noise = None
    if privacy.mode == "distributed":
        from fedpeft_edge.site.privacy import SiteNoise

        noise = [SiteNoise(privacy, np.random.default_rng(s.seed * 31 + i)) for i in range(s.clients)]
    attackers = set(range(s.clients - s.malicious, s.clients)) if s.attack != "none" else set()
    site_steps = s.site_steps()  # unequal local work (site_speed), as a time budget on slower CPUs gives
    init_acc, _ = evaluate(trainer, task.test_inputs, task.test_labels, s.eval_batch_size)
    site_state = [work_dir / f"site{i}.state" for i in range(s.clients)]
    site_batches = [
        iterate(
            take(task.train_inputs, sh.train_idx),
            _labels(task.train_labels[sh.train_idx], task.num_classes,
                    i in attackers and s.attack == "labelflip"),
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
    # FedPer ([experiment] private_tensors): each site's own values of those tensors, as the agent keeps them
    private = [PrivateParts(trainer.layout, list(s.private_tensors), work_dir / f"private{i}")
               for i in range(s.clients)]
    for rnd in range(s.rounds):
        round_bytes, losses = 0, []
        global_flat = central.global_flat
        for i, shard in enumerate(shards):
            trainer.load_state(site_state[i] if rnd > 0 else initial_state)
            start = private[i].start_from(global_flat)
            trainer.set_flat(start)
            if s.fedrep_head_steps:  # FedRep: the private head alone, then the shared body alone
                head, metrics = train_fedrep(trainer, private[i], site_batches[i], site_batches[i],
                                             head_steps=s.fedrep_head_steps, body_steps=site_steps[i])
                step_seconds += head.seconds
            else:
                metrics = trainer.train(site_batches[i], max_steps=site_steps[i])
            step_seconds += metrics.seconds
            steps += metrics.steps
            losses.append(metrics.loss)
            trainer.save_state(site_state[i])
            trained = trainer.get_flat()
            private[i].keep(trained)
            delta = private[i].shared_delta(trained - start)
            if i in attackers and s.attack in ATTACK_FACTORS:
                delta = delta * np.float32(ATTACK_FACTORS[s.attack])
            if noise is not None:
                delta = noise[i].apply(delta)  # distributed DP: the site clips and adds its share
            encoded = encoders[i].encode(delta)
            round_bytes += encoded.nbytes
            updates += 1
            # FedAvg's weight is the site's training-set size (the agent would report the samples it saw).
            central.submit(f"site-{i + 1}", encoded, shard.num_train,
                           {"loss": metrics.loss, "train_seconds": metrics.seconds, "steps": metrics.steps,
                            "accuracy": metrics.accuracy})
        global_flat = central.close_round()
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
        trainer.set_flat(private[i].start_from(central.global_flat))  # with FedPer: the site's own head
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
        prox_mu=float(prox_mu),
        aggregation=s.aggregation,
        site_steps=site_steps,
    )


ATTACK_FACTORS = {"signflip": -10.0, "scaled": 20.0}  # what a poisoning site multiplies its delta by


def _labels(labels: np.ndarray, num_classes: int, flip: bool) -> np.ndarray:
    """A label-flipping site trains on every label shifted by one class."""
    return (labels + 1) % num_classes if flip else labels


def _privacy(s: Any, n_params: int, lr: float) -> Any:
    """The cell's ``[privacy]``: off, or the noise that spends ``dp_epsilon`` over the rounds (δ = 1e-5)."""
    from fedpeft_edge.protocol.privacy import PrivacyPolicy

    if not s.dp_epsilon:
        return PrivacyPolicy()
    from fedpeft_edge.central.privacy import calibrate_noise

    z = calibrate_noise(float(s.dp_epsilon), rounds=s.rounds, delta=1e-5)
    clip = s.dp_clip or 0.5 * lr * s.local_steps * math.sqrt(n_params)
    return PrivacyPolicy(mode=s.dp_mode, noise_multiplier=z, clip_norm=clip, expected_sites=s.clients)


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
