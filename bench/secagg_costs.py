"""Secure aggregation cost: bytes per site per phase and compute time, one simulated round in one process.

Run: ``python3 bench/secagg_costs.py [--dim 76808] [--sites 4 16 64] [--dropout 0.1]`` (about 30 s here).
Every message goes through ``secagg_wire`` so the byte counts are what MQTT would carry (payload only, no
MQTT header). Sites that drop do so after phase 1 (they shared keys, then sent no masked input), which
is the case that costs the server most: their mask keys are rebuilt and their pairwise masks removed.
Times are one run on a shared machine: read ratios, not absolute figures. Output: a markdown table
(docs/secagg.md quotes it).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from fedpeft_edge.protocol import secagg as sa
from fedpeft_edge.protocol import secagg_wire as sw


def sparse_degree(n: int) -> int:
    """A SecAgg+-style degree: the smallest even k >= 2 log2(n), at most n - 1 (n*k must be even)."""
    k = min(n - 1, 2 * math.ceil(math.log2(n)))
    if (n * k) % 2:
        k -= 1
    return k


KINDS = ["AdvertiseKeys", "KeyDirectory", "ShareKeys", "ForwardedShares", "MaskedInput", "UnmaskRequest",
         "UnmaskResponse"]
PHASES = ["0 advertise", "1 share keys", "2 masked input", "3 unmask"]


def one_round(n: int, k: int, dim: int, dropout: float) -> dict[str, Any]:
    quant = sa.QuantSpec(clip=0.05, bits=sa.QuantSpec.largest_bits(max(n, 2)), max_sites=max(n, 2))
    sites = tuple(f"site-{i:03d}" for i in range(n))
    params = sa.SecAggParams("bench", 1, sites, k, sa.SecAggParams.default_threshold(k), dim, quant,
                             os.urandom(32))
    size: dict[str, list[int]] = defaultdict(list)  # message kind → bytes of each message
    site_s: dict[str, list[float]] = defaultdict(list)  # phase → seconds of each site's call
    server_s: dict[str, float] = defaultdict(float)  # phase → seconds of the server, all calls

    def wire(msg: Any) -> Any:
        data = sw.encode_message(msg, params)
        size[type(msg).__name__].append(len(data))
        return sw.decode_message(data, params)

    def on_site(phase: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        site_s[phase].append(time.perf_counter() - t0)
        return out

    def on_server(phase: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        server_s[phase] += time.perf_counter() - t0
        return out

    server = sa.SecAggServer(params)
    clients = {s: sa.SecAggClient(params, s) for s in sites}
    for c in clients.values():
        on_server(PHASES[0], server.receive_advertise, wire(on_site(PHASES[0], c.advertise)))
    dirs = on_server(PHASES[0], server.key_directories)
    for s, c in clients.items():
        msg = wire(on_site(PHASES[1], c.share_keys, wire(dirs[s])))
        on_server(PHASES[1], server.receive_shares, msg)
    fwd = on_server(PHASES[1], server.forward_shares)
    rng = np.random.default_rng(0)
    dropped = set(rng.choice(sites, size=round(n * dropout), replace=False).tolist())
    q = sa.quantize(rng.normal(0, 0.01, dim).astype(np.float32), quant)
    for s, c in clients.items():
        msg = on_site(PHASES[2], c.masked_input, wire(fwd[s]), q)
        if s not in dropped:
            on_server(PHASES[2], server.receive_masked_input, wire(msg))
    req = on_server(PHASES[2], server.unmask_request)
    refused = []
    for s in req.survivors:
        try:
            resp = wire(on_site(PHASES[3], clients[s].unmask, wire(req)))
        except sa.ThresholdError as exc:  # too many of some site's neighbours dropped: it cannot complete
            refused.append(str(exc))
            continue
        on_server(PHASES[3], server.receive_unmask_response, resp)
    if refused:
        return {"n": n, "k": k, "t": params.threshold, "dropped": len(dropped), "failed": refused[0]}
    res = on_server(PHASES[3], server.finish)
    assert np.array_equal(res.total, (q.astype(np.uint64) * len(res.survivors)).astype(np.uint32))
    return {"n": n, "k": k, "t": params.threshold, "dropped": len(dropped),
            "bytes": {kind: float(np.mean(size[kind])) for kind in KINDS},
            "site_ms": {ph: 1000 * float(np.mean(site_s[ph])) for ph in PHASES},
            "server_ms": {ph: 1000 * server_s[ph] for ph in PHASES},
            "server_in": sum(sum(size[kd]) for kd in ("AdvertiseKeys", "ShareKeys", "MaskedInput",
                                                      "UnmaskResponse")),
            "server_out": sum(sum(size[kd]) for kd in ("KeyDirectory", "ForwardedShares", "UnmaskRequest"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=76_808, help="update length (MiniLM LoRA r=8 q/v + head)")
    ap.add_argument("--sites", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--dropout", type=float, default=0.1)
    args = ap.parse_args()
    rows = []
    for n in args.sites:
        for k in sorted({n - 1, sparse_degree(n)}):
            rows.append(one_round(n, k, args.dim, args.dropout))
    print(f"dim = {args.dim}, {args.dropout:.0%} of the sites drop after phase 1.\n")
    print("Bytes of one message (mean over the messages of that kind):\n")
    print("| n | k | t | dropped | " + " | ".join(KINDS) + " | server in / out, whole round |")
    print("|" + "---:|" * (4 + len(KINDS) + 1))
    for r in rows:
        cells = [str(r[c]) for c in ("n", "k", "t", "dropped")]
        if "failed" in r:
            print("| " + " | ".join(cells) + f" | round failed: {r['failed']} |")
            continue
        cells += [f"{r['bytes'][kd]:,.0f}" for kd in KINDS]
        cells.append(f"{r['server_in'] / 1e6:.2f} MB / {r['server_out'] / 1e3:.0f} kB")
        print("| " + " | ".join(cells) + " |")
    print("\nCompute, ms (site: mean per site; server: whole phase, receiving every message included):\n")
    print("| n | k | " + " | ".join(f"site {p}" for p in PHASES) + " | "
          + " | ".join(f"server {p}" for p in PHASES) + " |")
    print("|" + "---:|" * (2 + 2 * len(PHASES)))
    for r in rows:
        if "failed" in r:
            continue
        cells = [str(r["n"]), str(r["k"])]
        cells += [f"{r['site_ms'][p]:.1f}" for p in PHASES]
        cells += [f"{r['server_ms'][p]:.0f}" for p in PHASES]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
