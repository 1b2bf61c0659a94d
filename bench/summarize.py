"""Markdown table of bench_kernels.py results from pytest-benchmark's JSON.

    python bench/summarize.py bench/kernels.json

Medians only (the machine is shared and noisy: compare ratios from one run, not absolute times).
Columns: median time and M elements/s per implementation; "C vs numpy" = numpy time / C time
(speed-up of the dispatched C path); "C / copyto" = C time / np.copyto time of the same number of
float32 elements (how many buffer copies the kernel costs); "baseline / C" = forced portable path time /
dispatched path time (what run-time CPU dispatch buys).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def _fmt_ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.3g}"


def _fmt_ratio(num: float | None, den: float | None) -> str:
    return "–" if num is None or den is None or den == 0 else f"{num / den:.2f}×"


def summarize(report: dict) -> str:
    medians: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    rates: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    correct: dict[tuple[str, str], list[bool]] = defaultdict(list)
    cpu_paths: set[str] = set()
    copyto: dict[str, float] = {}
    order: list[tuple[str, str]] = []
    for bench in report.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "kernel" not in info or "impl" not in info:
            continue  # another benchmark file's entry
        median = bench["stats"]["median"]
        if info["kernel"] == "copyto":
            copyto[info["size"]] = median
            continue
        key = (info["kernel"], info["size"])
        if key not in medians:
            order.append(key)
        medians[key][info["impl"]] = median
        rates[key][info["impl"]] = info.get("elements_per_s", 0.0)
        correct[key].append(bool(info.get("correct")))
        if info["impl"] == "c" and info.get("cpu_path"):
            cpu_paths.add(info["cpu_path"])

    lines = [
        f"Dispatched C path: {', '.join(sorted(cpu_paths)) or '?'}; medians in ms; M el/s = million "
        "elements per second (scatter_add counts its 1 % non-zeros).",
        "",
        "| kernel | size | C ms | C M el/s | baseline ms | numpy ms | numpy M el/s | C vs numpy "
        "(numpy/C) | C / copyto | baseline / C | checked |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key in order:
        kernel, size = key
        m, r = medians[key], rates[key]
        c, base, ref = m.get("c"), m.get("c-baseline"), m.get("numpy")
        checked = "yes" if correct[key] and all(correct[key]) else "NO"
        lines.append(
            f"| {kernel} | {size} | {_fmt_ms(c)} | {r.get('c', 0) / 1e6:.0f} | {_fmt_ms(base)} | "
            f"{_fmt_ms(ref)} | {r.get('numpy', 0) / 1e6:.0f} | {_fmt_ratio(ref, c)} | "
            f"{_fmt_ratio(c, copyto.get(size))} | {_fmt_ratio(base, c)} | {checked} |"
        )
    lines.append("")
    elements = {"1M": 1 << 20, "16M": 1 << 24}
    for size, median in sorted(copyto.items(), key=lambda item: elements.get(item[0], 0)):
        n = elements.get(size)
        rate = f", {n / median / 1e6:.0f} M el/s" if n else ""
        lines.append(f"`np.copyto` {size} float32: {_fmt_ms(median)} ms{rate} (bandwidth yardstick).  ")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        print(summarize(json.load(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
