"""Differential privacy and poisoning defences, measured (issue 14, item 4): MiniLM-L6 + LoRA r=8 on
Reuters R8, 8 simulated sites (Dirichlet 0.5 over labels), in one process through the aggregator's own
core (``AggregatorCore`` with the ``[privacy]`` / robust-rule settings) and each site's own encoder.

* **DP** (``--table dp``): no DP, then central and distributed DP-FedAvg at ε ∈ {1, 4, 8}, δ = 1e-5, over
  the run's rounds (every site every round: sampling rate 1). The noise multiplier is calibrated with the
  RDP accountant (``calibrate_noise``); the clip norm C is a fixed hyperparameter: ``--clip`` or, by
  default, the median update norm of the no-DP run's first round (a choice an operator would make on
  public or proxy data; it is printed). Distributed: each site clips to C and adds z·C/√8 (site/privacy.py).
* **Poisoning** (``--table poison``): 1 and 2 of the 8 sites malicious —
  ``signflip`` (sends −10 × its honestly trained delta), ``scaled`` (sends +20 × it: a boosted update),
  ``labelflip`` (trains on labels shifted by one class and sends that delta) — under plain FedAvg (every
  bound off), the default close-time bounds (clip at 2 × the median norm, samples capped at the median),
  coordinate-wise median, trimmed mean (25 % each side) and multi-Krum (f = the malicious count).

Updates are top-k 10 % + int8 for poisoning (as the demo), fp32 for DP (noise is dense). Final global
accuracy on the test set after ``--rounds`` rounds.

    python3 bench/privacy_robust_experiment.py --out docs/results/privacy-robust
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from fedpeft_edge.central.core import AggregatorConfig, AggregatorCore
from fedpeft_edge.central.privacy import calibrate_noise
from fedpeft_edge.faces.experiment.cell import evaluate, make_trainer
from fedpeft_edge.faces.tasks import (
    SplitConfig,
    TaskConfig,
    get_bundle,
    iterate,
    load_task,
    method_spec,
    split_sites,
    take,
)
from fedpeft_edge.protocol.codec import CodecConfig, decode_global, update_l2_norm
from fedpeft_edge.protocol.privacy import PrivacyPolicy
from fedpeft_edge.protocol.wire import UpdateMessage
from fedpeft_edge.site.encoder import UpdateEncoder
from fedpeft_edge.site.privacy import SiteNoise

SITES = 8
OFF = {"norm_median_multiplier": 0.0, "norm_reject_multiplier": 0.0, "samples_median_multiplier": 0.0}
DEFENCES = {
    "fedavg": dict(OFF),
    "default bounds": {},
    "median": dict(OFF, robust_rule="median"),
    "trimmed mean": dict(OFF, robust_rule="trimmed_mean", trim_fraction=0.25),
    "multi-Krum": dict(OFF, robust_rule="multi_krum"),
}
ATTACKS = ("signflip", "scaled", "labelflip")


class Federation:
    def __init__(self, task: Any, args: argparse.Namespace, work: Path) -> None:
        self.task, self.args, self.work = task, args, work
        spec = method_spec("lora", "text", task.num_classes, {"rank": 8})
        self.bundle = get_bundle(task.prepared, spec, log=print)
        self.trainer = make_trainer(self.bundle, threads=args.threads, lr=args.lr)
        self.initial = work / "initial.state"
        self.trainer.save_state(self.initial)
        self.shards = split_sites(
            task, SplitConfig("dirichlet", 0.5), SITES, seed=args.seed, local_test_fraction=0.1
        )

    def run(
        self,
        *,
        policy: dict[str, Any],
        privacy: PrivacyPolicy,
        codec: CodecConfig,
        attack: str | None = None,
        malicious: int = 0,
        label: str,
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        task, args, trainer = self.task, self.args, self.trainer
        trainer.load_state(self.initial)
        start_vec = trainer.get_flat()
        n = int(start_vec.size)
        kw: dict[str, Any] = {"min_clients": SITES, "quorum": SITES, "max_rounds": args.rounds, **policy}
        if policy.get("robust_rule") == "multi_krum":
            kw["krum_byzantine"] = max(1, malicious)
        core = AggregatorCore(
            AggregatorConfig(fleet="x", n_params=n, spec_hash=self.bundle.spec_hash, privacy=privacy, **kw),
            None,
            initial_global=start_vec,
        )
        encoders = [UpdateEncoder(codec, n, seed=i) for i in range(SITES)]
        noise = (
            [SiteNoise(privacy, np.random.default_rng(100 + i)) for i in range(SITES)]
            if privacy.mode == "distributed"
            else None
        )
        bad = set(range(SITES - malicious, SITES))  # the last sites are the attackers
        labels = task.train_labels
        batches = []
        for i, sh in enumerate(self.shards):
            y = labels[sh.train_idx]
            if attack == "labelflip" and i in bad:
                y = (y + 1) % task.num_classes
            batches.append(
                iterate(
                    take(task.train_inputs, sh.train_idx),
                    y,
                    args.batch_size,
                    shuffle=True,
                    seed=args.seed * 7919 + i,
                )
            )
        states = [self.work / f"site{i}.state" for i in range(SITES)]
        norms0: list[float] = []
        for rnd in range(args.rounds):
            g = decode_global(core.global_message().vector, n)
            for i, sh in enumerate(self.shards):
                trainer.load_state(states[i] if rnd else self.initial)
                trainer.set_flat(g)
                m = trainer.train(batches[i], max_steps=args.local_steps)
                trainer.save_state(states[i])
                delta = trainer.get_flat() - g
                if i in bad and attack == "signflip":
                    delta = delta * np.float32(-10.0)
                elif i in bad and attack == "scaled":
                    delta = delta * np.float32(20.0)
                if noise is not None:
                    delta = noise[i].apply(delta)
                enc = encoders[i].encode(delta)
                if rnd == 0:
                    norms0.append(update_l2_norm(enc))
                msg = UpdateMessage(
                    "x",
                    core.round,
                    f"site-{i}",
                    self.bundle.spec_hash,
                    int(sh.num_train),
                    {"loss": float(m.loss)},
                    enc,
                )
                d = core.offer(msg)
                assert d.accepted, d
            _, metrics = core.close_round()
        trainer.set_flat(decode_global(core.global_message().vector, n))
        acc, _ = evaluate(trainer, task.test_inputs, task.test_labels, 64)
        out = {
            "label": label,
            "accuracy": acc,
            "attack": attack,
            "malicious": malicious,
            "median_norm_round1": float(np.median(norms0)),
            "epsilon": metrics.get("epsilon"),
            "noise_multiplier": metrics.get("noise_multiplier"),
            "seconds": time.perf_counter() - t0,
        }
        print(f"  {label}: accuracy {acc:.3f} ({out['seconds']:.0f} s)", flush=True)
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", default="dp,poison")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--train-size", type=int, default=640)
    ap.add_argument("--test-size", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--clip", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("reports/privacy-robust"))
    args = ap.parse_args(argv)
    tables = set(args.table.split(","))
    started = time.perf_counter()
    task = load_task(
        TaskConfig(
            kind="text",
            dataset="reuters_r8",
            train_size=args.train_size,
            test_size=args.test_size,
            max_len=args.max_len,
            seed=args.seed,
        )
    )
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {"dp": [], "poison": []}
    topk = CodecConfig(mode="topk_int8", topk_ratio=0.1)
    fp32 = CodecConfig(mode="fp32")

    def save() -> None:
        (args.out / "results.json").write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
        )

    with tempfile.TemporaryDirectory(prefix="privacy-robust-") as tmp:
        fed = Federation(task, args, Path(tmp))
        if "dp" in tables:
            base = fed.run(policy=dict(OFF), privacy=PrivacyPolicy(), codec=fp32, label="no DP")
            results["dp"].append(base)
            clip = args.clip or base["median_norm_round1"]
            print(f"clip norm C = {clip:.4g}", flush=True)
            for mode in ("central", "distributed"):
                for eps in (8.0, 4.0, 1.0):
                    z = calibrate_noise(eps, rounds=args.rounds, delta=1e-5)
                    p = PrivacyPolicy(mode=mode, noise_multiplier=z, clip_norm=clip, expected_sites=SITES)
                    r = fed.run(policy=dict(OFF), privacy=p, codec=fp32, label=f"{mode} ε={eps:g}")
                    r.update(mode=mode, target_epsilon=eps, clip=clip)
                    results["dp"].append(r)
                    save()
        if "poison" in tables:
            results["poison"].append(
                fed.run(policy=dict(OFF), privacy=PrivacyPolicy(), codec=topk, label="no attack, fedavg")
            )
            for attack in ATTACKS:
                for mal in (1, 2):
                    for name, pol in DEFENCES.items():
                        r = fed.run(
                            policy=pol,
                            privacy=PrivacyPolicy(),
                            codec=topk,
                            attack=attack,
                            malicious=mal,
                            label=f"{attack} x{mal}, {name}",
                        )
                        r["defence"] = name
                        results["poison"].append(r)
                        save()
    save()
    lines = [f"`python3 bench/privacy_robust_experiment.py {' '.join(sys.argv[1:])}`", ""]
    if results["dp"]:
        lines += [
            "| DP | target ε | ε spent (RDP) | noise multiplier z | clip C | accuracy |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in results["dp"]:
            eps = "—" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
            z = "—" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}"
            clip = f"{r['clip']:.3g}" if "clip" in r else "—"
            lines.append(
                f"| {r['label']} | {r.get('target_epsilon', '—')} | {eps} | {z} | {clip} | "
                f"{r['accuracy']:.3f} |"
            )
        lines.append("")
    if results["poison"]:
        lines += [
            "| attack | malicious | " + " | ".join(DEFENCES) + " |",
            "|---|---:|" + "---:|" * len(DEFENCES),
        ]
        base = [r for r in results["poison"] if r["attack"] is None]
        if base:
            lines.append(f"| none | 0 | {base[0]['accuracy']:.3f} |" + " |" * (len(DEFENCES) - 1))
        for attack in ATTACKS:
            for mal in (1, 2):
                row = {
                    r["defence"]: r["accuracy"]
                    for r in results["poison"]
                    if r["attack"] == attack and r["malicious"] == mal
                }
                if row:
                    lines.append(
                        f"| {attack} | {mal} | "
                        + " | ".join(f"{row[d]:.3f}" if d in row else "" for d in DEFENCES)
                        + " |"
                    )
    lines.append(f"\nTotal {time.perf_counter() - started:.0f} s.")
    (args.out / "results.md").write_text("# Privacy and poisoning defences\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
