"""Sub-commands of ``fedpeft-edge`` that live in the faces layer: demo, experiment, bench, prepare.

``register(subparsers)`` adds all four to the main parser; each sets ``func`` to a handler taking the
parsed namespace and returning the exit code. Heavy imports happen inside the handlers so ``--help``
stays instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedpeft_edge.errors import FedPeftError


def register(subparsers: Any) -> None:
    """Add ``demo``, ``experiment``, ``bench`` and ``prepare`` to an argparse sub-parser collection."""
    register_demo(subparsers)
    register_experiment(subparsers)
    register_bench(subparsers)
    register_prepare(subparsers)


# ------------------------------------------------------------------------------------------------ demo


def register_demo(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run a whole local federation: broker, aggregator and plant agents as separate processes",
        description=(
            "Starts a local MQTT broker, an aggregator and N agents (separate processes), each agent with "
            "its own non-IID shard of a real data set, trains a PEFT adapter on a pretrained model for R "
            "rounds with live progress, then prints and writes a report (JSON, Markdown, PNG plots). "
            "The first run exports the model and builds the training artifacts (cached for later runs). "
            "Set FEDPEFT_EDGE_DEMO_QUICK=1 (or pass --quick) for a reduced run: 2 agents, 2 rounds, a small "
            "subset."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--task",
        choices=("text", "cv"),
        default=None,
        help="text (the default): MiniLM on Reuters R8; cv: EfficientNet-Lite0 on MNIST-5k/Fashion-MNIST",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="override the data set (text: reuters_r8, 20newsgroups; cv: mnist5k, fashion_mnist)",
    )
    p.add_argument("--method", default=None, help="PEFT method (lora, ffa_lora, adapter, bitfit, head_only)")
    p.add_argument("--agents", type=int, default=None, help="number of plant agents (default 4)")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (default from the demo config)")
    p.add_argument("--local-steps", type=int, default=None, help="optimizer steps per agent per round")
    p.add_argument(
        "--codec",
        choices=("fp32", "int8", "topk_int8"),
        default=None,
        help="update compression (default topk_int8 for text)",
    )
    p.add_argument("--topk-ratio", type=float, default=None, help="share of values sent by top-k")
    p.add_argument("--split", default=None, help="iid | group | dirichlet:<alpha> (default dirichlet:0.5)")
    p.add_argument(
        "--broker",
        choices=("embedded", "mosquitto", "auto"),
        default=None,
        help="local broker to start: embedded amqtt (the default, nothing to install) or Mosquitto",
    )
    p.add_argument("--config", type=Path, default=None, help="demo TOML (see configs/demo.toml)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default reports/demo-<time>)")
    p.add_argument("--work-dir", type=Path, default=None, help="where services keep state (default: temp)")
    p.add_argument("--cache-dir", type=Path, default=None, help="model + artifact cache")
    p.add_argument("--quick", action="store_true", help="reduced run (same as FEDPEFT_EDGE_DEMO_QUICK=1)")
    p.add_argument("--plain", action="store_true", help="plain log lines instead of live progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from fedpeft_edge.faces.demo import DemoOptions, run_demo

    opts = DemoOptions.from_args(args)
    summary = run_demo(opts)
    return 0 if summary.get("ok") else 1


# ------------------------------------------------------------------------------------------ experiment


def register_experiment(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "experiment",
        help="compare PEFT methods x data splits x compression x tasks in one process (no broker)",
        description=(
            "Runs a grid of federations in one process with the same codec and aggregation code as the "
            "services and writes a Markdown table, plots and JSON: global accuracy, per-site accuracy after "
            "local personalisation, bytes up per round, client step time and peak memory per cell."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config", type=Path, default=Path("configs/experiment-small.toml"), help="grid definition (TOML)"
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default reports/experiment-<name>)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (overrides the config)")
    p.add_argument("--cache-dir", type=Path, default=None, help="model + artifact cache")
    p.set_defaults(func=_run_experiment)


def _run_experiment(args: argparse.Namespace) -> int:
    from fedpeft_edge.faces.experiment import main_experiment

    summary = main_experiment(args.config, args.out, cache_dir=args.cache_dir, threads=args.threads)
    return 0 if summary["cells"] and not summary["failures"] else 1


# ----------------------------------------------------------------------------------------------- bench


def register_bench(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="check this device: C kernels, one training step, memory, codec, MQTT round trip",
        description=(
            "The on-device check to run on a gateway before deploying an agent. Prints a verdict table "
            "(ok / warn / fail) and writes the figures as JSON. Exit code 1 if a check failed."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", choices=("text", "image"), default="text")
    p.add_argument("--method", default="lora")
    p.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="artifact bundle made by `fedpeft-edge prepare` (no torch needed on the device)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--broker", default=None, help="host:port of an MQTT broker for the round-trip check")
    p.add_argument("--rss-limit-mb", type=float, default=400.0)
    p.add_argument("--skip-training", action="store_true", help="kernels, codec and MQTT only")
    p.add_argument("--out", type=Path, default=Path("fedpeft-bench.json"), help="JSON output")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from fedpeft_edge.faces.device_bench import BenchOptions, main_bench

    opts = BenchOptions(
        task=args.task,
        method=args.method,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        image_size=args.image_size,
        steps=args.steps,
        threads=args.threads,
        broker=args.broker,
        bundle_dir=args.bundle,
        cache_dir=args.cache_dir,
        rss_limit_mb=args.rss_limit_mb,
        skip_training=args.skip_training,
    )
    return main_bench(opts, args.out)


# --------------------------------------------------------------------------------------------- prepare


def register_prepare(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="central side: export the model to ONNX and build the training artifact bundle for a spec",
        description=(
            "Exports the pretrained backbone (needs the [prepare] extra: torch, transformers) and generates "
            "the ORT training artifacts for a PEFT method. Copy the resulting bundle folder to the sites; "
            "they train it without torch."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", choices=("text", "image"), default="text")
    p.add_argument("--method", default="lora")
    p.add_argument("--classes", type=int, default=None, help="labels of the new head")
    p.add_argument("--dataset", default=None, help="data set whose label count sizes the head")
    p.add_argument("--spec", type=Path, default=None, help="PEFT spec as TOML/JSON (overrides --method)")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=None, help="copy the bundle here (default: print cache path)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    import json
    import shutil

    from fedpeft_edge.faces.tasks import TaskConfig, get_bundle, method_spec, prepare_backbone
    from fedpeft_edge.peft.spec import PeftSpec

    dataset = args.dataset or ("reuters_r8" if args.task == "text" else "mnist5k")
    task = TaskConfig(kind=args.task, dataset=dataset, max_len=args.max_len, image_size=args.image_size)
    prepared = prepare_backbone(task, args.cache_dir)
    classes = args.classes
    if classes is None:
        from fedpeft_edge.data.datasets import load_dataset

        classes = load_dataset(dataset, "test").num_classes
    if args.spec is not None:
        text = args.spec.read_text()
        if args.spec.suffix == ".json":
            raw = json.loads(text)
        else:
            import tomllib

            raw = tomllib.loads(text)
        spec = PeftSpec.from_dict(raw.get("peft", raw))
    else:
        spec = method_spec(args.method, args.task, classes)
    bundle = get_bundle(prepared, spec, args.cache_dir, log=print)
    target = bundle.directory
    if args.out is not None:
        if args.out.exists():
            raise FedPeftError(f"{args.out} exists; choose a new folder for the bundle")
        shutil.copytree(bundle.directory, args.out)
        target = args.out
    print(f"model:     {prepared.onnx_path}")
    print(f"bundle:    {target}")
    print(f"method:    {spec.method}, {bundle.num_trainable:,} trainable parameters")
    print(f"spec hash: {bundle.spec_hash}")
    return 0
