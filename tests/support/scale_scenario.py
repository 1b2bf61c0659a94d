"""Many simulated sites through one Mosquitto against the real aggregator CLI (issue 13, item 8).

Shared by ``bench/bench_scale.py`` (the figures in bench/RESULTS.md) and
``tests/central/test_scale_smoke.py`` (the same scenario, small). What runs:

* a dev-config Mosquitto (own free port) — or a broker handle the caller passes;
* ``python -m fedpeft_edge aggregate --config agg.toml`` in a subprocess, so its RSS and CPU are its own
  (psutil samples them every 50 ms): quorum = min_clients = number of sites, a generous deadline,
  ``max_rounds`` rounds, FedAvg, the default policy (close-time bounds, round buffer) and downlink (fp32);
* light sites, all driven by ONE selector thread in this process over non-blocking paho clients
  (MQTT 3.1.1, clean sessions): no training. Each site's update (top-k + int8 of a random delta, made
  once per site by :class:`UpdateEncoder`) is wrapped for every round with ``wire.encode_update``
  before anything is timed. A site sends its round-r envelope (QoS 1) as soon as it sees the retained
  global of round r (the payload is decoded once per distinct global and compared by bytes for the
  other sites) and its ack for the previous round has arrived (``fedpeft/<fleet>/ack/<site>``).
  ``sites_per_connection > 1`` lets one connection publish for several site ids (dev broker: no ACL),
  for when the fd limit does not allow one connection per site.

Per round it reports: the round's wall time as the sites see it (the round's global first reached a
site → the next global did: everything the aggregator does for the round, its close and publication
included), the aggregator's own ``duration_s`` from metrics.jsonl (taken when the closing batch was
received, before it was processed: a little shorter), what the sites saw (first/last global receipt,
first and last send, last ack), every ack by status and site (each site accepted exactly once = nothing
lost, nothing counted twice), CPU seconds of the aggregator, the broker and this process in the round's
window, the aggregator's RSS at the round's end and its peak in the round, the largest round-state file.
"""

from __future__ import annotations

import json
import os
import platform
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from fedpeft_edge.central.broker import BrokerHandle, die_with_parent, find_mosquitto, start_local_broker
from fedpeft_edge.central.store import RoundState
from fedpeft_edge.protocol import notices, wire
from fedpeft_edge.protocol.codec import CodecConfig
from fedpeft_edge.protocol.config import default_spec_hash
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.site.encoder import UpdateEncoder

REPO_DIR = Path(__file__).resolve().parents[2]
MB = 1024 * 1024


@dataclass
class ScaleOptions:
    sites: int = 100
    rounds: int = 5
    params: int = 76_808  # MiniLM LoRA r=8 on query/value + head (bench/RESULTS.md section 4)
    mode: str = "topk_int8"
    ratio: float = 0.01
    sites_per_connection: int = 1
    deadline_s: float = 900.0  # generous: a round must close on quorum, never on the deadline
    timeout_s: float = 1800.0  # the whole run
    fleet: str = "scale"
    log_level: str = "INFO"  # the aggregator's; INFO logs one line per accepted update, as deployed
    profile: Path | None = None  # run the aggregator under cProfile, stats written here
    work_dir: Path | None = None  # None: a temporary directory
    sample_interval_s: float = 0.05


@dataclass
class RoundFigures:
    round: int
    accepted: int  # the aggregator's num_updates for the round
    unique_participants: int
    acks: dict[str, int]  # acks the sites received for this round, by status
    sites_acked_once: int  # sites with exactly one "accepted" ack for the round
    agg_round_s: float  # the aggregator's duration_s (between the receipts of the closing batches)
    round_s: float  # the round's global first reached a site -> the next global did
    fanout_s: float  # first -> last connection that received this round's global
    seen_to_last_ack_s: float  # first receipt of the global -> last ack for the round (sites' view)
    first_send_to_last_ack_s: float
    last_send_to_close_s: float  # last update published -> next global at a site: the aggregator's lag
    agg_cpu_s: float
    broker_cpu_s: float
    clients_cpu_s: float
    rss_end_mb: float  # aggregator RSS once the round's successor global was out
    rss_peak_mb: float
    state_file_mb: float  # largest round_state.npz seen in the round (rewritten at every checkpoint)
    load: tuple[float, float]  # load average (1 and 5 min) at the round's end

    @property
    def updates_per_s(self) -> float:
        return self.accepted / self.round_s if self.round_s > 0 else float("nan")


@dataclass
class ScaleResult:
    options: ScaleOptions
    connections: int
    update_bytes: float  # mean envelope size
    global_bytes: int
    rounds: list[RoundFigures]
    counters: dict[str, int]  # the aggregator's persisted counters at the end
    rss_start_mb: float  # aggregator RSS when the round-0 global was first seen
    agg_returncode: int | None
    wall_s: float
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float]
    broker: str
    errors: list[str] = field(default_factory=list)
    agg_log: Path | None = None

    @property
    def nothing_lost(self) -> bool:
        n = self.options.sites
        return (len(self.rounds) == self.options.rounds and not self.errors and all(
            r.accepted == n and r.unique_participants == n and r.sites_acked_once == n
            and r.acks.get("accepted", 0) == n and sum(r.acks.values()) == n for r in self.rounds)
            and self.counters.get("accepted", 0) == n * self.options.rounds
            and self.counters.get("duplicate", 0) == 0 and self.counters.get("rejected", 0) == 0)

    def markdown(self) -> str:
        o = self.options
        cols = ["sites", "round", "accepted", "acks accepted / other", "round s", "updates/s",
                "global fan-out s", "first global → last ack s", "last update sent → close s", "agg CPU s",
                "broker CPU s", "sites CPU s", "agg RSS end MB", "agg RSS peak MB", "state file MB",
                "load 1/5 min"]
        head = "| " + " | ".join(cols) + " |\n|" + "---:|" * (len(cols) - 1) + "---|\n"
        rows = []
        for r in self.rounds:
            other = sum(v for k, v in r.acks.items() if k != "accepted")
            cells = [f"{o.sites:,}", str(r.round), f"{r.accepted:,}",
                     f"{r.acks.get('accepted', 0):,} / {other}",
                     f"{r.round_s:.2f}", f"{r.updates_per_s:,.0f}", f"{r.fanout_s:.2f}",
                     f"{r.seen_to_last_ack_s:.2f}", f"{r.last_send_to_close_s:.2f}", f"{r.agg_cpu_s:.2f}",
                     f"{r.broker_cpu_s:.2f}", f"{r.clients_cpu_s:.2f}", f"{r.rss_end_mb:.1f}",
                     f"{r.rss_peak_mb:.1f}", f"{r.state_file_mb:.2f}", fmt_load(r.load)]
            rows.append("| " + " | ".join(cells) + " |")
        summary = [
            f"sites {o.sites:,} on {self.connections:,} connection(s), {o.rounds} rounds, "
            f"{o.params:,} params, {o.mode} ratio {o.ratio}: update envelope {self.update_bytes:,.0f} B, "
            f"global {self.global_bytes:,} B; broker {self.broker}",
            f"nothing lost: {'yes' if self.nothing_lost else 'NO'}; aggregator counters: accepted "
            f"{self.counters.get('accepted', 0):,}, duplicate {self.counters.get('duplicate', 0)}, rejected "
            f"{self.counters.get('rejected', 0)}; exit code {self.agg_returncode}",
        ]
        if self.rounds:
            first, last = self.rounds[0], self.rounds[-1]
            summary.append(f"aggregator RSS: {self.rss_start_mb:.1f} MB at the first global, "
                           f"{first.rss_end_mb:.1f} MB after round {first.round}, "
                           f"{last.rss_end_mb:.1f} MB after round {last.round} "
                           f"({last.rss_end_mb - first.rss_end_mb:+.1f} MB)")
        summary.append(f"wall {self.wall_s:.1f} s; load average {fmt_load(self.load_start)} at start, "
                       f"{fmt_load(self.load_end)} at end ({os.cpu_count()} CPUs)")
        if self.errors:
            summary.append("errors: " + "; ".join(self.errors[:10]))
        return head + "\n".join(rows) + "\n\n" + "\n".join(f"- {x}" for x in summary) + "\n"


def fmt_load(load: tuple[float, ...]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def site_id(i: int) -> str:
    return f"site-{i:04d}"


# --------------------------------------------------------------------------------------------------
# Light sites: one selector thread over non-blocking paho clients


class _Conn:
    """One MQTT connection publishing for the sites ``indices``."""

    def __init__(self, pool: SitePool, idx: int, indices: list[int]) -> None:
        self.pool, self.idx, self.indices = pool, idx, indices
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"scale-{pool.fleet}-{pool.first}-{idx:04d}",
                        protocol=mqtt.MQTTv311, clean_session=True)
        c.max_inflight_messages_set(max(20, 2 * len(indices)))
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self.client = c
        self.sock: Any = None
        self.writing = False
        self.label = f"connection {idx}"

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: Any,
                    properties: object) -> None:
        if reason.is_failure:
            self.pool.errors.append(f"connection {self.idx} refused: {reason}")
            return
        acks = [(self.pool.topics.ack(site_id(self.pool.first + i)), 1) for i in self.indices]
        client.subscribe([(self.pool.topics.global_, 1), *acks])

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reasons: Any,
                      properties: object) -> None:
        self.pool.subscribed += 1

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        pool = self.pool
        if msg.topic == pool.topics.global_:
            rnd, final = pool.global_info(msg.payload)
            pool.note_global(rnd, now)
            for i in self.indices:
                if rnd > pool.seen[i]:
                    pool.seen[i], pool.final[i] = rnd, final
                    pool.maybe_send(self, i, now)
            return
        try:
            ack = notices.decode_ack(msg.payload)
        except Exception as exc:  # reported, never raised into paho
            pool.errors.append(f"unreadable ack on {msg.topic}: {exc}")
            return
        i = int(msg.topic.rsplit("-", 1)[1]) - pool.first
        pool.note_ack(i, ack, now)
        pool.maybe_send(self, i, now)


class SitePool:
    """``n`` light sites over ``ceil(n / per_conn)`` connections, all served by one thread."""

    def __init__(self, host: str, port: int, fleet: str, envelopes: list[list[bytes]], per_conn: int = 1,
                 first_site: int = 0) -> None:
        self.host, self.port, self.fleet = host, port, fleet
        self.first = first_site  # site k of this pool is site_id(first_site + k) (pools behind gateways)
        self.topics = Topics(fleet)
        self.envelopes = envelopes  # [round][site]
        n = len(envelopes[0])
        self.rounds = len(envelopes)
        self.seen = [-1] * n  # newest global round each site saw
        self.final = [False] * n
        self.sent = [-1] * n  # round of the last update sent
        self.acked: list[dict[int, str]] = [{} for _ in range(n)]  # round -> status of the first ack
        self.ack_count: list[Counter[int]] = [Counter() for _ in range(n)]  # round -> acks received
        self.ack_status: dict[int, Counter[str]] = {}
        self.global_first: dict[int, float] = {}
        self.global_last: dict[int, float] = {}
        self.global_conns: Counter[int] = Counter()
        self.send_first: dict[int, float] = {}
        self.send_last: dict[int, float] = {}
        self.ack_last: dict[int, float] = {}
        self.global_bytes = 0
        self.errors: list[str] = []
        self.subscribed = 0
        self._global_cache: tuple[bytes, int, bool] | None = None
        self.conns = [_Conn(self, k, list(range(s, min(n, s + per_conn))))
                      for k, s in enumerate(range(0, n, per_conn))]
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scale-sites", daemon=True)

    # --- called from the loop thread (paho callbacks) ---------------------------------------------
    def global_info(self, payload: bytes) -> tuple[int, bool]:
        cached = self._global_cache
        if cached is not None and cached[0] == payload:
            return cached[1], cached[2]
        msg = wire.decode_global(payload)
        self._global_cache = (payload, msg.round, bool(msg.meta.get("final", False)))
        self.global_bytes = len(payload)
        return msg.round, bool(msg.meta.get("final", False))

    def note_global(self, rnd: int, now: float) -> None:
        self.global_first.setdefault(rnd, now)
        self.global_last[rnd] = now
        self.global_conns[rnd] += 1

    def note_ack(self, i: int, ack: notices.AckMessage, now: float) -> None:
        if ack.round is None:
            self.errors.append(f"{site_id(self.first + i)}: ack without a round ({ack.status})")
            return
        self.ack_count[i][ack.round] += 1
        self.acked[i].setdefault(ack.round, ack.status)
        self.ack_status.setdefault(ack.round, Counter())[ack.status] += 1
        self.ack_last[ack.round] = now

    def maybe_send(self, conn: _Conn, i: int, now: float) -> None:
        r = self.seen[i]
        waiting = self.sent[i] >= 0 and self.sent[i] not in self.acked[i]
        if self.final[i] or r <= self.sent[i] or waiting or r >= self.rounds:
            return
        info = conn.client.publish(self.topics.update(site_id(self.first + i)), self.envelopes[r][i], qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.errors.append(f"{site_id(self.first + i)}: publish for round {r} failed: "
                               f"{mqtt.error_string(info.rc)}")
            return
        self.sent[i] = r
        self.send_first.setdefault(r, now)
        self.send_last[r] = now

    # --- the loop ---------------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        self._thread.start()
        if not self.ready.wait(timeout):
            raise RuntimeError(f"sites not connected within {timeout}s: {self.subscribed}/{len(self.conns)} "
                               f"subscribed; {self.errors[:3]}")

    def all_final(self) -> bool:
        return self.global_conns[self.rounds] >= len(self.conns)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for c in self.conns:
            try:
                c.client.disconnect()
            except Exception:
                pass

    def _run(self) -> None:
        serve_connections(self.conns, self.host, self.port, stop=self._stop, errors=self.errors,
                          ready=self.ready, ready_when=lambda: self.subscribed >= len(self.conns))


def serve_connections(conns: Sequence[Any], host: str, port: int, *, stop: threading.Event,
                      errors: list[str], ready: threading.Event, ready_when: Callable[[], bool],
                      select_s: float = 0.1, keepalive_s: float | None = 10.0,
                      sweep_writes: bool = False) -> None:
    """Serve many paho clients from ONE thread with a selector (epoll: no 1,024-descriptor limit) until
    ``stop``. Each connection has ``client`` (an unconnected paho client), ``sock``, ``writing`` and
    ``label``; a failed read is recorded in ``errors`` and drops that connection. ``ready`` is set once
    ``ready_when()``. ``keepalive_s``: how often every connection's keepalive is serviced (None: never).
    ``sweep_writes``: after each batch, flush every connection's pending writes (for callbacks that
    publish on connections other than the one being served)."""

    def interest(sel: selectors.BaseSelector, conn: Any) -> None:
        want = conn.client.want_write()
        if want != conn.writing and conn.sock is not None:
            conn.writing = want
            sel.modify(conn.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0), conn)

    sel = selectors.DefaultSelector()
    try:
        for conn in conns:
            conn.client.connect(host, port, keepalive=600)
            conn.sock = conn.client.socket()
            sel.register(conn.sock, selectors.EVENT_READ, conn)
            interest(sel, conn)
        next_misc = time.monotonic() + (keepalive_s or 0.0)
        while not stop.is_set():
            for key, mask in sel.select(select_s):
                conn = key.data
                if mask & selectors.EVENT_READ:
                    rc = conn.client.loop_read()
                    if rc != mqtt.MQTT_ERR_SUCCESS:
                        errors.append(f"{conn.label}: {mqtt.error_string(rc)}")
                        sel.unregister(conn.sock)
                        conn.sock = None
                        continue
                if conn.client.want_write():
                    conn.client.loop_write()
                interest(sel, conn)
            if sweep_writes:
                for conn in conns:
                    if conn.sock is not None:
                        if conn.client.want_write():
                            conn.client.loop_write()
                        interest(sel, conn)
            if not ready.is_set() and ready_when():
                ready.set()
            if keepalive_s is not None and time.monotonic() > next_misc:  # keepalive pings
                next_misc = time.monotonic() + keepalive_s
                for conn in conns:
                    if conn.sock is not None:
                        conn.client.loop_misc()
                        interest(sel, conn)
    except Exception as exc:  # reported to the caller through errors
        errors.append(f"site loop failed: {exc!r}")
    finally:
        sel.close()


# --------------------------------------------------------------------------------------------------
# The aggregator subprocess and its samples


class _Sampler:
    """RSS and CPU time of the aggregator, CPU of the broker and of this process, every ``interval``."""

    def __init__(self, agg: psutil.Process, broker: psutil.Process | None, state_file: Path,
                 interval: float) -> None:
        self.agg, self.broker, self.me = agg, broker, psutil.Process()
        self.state_file = state_file
        self.interval = interval
        # (time, aggregator RSS, CPU s of aggregator / broker / this process, state file bytes, load 1/5 min)
        self.samples: list[tuple[float, ...]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scale-sampler", daemon=True)

    @staticmethod
    def _cpu(p: psutil.Process | None) -> float:
        if p is None:
            return 0.0
        t = p.cpu_times()
        return t.user + t.system

    def take(self) -> bool:
        try:
            rss = self.agg.memory_info().rss
            agg_cpu = self._cpu(self.agg)
        except psutil.Error:
            return False
        try:
            broker_cpu = self._cpu(self.broker)
        except psutil.Error:
            broker_cpu = float("nan")
        try:
            state = self.state_file.stat().st_size
        except OSError:
            state = 0
        self.samples.append((time.time(), rss, agg_cpu, broker_cpu, self._cpu(self.me), state,
                             *os.getloadavg()[:2]))
        return True

    def _run(self) -> None:
        while not self._stop.is_set() and self.take():
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def at(self, t: float) -> tuple[float, ...]:
        """The first sample at or after ``t`` (else the last one)."""
        for s in self.samples:
            if s[0] >= t:
                return s
        return self.samples[-1]

    def between(self, t0: float, t1: float) -> list[tuple[float, ...]]:
        return [s for s in self.samples if t0 <= s[0] <= t1]


def service_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_DIR), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def agg_toml(port: int, work: Path, o: ScaleOptions) -> str:
    return f"""
[connection]
port = {port}
[fleet]
name = "{o.fleet}"
[aggregator]
state_dir = "{work}/agg"
initial_global = "{work}/initial.npy"
max_rounds = {o.rounds}
quorum = {o.sites}
min_clients = {o.sites}
round_deadline_s = {o.deadline_s}
server_optimizer = "fedavg"
final_linger_s = 5
"""


def make_envelopes(o: ScaleOptions, spec_hash: str, first_site: int = 0) -> list[list[bytes]]:
    """``[round][site]`` update envelopes: one encoded update per site, wrapped once per round (sites
    ``site_id(first_site + k)``)."""
    rng = np.random.default_rng(first_site)
    cfg = CodecConfig(mode=o.mode, topk_ratio=o.ratio)
    encoded = []
    for i in range(o.sites):
        delta = rng.standard_normal(o.params, dtype=np.float32) * np.float32(1e-3)
        encoded.append(UpdateEncoder(cfg, o.params, seed=i).encode(delta))

    def envelope(r: int, i: int, enc: Any) -> bytes:
        msg = wire.UpdateMessage(o.fleet, r, site_id(first_site + i), spec_hash, 100, {"loss": 1.0}, enc)
        return wire.encode_update(msg)

    return [[envelope(r, i, enc) for i, enc in enumerate(encoded)] for r in range(o.rounds)]


def _mosquitto_version() -> str:
    exe = find_mosquitto()
    if exe is None:
        return "mosquitto"
    try:
        out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "mosquitto"
    return out.splitlines()[0].strip() if out else "mosquitto"


def run_scenario(o: ScaleOptions, broker: BrokerHandle | None = None) -> ScaleResult:
    """Run it; never raises for a lost update (see :attr:`ScaleResult.nothing_lost`), only for set-up."""
    own_work = o.work_dir is None  # a temporary directory, removed at the end
    work = Path(o.work_dir) if o.work_dir is not None else Path(tempfile.mkdtemp(prefix="fedpeft-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    own_broker = broker is None
    if broker is None:
        broker = start_local_broker(prefer="mosquitto", config="dev")
    pool: SitePool | None = None
    proc: subprocess.Popen[bytes] | None = None
    sampler: _Sampler | None = None
    load_start = os.getloadavg()
    t_start = time.time()
    try:
        spec = default_spec_hash(o.params)
        envelopes = make_envelopes(o, spec)
        update_bytes = float(np.mean([len(e) for e in envelopes[0]]))
        np.save(work / "initial.npy", np.zeros(o.params, np.float32))
        cfg = work / "agg.toml"
        cfg.write_text(agg_toml(broker.port, work, o))
        pool = SitePool(broker.host, broker.port, o.fleet, envelopes, o.sites_per_connection)
        pool.start()  # every site subscribed before the aggregator publishes the first global
        cmd = [sys.executable]
        if o.profile is not None:
            cmd += ["-m", "cProfile", "-o", str(o.profile)]
        cmd += ["-m", "fedpeft_edge", "aggregate", "--config", str(cfg), "--log-level", o.log_level]
        log_path = work / "agg.log"
        with open(log_path, "ab") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=service_env(),
                                    cwd=str(REPO_DIR), preexec_fn=die_with_parent)
        broker_ps = psutil.Process(broker.pid) if broker.pid is not None else None
        sampler = _Sampler(psutil.Process(proc.pid), broker_ps, work / "agg" / "round_state.npz",
                           o.sample_interval_s)
        sampler.start()
        deadline = time.monotonic() + o.timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:
            pool.errors.append(f"aggregator still running after {o.timeout_s:.0f} s: killed")
            proc.kill()
            proc.wait(10)
        sampler.stop()
        wall = time.time() - t_start
        # The broker may still be fanning the final global out after the aggregator left: wait for it.
        final_by = time.monotonic() + 60
        while not pool.all_final() and time.monotonic() < final_by:
            time.sleep(0.05)
        pool.stop()
        result = _collect(o, work, pool, sampler, proc, update_bytes, wall, load_start, broker)
        if own_work:
            result.agg_log = None
        return result
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if sampler is not None:
            sampler.stop()
        if pool is not None:
            pool.stop()
        if own_broker:
            broker.stop()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _collect(o: ScaleOptions, work: Path, pool: SitePool, sampler: _Sampler, proc: subprocess.Popen[bytes],
             update_bytes: float, wall: float, load_start: tuple[float, float, float],
             broker: BrokerHandle) -> ScaleResult:
    metrics_path = work / "agg" / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] \
        if metrics_path.exists() else []
    state = RoundState.load(work / "agg")
    counters = dict(state.counters) if state is not None else {}
    rounds: list[RoundFigures] = []
    s = sampler.samples
    rss_start = sampler.at(pool.global_first.get(0, s[0][0]))[1] / MB if s else float("nan")
    nan = float("nan")
    for m in lines:
        r = int(m["round"])
        # The round as the sites see it: its global first reached a site -> the next global did (the
        # aggregator then had counted the last update, checkpointed, closed and published). Its own
        # closed_at / duration_s are taken when the last batch was *received*, before processing it.
        t0 = pool.global_first.get(r, nan)
        t1 = pool.global_first.get(r + 1, nan)
        if not (t0 == t0 and t1 == t1):  # a global the sites never saw: fall back to the aggregator's clock
            t1 = float(m["closed_at"])
            t0 = t1 - float(m["duration_s"])
        a, b = sampler.at(t0), sampler.at(t1)
        window = [*sampler.between(t0, t1), b]
        statuses = dict(pool.ack_status.get(r, Counter()))
        once = sum(1 for i in range(o.sites)
                   if pool.ack_count[i][r] == 1 and pool.acked[i].get(r) == "accepted")
        rounds.append(RoundFigures(
            round=r, accepted=int(m["num_updates"]), unique_participants=len(set(m["participants"])),
            acks=statuses, sites_acked_once=once, agg_round_s=float(m["duration_s"]), round_s=t1 - t0,
            fanout_s=pool.global_last.get(r, nan) - pool.global_first.get(r, nan),
            seen_to_last_ack_s=pool.ack_last.get(r, nan) - pool.global_first.get(r, nan),
            first_send_to_last_ack_s=pool.ack_last.get(r, nan) - pool.send_first.get(r, nan),
            last_send_to_close_s=t1 - pool.send_last.get(r, nan),
            agg_cpu_s=b[2] - a[2], broker_cpu_s=b[3] - a[3], clients_cpu_s=b[4] - a[4],
            rss_end_mb=b[1] / MB, rss_peak_mb=max(x[1] for x in window) / MB,
            state_file_mb=max(x[5] for x in window) / MB, load=(b[6], b[7]),
        ))
    errors = list(pool.errors)
    if not pool.all_final():
        errors.append(f"final global reached {pool.global_conns[o.rounds]}/{len(pool.conns)} connections")
    return ScaleResult(
        options=o, connections=len(pool.conns), update_bytes=update_bytes, global_bytes=pool.global_bytes,
        rounds=rounds, counters=counters, rss_start_mb=rss_start, agg_returncode=proc.returncode, wall_s=wall,
        load_start=load_start, load_end=os.getloadavg(),
        broker=f"{_mosquitto_version()} ({broker.kind}), Python {platform.python_version()}",
        errors=errors, agg_log=work / "agg.log")


__all__ = ["RoundFigures", "ScaleOptions", "ScaleResult", "SitePool", "run_scenario"]
