"""The local fleet: service configs, broker, aggregator and agent processes, and the observer of globals."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import fedpeft_edge
from fedpeft_edge.faces.demo.options import DemoOptions
from fedpeft_edge.faces.demo.site import FACTORY, save_shard
from fedpeft_edge.faces.tasks import TaskData, take
from fedpeft_edge.runtime.errors import FedPeftError, ensure

FLEET = "demo"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_service_config(path: Path, role: str, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """A service TOML (None values left out), read back first by the loader of the service ``role`` runs:
    the services' configs are strict, so a key they do not know fails here, not in a child process."""
    from fedpeft_edge.central.config import load_aggregator_config
    from fedpeft_edge.site.config import load_agent_config

    loaders = {"aggregate": load_aggregator_config, "agent": load_agent_config}
    ensure(role in loaders, f"no service config for role {role!r}")
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None)
        lines.append("")
    text = "\n".join(lines)
    loaders[role](text=text)
    path.write_text(text)
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


def write_shards(task: TaskData, shards: Sequence[Any], sites_dir: Path) -> list[Path]:
    """One npz per site (its training part and held-out local test part): all a site ever reads."""
    sites_dir.mkdir(exist_ok=True)
    paths = []
    for shard in shards:
        path = sites_dir / f"site-{shard.site + 1}.npz"
        save_shard(
            path,
            take(task.train_inputs, shard.train_idx),
            task.train_labels[shard.train_idx],
            take(task.train_inputs, shard.test_idx),
            task.train_labels[shard.test_idx],
        )
        paths.append(path)
    return paths


def service_env(threads: int) -> dict[str, str]:
    """The environment of the service processes: this one, one BLAS thread budget, this package first."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    pkg_root = str(Path(fedpeft_edge.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, *filter(None, [env.get("PYTHONPATH")])])
    return env


class LocalFleet:
    """Broker (started at construction), then :meth:`start`: observer, aggregator and agent processes.

    :meth:`close` stops whatever was started, in reverse order; call it from a ``finally``.
    """

    def __init__(
        self,
        opts: DemoOptions,
        work: Path,
        *,
        spec_hash: str,
        bundle_dir: Path,
        gradient_dir: Path | None = None,
        shard_paths: Sequence[Path],
        n_params: int,
        log: Callable[[str], None],
    ) -> None:
        from fedpeft_edge.central.broker import start_local_broker

        self.opts = opts
        self.work = work
        self.spec_hash = spec_hash
        self.bundle_dir = bundle_dir
        self.gradient_dir = gradient_dir  # set: the agents train with GradientTrainer, else OrtTrainer
        self.shard_paths = list(shard_paths)
        self.n_params = n_params
        self.log = log
        self.metrics_path = work / "aggregator" / "metrics.jsonl"
        self.procs: list[Proc] = []
        self.agent_dirs: list[Path] = []
        self.collector: GlobalCollector | None = None
        # The embedded broker runs in this process; its per-connection chatter would drown the progress
        # display.
        for noisy in ("amqtt", "transitions"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
        self.broker = start_local_broker(port=0, prefer=opts.broker)  # type: ignore[arg-type]
        log(f"broker: {self.broker.kind} on {self.broker.host}:{self.broker.port}")
        # amqtt speaks MQTT 3.1.1 only: asking for it directly spares every client a refused MQTT 5 attempt.
        self.protocol = "3.1.1" if self.broker.kind == "embedded" else "auto"
        self.connection = {"host": self.broker.host, "port": self.broker.port, "protocol": self.protocol}
        self.privacy = self._privacy_table()

    def _privacy_table(self) -> dict[str, Any]:
        """``[privacy]`` for ``--dp EPS`` (aggregator, and agents in distributed mode): the noise multiplier
        that spends exactly ε over the demo's rounds (RDP accountant, δ = 1e-5), the clip norm C."""
        opts = self.opts
        if opts.dp is None:
            return {}
        from fedpeft_edge.central.privacy import calibrate_noise

        z = calibrate_noise(float(opts.dp), rounds=int(opts.rounds), delta=1e-5)  # type: ignore[arg-type]
        # AdamW moves each parameter by about lr per step at most: half of that worst case is a clip norm
        # that depends on no site's data
        steps = int(opts.local_steps)  # type: ignore[arg-type]
        clip = opts.dp_clip or 0.5 * float(opts.lr) * steps * math.sqrt(self.n_params)  # type: ignore[arg-type]
        self.log(f"differential privacy: {opts.dp_mode}, ε = {opts.dp:g} at δ = 1e-5 over {opts.rounds} "
                 f"rounds → noise multiplier {z:.3g}, clip norm {clip:.3g}")
        return {"mode": opts.dp_mode, "noise_multiplier": z, "clip_norm": clip, "delta": 1e-5,
                "epsilon_budget": float(opts.dp), "expected_sites": int(opts.agents)}  # type: ignore[arg-type]

    @property
    def aggregator(self) -> Proc:
        return self.procs[0]

    @property
    def agents(self) -> list[Proc]:
        return self.procs[1:]

    def _aggregator_config(self) -> Path:
        opts = self.opts
        return write_service_config(
            self.work / "aggregator.toml",
            "aggregate",
            {
                "connection": self.connection,
                "fleet": {"name": FLEET},
                "aggregator": {
                    "client_id": "aggregator",
                    "state_dir": str(self.work / "aggregator"),
                    "max_rounds": opts.rounds,
                    "quorum": opts.agents,
                    "min_clients": opts.agents,
                    "round_deadline_s": opts.round_deadline_s,
                    "initial_global": str(self.work / "initial.npy"),
                    "spec_hash": self.spec_hash,
                    "metrics_file": str(self.metrics_path),
                    "server_optimizer": "fedavg",
                    **({"rank_aggregation": opts.rank_aggregation} if opts.rank_aggregation else {}),
                },
                # the adapter's layout: the aggregator maps a lower-rank site's values onto the rank slots
                **({"trainer": self._layout_source()} if opts.ranks else {}),
                **({"privacy": self.privacy} if self.privacy else {}),
                **({"secagg": self._secagg_table()} if opts.secagg else {}),
            },
        )

    def _layout_source(self) -> dict[str, Any]:
        if self.gradient_dir is not None:
            return {"kind": "gradient", "gradient_dir": str(self.gradient_dir)}
        return {"kind": "ort", "bundle_dir": str(self.bundle_dir)}

    def _secagg_table(self) -> dict[str, Any]:
        """``[secagg]`` of the aggregator: the sites by name, and a clip range covering AdamW's largest move
        in a round (about lr per step), so quantisation clips nothing the sites can produce."""
        opts = self.opts
        clip = max(0.05, 1.5 * float(opts.lr) * int(opts.local_steps))  # type: ignore[arg-type]
        names = [f"site-{i + 1}" for i in range(len(self.shard_paths))]
        self.log(f"secure aggregation: {len(names)} sites, classic SecAgg (every pair masks), "
                 f"clip ±{clip:.3g}")
        return {"enabled": True, "sites": names, "clip": clip}

    def _agent_config(self, i: int, name: str, state_dir: Path) -> Path:
        opts = self.opts
        codec = {"mode": opts.codec, "topk_ratio": float(opts.topk_ratio or 0.01), "error_feedback": True}
        if opts.codec.startswith("topk") and opts.codec_warmup_rounds:  # dense first round, then shrinking
            codec.update(warmup_rounds=int(opts.codec_warmup_rounds), warmup_start_ratio=1.0)
        return write_service_config(
            self.work / f"{name}.toml",
            "agent",
            {
                "connection": self.connection,
                "fleet": {"name": FLEET},
                "agent": {
                    "client_id": name,
                    "state_dir": str(state_dir),
                    "local_steps": opts.local_steps,
                    "threads": opts.threads_per_agent,
                    "dump_updates": True,
                    "evaluate": True,
                    "idle_exit_s": opts.round_deadline_s,
                    "exit_after_final": True,  # a demo ends with its federation
                    **({"lora_rank": opts.site_ranks()[i]} if opts.ranks else {}),
                },
                "codec": codec,
                **({"privacy": self.privacy} if self.privacy.get("mode") == "distributed" else {}),
                **({"secagg": {"enabled": True}} if opts.secagg else {}),
                "trainer": {
                    "kind": "factory",
                    "factory": FACTORY,
                    "bundle_dir": str(self.bundle_dir),
                    "prox_mu": float(opts.prox_mu),
                    **({"gradient_dir": str(self.gradient_dir)} if self.gradient_dir is not None else {}),
                    "options": {
                        "shard": str(self.shard_paths[i]),
                        "lr": float(opts.lr),  # type: ignore[arg-type]
                        "batch_size": opts.batch_size,
                        "seed": opts.seed + i + 1,
                    },
                },
            },
        )

    def start(self) -> None:
        """The observer first (so no global is missed), then the aggregator, then one agent per shard."""
        env = service_env(self.opts.threads_per_agent)
        agg_cfg = self._aggregator_config()
        self.collector = GlobalCollector(self.broker.host, self.broker.port, self.n_params, self.protocol)
        self.procs.append(
            _spawn("aggregator", service_command("aggregate", agg_cfg), self.work / "aggregator.log", env)
        )
        for i in range(len(self.shard_paths)):
            name = f"site-{i + 1}"
            state_dir = self.work / name
            self.agent_dirs.append(state_dir)
            cfg_path = self._agent_config(i, name, state_dir)
            log_path = self.work / f"{name}.log"
            self.procs.append(_spawn(name, service_command("agent", cfg_path), log_path, env))

    def sent_so_far(self) -> int:
        """Updates the agents have sent (their audit copies), for the live status."""
        return sum(len(list((d / "sent").glob("r*.msg"))) for d in self.agent_dirs if (d / "sent").is_dir())

    def close(self) -> None:
        _stop(self.procs)
        if self.collector is not None:
            # paho logs an error when asked to disconnect a session the broker already dropped; at the
            # end of the demo that is expected, not news
            paho_log = logging.getLogger("fedpeft_edge.protocol.transport.paho")
            level = paho_log.level
            paho_log.setLevel(logging.CRITICAL)
            with contextlib.suppress(Exception):
                self.collector.close()
            paho_log.setLevel(level)
        self.broker.stop()
