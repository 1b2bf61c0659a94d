"""The experiment's report: the results table, its Markdown page and its plots."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.faces import report as rep

RESULT_COLUMNS = (
    "task",
    "method",
    "split",
    "compression",
    "prox mu",
    "params",
    "global acc",
    "site acc (global)",
    "personalised mean",
    "personalised worst",
    "bytes up / update",
    "% of full FT fp32",
    "step ms",
    "peak RSS MB",
)


def result_rows(cells: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    rows = []
    for c in cells:
        site_global = c["site_accuracy_global"]
        rows.append(
            [
                c["task"],
                c["method"],
                c["split"],
                c["compression"],
                format(float(c.get("prox_mu", 0.0)), "g"),  # an axis, named like the others
                int(c["trainable_params"]),
                c["global_accuracy"],
                float(np.mean(site_global)) if site_global else None,
                c["personalised_mean"],
                c["personalised_worst"],
                round(c["bytes_up_per_client_update"]),
                100.0 * c["bytes_ratio_vs_full_fp32"],
                c["step_ms"],
                c["peak_rss_mb"],
            ]
        )
    return rows


def cell_label(c: Mapping[str, Any]) -> str:
    """A cell's name in the plots: method/split/compression, and FedProx's mu where it is not 0."""
    mu = float(c.get("prox_mu", 0.0))
    variant = f"/{c['variant']}" if c.get("variant") else ""
    return f"{c['method']}/{c['split']}/{c['compression']}" + (f"/prox {mu:g}" if mu else "") + variant


def _variant_note(v: Mapping[str, Any]) -> str:
    speed = v.get("site_speed")
    work = f"site speeds {', '.join(f'{x:g}' for x in speed)}" if speed else "equal local work"
    return (f"{work}, aggregation {v.get('aggregation', 'fedavg')}, {v['rounds']} rounds of "
            f"{v['local_steps']} local steps")


def write_experiment_report(summary: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": rep.write_json(out_dir / "results.json", summary)}
    cells = summary["cells"]
    lines = [f"# Experiment `{summary['name']}`", ""]
    st = summary["settings"]
    lines.append(
        f"{st['clients']} sites, {st['rounds']} rounds, {st['local_steps']} local steps of batch "
        f"{st['batch_size']}, {st['personalise_steps']} personalisation steps, strategy "
        f"{st['strategy']}; {len(cells)} cells in {summary['seconds']:.0f} s."
    )
    lines.append("")
    for name, t in summary["tasks"].items():
        lines.append(
            f"- task `{name}`: {t['kind']} on `{t['dataset']}`, {t['train_size']} training / "
            f"{t['test_size']} test samples"
        )
    lines.append("")
    if summary.get("variants"):  # [variants.<label>]: which one each row ran under, and how it differs
        lines.extend(f"- variant `{label}`: {_variant_note(v)}" for label, v in summary["variants"].items())
        lines.append("")
        rows = [[c.get("variant", ""), *row] for c, row in zip(cells, result_rows(cells), strict=True)]
        lines.append(rep.markdown_table(("variant", *RESULT_COLUMNS), rows))
    else:
        lines.append(rep.markdown_table(RESULT_COLUMNS, result_rows(cells)))
    if summary.get("failures"):
        lines.append("## Cells that could not run\n")
        lines.extend(f"- `{f['cell']}`: {f['error']}" for f in summary["failures"])
        lines.append("")
    plots: dict[str, Path] = {}
    if cells and rep.plots_available():
        for task in sorted({c["task"] for c in cells}):
            task_cells = [c for c in cells if c["task"] == task]
            series = {
                cell_label(c): (
                    list(range(1, len(c["accuracy_per_round"]) + 1)),
                    c["accuracy_per_round"],
                )
                for c in task_cells
            }
            # one point per cell (eval_every_round = false) makes no curve: the bar charts carry it then
            if any(
                sum(1 for a in c["accuracy_per_round"] if a is not None and math.isfinite(a)) > 1
                for c in task_cells
            ):
                plots[f"accuracy_{task}"] = rep.line_plot(
                    out_dir / f"accuracy_{task}.png",
                    series,
                    title=f"{task}: global test accuracy per round",
                    xlabel="round",
                    ylabel="accuracy",
                )
            labels = [cell_label(c) for c in task_cells]
            plots[f"bytes_{task}"] = rep.bar_plot(
                out_dir / f"bytes_{task}.png",
                labels,
                {"bytes up per update": [c["bytes_up_per_client_update"] for c in task_cells]},
                title=f"{task}: bytes uploaded per site update",
                ylabel="bytes",
                log_y=True,
            )
            plots[f"personalised_{task}"] = rep.bar_plot(
                out_dir / f"personalised_{task}.png",
                labels,
                {
                    "global model, global test": [c["global_accuracy"] for c in task_cells],
                    "global model, sites' own test (mean)": [
                        float(np.mean(c["site_accuracy_global"])) if c["site_accuracy_global"] else None
                        for c in task_cells
                    ],
                    "personalised, sites' own test (mean)": [c["personalised_mean"] for c in task_cells],
                    "personalised, sites' own test (worst)": [c["personalised_worst"] for c in task_cells],
                },
                title=f"{task}: accuracy, global vs personalised",
                ylabel="accuracy",
            )
        lines.append("## Plots\n")
        lines.extend(f"![{k}]({p.name})" for k, p in plots.items())
        lines.append("")
    elif cells:
        lines.append(f"(plots skipped: matplotlib is not installed; `{rep.REPORT_INSTALL_HINT}`)\n")
    md = out_dir / "results.md"
    md.write_text("\n".join(lines))
    paths["markdown"] = md
    paths.update(plots)
    return paths
