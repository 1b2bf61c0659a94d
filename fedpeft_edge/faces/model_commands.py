"""Commands for the trained model on site and the device install: ``infer``, ``model``, ``wheelhouse``.

``infer`` and ``model`` run on a device (stock onnxruntime, nothing of the central side); ``wheelhouse``
runs centrally. Registered through ``faces/cli_commands._COMMANDS``; heavy imports happen in the runners
so ``--help`` stays instant (no numpy).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedpeft_edge.runtime.errors import FedPeftError, InvalidValueError

# ----------------------------------------------------------------------------------------------- infer

INFER_HELP = "site: batch predictions with the current exported model (stock onnxruntime)"
INFER_DESCRIPTION = """\
Runs the current version of the merged inference model that the agent exports on every new global
(<state>/model, see `fedpeft-edge model list`) over a batch of inputs and writes one JSON line per
input: id, row, label name, label id and the probability of every label. Tokenisation (text) or image
preprocessing comes with the model version, exactly as in training.

Inputs: a .jsonl file (objects with "text", optional "id"), a .csv file with a header (column "text",
optional "id"), a folder of images (.png, .pgm/.ppm, .npy; others with Pillow if installed) or an .npz
with an "images" array. An input's "label" (jsonl/csv), when every row has one, gives the accuracy.
"""


def _infer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("infer")
    g.add_argument("--model", type=Path, required=True,
                   help="the model store <state_dir>/model (its current version), or one version folder")
    g.add_argument("--input", type=Path, required=True,
                   help="file.jsonl | file.csv | image folder | file.npz")
    g.add_argument("--out", type=Path, default=None, help="predictions as JSON lines (default: stdout)")
    g.add_argument("--batch-size", type=int, default=32, help="default 32")
    g.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")


def _text_rows(path: Path) -> Iterator[tuple[str, Any, Any]]:
    """(id, text, label or None) per row of a .jsonl or .csv file."""
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise InvalidValueError(f"{path}:{n}: expected an object with a string 'text'")
                yield obj.get("id", n), obj["text"], obj.get("label")
        return
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "text" not in reader.fieldnames:
            raise InvalidValueError(f"{path}: CSV header needs a 'text' column (has {reader.fieldnames})")
        for row in reader:
            yield row.get("id") or reader.line_num, row["text"], row.get("label") or None


def _image_rows(path: Path) -> Iterator[tuple[str, Any, Any]]:
    import numpy as np

    from fedpeft_edge.data.image_files import image_files, read_image

    if path.is_dir():
        files = image_files(path)
        if not files:
            raise InvalidValueError(f"{path} holds no image files")
        for f in files:
            yield f.name, read_image(f), None
        return
    with np.load(path, allow_pickle=False) as z:
        images = z["images"]
        labels = z["labels"] if "labels" in z.files else None
    for i in range(images.shape[0]):
        yield i, images[i], None if labels is None else labels[i].item()


def _batched(rows: Iterator[tuple[Any, Any, Any]], size: int) -> Iterator[list[tuple[Any, Any, Any]]]:
    batch: list[tuple[Any, Any, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_infer(model_path: Path, input_path: Path, out, *, batch_size: int = 32, threads: int = 1
              ) -> dict[str, Any]:
    """Predict every input; writes JSON lines to ``out`` and returns a summary."""
    from fedpeft_edge.site.model_export import DeployedModel

    if batch_size < 1:
        raise InvalidValueError("--batch-size must be >= 1")
    model = DeployedModel.current(model_path, threads=threads)
    kind = (model.preprocessing or {}).get("kind")
    if input_path.is_dir() or input_path.suffix.lower() == ".npz":
        rows, encode = _image_rows(input_path), model.encode_images
    elif input_path.suffix.lower() in (".jsonl", ".csv"):
        rows, encode = _text_rows(input_path), model.encode_texts
    else:
        raise InvalidValueError(f"{input_path}: use a .jsonl or .csv file, an image folder or an .npz")
    if kind is None:
        raise InvalidValueError(f"model version {model.version} has no preprocessing settings "
                                "([data] options of the agent named none)")
    n = correct = labelled = 0
    for batch in _batched(rows, batch_size):
        probs = model.probabilities(model.logits(encode([x for _, x, _ in batch])))
        # ids beyond the recorded names (a record without labels) are named by their number
        names = [*model.labels, *map(str, range(len(model.labels), probs.shape[1]))]
        for (rid, _, label), p in zip(batch, probs, strict=True):
            k = int(p.argmax())
            name = names[k]
            line = {"id": rid, "row": n, "label": name, "label_id": k,
                    "probabilities": {names[i]: round(float(v), 6) for i, v in enumerate(p)}}
            out.write(json.dumps(line) + "\n")
            n += 1
            if label is not None:
                labelled += 1
                correct += int(label == name or label == k)
    summary: dict[str, Any] = {"rows": n, "version": model.version, "model": str(model.directory)}
    if n and labelled == n:
        summary["accuracy"] = correct / n
    return summary


def _run_infer(args: argparse.Namespace) -> int:
    if args.out is None:
        summary = run_infer(args.model, args.input, sys.stdout, batch_size=args.batch_size,
                            threads=args.threads)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            summary = run_infer(args.model, args.input, fh, batch_size=args.batch_size, threads=args.threads)
    acc = f", accuracy {summary['accuracy']:.3f}" if "accuracy" in summary else ""
    print(f"{summary['rows']} predictions with model version {summary['version']}{acc}"
          + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------- model

MODEL_HELP = "site: list the exported model versions, roll back one, or follow the latest again"
MODEL_DESCRIPTION = """\
The agent exports a merged inference model for every new global into <state_dir>/model/<round>/ and
points <state_dir>/model/current at it (keeping the newest 3 and the current one).
  list      the versions, which one is current, whether it is pinned
  rollback  make the version before the current one current and pin it: new globals are still
            exported but no longer made current
  latest    unpin and make the newest version current again
"""


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("list", "rollback", "latest"), help="what to do")
    p.add_argument("--model", type=Path, required=True, help="the model store <state_dir>/model")


def _run_model(args: argparse.Namespace) -> int:
    from fedpeft_edge.site.model_export import ModelStore

    store = ModelStore(args.model)
    if not args.model.is_dir():
        raise InvalidValueError(f"{args.model} is not a model store (no folder)")
    if args.action == "rollback":
        print(f"current model version: {store.rollback()} (pinned; `model latest` undoes it)")
    elif args.action == "latest":
        print(f"current model version: {store.follow_latest()} (following new versions)")
    cur = store.current()
    for v in store.versions():
        info = store.deploy_info(v)
        mark = "*" if v == cur else " "
        size = sum(f["bytes"] for f in info.get("files", {}).values()) / 1e6
        print(f"{mark} {v:>6}  {info.get('method', '?'):<9} merged={info.get('merged')!s:<5} "
              f"{size:7.1f} MB  {len(info.get('labels', []))} labels"
              + ("  final" if info.get("final") else ""))
    if cur is None:
        print("no current version")
    elif store.pinned:
        print(f"pinned at {cur}")
    return 0


# ------------------------------------------------------------------------------------------ wheelhouse

WHEELHOUSE_HELP = "central side: every wheel a device needs for an offline install without a compiler"
WHEELHOUSE_DESCRIPTION = """\
Collects into --out: this project's wheel with the C core prebuilt for --platform and --python
(host compiler for the host's platform; cross-compiled with <arch>-linux-gnu-gcc against the target
Python's headers otherwise) and the wheels of the base dependencies only (stock onnxruntime; never
torch nor onnxruntime-training), plus README.txt and manifest.json. Run from a checkout of the project.
On the device:  pip install --no-index --find-links DIR fedpeft-edge
"""


def _wheelhouse_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("wheelhouse")
    g.add_argument("--platform", choices=("x86_64", "aarch64"), required=True, help="the device's CPU")
    g.add_argument("--python", default="3.11", help="the device's Python, e.g. 3.11 (default)")
    g.add_argument("--out", type=Path, required=True, help="the wheelhouse folder")
    g.add_argument("--glibc", default="2.28", help="oldest glibc among the devices (default 2.28)")
    g.add_argument("--source", type=Path, default=None, help="project checkout (default: this one)")
    g.add_argument("--cc", default=None, help="cross compiler (default <arch>-linux-gnu-gcc)")
    g.add_argument("--python-include", type=Path, default=None,
                   help="cross builds: the target Python's include folder (Python.h; its pyconfig.h)")


def _run_wheelhouse(args: argparse.Namespace) -> int:
    from fedpeft_edge.faces.wheelhouse import WheelhouseOptions, build_wheelhouse

    opts = WheelhouseOptions(platform=args.platform, python=args.python, out=args.out, source=args.source,
                             cc=args.cc, python_include=args.python_include, glibc=args.glibc)
    try:
        manifest = build_wheelhouse(opts)
    except OSError as exc:
        raise FedPeftError(f"wheelhouse: {exc}") from exc
    print(f"project wheel: {manifest['project_wheel']}")
    print(f"install on the device: pip install --no-index --find-links {args.out} fedpeft-edge")
    return 0


COMMANDS = (
    ("infer", INFER_HELP, INFER_DESCRIPTION, _infer_args, _run_infer),
    ("model", MODEL_HELP, MODEL_DESCRIPTION, _model_args, _run_model),
    ("wheelhouse", WHEELHOUSE_HELP, WHEELHOUSE_DESCRIPTION, _wheelhouse_args, _run_wheelhouse),
)
