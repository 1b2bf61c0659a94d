"""Sub-commands of ``fedpeft-edge`` that live in the faces layer: demo, experiment, bench, prepare.

:func:`commands` hands them to the CLI's command registry (``fedpeft_edge.faces.cli``), which adds the common
options (``--config``, ``--log-level``, ``--log-file``) to each. Heavy imports happen inside the runners, so
``--help`` stays instant and never imports torch or ONNX Runtime.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedpeft_edge.runtime.errors import FedPeftError
from fedpeft_edge.runtime.names import RANK_RULES

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def commands(command_cls: Any) -> list[Any]:
    """The four commands as ``command_cls(name, help, description, add_arguments, run)`` records, the shape
    of ``fedpeft_edge.faces.cli.Command`` (passed in, so this module never imports the CLI it plugs into)."""
    return [command_cls(*entry) for entry in _COMMANDS]


def register(subparsers: Any) -> None:
    """Add the four commands to an argparse sub-parser collection (standalone use)."""
    for name, help_text, description, add_arguments, run in _COMMANDS:
        p = subparsers.add_parser(name, help=help_text, description=description)
        p.add_argument("--config", type=Path, default=None, help="TOML configuration file")
        add_arguments(p)
        p.set_defaults(_run=run)


# ------------------------------------------------------------------------------------------------ demo

DEMO_HELP = "run a whole local federation: broker, aggregator and plant agents as separate processes"
DEMO_DESCRIPTION = """\
Starts a local MQTT broker, an aggregator and N agents (separate processes), each agent with its own
non-IID shard of a real data set; fine-tunes a PEFT adapter of a pretrained model for R rounds with live
progress; prints a before/after table and writes a report folder (JSON, Markdown, PNG plots).
Default: all-MiniLM-L6-v2 + LoRA (r=8, query/value) + head on Reuters R8, 4 agents, 5 rounds,
top-k + int8 updates with error feedback, embedded broker. The first run exports the model and builds
the training artifacts (cached for later runs). --config reads a [demo] table (configs/demo.toml).

Reduced run for CI: FEDPEFT_EDGE_DEMO_QUICK=1 (or --quick): 2 agents, 2 rounds, a small subset.
"""


def _demo_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("demo")
    g.add_argument(
        "--task",
        choices=("text", "cv"),
        default=None,
        help="text (default): MiniLM on Reuters R8; cv: EfficientNet-Lite0 on MNIST-5k",
    )
    g.add_argument(
        "--dataset",
        default=None,
        help="text: reuters_r8 (default), 20newsgroups; cv: mnist5k (default), fashion_mnist",
    )
    g.add_argument(
        "--method", default=None, help="PEFT method: lora (default), ffa_lora, adapter, bitfit, head_only"
    )
    g.add_argument("--agents", type=int, default=None, help="number of plant agents (default 4)")
    g.add_argument(
        "--rounds", type=int, default=None, help="federated rounds (default 5 for text, 10 for cv)"
    )
    g.add_argument("--local-steps", type=int, default=None, help="optimizer steps per agent per round")
    g.add_argument(
        "--codec",
        choices=("fp32", "int8", "topk_int8"),
        default=None,
        help="update compression (default topk_int8)",
    )
    g.add_argument("--topk-ratio", type=float, default=None, help="share of values top-k sends (default 0.1)")
    g.add_argument("--codec-warmup-rounds", type=int, default=None,
                   help="top-k warm-up: rounds from a dense first update down to --topk-ratio "
                        "(default 5; 0 = off)")
    g.add_argument("--split", default=None, help="iid | group | dirichlet:<alpha> (default dirichlet:0.5)")
    g.add_argument(
        "--broker",
        choices=("embedded", "mosquitto", "auto"),
        default=None,
        help="local broker: embedded amqtt (default, nothing to install) or Mosquitto",
    )
    g.add_argument(
        "--backend",
        choices=("gradient", "ort"),
        default=None,
        help="training backend: gradient (default, stock onnxruntime) or ort (ONNX Runtime Training)",
    )
    g.add_argument("--prox-mu", type=float, default=None,
                   help="FedProx: the agents' proximal term toward each round's global (default 0: FedAvg)")
    g.add_argument("--dp", type=float, default=None, metavar="EPS",
                   help="client-level differential privacy: spend at most this ε (δ = 1e-5) over the rounds "
                        "(needs the [privacy] extra)")
    g.add_argument("--dp-mode", choices=("central", "distributed"), default=None,
                   help="who adds the noise: the aggregator (central, default) or each site (distributed)")
    g.add_argument("--dp-clip", type=float, default=None,
                   help="clip norm C of each site's update (default: lr x local steps x sqrt(params) / 2)")
    g.add_argument("--secagg", action="store_true",
                   help="secure aggregation (SecAgg+): the aggregator only ever sees the masked sum of the "
                        "sites' updates (dense updates: the codec defaults to fp32)")
    g.add_argument("--ranks", default=None, metavar="R1,R2,...",
                   help="LoRA rank of each site, e.g. 8,8,4,4 (0: the bundle's rank; sites below it send "
                        "only their rank slots)")
    g.add_argument("--rank-aggregation", choices=RANK_RULES, default=None,
                   help="how the aggregator combines mixed ranks: FlexLoRA's SVD of the mean product "
                        "(the default), HetLoRA's zero-padded norm-weighted mean, or each rank slot averaged "
                        "over the sites that train it (slotwise)")
    g.add_argument("--out", type=Path, default=None, help="report folder (default reports/demo-<time>)")
    g.add_argument(
        "--work-dir", type=Path, default=None, help="where the services keep state (default: temp)"
    )
    g.add_argument("--cache-dir", type=Path, default=None, help="model + artifact cache")
    g.add_argument("--quick", action="store_true", help="reduced run (same as FEDPEFT_EDGE_DEMO_QUICK=1)")
    g.add_argument("--plain", action="store_true", help="plain log lines instead of live progress bars")
    c = p.add_argument_group("operator console (needs the [console] extra)")
    c.add_argument("--console", action="store_true",
                   help="start the web console beside the federation and print its URL and logins")
    c.add_argument("--console-port", type=int, default=None,
                   help="its port on 127.0.0.1 (default: a free one)")
    c.add_argument("--console-users", type=Path, default=None,
                   help="users file (fedpeft-edge console-user); default: new 'operator' and 'viewer' "
                        "accounts with random passwords, printed")


def _run_demo(args: argparse.Namespace) -> int:
    from fedpeft_edge.faces.demo import DemoOptions, run_demo

    opts = DemoOptions.from_args(args)
    summary = run_demo(opts)
    return 0 if summary.get("ok") else 1


# ------------------------------------------------------------------------------------------ experiment

EXPERIMENT_HELP = "compare PEFT methods x data splits x compression x tasks in one process (no broker)"
EXPERIMENT_DESCRIPTION = """\
Runs a grid of federations in one process with the same codec and aggregation code as the services and
writes results.md (table), results.json and plots: global accuracy, per-site accuracy after local
personalisation, bytes up per round, client step time and peak memory per cell.
--config selects the grid (default configs/experiment-small.toml, the CI grid; see also
configs/experiment-medium.toml and configs/experiment-full.toml).
"""


def default_experiment_config() -> Path:
    local = Path("configs/experiment-small.toml")
    return local if local.is_file() else REPO_CONFIGS / "experiment-small.toml"


def _experiment_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment")
    g.add_argument("--out", type=Path, default=None, help="output folder (default reports/experiment-<name>)")
    g.add_argument("--threads", type=int, default=None, help="intra-op threads (overrides the config)")
    g.add_argument("--tasks", default=None, help="comma-separated subset of the grid's tasks, e.g. image")
    g.add_argument("--compressions", default=None, help="comma-separated subset of the grid's compressions")
    g.add_argument("--variants", default=None, help="comma-separated subset of the [variants.<label>] tables")
    g.add_argument("--cache-dir", type=Path, default=None, help="model + artifact cache")


def _run_experiment(args: argparse.Namespace) -> int:
    from fedpeft_edge.faces.experiment import main_experiment

    summary = main_experiment(
        args.config or default_experiment_config(),
        args.out,
        cache_dir=args.cache_dir,
        threads=args.threads,
        tasks=[t for t in (args.tasks or "").split(",") if t] or None,
        compressions=[c for c in (args.compressions or "").split(",") if c] or None,
        variants=[v for v in (args.variants or "").split(",") if v] or None,
    )
    return 0 if summary["cells"] and not summary["failures"] else 1


# ----------------------------------------------------------------------------------------------- bench

BENCH_HELP = "check this device: C kernels, one training step, memory, codec, MQTT round trip"
BENCH_DESCRIPTION = """\
The on-device check to run on a gateway before deploying an agent. Prints a verdict table (ok / warn /
fail) and writes the figures as JSON. Exit code 1 if a check failed. On a device, pass the artifact
bundle made centrally by `fedpeft-edge prepare` with --bundle (then no torch is needed).
"""


def _bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bench")
    g.add_argument("--task", choices=("text", "image"), default="text", help="model family (default text)")
    g.add_argument("--method", default="lora", help="PEFT method when no --bundle is given (default lora)")
    g.add_argument("--bundle", type=Path, default=None,
                   help="from `fedpeft-edge prepare`: the gradient-model folder (--gradient-out, what a site "
                        "trains on) or the artifact bundle")
    g.add_argument("--backend", choices=("gradient", "ort"), default="gradient",
                   help="gradient: the gradient model on stock onnxruntime (the site default); "
                        "ort: ORT Training (central side, for comparison)")
    g.add_argument("--batch-size", type=int, default=None, help="default: the site config's, else 16")
    g.add_argument("--seq-len", type=int, default=None,
                   help="tokens per text sample (default: the site config's max_len, else 64)")
    g.add_argument("--image-size", type=int, default=32, help="default 32")
    g.add_argument("--steps", type=int, default=3, help="timed training steps after one warm-up (default 3)")
    g.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the site's, else 1)")
    g.add_argument("--round-steps", type=int, default=None,
                   help="training steps per round (default: the site's [agent] local_steps)")
    g.add_argument("--deadline", type=float, default=None,
                   help="the aggregator's round deadline in seconds: the round time is checked against it")
    g.add_argument("--kernel-elements", type=int, default=1 << 20,
                   help="floats per C-kernel timing (default 1,048,576)")
    g.add_argument("--broker", default=None,
                   help="host:port of a plain MQTT broker for the round-trip check (with --config: the "
                        "site's own broker settings, TLS and login included, are used instead)")
    g.add_argument("--rss-limit-mb", type=float, default=400.0, help="peak memory limit (default 400)")
    g.add_argument("--skip-training", action="store_true", help="kernels, codec and MQTT only")
    g.add_argument("--out", type=Path, default=Path("fedpeft-bench.json"), help="JSON output file")
    g.add_argument("--cache-dir", type=Path, default=None, help="model + artifact cache")


def _run_bench(args: argparse.Namespace) -> int:
    import dataclasses

    from fedpeft_edge.faces.device_bench import BenchOptions, main_bench, options_from_agent_config

    opts = BenchOptions(
        task=args.task,
        method=args.method,
        backend=args.backend,
        image_size=args.image_size,
        steps=args.steps,
        kernel_elements=args.kernel_elements,
        broker=args.broker,
        bundle_dir=args.bundle,
        cache_dir=args.cache_dir,
        rss_limit_mb=args.rss_limit_mb,
        skip_training=args.skip_training,
        deadline_s=args.deadline,
    )
    if args.config is not None:
        # The site's own config: the check runs the way its agent will (model, batch, threads, broker).
        from fedpeft_edge.site.bundle_setup import prepare_site_bundle
        from fedpeft_edge.site.config import load_agent_config

        site_cfg = load_agent_config(args.config)
        prepare_site_bundle(site_cfg)  # a [bundle]: verified and applied as the agent does (model, fleet)
        opts = options_from_agent_config(site_cfg, opts)
        if args.bundle is not None:
            opts = dataclasses.replace(opts, bundle_dir=args.bundle)
    explicit = {"batch_size": args.batch_size, "seq_len": args.seq_len, "threads": args.threads,
                "round_steps": args.round_steps}
    opts = dataclasses.replace(opts, **{k: v for k, v in explicit.items() if v is not None})
    return main_bench(opts, args.out)


# --------------------------------------------------------------------------------------------- prepare

PREPARE_HELP = "central side: export the model to ONNX and build the training artifact bundle"
PREPARE_DESCRIPTION = """\
Exports the pretrained backbone (needs the [prepare] extra: torch, transformers), generates the ORT
training artifacts for a PEFT method and lowers them to a gradient model that stock onnxruntime runs.
Copy the bundle folder (and, for gateways with stock onnxruntime, the gradient-model folder: their
[trainer] gradient_dir) to the sites; they train without torch.
"""


def _prepare_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prepare")
    g.add_argument("--task", choices=("text", "image"), default=None,
                   help="default text (with --onnx: read from the model's inputs)")
    g.add_argument("--method", default="lora", help="PEFT method (default lora)")
    g.add_argument(
        "--classes", default=None,
        help="labels of the new head: a count (8) or the names in output order (acq,crude,...); "
             "default: the data set's"
    )
    g.add_argument("--dataset", default=None, help="data set whose label count sizes the head")
    g.add_argument("--spec", type=Path, default=None, help="PEFT spec as TOML/JSON (overrides --method)")
    g.add_argument("--max-len", type=int, default=64, help="default 64")
    g.add_argument("--image-size", type=int, default=32, help="default 32")
    g.add_argument("--out", type=Path, default=None, help="copy the bundle to this new folder")
    g.add_argument("--gradient-out", type=Path, default=None,
                   help="copy the gradient model (a site's [trainer] gradient_dir) to this new folder")
    g.add_argument("--cache-dir", type=Path, default=None, help="model + artifact cache")
    b = p.add_argument_group("bring your own model (docs/own-model.md)")
    b.add_argument("--onnx", type=Path, default=None,
                   help="your ONNX classifier backbone (an encoder or a CNN) instead of the built-in models")
    b.add_argument("--features-output", default=None,
                   help="the output to train the head on (default: the only output); rank 3 is mean-pooled "
                        "over the attention mask, rank 4 average-pooled")
    b.add_argument("--input-map", default=None,
                   help="rename your inputs to ours: ids=input_ids,mask=attention_mask (text) or "
                        "image=pixel_values")
    b.add_argument("--tokenizer", type=Path, default=None, help="text models: the tokenizer.json sites use")
    b.add_argument("--targets", default=None,
                   help="LoRA/adapter target weights, a regular expression over initializer names "
                        "(default with --onnx: every MatMul/Gemm weight for text, every 1x1 Conv for images)")
    from fedpeft_edge.faces.bundle_commands import add_site_bundle_args

    add_site_bundle_args(p.add_argument_group("site bundle (one signed file for the sites)"))


def _run_prepare(args: argparse.Namespace) -> int:
    import json
    import shutil

    from fedpeft_edge.faces.tasks import (
        TaskConfig,
        get_bundle,
        get_gradient_model,
        method_spec,
        prepare_backbone,
    )
    from fedpeft_edge.peft.spec import PeftSpec

    overrides: dict[str, object] = {}
    if args.onnx is not None:
        from fedpeft_edge.models.byo import prepare_onnx_model  # central side: torch not needed

        input_map = dict(pair.split("=", 1) for pair in args.input_map.split(",")) if args.input_map else None
        prepared = prepare_onnx_model(args.onnx, kind=args.task, features_output=args.features_output,
                                      input_map=input_map, tokenizer=args.tokenizer, max_len=args.max_len,
                                      image_size=args.image_size if args.image_size != 32 else None,
                                      cache_dir=args.cache_dir)
        args.task = prepared.kind
        if args.method in ("lora", "ffa_lora", "adapter"):
            from fedpeft_edge.models.byo import default_targets

            overrides = default_targets(prepared, args.targets)
        print(f"your model: {prepared.kind}, inputs {list(prepared.input_names)}, features "
              f"[batch, {prepared.feature_dim}]")
    args.task = args.task or "text"
    dataset = args.dataset or ("reuters_r8" if args.task == "text" else "mnist5k")
    if args.onnx is None:
        task = TaskConfig(kind=args.task, dataset=dataset, max_len=args.max_len, image_size=args.image_size)
        prepared = prepare_backbone(task, args.cache_dir)
    from fedpeft_edge.faces.bundle_commands import parse_classes, write_prepared_bundle

    classes, labels = parse_classes(args.classes, dataset, explicit_dataset=args.dataset is not None)
    if args.spec is not None:
        text = args.spec.read_text()
        if args.spec.suffix == ".json":
            raw = json.loads(text)
        else:
            import tomllib

            raw = tomllib.loads(text)
        spec = PeftSpec.from_dict(raw.get("peft", raw))
    else:
        spec = method_spec(args.method, args.task, classes, overrides or None)
    if labels is not None and spec.head_classes is not None and len(labels) != spec.head_classes:
        if args.classes is not None:
            raise FedPeftError(f"--classes names {len(labels)} labels, the spec's head has "
                               f"{spec.head_classes}")
        labels = None  # a spec file with its own head size: the data set's names do not apply
    for out in (args.out, args.gradient_out, args.site_bundle):
        if out is not None and out.exists():
            raise FedPeftError(f"{out} exists; choose a new folder")
    bundle = get_bundle(prepared, spec, args.cache_dir, log=print)
    gradient = get_gradient_model(bundle, args.cache_dir, log=print)
    target, gradient_dir = bundle.directory, gradient.directory
    if args.out is not None:
        shutil.copytree(bundle.directory, args.out)
        target = args.out
    if args.gradient_out is not None:
        shutil.copytree(gradient.directory, args.gradient_out)
        gradient_dir = args.gradient_out
    if args.site_bundle is not None:
        site = write_prepared_bundle(args, prepared, gradient, labels)
        print(f"site bundle: {site.path} (id {site.bundle_id}, {'signed' if site.signed else 'UNSIGNED'}, "
              f"{site.bytes / 1e6:.1f} MB)")
    print(f"model:     {prepared.onnx_path}")
    print(f"bundle:    {target}")
    print(f"gradient:  {gradient_dir}")
    print(f"method:    {spec.method}, {bundle.num_trainable:,} trainable parameters")
    print(f"spec hash: {bundle.spec_hash}")
    return 0


_COMMANDS = (
    ("demo", DEMO_HELP, DEMO_DESCRIPTION, _demo_args, _run_demo),
    ("experiment", EXPERIMENT_HELP, EXPERIMENT_DESCRIPTION, _experiment_args, _run_experiment),
    ("bench", BENCH_HELP, BENCH_DESCRIPTION, _bench_args, _run_bench),
    ("prepare", PREPARE_HELP, PREPARE_DESCRIPTION, _prepare_args, _run_prepare),
)

# infer, model, wheelhouse: the trained model on site and the offline device install (model_commands.py).
from fedpeft_edge.faces.model_commands import COMMANDS as _MODEL_COMMANDS  # noqa: E402

_COMMANDS = (*_COMMANDS, *_MODEL_COMMANDS)

# bundle: keygen, sign, verify, inspect of site bundles (bundle_commands.py).
from fedpeft_edge.faces.bundle_commands import COMMANDS as _BUNDLE_COMMANDS  # noqa: E402

_COMMANDS = (*_COMMANDS, *_BUNDLE_COMMANDS)

# console, console-user: the operator console and its users (console_commands.py, console_user_commands.py).
from fedpeft_edge.faces.console_commands import COMMANDS as _CONSOLE_COMMANDS  # noqa: E402
from fedpeft_edge.faces.console_user_commands import COMMANDS as _CONSOLE_USER_COMMANDS  # noqa: E402

_COMMANDS = (*_COMMANDS, *_CONSOLE_COMMANDS, *_CONSOLE_USER_COMMANDS)
