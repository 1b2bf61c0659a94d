"""``fedpeft-edge``: command line of the edge runtime.

Subcommands live in a registry (:data:`COMMANDS`); each has its own argument builder and runner, so
new ones (demo, experiment, bench, prepare) are added with :func:`register` without touching the rest.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft_edge.runtime import names
from fedpeft_edge.runtime.errors import FedPeftError, readable_file

log = logging.getLogger("fedpeft_edge.faces.cli")

EPILOG_TOPICS = """\
MQTT topics (fleet = [fleet] name):
  fedpeft/<fleet>/global            retained global adapter, published by the aggregator
  fedpeft/<fleet>/update/<site>     one site's compressed update per round (QoS 1)
  fedpeft/<fleet>/status/<site>     retained online/offline status (offline = last will)
"""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(cmd: Command) -> Command:
    if cmd.name in COMMANDS:
        raise ValueError(f"command {cmd.name!r} registered twice")
    COMMANDS[cmd.name] = cmd
    return cmd


# --- shared options ------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE.toml",
                   help="TOML configuration file; the flags below override single values")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-file", type=Path, help="also write the log to this file")


def _add_connection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker connection ([connection] section)")
    g.add_argument("--host", help="broker host name or address (default 127.0.0.1)")
    g.add_argument("--port", type=int, help="broker port (default 1883; 8883 is usual for TLS)")
    g.add_argument("--username", help="MQTT user name (sites: their site id)")
    g.add_argument("--password-file", help="file whose first line is the MQTT password")
    g.add_argument("--tls-ca", help="CA certificate that signed the broker certificate (enables TLS)")
    g.add_argument("--tls-cert", help="this client's certificate (mutual TLS)")
    g.add_argument("--tls-key", help="this client's private key (mutual TLS)")
    g.add_argument("--protocol", choices=["auto", "5", "3.1.1"], help="MQTT version (auto: 5, else 3.1.1)")
    g.add_argument("--fleet", help="fleet name: which group of sites trains one shared adapter")


def _setup_logging(args: argparse.Namespace) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if getattr(args, "log_file", None):
        handlers.append(logging.FileHandler(args.log_file))
    fmt = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    fmt.converter = time.gmtime  # UTC timestamps: logs from sites in different time zones line up
    root = logging.getLogger()
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(getattr(logging, args.log_level))
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # paho logs "Client is not connected" at ERROR around every reconnect and clean close; the transport
    # says what happened in its own words (protocol/diagnose.py). --log-level DEBUG shows paho's too.
    paho = logging.getLogger("fedpeft_edge.protocol.transport.paho")
    paho.setLevel(logging.DEBUG if root.level <= logging.DEBUG else logging.CRITICAL)


def _load(args: argparse.Namespace, loader: Callable[..., Any]) -> Any:
    """The command's own config dataclass from ``--config`` (or defaults), with the connection flags."""
    from fedpeft_edge.protocol.config import override

    if args.config:
        readable_file(args.config, "configuration file (--config)")
    cfg = loader(args.config) if args.config else loader()
    if hasattr(args, "host"):
        override(cfg.connection, host=args.host, port=args.port, username=args.username,
                 password_file=args.password_file, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                 tls_key=args.tls_key, protocol=args.protocol)
        override(cfg.fleet, name=args.fleet)
    return cfg


def _stop_on_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: object) -> None:
        log.info("signal %d received: stopping after the current step", signum)
        stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


# --- broker ------------------------------------------------------------------------------------------
def _broker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker ([broker] section)")
    g.add_argument("--port", type=int, help="port to listen on (default 1883; 0 = any free port)")
    g.add_argument("--bind", help="address to listen on (default 127.0.0.1; 0.0.0.0 = all interfaces)")
    g.add_argument("--kind", choices=["dev", "plant"],
                   help="dev: loopback, no login. plant: TLS + passwords + per-site ACL")
    g.add_argument("--prefer", choices=["auto", "mosquitto", "embedded"],
                   help="auto: Mosquitto if installed, else the embedded amqtt broker (MQTT 3.1.1)")
    g.add_argument("--data-dir", help="where the generated config, the log and retained/queued messages "
                   "are kept (default: a temporary directory)")
    g.add_argument("--max-packet-size", type=int, help="largest MQTT packet in bytes")
    g.add_argument("--cafile", help="plant: CA certificate")
    g.add_argument("--certfile", help="plant: broker certificate")
    g.add_argument("--keyfile", help="plant: broker private key")
    g.add_argument("--password-file", help="plant: Mosquitto password file (mosquitto_passwd -c -b ...)")
    g.add_argument("--acl-file", help="plant: ACL file (default: broker_config/acl.conf for this fleet)")
    g.add_argument("--require-certificate", action="store_true", default=None,
                   help="plant: sites must present a client certificate (mutual TLS)")
    g.add_argument("--fleet", help="plant: restrict the generated ACL to this fleet (default: all)")


def _broker_run(args: argparse.Namespace) -> int:
    from fedpeft_edge.central.broker import PlantOptions, start_local_broker
    from fedpeft_edge.central.config import load_broker_config
    from fedpeft_edge.protocol.config import override

    cfg = _load(args, load_broker_config)
    b = cfg.broker
    override(b, port=args.port, bind=args.bind, kind=args.kind, prefer=args.prefer, data_dir=args.data_dir,
             max_packet_size=args.max_packet_size, cafile=args.cafile, certfile=args.certfile,
             keyfile=args.keyfile, password_file=args.password_file, acl_file=args.acl_file,
             require_certificate=args.require_certificate)
    plant = None
    if b.kind == "plant":
        missing = [n for n in ("cafile", "certfile", "keyfile", "password_file") if not getattr(b, n)]
        if missing:
            raise FedPeftError(f"--kind plant needs {', '.join('--' + m.replace('_', '-') for m in missing)}")
        plant = PlantOptions(Path(b.cafile), Path(b.certfile), Path(b.keyfile), Path(b.password_file),  # type: ignore[arg-type]
                             Path(b.acl_file) if b.acl_file else None, b.require_certificate,
                             args.fleet or "+")
    stopping = [False]

    def stop() -> None:
        stopping[0] = True

    _stop_on_signals(stop)  # before the broker starts: a signal must never skip its clean stop
    handle = start_local_broker(b.port, b.prefer, b.kind, bind=b.bind, data_dir=b.data_dir,  # type: ignore[arg-type]
                                max_packet_size=b.max_packet_size, plant=plant)
    log.info("%s broker running on %s:%d (%s config); state and log in %s; Ctrl-C stops it",
             handle.kind, handle.host, handle.port, b.kind, handle.data_dir)
    print(f"BROKER {handle.host}:{handle.port}", flush=True)  # machine-readable line for scripts
    try:
        while not stopping[0] and handle.is_running():
            time.sleep(0.2)
        if not stopping[0]:
            lines = [ln for ln in handle.log_text().splitlines() if ln.strip()]
            log.error("the %s broker on port %d exited on its own: %s", handle.kind, handle.port,
                      lines[-1] if lines else "no log line")
    finally:
        handle.stop(keep_dir=b.data_dir is not None)
    return 0 if stopping[0] else 2


register(Command(
    "broker", "run a local MQTT broker (Mosquitto, or embedded amqtt) in the foreground",
    "Start an MQTT broker for fedpeft-edge and keep it running until Ctrl-C.\n\n"
    "dev: listens on loopback only, no login (one machine, demos, tests).\n"
    "plant: TLS listener, user names + passwords, and an ACL so each site may publish only its own\n"
    "update/status topics and read only the global adapter (see broker_config/README.md).\n"
    "Mosquitto keeps retained messages and queued updates in --data-dir across restarts.",
    _broker_args, _broker_run))


# --- aggregate ---------------------------------------------------------------------------------------
def _aggregate_args(p: argparse.ArgumentParser) -> None:
    _add_connection(p)
    g = p.add_argument_group("aggregation ([aggregator] section)")
    g.add_argument("--client-id", help="MQTT client id / user of the aggregator (default aggregator)")
    g.add_argument("--state-dir", help="where round state (resumable after a crash) and metrics.jsonl live")
    g.add_argument("--rounds", type=int, dest="max_rounds", help="number of rounds, then stop")
    g.add_argument("--quorum", type=int, help="close a round as soon as this many updates arrived")
    g.add_argument("--min-clients", type=int, help="at the deadline, close with at least this many updates")
    g.add_argument("--deadline", type=float, dest="round_deadline_s", help="round deadline in seconds")
    g.add_argument("--late-policy", choices=names.LATE_POLICIES,
                   help="updates trained from an older global: drop, or count them down-weighted")
    g.add_argument("--server-optimizer", choices=names.SERVER_OPTIMIZERS)
    g.add_argument("--round-mode", choices=names.ROUND_MODES,
                   help="sync rounds, or fedbuff: a server step per --buffer-k updates, stale ones damped")
    g.add_argument("--buffer-k", type=int, help="fedbuff: updates per server step")
    g.add_argument("--initial-global", help=".npy float32 vector to start from (else the trainer's)")
    g.add_argument("--spec-hash", help="PEFT spec hash every update must carry")
    g.add_argument("--metrics-file",
                   help="JSON lines, one per closed round (default <state-dir>/metrics.jsonl)")
    g = p.add_argument_group("first global ([trainer] section)")
    g.add_argument("--bundle-dir", help="PEFT artifact bundle (made by the prepare step)")
    g.add_argument("--trainer-factory", help="module:function returning a TrainerSetup (custom trainers)")


def _aggregate_run(args: argparse.Namespace) -> int:
    from fedpeft_edge.central.config import load_aggregator_config
    from fedpeft_edge.central.service import AggregatorService
    from fedpeft_edge.protocol.config import override

    cfg = _load(args, load_aggregator_config)
    a = cfg.aggregator
    override(a, client_id=args.client_id, state_dir=args.state_dir, initial_global=args.initial_global,
             spec_hash=args.spec_hash, metrics_file=args.metrics_file)
    a.policy = override(
        a.policy, max_rounds=args.max_rounds, quorum=args.quorum, min_clients=args.min_clients,
                        round_deadline_s=args.round_deadline_s, late_policy=args.late_policy,
                        server_optimizer=args.server_optimizer, round_mode=args.round_mode,
                        buffer_k=args.buffer_k)
    _apply_trainer_flags(cfg, args)
    svc = AggregatorService(cfg)
    _stop_on_signals(svc.stop)
    result = svc.run()
    log.info("aggregator stopped at round %d (%s); counters %s", result.final_round,
             "finished" if result.finished else "not finished", result.counters)
    return 0


register(Command(
    "aggregate", "run the central aggregator (collects site updates, publishes the global adapter)",
    "Collect the sites' compressed adapter updates from fedpeft/<fleet>/update/+, check every message\n"
    "(size, format, round, spec hash, duplicates), average them (FedAvg or a server optimizer) when a\n"
    "round reaches its quorum or deadline, and publish the new global adapter retained on\n"
    "fedpeft/<fleet>/global. State is saved in --state-dir after every accepted update, so the service\n"
    "resumes where it stopped after a crash or reboot. Stops after --rounds rounds.",
    _aggregate_args, _aggregate_run))


# --- gateway -----------------------------------------------------------------------------------------
def _gateway_args(p: argparse.ArgumentParser) -> None:
    _add_connection(p)
    g = p.add_argument_group("gateway ([gateway] section)")
    g.add_argument("--client-id", help="MQTT client id / user of the gateway (default gateway)")
    g.add_argument("--state-dir", help="where the line's round state and the partials outbox live")
    g.add_argument("--sites", type=int, dest="quorum", help="seal a batch as soon as this many sites are in")
    g.add_argument("--deadline", type=float, dest="round_deadline_s",
                   help="seal a batch this many seconds after its round opened (with at least one site)")


def _gateway_run(args: argparse.Namespace) -> int:
    from fedpeft_edge.gateway.config import load_gateway_config
    from fedpeft_edge.gateway.service import GatewayService
    from fedpeft_edge.protocol.config import override

    cfg = _load(args, load_gateway_config)
    gw = cfg.gateway
    override(gw, client_id=args.client_id, state_dir=args.state_dir)
    gw.policy = override(gw.policy, quorum=args.quorum, round_deadline_s=args.round_deadline_s)
    svc = GatewayService(cfg)
    _stop_on_signals(svc.stop)
    result = svc.run()
    log.info("gateway stopped at round %d (%s); %d partial(s) sealed; counters %s", result.final_round,
             "finished" if result.finished else "not finished", result.sealed, result.counters)
    return 0


register(Command(
    "gateway", "aggregate one line's sites at the plant and forward one partial upstream",
    "Count the updates of the sites on this plant broker (fedpeft/<fleet>/update/+) exactly as the\n"
    "aggregator would, seal them per round into one partial aggregate, and publish it on\n"
    "fedpeft/<fleet>/partial/<gateway>, which a Mosquitto bridge carries to the central broker\n"
    "(broker_config/bridge-gateway-to-central.conf). Partials are kept on disk until the aggregator\n"
    "acknowledges them; a restart resumes without losing or double-counting any site's update. The\n"
    "aggregator counts partials only from the accounts in its [aggregator] gateways list.",
    _gateway_args, _gateway_run))


# --- agent -------------------------------------------------------------------------------------------
def _add_trainer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trainer and local data ([trainer], [data] sections)")
    g.add_argument("--bundle-dir", help="PEFT artifact bundle (made by the prepare step)")
    g.add_argument("--trainer-factory", help="module:function returning a TrainerSetup (custom trainers)")
    g.add_argument("--dataset", help="dataset name (e.g. reuters_r8, 20newsgroups, fashion_mnist)")
    g.add_argument("--client-index", type=int, help="which share of the dataset this site holds")
    g.add_argument("--num-clients", type=int, help="number of shares the dataset is split into")
    g.add_argument("--partition", choices=names.PARTITIONS)
    g.add_argument("--alpha", type=float, help="Dirichlet concentration (small = very uneven labels)")
    g.add_argument("--seed", type=int)
    g.add_argument("--max-samples", type=int, help="use at most this many local samples")
    g.add_argument("--batch-size", type=int)


def _apply_trainer_flags(cfg: Any, args: argparse.Namespace) -> None:
    """``--bundle-dir``/``--trainer-factory`` into ``[trainer]``; the data flags into ``[data]`` (agent)."""
    from fedpeft_edge.protocol.config import override

    override(cfg.trainer, bundle_dir=args.bundle_dir, factory=args.trainer_factory)
    if args.trainer_factory:
        cfg.trainer.kind = "factory"
    if not hasattr(cfg, "data"):
        return
    override(cfg.data, dataset=args.dataset, client_index=args.client_index, num_clients=args.num_clients,
             partition=args.partition, alpha=args.alpha, seed=args.seed, max_samples=args.max_samples,
             batch_size=args.batch_size)


def _agent_args(p: argparse.ArgumentParser) -> None:
    _add_connection(p)
    g = p.add_argument_group("agent ([agent], [codec] sections)")
    g.add_argument("--client-id", help="this site's id (also its MQTT client id and topic level)")
    g.add_argument("--state-dir", help="where the outbox, error-feedback residual and trainer state live")
    g.add_argument("--local-epochs", type=int)
    g.add_argument("--local-steps", type=int, help="cap on training steps per round")
    g.add_argument("--threads", type=int, help="CPU threads for training (leave cores for the plant)")
    g.add_argument("--max-rounds", type=int, help="stop after sending this many updates")
    g.add_argument("--newer-global-policy", choices=names.NEWER_GLOBAL_POLICIES,
                   help="a newer global arrives while training: finish and send, or abandon the round")
    g.add_argument("--idle-exit", type=float, dest="idle_exit_s",
                   help="stop when no new global arrived for this many seconds")
    g.add_argument("--dump-updates", action="store_true", default=None,
                   help="keep a copy of every sent update in <state-dir>/sent/")
    g.add_argument("--codec", choices=names.CODEC_MODES, dest="codec_mode")
    g.add_argument("--topk-ratio", type=float, help="fraction of coordinates sent per round (top-k)")
    _add_trainer_flags(p)


def _agent_run(args: argparse.Namespace) -> int:
    from fedpeft_edge.protocol.config import override
    from fedpeft_edge.site.agent import EdgeAgent
    from fedpeft_edge.site.config import load_agent_config
    from fedpeft_edge.site.trainer_setup import build_trainer_setup

    cfg = _load(args, load_agent_config)
    override(cfg.agent, client_id=args.client_id, state_dir=args.state_dir, local_epochs=args.local_epochs,
             local_steps=args.local_steps, threads=args.threads, max_rounds=args.max_rounds,
             newer_global_policy=args.newer_global_policy, idle_exit_s=args.idle_exit_s,
             dump_updates=args.dump_updates)
    cfg.codec = override(cfg.codec, mode=args.codec_mode, topk_ratio=args.topk_ratio)
    _apply_trainer_flags(cfg, args)
    if cfg.connection.username is None and cfg.connection.password_file:
        cfg.connection.username = cfg.agent.client_id
    setup = build_trainer_setup(cfg)
    agent = EdgeAgent(cfg, setup.trainer, setup.train_batches_fn, setup.eval_batches_fn,
                      spec_hash=setup.spec_hash, bundle_id=setup.bundle_id)
    _stop_on_signals(agent.stop)
    result = agent.run()
    return 0 if result.final_seen or result.reason in ("max_rounds reached", "idle timeout", "stopped") else 1


register(Command(
    "agent", "run a site's training agent (trains locally, sends only compressed adapter updates)",
    "Wait for the global adapter on fedpeft/<fleet>/global, train it on this site's own data, and send\n"
    "only the compressed change (never the data) to fedpeft/<fleet>/update/<site>. Updates are kept in\n"
    "<state-dir>/outbox until the aggregator acknowledges it counted them (fedpeft/<fleet>/ack/<site>),\n"
    "so nothing is lost when the network or the broker is down, even if the broker crashes; the agent\n"
    "resumes after a restart. It stays after the aggregator's last round and joins the next federation\n"
    "([agent] exit_after_final = true ends it there); [governor] keeps training to its windows and\n"
    "pauses it while the plant needs the machine. Each new global is exported as a merged model to\n"
    "<state-dir>/model/ for `fedpeft-edge infer`.",
    _agent_args, _agent_run))


# --- status ------------------------------------------------------------------------------------------

def _status_args(p: argparse.ArgumentParser) -> None:
    _add_connection(p)
    g = p.add_argument_group("status")
    g.add_argument("--client-id", help="MQTT client id (default: status-<random>; a clean session)")
    g.add_argument("--wait", type=float, default=2.0, help="seconds to collect retained statuses (default 2)")
    g.add_argument("--json", action="store_true", help="print JSON lines instead of the table")


def _status_run(args: argparse.Namespace) -> int:
    import json

    from fedpeft_edge.faces.fleet_status import collect, load_status_config, print_table

    cfg = _load(args, load_status_config)
    if cfg.connection.username is None and cfg.connection.password_file and args.client_id:
        cfg.connection.username = args.client_id
    statuses, bad = collect(cfg, client_id=args.client_id, wait_s=args.wait)
    if args.json:
        for s in statuses:
            print(json.dumps({"id": s.client_id, "state": s.state, "round": s.round, "time": s.ts,
                              "version": s.version, "detail": s.detail}))
    else:
        print_table(statuses, cfg.fleet.name)
    for topic in bad:
        log.warning("malformed status on %s (ignored)", topic)
    return 0


register(Command(
    "status", "show the fleet: every site's and the aggregator's state, round and last change",
    "Read the retained status of every service of the fleet from fedpeft/<fleet>/status/+ and print one\n"
    "line each: training, waiting, paused (with the reason), offline (the broker's last will), done.\n"
    "Give the connection as flags or with --config (an agent's or the aggregator's TOML works).",
    _status_args, _status_run))


# --- control -----------------------------------------------------------------------------------------
CONTROL_ACTIONS = ("pause", "resume", "exclude", "include", "close_round")  # = notices.CONTROL_ACTIONS


def _control_args(p: argparse.ArgumentParser) -> None:
    _add_connection(p)
    g = p.add_argument_group("control")
    g.add_argument("action", choices=CONTROL_ACTIONS,
                   help="pause/resume (the federation, or one site with --site), exclude/include a site, "
                        "close_round (close the current round now with what it has)")
    g.add_argument("--site", help="the site the action concerns (required for exclude/include)")
    g.add_argument("--by", help="operator name written in the audit log (default: the user name)")
    g.add_argument("--aggregator-id", default="aggregator", help="the aggregator's client id")
    g.add_argument("--client-id", help="MQTT client id (default: control-<random>; a clean session)")
    g.add_argument("--wait", type=float, default=10.0, help="seconds to wait for confirmations (default 10)")


def _control_run(args: argparse.Namespace) -> int:
    from fedpeft_edge.faces.fleet_status import load_status_config
    from fedpeft_edge.faces.operator_control import make_command, send_command

    cfg = _load(args, load_status_config)
    by = args.by or cfg.connection.username or "operator"
    cmd = make_command(args.action, args.site, by)
    print(f"sent {cmd.action}{f' --site {cmd.site}' if cmd.site else ''} as {by} (cmd {cmd.id})", flush=True)
    out = send_command(cfg, cmd, aggregator_id=args.aggregator_id, wait_s=args.wait,
                       client_id=args.client_id,
                       on_confirmation=lambda s: print(f"{s.client_id}: {s.state}: {s.detail}", flush=True))
    if not out.complete:
        log.warning("no confirmation within %.0f s from: %s", args.wait, ", ".join(sorted(out.waiting_for)))
        return 3
    return 1 if out.refused else 0


register(Command(
    "control", "operator actions: pause/resume the federation or a site, exclude/include one, close a round",
    "Publish an operator action on fedpeft/<fleet>/control (QoS 1) as the broker's operator account (the\n"
    "only one the plant ACL lets write it) and print the aggregator's and the site's confirmations from\n"
    "their status topics. Exit 0 confirmed, 1 refused (e.g. close_round below min_clients), 3 no answer.",
    _control_args, _control_run))


# --- entry point -------------------------------------------------------------------------------------
# demo, experiment, bench, prepare: the faces layer's commands (fedpeft_edge/faces/cli_commands.py).
from fedpeft_edge.faces.cli_commands import commands as _faces_commands  # noqa: E402

for _cmd in _faces_commands(Command):
    register(_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpeft-edge", description="Federated fine-tuning of adapters on edge devices over MQTT.",
        epilog=EPILOG_TOPICS, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description, epilog=EPILOG_TOPICS,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(p)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    try:
        return int(args._run(args))
    except FedPeftError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:  # a file or port the configuration names: one line, not a traceback
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
