"""Example site data for a dry run of a plant deployment (README "Deploy to a plant").

    python3 scripts/make_site_files.py OUT_DIR [--sites 2] [--per-site 400] [--alpha 0.5] [--seed 0]

Writes OUT_DIR/site-a.jsonl, site-b.jsonl, ... (a Dirichlet label split of Reuters R8's training part, one
{"text", "label"} object per line, as a plant's own labelled data would look) and OUT_DIR/new-docs.jsonl
(documents from the test part, with labels, for `fedpeft-edge infer`), and prints the class list in the
head's order. Needs the data packages of the central install (scripts/install.sh); a real site brings its
own file instead.
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

import numpy as np

from fedpeft_edge.data.datasets import load_dataset
from fedpeft_edge.data.partition import dirichlet_partition


def write_jsonl(path: Path, texts: list[str], labels: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for text, label in zip(texts, labels, strict=True):
            fh.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--per-site", type=int, default=400)
    p.add_argument("--new-docs", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train, test = load_dataset("reuters_r8", "train"), load_dataset("reuters_r8", "test")
    parts = dirichlet_partition(train.labels, args.sites, args.alpha, args.seed, min_size=args.per_site // 4)
    rng = np.random.default_rng(args.seed)
    for letter, idx in zip(string.ascii_lowercase, parts, strict=False):
        idx = rng.permutation(idx)[: args.per_site]
        write_jsonl(args.out / f"site-{letter}.jsonl", [train.texts[i] for i in idx],
                    [train.classes[int(train.labels[i])] for i in idx])
    pick = rng.choice(len(test.texts), size=min(args.new_docs, len(test.texts)), replace=False)
    write_jsonl(args.out / "new-docs.jsonl", [test.texts[i] for i in pick],
                [test.classes[int(test.labels[i])] for i in pick])
    print(",".join(train.classes))


if __name__ == "__main__":
    main()
