"""Scale: 1,000 simulated sites through one Mosquitto; does the aggregator keep up, stay flat, lose nothing?

A scenario, not a micro-benchmark: a dev Mosquitto on its own port, the real aggregator CLI in a
subprocess (`python -m fedpeft_edge aggregate`, quorum = number of sites, FedAvg, default policy and
fp32 downlink) and light sites driven by one selector thread of this process (no training: a pre-encoded
top-k 1 % + int8 update per site, re-enveloped per round; each site sends as soon as it sees the round's
retained global, QoS 1, and waits for its ack before the next round). The scenario lives in
tests/support/scale_scenario.py (tests/central/test_scale_smoke.py runs it small). Prints one Markdown
table per fleet size; per round: the aggregator's round time (global published → round closed),
updates/s, acks, CPU of aggregator / broker / sites, the aggregator's RSS.

    python3 bench/bench_scale.py                          # 100 and 1,000 sites, 5 rounds each
    python3 bench/bench_scale.py --sites 1000 --rounds 20
    python3 bench/bench_scale.py --sites 1000 --rounds 2 --profile /tmp/agg.prof   # where the time goes
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import resource
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from scale_scenario import ScaleOptions, fmt_load, run_scenario


def _fd_limit(needed: int) -> str:
    """Raise the soft descriptor limit towards ``needed`` (the broker inherits it); what it is now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return f"fd limit {soft} (hard {hard})"


def _print_profile(path: Path, top: int = 25) -> None:
    st = pstats.Stats(str(path))
    total = st.total_tt  # type: ignore[attr-defined]
    print(f"\naggregator main thread under cProfile ({path}), {total:.2f} s in total; by own time:\n")
    print("| function | calls | own s | cumulative s |\n|---|---:|---:|---:|")
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    for (file, line, name), (_cc, nc, tt, ct, _callers) in rows[:top]:
        where = f"{Path(file).name}:{line}" if line else file
        print(f"| `{name}` ({where}) | {nc:,} | {tt:.2f} | {ct:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", default="100,1000", help="comma-separated fleet sizes (default 100,1000)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--params", type=int, default=76_808)
    ap.add_argument("--mode", default="topk_int8", choices=["fp32", "int8", "topk_fp32", "topk_int8"])
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--sites-per-connection", type=int, default=1,
                    help="site ids one MQTT connection publishes for (when descriptors are short)")
    ap.add_argument("--log-level", default="INFO", help="the aggregator's (INFO: one line per update)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per fleet size, seconds")
    ap.add_argument("--profile", type=Path, help="run the aggregator under cProfile; stats file")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--keep", type=Path, help="keep the work directories (aggregator log, state) under here")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sites.split(",") if x.strip()]
    # per site connection: its socket here and the broker's; the broker also keeps its own files
    print(_fd_limit(2 * max(sizes) // args.sites_per_connection + 256), f"; {os.cpu_count()} CPUs")
    out = []
    ok = True
    for n in sizes:
        opts = ScaleOptions(sites=n, rounds=args.rounds, params=args.params, mode=args.mode, ratio=args.ratio,
                            sites_per_connection=args.sites_per_connection, log_level=args.log_level,
                            timeout_s=args.timeout, profile=args.profile,
                            work_dir=args.keep / f"sites-{n}" if args.keep else None)
        print(f"\n## {n:,} sites, load average {fmt_load(os.getloadavg())} before\n", flush=True)
        res = run_scenario(opts)
        print(res.markdown(), flush=True)
        ok &= res.nothing_lost
        out.append({"options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
                    "rounds": [asdict(r) | {"updates_per_s": r.updates_per_s} for r in res.rounds],
                    "counters": res.counters, "rss_start_mb": res.rss_start_mb, "wall_s": res.wall_s,
                    "load_start": res.load_start, "load_end": res.load_end, "errors": res.errors,
                    "nothing_lost": res.nothing_lost, "update_bytes": res.update_bytes,
                    "global_bytes": res.global_bytes, "connections": res.connections, "broker": res.broker})
        if args.profile is not None and args.profile.exists():
            _print_profile(args.profile)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
