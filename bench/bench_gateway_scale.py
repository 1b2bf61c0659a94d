"""Scale through the gateway tier: 10,000 light sites behind 4 gateways, each on its own line broker
bridged to the central one (issue 13, item 8, second half).

What runs, all on this machine: a central Mosquitto with the real aggregator CLI
(`gateways = [...]`, quorum = every site); per line a Mosquitto bridged with
broker_config/bridge-gateway-to-central.conf, `fedpeft-edge gateway` (quorum = the line's sites) and a
pool of light sites (tests/support/scale_scenario.py: one pre-encoded top-k 1 % + int8 update of 76,808
parameters per site, re-enveloped per round, sent as soon as the round's global arrives, next round
after the gateway's ack; `--per-conn` sites share one MQTT connection). Per round: wall time as the
sites see it (the round's global first reached a site → the next one did), sites counted by the
aggregator (metrics.jsonl), sites acknowledged exactly once by their gateway, and the peak RSS / CPU of
the aggregator and of the gateways. Nothing lost = every round counts every site once, no rejection.

    python3 bench/bench_gateway_scale.py                       # 10,000 sites, 4 lines, 5 rounds
    python3 bench/bench_gateway_scale.py --sites 2000 --lines 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from scale_scenario import REPO_DIR, ScaleOptions, SitePool, make_envelopes, service_env

from fedpeft_edge.central.broker import die_with_parent, start_local_broker
from fedpeft_edge.central.store import RoundState
from fedpeft_edge.protocol.config import default_spec_hash

MB = 1024 * 1024


def bridge_lines(central_port: int, line: int) -> list[str]:
    out = []
    for text in (REPO_DIR / "broker_config" / "bridge-gateway-to-central.conf").read_text().splitlines():
        key = text.split(" ", 1)[0]
        if not text.strip() or text.startswith("#") or key in ("remote_password", "bridge_cafile"):
            continue
        if key == "address":
            text = f"address 127.0.0.1:{central_port}"
        elif key in ("connection", "remote_clientid", "remote_username", "notification_topic"):
            text = text.replace("line-a", f"line-{line}")
        out.append(text)
    return out


class Peak:
    """Peak RSS and CPU seconds of a set of processes, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.procs: dict[str, psutil.Process] = {}
        self.rss: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, name: str, pid: int) -> None:
        self.procs[name] = psutil.Process(pid)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, p in list(self.procs.items()):
                try:
                    self.rss[name] = max(self.rss.get(name, 0.0), p.memory_info().rss / MB)
                    t = p.cpu_times()
                    self.cpu[name] = t.user + t.system
                except psutil.Error:
                    pass
            time.sleep(0.2)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=10_000)
    ap.add_argument("--lines", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-conn", type=int, default=10, help="sites per MQTT connection (fd limit)")
    ap.add_argument("--timeout", type=float, default=3600.0)
    args = ap.parse_args()
    per_line = args.sites // args.lines
    sites = per_line * args.lines
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(65536, hard), hard))
    o = ScaleOptions(sites=per_line, rounds=args.rounds, fleet="tier")
    spec = default_spec_hash(o.params)
    work = Path(tempfile.mkdtemp(prefix="fedpeft-gwscale-"))
    gateways = [f"line-{k}-gw" for k in range(args.lines)]
    np.save(work / "initial.npy", np.zeros(o.params, np.float32))
    central = start_local_broker(prefer="mosquitto", data_dir=work / "central-broker")
    brokers = [central]
    procs: list[subprocess.Popen[bytes]] = []
    pools: list[SitePool] = []
    peak = Peak()
    t0 = time.time()

    def spawn(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(work / f"{name}.log", "ab") as fh:
            p = subprocess.Popen(
                [sys.executable, "-m", "fedpeft_edge", *argv],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=service_env(),
                cwd=str(REPO_DIR),
                preexec_fn=die_with_parent,
            )
        procs.append(p)
        peak.add(name, p.pid)
        return p

    try:
        (work / "agg.toml").write_text(f"""
[connection]
port = {central.port}
[fleet]
name = "{o.fleet}"
[aggregator]
state_dir = "{work}/agg"
initial_global = "{work}/initial.npy"
max_rounds = {args.rounds}
quorum = {sites}
min_clients = {sites}
round_deadline_s = 3600
server_optimizer = "fedavg"
final_linger_s = 5
gateways = {json.dumps(gateways)}
""")
        for k in range(args.lines):
            line = start_local_broker(
                prefer="mosquitto",
                data_dir=work / f"line-{k}-broker",
                extra_config=bridge_lines(central.port, k),
            )
            brokers.append(line)
            (work / f"gw-{k}.toml").write_text(f"""
[connection]
port = {line.port}
[fleet]
name = "{o.fleet}"
[gateway]
client_id = "{gateways[k]}"
state_dir = "{work}/gw-{k}"
quorum = {per_line}
round_deadline_s = 3600
final_linger_s = 3
""")
            envelopes = make_envelopes(o, spec, first_site=k * per_line)
            pool = SitePool(line.host, line.port, o.fleet, envelopes, args.per_conn, first_site=k * per_line)
            pool.start(timeout=300)
            pools.append(pool)
            spawn(f"gw-{k}", ["gateway", "--config", str(work / f"gw-{k}.toml")])
        for k, b in enumerate(brokers):
            if b.pid is not None:
                peak.add(f"line broker {k - 1}" if k else "central broker", b.pid)
        time.sleep(2)  # gateways subscribed before the first global
        agg = spawn("aggregator", ["aggregate", "--config", str(work / "agg.toml")])
        peak.start()
        deadline = time.monotonic() + args.timeout
        while agg.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        wall = time.time() - t0
        time.sleep(3)
    finally:
        peak.stop()
        for pool in pools:
            pool.stop()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for b in brokers:
            b.stop()
    lines = [json.loads(x) for x in (work / "agg" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    state = RoundState.load(work / "agg")
    counters = state.counters if state is not None else {}
    print(
        f"\n{sites:,} sites behind {args.lines} gateways ({per_line:,} each, {args.per_conn} per "
        f"connection), "
        f"{args.rounds} rounds, {o.params:,} parameters, top-k 1 % + int8; wall {wall:.0f} s; "
        f"load {os.getloadavg()[0]:.1f}; work dir {work}\n"
    )
    print("| round | sites counted | unique | sites acked once by their gateway | round s (sites' view) |")
    print("|---:|---:|---:|---:|---:|")
    ok = len(lines) == args.rounds
    for m in lines:
        r = int(m["round"])
        once = sum(
            sum(1 for i in range(per_line) if p.ack_count[i][r] == 1 and p.acked[i].get(r) == "accepted")
            for p in pools
        )
        first = min(p.global_first.get(r, float("inf")) for p in pools)
        nxt = min(p.global_first.get(r + 1, float("inf")) for p in pools)
        ok &= m["num_updates"] == sites and len(set(m["participants"])) == sites and once == sites
        print(
            f"| {r} | {m['num_updates']:,} | {len(set(m['participants'])):,} | {once:,} | {nxt - first:.1f} |"
        )
    ok &= counters.get("rejected", 0) == 0 and counters.get("accepted", 0) == sites * args.rounds
    errors = [e for p in pools for e in p.errors]
    print(
        f"\naggregator counters: accepted {counters.get('accepted', 0):,}, partials "
        f"{counters.get('partials_accepted', 0)}, duplicate {counters.get('duplicate', 0)}, "
        f"rejected {counters.get('rejected', 0)}; site errors {len(errors)} {errors[:3]}"
    )
    print("\n| process | peak RSS MB | CPU s |\n|---|---:|---:|")
    for name in sorted(peak.rss):
        print(f"| {name} | {peak.rss[name]:.0f} | {peak.cpu.get(name, 0.0):.1f} |")
    print(f"\nnothing lost, nothing counted twice: {ok and not errors}")


if __name__ == "__main__":
    main()
