"""SecAgg measured over MQTT: the real aggregator, a real Mosquitto, n light sites (issue 14, item 4).

    python3 bench/secagg_mqtt.py --sites 4 16 64 --dropout 0 0.1 0.3 --dim 76808 --out /tmp/secagg-mqtt.json
    python3 bench/secagg_mqtt.py --graph classic sparse --repeat 3 ...  # + k = min(n - 1, 12); medians of 3

What runs, per cell (n sites, dropout fraction):

* one dev-config Mosquitto for the whole run (own free port, the project's broker_config template); each
  cell has its own fleet name, aggregator client id and state directory;
* the real aggregator CLI (``python -m fedpeft_edge aggregate``, i.e. ``AggregatorService``) in a
  subprocess, so its CPU is its own: ``[secagg] enabled``, ``sites`` = the n light sites, classic SecAgg
  (k = n - 1) or the sparse graph, ``clip = 0.05``, ``phase_timeout_s`` from ``--phase-timeout`` (default
  max(2, 0.2·n) s: with less, live sites miss deadlines at n = 64, their calls running one by one), a
  zeros float32 initial global of ``--dim``, quorum = min_clients = n, one round, FedAvg, fp32 global;
* n light sites in this process, one paho connection each, all served by ONE selector thread (as
  tests/support/scale_scenario.py does): each drives the project's site state machine
  ``SecureContribution`` (own state dir) with a random update ``uniform(-0.01, 0.01, dim)``, routing
  ``secagg/params`` (then ``contribute(0, delta)``), ``secagg/down/<site>`` and ``secagg/unmask`` to it
  and publishing what it returns;
* ``round(fraction * n)`` random sites drop right AFTER publishing their ShareKeys (no masked input, no
  answer after that): the costliest dropout, their mask keys must be rebuilt by the server. With any
  dropout, phase 2 lasts the whole ``phase_timeout_s`` (the server cannot tell slow from gone).

A cell whose first session fails (e.g. a site left with fewer than t surviving neighbours) is reported as
failed with the aggregator's reason; its retry session is not measured (the aggregator is stopped).

Measured: bytes each surviving site published / received on the secagg topics (MQTT payloads; the global
separately), the time inside each SecureContribution call per phase (median over the surviving sites;
wall and thread CPU), the server's figures from its metrics line (``secagg_costs``: bytes per phase, how
long each phase stayed open, the unmasking), the wall time from the first params receipt to the first
receipt of the round-1 global, and correctness: that global equals the mean of the survivors' deltas
within 1e-6. Baselines: one top-k 1 % + int8 update (default CodecConfig) and one dense int8 update of the
same dim, as ``wire.encode_update`` envelopes. The sites' calls are serialised on one thread (a fleet's
devices would run them in parallel), so the wall time over-states a real round at large n.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from scale_scenario import REPO_DIR, serve_connections, service_env

from fedpeft_edge.central.broker import BrokerHandle, die_with_parent, find_mosquitto, start_local_broker
from fedpeft_edge.protocol import codec, wire
from fedpeft_edge.protocol.codec import CodecConfig
from fedpeft_edge.protocol.config import default_spec_hash
from fedpeft_edge.protocol.secagg_policy import Publish, SecAggPolicy
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.site.encoder import UpdateEncoder
from fedpeft_edge.site.secure_sum import SecureContribution

PHASES = ("0 advertise", "1 share keys", "2 masked input", "3 unmask")
# SecureContribution.phase before a call → the protocol phase that call serves
_PHASE_OF = {"idle": 0, "waiting": 0, "advertised": 1, "shared": 2, "masked": 3}
SERVER_PHASES = ("ADVERTISE", "SHARE_KEYS", "MASKED_INPUT", "UNMASK")
SPARSE_K = 12
# The bench serialises the sites' calls on one thread: a phase needs about n × one site's call before
# the last live site has answered, so a fixed 2 s closes phases on live sites at n = 64.
TIMEOUT_PER_SITE = 0.2


def site_name(i: int) -> str:
    return f"site-{i:03d}"  # 8 characters, as bench/secagg_costs.py (message sizes grow with the id)


# --------------------------------------------------------------------------------------------------
# Light sites: one selector thread over non-blocking paho clients


@dataclass
class SiteFigures:
    up: int = 0  # payload bytes published on secagg/up/<site>
    down: int = 0  # payload bytes received on secagg/params, secagg/down/<site>, secagg/unmask
    up_msgs: int = 0
    down_msgs: int = 0
    wall_s: dict[int, float] = field(default_factory=lambda: defaultdict(float))  # phase → s in calls
    cpu_s: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    global1_at: float | None = None
    in_at: dict[int, float] = field(default_factory=dict)  # phase → first call (message arrived)
    out_at: dict[int, float] = field(default_factory=dict)  # phase → its reply published


class LightSite:
    """One site: its MQTT connection and the project's site state machine."""

    def __init__(self, fleet: Fleet, i: int, delta: np.ndarray, state_dir: Path, drops: bool) -> None:
        self.fleet, self.name, self.delta, self.drops = fleet, site_name(i), delta, drops
        self.topics = fleet.topics
        self.sc = SecureContribution(self.name, self.topics, delta.size, state_dir)
        self.fig = SiteFigures()
        self.contributed = False
        self.silent = False  # a dropped site after its ShareKeys: answers nothing any more
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{fleet.topics.fleet}-{self.name}",
                        protocol=mqtt.MQTTv311, clean_session=True)
        c.max_inflight_messages_set(20)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self.client = c
        self.sock: Any = None
        self.writing = False
        self.label = self.name

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: Any,
                    properties: object) -> None:
        if reason.is_failure:
            self.fleet.errors.append(f"{self.name}: connection refused: {reason}")
            return
        t = self.topics
        client.subscribe([(t.secagg_params, 1), (t.secagg_down(self.name), 1), (t.secagg_unmask, 1),
                          (t.global_, 1)])

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reasons: Any,
                      properties: object) -> None:
        self.fleet.subscribed += 1

    def _call(self, fn: Any, *args: Any) -> list[Publish]:
        """Time one call into the state machine, booked to the phase the site is in before it."""
        phase = _PHASE_OF.get(self.sc.phase, -1)
        self.fig.in_at.setdefault(phase, time.time())
        w0, c0 = time.perf_counter(), time.thread_time()
        out: list[Publish] = fn(*args)
        self.fig.wall_s[phase] += time.perf_counter() - w0
        self.fig.cpu_s[phase] += time.thread_time() - c0
        if out:
            self.fig.out_at[phase] = time.time()
        return out

    def _publish(self, out: list[Publish]) -> None:
        for m in out:
            info = self.client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                self.fleet.errors.append(f"{self.name}: publish failed: {mqtt.error_string(info.rc)}")
            self.fig.up += len(m.payload)
            self.fig.up_msgs += 1

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        t, payload = self.topics, msg.payload
        try:
            if msg.topic == t.global_:
                self.fleet.note_global(self, payload, now)
                return
            if self.silent:
                return
            self.fig.down += len(payload)
            self.fig.down_msgs += 1
            if msg.topic == t.secagg_params:
                if payload:
                    self.fleet.note_params(now)
                out = self._call(self.sc.take_params, payload)
                if payload and not self.contributed:  # the update is "trained" once the session is known
                    self.contributed = True
                    out += self._call(self.sc.contribute, 0, self.delta)
            elif msg.topic == t.secagg_down(self.name):
                before = self.sc.phase
                out = self._call(self.sc.take_down, payload)
                if self.drops and before == "advertised" and out:
                    self._publish(out)  # its ShareKeys still go out; then it drops
                    self.silent = True
                    return
            elif msg.topic == t.secagg_unmask:
                out = self._call(self.sc.take_unmask, payload)
            else:
                return
            self._publish(out)
        except Exception as exc:  # reported, never raised into paho
            self.fleet.errors.append(f"{self.name}: {type(exc).__name__}: {exc}")


class Fleet:
    """``n`` light sites over one connection each, served by one thread."""

    def __init__(self, host: str, port: int, fleet: str, deltas: list[np.ndarray], drop: set[int],
                 state_dir: Path) -> None:
        self.host, self.port = host, port
        self.topics = Topics(fleet)
        self.errors: list[str] = []
        self.subscribed = 0
        self.params_first: float | None = None
        self.global1_first: float | None = None
        self.global1_payload: bytes | None = None
        self.global_bytes: dict[int, int] = {}
        self._global_cache: tuple[bytes, int] | None = None
        self.sites = [LightSite(self, i, d, state_dir / site_name(i), i in drop)
                      for i, d in enumerate(deltas)]
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="secagg-sites", daemon=True)

    def note_params(self, now: float) -> None:
        if self.params_first is None:
            self.params_first = now

    def note_global(self, site: LightSite, payload: bytes, now: float) -> None:
        cached = self._global_cache
        if cached is None or cached[0] != payload:
            rnd = wire.decode_global(payload, wire.WireLimits(max_params=max(2, site.delta.size))).round
            self._global_cache = cached = (payload, rnd)
            self.global_bytes[rnd] = len(payload)
        if cached[1] == 1:
            if self.global1_first is None:
                self.global1_first, self.global1_payload = now, payload
            if site.fig.global1_at is None:
                site.fig.global1_at = now

    def start(self, timeout: float = 60.0) -> None:
        self._thread.start()
        if not self.ready.wait(timeout):
            raise RuntimeError(f"sites not subscribed within {timeout}s: {self.subscribed}/"
                               f"{len(self.sites)}; {self.errors[:3]}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self.sites:
            try:
                s.client.disconnect()
            except Exception:
                pass

    def _run(self) -> None:
        # A callback may queue a publish on another connection than the one served: sweep every write.
        serve_connections(self.sites, self.host, self.port, stop=self._stop, errors=self.errors,
                          ready=self.ready, ready_when=lambda: self.subscribed >= len(self.sites),
                          select_s=0.05, keepalive_s=None, sweep_writes=True)


# --------------------------------------------------------------------------------------------------
# One cell


def agg_toml(port: int, work: Path, fleet: str, sites: list[str], phase_timeout: float,
             neighbours: int | None) -> str:
    k = f"neighbours = {neighbours}\n" if neighbours is not None else ""
    return f"""
[connection]
port = {port}
[fleet]
name = "{fleet}"
[aggregator]
client_id = "agg-{fleet}"
state_dir = "{work}/agg"
initial_global = "{work}/initial.npy"
max_rounds = 1
quorum = {len(sites)}
min_clients = {len(sites)}
round_deadline_s = 600
server_optimizer = "fedavg"
final_linger_s = 0
[secagg]
enabled = true
sites = {json.dumps(sites)}
clip = 0.05
phase_timeout_s = {phase_timeout}
{k}"""


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _failure_in_log(log: Path) -> str | None:
    """The first line of the aggregator's log saying the session failed or the round was skipped."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if ("session" in line and "failed" in line) or "skipped" in line or "Traceback" in line:
            return line.split(" ", 3)[-1].strip()
    return None


class _Warnings(logging.Handler):
    """The sites' warnings (refusals to unmask, ...) for the cell's record instead of this terminal."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_cell(broker: BrokerHandle, root: Path, n: int, dropout: float, dim: int, graph: str,
             phase_timeout: float, seed: int, timeout_s: float, rep: int = 0) -> dict[str, Any]:
    fleet = f"sa-{graph[0]}{n}-d{round(dropout * 100)}-r{rep}"
    work = root / fleet
    work.mkdir(parents=True)
    np.save(work / "initial.npy", np.zeros(dim, np.float32))
    names = [site_name(i) for i in range(n)]
    neighbours = None if graph == "classic" else min(n - 1, SPARSE_K)
    params = SecAggPolicy(enabled=True, sites=names, neighbours=neighbours).params_for(fleet, 0, dim)
    rng = np.random.default_rng(seed)
    deltas = [rng.uniform(-0.01, 0.01, dim).astype(np.float32) for _ in range(n)]
    drop = {int(i) for i in rng.choice(n, size=round(dropout * n), replace=False)}
    cell: dict[str, Any] = {"graph": graph, "n": n, "dropout": dropout, "dropped": len(drop),
                            "k": params.neighbours, "t": params.threshold, "bits": params.quant.bits,
                            "phase_timeout_s": phase_timeout, "fleet": fleet, "ok": False, "correct": False}
    (work / "agg.toml").write_text(agg_toml(broker.port, work, fleet, names, phase_timeout, neighbours))
    warned = _Warnings()
    site_log = logging.getLogger("fedpeft_edge.site")
    site_log.addHandler(warned)
    site_log.propagate = False
    sites = Fleet(broker.host, broker.port, fleet, deltas, drop, work / "sites")
    sites.start()
    log = work / "agg.log"
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the aggregator's CPU, once it has been waited for
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "fedpeft_edge", "aggregate", "--config",
                                 str(work / "agg.toml")], stdout=fh, stderr=subprocess.STDOUT,
                                env=service_env(), cwd=str(REPO_DIR), preexec_fn=die_with_parent)
    failure = None
    try:
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            failure = _failure_in_log(log)
            if failure is not None:
                break  # the first session failed: what a retry would do is another measurement
            if time.monotonic() > deadline:
                failure = f"no global of round 1 within {timeout_s:.0f} s"
                break
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cell["aggregator_cpu_s"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        if failure is None and proc.returncode != 0:
            failure = f"aggregator exited with code {proc.returncode}: {_failure_in_log(log)}"
        survivors_local = [s for i, s in enumerate(sites.sites) if i not in drop]
        by = time.monotonic() + 15  # the final global may still be on its way to some sites
        while failure is None and time.monotonic() < by and any(s.fig.global1_at is None
                                                                 for s in survivors_local):
            time.sleep(0.05)
    finally:
        sites.stop()
        site_log.removeHandler(warned)
    cell["errors"] = sites.errors[:10]
    cell["site_warnings"] = {"count": len(warned.lines), "first": sorted(set(warned.lines))[:5]}
    if failure is not None:
        cell["failure"] = failure
    metrics_path = work / "agg" / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] \
        if metrics_path.exists() else []
    m = next((x for x in lines if x.get("round") == 0 and not x.get("skipped")), None)
    if m is not None:
        costs = m.get("secagg_costs", {})
        survivors = sorted(m["participants"])
        cell["server"] = {"bytes_in": costs.get("bytes_in", {}), "bytes_out": costs.get("bytes_out", {}),
                          "phase_s": costs.get("phase_s", {}), "unmask_s": costs.get("unmask_s"),
                          "round_duration_s": m.get("duration_s"), "survivors": len(survivors),
                          "dropped": m.get("secagg_dropped", [])}
        expected = sorted(s.name for s in survivors_local)
        cell["survivors_as_expected"] = survivors == expected
        if sites.global1_payload is not None:
            g = wire.decode_global(sites.global1_payload, wire.WireLimits(max_params=max(2, dim)))
            vec = codec.decode_global(g.vector, dim)
            idx = [names.index(s) for s in survivors]
            want = np.mean(np.stack([deltas[i].astype(np.float64) for i in idx]), axis=0)
            err = float(np.max(np.abs(vec.astype(np.float64) - want)))
            cell["max_abs_error"] = err
            cell["correct"] = err <= 1e-6 and cell["survivors_as_expected"]
            cell["global_bytes"] = len(sites.global1_payload)
        cell["ok"] = failure is None and not sites.errors
    if sites.params_first is not None and sites.global1_first is not None:
        cell["wall_s"] = sites.global1_first - sites.params_first
    figs = [s.fig for s in survivors_local]
    cell["site"] = {
        "up_bytes": _median([f.up for f in figs]), "down_bytes": _median([f.down for f in figs]),
        "up_bytes_max": max((f.up for f in figs), default=0), "down_bytes_max": max((f.down for f in figs),
                                                                                     default=0),
        "up_msgs": _median([f.up_msgs for f in figs]), "down_msgs": _median([f.down_msgs for f in figs]),
        "wall_ms": {PHASES[p]: 1e3 * _median([f.wall_s.get(p, 0.0) for f in figs]) for p in range(4)},
        "cpu_ms": {PHASES[p]: 1e3 * _median([f.cpu_s.get(p, 0.0) for f in figs]) for p in range(4)},
    }
    # Where the wall time goes: per phase, the first live site's message in → the last live reply out.
    spans = {}
    for p in range(4):
        ins = [f.in_at[p] for f in figs if p in f.in_at]
        outs = [f.out_at[p] for f in figs if p in f.out_at]
        if ins and outs:
            spans[PHASES[p]] = max(outs) - min(ins)
    cell["sites_span_s"] = spans
    shutil.rmtree(work / "sites", ignore_errors=True)  # pending updates: 4·dim bytes per site
    return cell


# --------------------------------------------------------------------------------------------------
# Baselines and output


def baselines(dim: int, seed: int) -> dict[str, int]:
    """Envelope bytes of one plain update of ``dim`` parameters in today's codecs."""
    delta = np.random.default_rng(seed).uniform(-0.01, 0.01, dim).astype(np.float32)
    out = {}
    configs = {"topk_int8": CodecConfig(),  # the default: top-k 1 % + int8
               "topk_int8_10pct": CodecConfig(topk_ratio=0.1),  # the demo's codec
               "int8": CodecConfig(mode="int8"), "fp32": CodecConfig(mode="fp32")}
    for mode, cfg in configs.items():
        enc = UpdateEncoder(cfg, dim, seed=0).encode(delta)
        msg = wire.UpdateMessage("bench", 0, site_name(0), default_spec_hash(dim), 100, {"loss": 1.0}, enc)
        out[mode] = len(wire.encode_update(msg))
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the repeats of a cell: times are medians over the runs that completed; correct only
    if every run was; bytes are the same in every completed run (checked)."""
    done = [r for r in runs if "server" in r] or runs
    first = done[0]
    out = {k: first[k] for k in ("graph", "n", "k", "t", "dropout", "dropped", "bits", "phase_timeout_s")}
    out["runs"], out["completed"] = len(runs), sum(1 for r in runs if "server" in r)
    out["correct"] = all(r["correct"] for r in runs)
    failed = [r for r in runs if not r["correct"]]
    if failed:
        why = failed[0].get("failure", "result differs from the survivors' mean")
        out["failure"] = f"{len(failed)} of {len(runs)} run(s): {why}"
    out["bytes_identical"] = len({(r["site"]["up_bytes"], r["site"]["down_bytes"]) for r in done}) == 1
    site = dict(first["site"])
    for key in ("cpu_ms", "wall_ms"):
        site[key] = {p: _median([r["site"][key][p] for r in done]) for p in PHASES}
    out["site"] = site
    if "server" in first:
        server = dict(first["server"])
        times = [r["server"]["phase_s"] for r in done]
        server["phase_s"] = {p: _median([t[p] for t in times if p in t])
                             for p in SERVER_PHASES[:3] if any(p in t for t in times)}
        server["unmask_s"] = _median([r["server"]["unmask_s"] for r in done])
        out["server"] = server
    out["aggregator_cpu_s"] = _median([r["aggregator_cpu_s"] for r in done])
    walls = [r["wall_s"] for r in done if "wall_s" in r]
    if walls:
        out["wall_s"] = _median(walls)
        out["wall_s_range"] = [min(walls), max(walls)]
    out["sites_span_s"] = {p: _median([r["sites_span_s"][p] for r in done if p in r["sites_span_s"]])
                           for p in PHASES if any(p in r["sites_span_s"] for r in done)}
    if "global_bytes" in first:
        out["global_bytes"] = first["global_bytes"]
    out["max_abs_error"] = max((r["max_abs_error"] for r in runs if "max_abs_error" in r), default=None)
    return out


def _short(failure: str) -> str:
    """The table's form of a failure: its count and the aggregator's reason without the site list."""
    m = re.search(r"failed \((phase \w+ could not close: [^:;(]*)", failure)
    return f"{failure.split(':', 1)[0]}: {m.group(1).strip()}" if m else failure


def _kb(x: float) -> str:
    return f"{x / 1000:,.1f}"


def markdown(cells: list[dict[str, Any]], base: dict[str, int]) -> str:
    cols = ["graph", "n", "k", "t", "dropped", "phase timeout s", "up / site KB", "down / site KB",
            "× top-k 1 % int8", "× dense int8", "site CPU ms p0 / p1 / p2 / p3",
            "site wall ms p0 / p1 / p2 / p3", "server phase s 0 / 1 / 2", "unmask s", "agg CPU s", "wall s",
            "correct"]
    rows = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 2) + "---|"]
    for c in cells:
        s = c["site"]
        srv = c.get("server", {})
        ph = srv.get("phase_s", {})
        cpu, wall = (" / ".join(f"{s[key][p]:.0f}" if s[key][p] == s[key][p] else "–" for p in PHASES)
                     for key in ("cpu_ms", "wall_ms"))
        server = " / ".join(f"{ph[p]:.2f}" if p in ph else "–" for p in SERVER_PHASES[:3])
        unmask = f"{srv['unmask_s']:.2f}" if srv.get("unmask_s") is not None else "–"
        verdict = "yes" if c["correct"] else "FAILED " + _short(c.get("failure", "wrong result"))
        done = "server" in c  # a failed session's bytes and times stop where it failed: not comparable
        rows.append("| " + " | ".join([
            c["graph"], str(c["n"]), str(c["k"]), str(c["t"]), f"{c['dropped']} ({c['dropout']:.0%})",
            f"{c['phase_timeout_s']:g}",
            _kb(s["up_bytes"]) if done else "–", _kb(s["down_bytes"]) if done else "–",
            f"{s['up_bytes'] / base['topk_int8']:.0f}" if done else "–",
            f"{s['up_bytes'] / base['int8']:.2f}" if done else "–", cpu, wall, server, unmask,
            f"{c['aggregator_cpu_s']:.1f}", f"{c['wall_s']:.2f}" if "wall_s" in c else "–", verdict]) + " |")
    return "\n".join(rows) + "\n"


def _mosquitto_version() -> str:
    exe = find_mosquitto()
    if exe is None:
        return "mosquitto"
    try:
        out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "mosquitto"
    return out.splitlines()[0].strip() if out else "mosquitto"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    ap.add_argument("--dim", type=int, default=76_808, help="update length (MiniLM LoRA r=8 q/v + head)")
    ap.add_argument("--graph", nargs="+", default=["classic"], choices=["classic", "sparse"],
                    help=f"classic: k = n - 1; sparse: k = min(n - 1, {SPARSE_K})")
    ap.add_argument("--phase-timeout", type=float, default=None,
                    help="[secagg] phase_timeout_s: how long a phase waits for sites that dropped (default "
                         f"max(2, {TIMEOUT_PER_SITE} × n) s: the sites' calls run one after another here)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per cell, seconds")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell (new dropout draw each); medians")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--out", type=Path, help="write every figure here (JSON)")
    ap.add_argument("--keep", type=Path, help="keep the work directories (aggregator logs and state) here")
    args = ap.parse_args()
    root = args.keep if args.keep is not None else Path(tempfile.mkdtemp(prefix="fedpeft-secagg-mqtt-"))
    root.mkdir(parents=True, exist_ok=True)
    base = baselines(args.dim, args.seed)
    broker = start_local_broker(prefer="mosquitto", config="dev", data_dir=root / "broker")
    load_start = os.getloadavg()
    cells = []
    try:
        for graph in args.graph:
            for n in args.sites:
                if graph == "sparse" and min(n - 1, SPARSE_K) == n - 1:
                    print(f"sparse n={n}: k = n - 1 is the classic graph, skipped", flush=True)
                    continue
                for d in args.dropout:
                    timeout = args.phase_timeout or max(2.0, TIMEOUT_PER_SITE * n)
                    runs = []
                    for rep in range(args.repeat):
                        print(f"{graph} n={n} dropout={d} run {rep + 1}/{args.repeat}: ", end="", flush=True)
                        t0 = time.time()
                        cell = run_cell(broker, root, n, d, args.dim, graph, timeout,
                                        args.seed + 1000 * rep + n, args.timeout, rep)
                        cell["load_after"] = os.getloadavg()[:2]
                        runs.append(cell)
                        print(f"{'correct' if cell['correct'] else cell.get('failure', 'NOT correct')} "
                              f"({time.time() - t0:.1f} s, load {os.getloadavg()[0]:.1f})", flush=True)
                    cells.append(summarise(runs) | {"repeats": runs})
    finally:
        broker.stop(keep_dir=args.keep is not None)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    machine = (f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {_mosquitto_version()}, load "
               f"average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    gbytes = next((c["global_bytes"] for c in cells if "global_bytes" in c), 0)
    print(f"\n{machine}; dim {args.dim:,}; plain update envelopes: top-k 1 % + int8 {base['topk_int8']:,} B, "
          f"top-k 10 % + int8 {base['topk_int8_10pct']:,} B, dense int8 {base['int8']:,} B, fp32 "
          f"{base['fp32']:,} B; global (fp32) {gbytes:,} B\n")
    print(markdown(cells, base))
    if args.out is not None:
        args.out.write_text(json.dumps({"command": sys.argv, "machine": machine, "dim": args.dim,
                                        "repeat": args.repeat, "baseline_bytes": base,
                                        "cells": cells}, indent=2))
    raise SystemExit(0 if all(c["correct"] for c in cells) else 1)


if __name__ == "__main__":
    main()
