"""The demo's results: accuracy of adapters, the sites' sent updates, the summary, its report and table."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.central.policy import RoundPolicy
from fedpeft_edge.faces import report as rep
from fedpeft_edge.faces.demo.options import DemoOptions
from fedpeft_edge.faces.tasks import TaskData, iterate, take
from fedpeft_edge.runtime.errors import FedPeftError


def full_model_params(task: TaskData) -> int:
    """Parameters of backbone + head: what a full fine-tuning update would carry."""
    import onnx

    model = onnx.load(str(task.prepared.onnx_path), load_external_data=False)
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims)]
    return sum(int(np.prod(t.dims)) for t in floats) + (int(task.prepared.feature_dim) + 1) * task.num_classes



def evaluator_accuracy(evaluator: Any, task: TaskData, vec: np.ndarray, shard: Any) -> float | None:
    """Accuracy of an adapter on the global test set (``shard`` None) or on a site's own test data."""
    if shard is None:
        inputs, labels = task.test_inputs, task.test_labels
    else:
        inputs, labels = take(task.train_inputs, shard.test_idx), task.train_labels[shard.test_idx]
    if labels.size == 0:
        return None
    evaluator.set_flat(vec)
    return float(evaluator.evaluate(iterate(inputs, labels, 64, shuffle=False)).accuracy)



def read_sent_updates(agent_dir: Path) -> list[dict[str, Any]]:
    """What the agent actually sent (its audit copies): wire bytes, codec payload bytes, metrics."""
    from fedpeft_edge.protocol import wire

    out = []
    sent = agent_dir / "sent"
    if not sent.is_dir():
        return out
    for path in sorted(sent.glob("r*.msg")):
        data = path.read_bytes()
        try:
            msg = wire.decode_update(data)
        except FedPeftError:
            continue
        out.append(
            {
                "round": msg.round,
                "wire_bytes": len(data),
                "payload_bytes": msg.update.nbytes,
                "codec": msg.update.mode,
                "k": msg.update.k,
                "n": msg.update.n,
                "block": msg.update.block,
                "index_nbytes": msg.update.index_nbytes,
                "num_samples": msg.num_samples,
                "metrics": dict(msg.metrics),
            }
        )
    return out


def site_entries(
    task: TaskData,
    shards: Sequence[Any],
    agent_dirs: Sequence[Path],
    evaluator: Any,
    initial: np.ndarray,
    final: np.ndarray,
    site_before: Mapping[int, float | None],
    site_finals: Mapping[int, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """Per site: data sizes, label mix, accuracy of the initial and final globals on its own test data,
    and the updates it sent. ``site_before`` holds accuracies already measured while the fleet ran;
    ``site_finals`` the model a site runs when it is not the final global (a site below the LoRA rank
    runs the global cut to its rank)."""
    sites = []
    for shard, adir in zip(shards, agent_dirs, strict=False):
        test_y = task.train_labels[shard.test_idx]
        entry: dict[str, Any] = {
            "site": f"site-{shard.site + 1}",
            "train_samples": shard.num_train,
            "test_samples": int(test_y.size),
            "label_counts": np.bincount(
                task.train_labels[shard.train_idx], minlength=task.num_classes
            ).tolist(),
        }
        if test_y.size:
            before = site_before.get(shard.site)
            if before is None:
                before = evaluator_accuracy(evaluator, task, initial, shard)
            entry["accuracy_before"] = before
            own = (site_finals or {}).get(shard.site, final)
            entry["accuracy_after"] = evaluator_accuracy(evaluator, task, own, shard)
        entry["updates"] = read_sent_updates(adir)
        sites.append(entry)
    return sites


def _rank_words(o: dict[str, Any]) -> str:
    """Words for mixed LoRA ranks, e.g. ', LoRA ranks 8/8/4/4 per site (hetlora)'; else nothing."""
    if not o.get("ranks"):
        return ""
    ranks = "/".join(str(r) for r in str(o["ranks"]).split(","))
    rule = o.get("rank_aggregation") or RoundPolicy.rank_aggregation
    return f", LoRA ranks {ranks} per site ({rule})"


def _codec_words(o: dict[str, Any]) -> str:
    """Words for a top-k codec, e.g. ' (top 10 %, warm-up 3 rounds from dense)'; else nothing."""
    if o["codec"] != "topk_int8":
        return ""
    warm = o.get("codec_warmup_rounds")
    return (f" (top {format(100 * o['topk_ratio'], 'g')} %"
            f"{f', warm-up {warm} rounds from dense' if warm else ''})")


def build_summary(
    opts: DemoOptions,
    task: TaskData,
    bundle: Any,
    n_params: int,
    full_params: int,
    rounds_seen: list[dict[str, Any]],
    acc_per_round: Mapping[int, float],
    sites: list[dict[str, Any]],
    *,
    ok: bool,
    failure: str,
    prep_seconds: float,
    fed_seconds: float,
    total_seconds: float,
) -> dict[str, Any]:
    full_bytes = 4 * full_params
    per_round = []
    for rnd in range(len(rounds_seen)):
        ups = [u for s in sites for u in s["updates"] if u["round"] == rnd]
        payload = sum(u["payload_bytes"] for u in ups)
        wire_bytes = sum(u["wire_bytes"] for u in ups)
        train_s = [u["metrics"].get("train_seconds") for u in ups if "train_seconds" in u["metrics"]]
        m = rounds_seen[rnd]
        senders = len(ups)
        if not ups and m.get("secagg_session"):  # secure aggregation: no plain update; every phase's uplink
            wire_bytes = payload = int(m.get("bytes_in") or 0)  # (keys, shares, masked input, reveals)
            senders = len(m.get("participants", []))
        per_round.append(
            {
                "round": rnd + 1,
                "participants": len(m.get("participants", [])),
                "client_loss": m.get("loss"),
                "site_accuracy_of_global": m.get("global_eval_accuracy"),
                "global_test_accuracy": acc_per_round.get(rnd + 1),
                "bytes_in_aggregator": m.get("bytes_in"),
                "wire_bytes_up": wire_bytes,
                "payload_bytes_up": payload,
                "payload_bytes_per_site": payload / max(1, senders),
                "bytes_per_site_vs_full_ft_percent": 100.0 * (wire_bytes / max(1, senders)) / full_bytes,
                "local_train_seconds_mean": float(np.mean(train_s)) if train_s else None,
                "local_train_seconds_max": float(np.max(train_s)) if train_s else None,
                "round_seconds": m.get("duration_s"),
            }
        )
    accs = [acc_per_round[r] for r in sorted(acc_per_round)]
    majority = task.majority_accuracy()
    return {
        "ok": ok,
        "failure": failure or None,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()},
        "model": {
            "kind": task.kind,
            "onnx": str(task.prepared.onnx_path),
            "full_params": full_params,
            "full_ft_fp32_bytes": full_bytes,
        },
        "peft": {
            "method": bundle.spec.method,
            "spec": bundle.spec.to_dict(),
            "spec_hash": bundle.spec_hash,
            "trainable_params": n_params,
            "dense_fp32_bytes": 4 * n_params,
        },
        "data": {
            "dataset": task.config.dataset,
            "classes": task.classes,
            "train_pool": int(task.train_labels.size),
            "global_test": int(task.test_labels.size),
            "split": opts.split,
            "majority_class_accuracy": majority,
        },
        "global": {
            "accuracy_before": accs[0] if accs else None,
            "accuracy_after": accs[-1] if accs else None,
            "accuracy_per_round": {str(k): v for k, v in sorted(acc_per_round.items())},
        },
        "rounds": per_round,
        "sites": sites,
        "bytes": {
            "payload_bytes_per_site_update_mean": float(
                np.mean([r["payload_bytes_per_site"] for r in per_round])
            )
            if per_round
            else None,
            "wire_bytes_per_round_mean": float(np.mean([r["wire_bytes_up"] for r in per_round]))
            if per_round
            else None,
            "full_ft_fp32_bytes_per_site_update": full_bytes,
            "max_percent_of_full_ft": max(
                (r["bytes_per_site_vs_full_ft_percent"] for r in per_round), default=None
            ),
        },
        "timing": {
            "prepare_seconds": prep_seconds,
            "federation_seconds": fed_seconds,
            "total_seconds": total_seconds,
        },
    }


FINAL_COLUMNS = ("", "accuracy before", "accuracy after", "train samples", "test samples")


def final_rows(summary: Mapping[str, Any]) -> list[list[Any]]:
    g = summary["global"]
    rows: list[list[Any]] = [
        [
            "global test set",
            g["accuracy_before"],
            g["accuracy_after"],
            summary["data"]["train_pool"],
            summary["data"]["global_test"],
        ]
    ]
    for s in summary["sites"]:
        rows.append(
            [
                f"{s['site']} (own test data)",
                s.get("accuracy_before"),
                s.get("accuracy_after"),
                s["train_samples"],
                s["test_samples"],
            ]
        )
    return rows


ROUND_COLUMNS = (
    "round",
    "sites",
    "client loss",
    "global test acc",
    "site acc of incoming global",
    "bytes up (all sites)",
    "per site vs full FT",
    "local train s (mean)",
    "round s",
)


def round_rows(summary: Mapping[str, Any]) -> list[list[Any]]:
    return [
        [
            r["round"],
            r["participants"],
            r["client_loss"],
            r["global_test_accuracy"],
            r["site_accuracy_of_global"],
            rep.human_bytes(r["wire_bytes_up"]),
            f"{r['bytes_per_site_vs_full_ft_percent']:.4f} %",
            r["local_train_seconds_mean"],
            r["round_seconds"],
        ]
        for r in summary["rounds"]
    ]


def write_demo_report(summary: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": rep.write_json(out_dir / "report.json", summary)}
    o, p, b = summary["options"], summary["peft"], summary["bytes"]
    lines = ["# fedpeft-edge demo report", ""]
    if not summary["ok"]:
        lines += [f"**The run failed:** {summary['failure']}", ""]
    lines.append(
        f"{o['agents']} sites, {o['rounds']} rounds of {o['local_steps']} local steps (batch "
        f"{o['batch_size']}), `{p['method']}` on the {summary['model']['kind']} model, data "
        f"`{summary['data']['dataset']}` split `{o['split']}`, codec `{o['codec']}`"
        f"{_codec_words(o)}"
        f"{', FedProx mu ' + format(o['prox_mu'], 'g') if o.get('prox_mu') else ''}"
        f"{_rank_words(o)}."
    )
    lines.append("")
    lines.append(
        f"- trainable parameters: {p['trainable_params']:,} of {summary['model']['full_params']:,} "
        f"({100 * p['trainable_params'] / summary['model']['full_params']:.2f} %)"
    )
    if b["payload_bytes_per_site_update_mean"] is not None:
        lines.append(
            f"- bytes up per site update: {rep.human_bytes(b['payload_bytes_per_site_update_mean'])} "
            f"codec payload; full fine-tuning in fp32 would send "
            f"{rep.human_bytes(b['full_ft_fp32_bytes_per_site_update'])} "
            f"(at most {b['max_percent_of_full_ft']:.4f} % of it, envelope included)"
        )
    lines.append(
        f"- majority-class accuracy on the global test set (the floor): "
        f"{summary['data']['majority_class_accuracy']:.3f}"
    )
    t = summary["timing"]
    lines.append(
        f"- time: preparation {t['prepare_seconds']:.0f} s, federation {t['federation_seconds']:.0f} s, "
        f"total {t['total_seconds']:.0f} s"
    )
    lines += ["", "## Accuracy before and after", "", rep.markdown_table(FINAL_COLUMNS, final_rows(summary))]
    lines += ["## Rounds", "", rep.markdown_table(ROUND_COLUMNS, round_rows(summary))]
    plots: dict[str, Path] = {}
    if rep.plots_available():
        acc = summary["global"]["accuracy_per_round"]
        xs = [int(k) for k in acc]
        series: dict[str, tuple[list[float], list[float | None]]] = {
            "global test set": (xs, list(acc.values()))
        }
        site_x = [r["round"] - 1 for r in summary["rounds"]]
        series["sites' own test data (mean)"] = (
            site_x,
            [r["site_accuracy_of_global"] for r in summary["rounds"]],
        )
        plots["accuracy"] = rep.line_plot(
            out_dir / "accuracy.png",
            series,
            title="Accuracy of the global adapter",
            xlabel="round (0 = before training)",
            ylabel="accuracy",
            hline=(summary["data"]["majority_class_accuracy"], "majority class"),
        )
        rounds = [r["round"] for r in summary["rounds"]]
        plots["bytes"] = rep.line_plot(
            out_dir / "bytes.png",
            {
                "bytes up per site (wire)": (
                    rounds,
                    [r["wire_bytes_up"] / max(1, r["participants"]) for r in summary["rounds"]],
                ),
                f"dense fp32 adapter ({p['method']})": (rounds, [p["dense_fp32_bytes"]] * len(rounds)),
                "full fine-tuning fp32": (rounds, [summary["model"]["full_ft_fp32_bytes"]] * len(rounds)),
            },
            title="Bytes uploaded per site per round",
            xlabel="round",
            ylabel="bytes (log)",
            log_y=True,
        )
        lines += ["## Plots", ""] + [f"![{k}]({v.name})" for k, v in plots.items()] + [""]
    else:
        lines.append(f"(plots skipped: matplotlib is not installed; `{rep.REPORT_INSTALL_HINT}`)")
    md = out_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    paths["markdown"] = md
    paths.update(plots)
    return paths


def print_final_table(summary: Mapping[str, Any], plain: bool) -> None:
    text = (
        rep.markdown_table(FINAL_COLUMNS, final_rows(summary))
        + "\n"
        + rep.markdown_table(ROUND_COLUMNS, round_rows(summary))
    )
    if plain:
        print(text, flush=True)
        return
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(text, flush=True)
        return
    console = Console()
    for title, cols, rows in (
        ("Accuracy before / after", FINAL_COLUMNS, final_rows(summary)),
        ("Rounds", ROUND_COLUMNS, round_rows(summary)),
    ):
        table = Table(title=title)
        for c in cols:
            table.add_column(c, justify="right" if c else "left")
        for row in rows:
            table.add_row(*[rep.format_cell(v) for v in row])
        console.print(table)
