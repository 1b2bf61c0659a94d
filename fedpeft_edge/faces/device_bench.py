"""``fedpeft-edge bench``: the on-device check a plant engineer runs on a target gateway before deploying.

Checks, each with a verdict (ok / warn / fail) and the figures behind it:

- ``kernels``: which C path is active (or that the numpy fallback was forced) and the throughput of the
  hot kernels (int8 quantisation, top-k with error feedback, AdamW, accumulation) over 1M floats;
- ``training``: load the configured model + PEFT method and time a few training steps (first step apart:
  it includes session warm-up), on the site's backend: the gradient model on stock onnxruntime (default;
  ``--bundle`` is then the gradient-model folder from ``prepare --gradient-out``) or ORT Training;
- ``memory``: peak resident set size of this process, against a limit;
- ``codec``: bytes of one adapter update in each codec mode, with encode time;
- ``mqtt`` (with ``--broker host:port``): connect, publish a message of the update's size with QoS 1 to
  a private topic and receive it back, timing the round trip.

Everything is written as JSON (``--out``); the verdict table is printed. Exit code 0 unless a check failed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.faces import report as rep
from fedpeft_edge.protocol.transport import TransportConfig
from fedpeft_edge.runtime.errors import FedPeftError, InvalidValueError, ensure

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skipped"
BENCH_KEYS = ("system", "kernels", "training", "memory", "codec", "mqtt", "verdicts", "passed")


@dataclass(frozen=True)
class BenchOptions:
    task: str = "text"
    method: str = "lora"
    backend: str = "gradient"  # "gradient" (stock onnxruntime, the site default) or "ort" (ORT Training)
    batch_size: int = 16
    seq_len: int = 64
    image_size: int = 32
    num_classes: int = 8
    steps: int = 3
    threads: int = 1
    kernel_elements: int = 1 << 20
    broker: str | None = None
    bundle_dir: Path | None = None
    cache_dir: Path | None = None
    rss_limit_mb: float = 400.0
    step_limit_s: float = 2.0
    skip_training: bool = False
    # From the site's own config (:func:`options_from_agent_config`): how the agent will really run.
    site: str | None = None
    connection: TransportConfig | None = None  # the agent's broker settings (TLS, login)
    bench_topic: str | None = None
    round_steps: int | None = None  # optimizer steps per round ([agent] local_steps, or from the data)
    deadline_s: float | None = None  # the aggregator's round deadline


def options_from_agent_config(cfg: Any, base: BenchOptions) -> BenchOptions:
    """``base`` with what the site's agent config says: model folder and backend, batch, threads, max_len,
    steps per round, and the broker with its TLS and login (so the check goes the agent's way)."""
    from fedpeft_edge.protocol.config import transport_config

    t, d, a = cfg.trainer, cfg.data, cfg.agent
    ensure(t.kind in ("gradient", "ort"), f"bench checks the gradient and ort trainers, not {t.kind!r}")
    folder = t.gradient_dir if (t.kind == "gradient" and t.gradient_dir) else t.bundle_dir
    governor = getattr(cfg, "governor", None)
    threads = int(a.threads)
    cap = getattr(governor, "max_threads", None)
    if cap:
        threads = min(threads, int(cap))
    steps = a.local_steps
    if steps is None and d.max_samples:
        steps = -(-int(d.max_samples) // int(d.batch_size)) * max(1, int(a.local_epochs))
    connection = transport_config(cfg.connection, a.client_id or "bench")
    if connection.username is None and cfg.connection.password_file:
        connection.username = a.client_id  # as the agent logs in (faces/cli.py)
    return dataclasses.replace(
        base, backend=t.kind, bundle_dir=Path(folder) if folder else base.bundle_dir,
        batch_size=int(d.batch_size), threads=threads,
        seq_len=int(d.options.get("max_len", base.seq_len)), round_steps=steps, site=a.client_id or None,
        connection=connection, bench_topic=f"fedpeft/{cfg.fleet.name}/bench/{a.client_id or 'bench'}")


def _timed(fn: Callable[[], Any], repeat: int = 5) -> float:
    """Median seconds of ``repeat`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_kernels(n: int) -> dict[str, Any]:
    from fedpeft_edge import kernels

    info = dict(kernels.backend_info())
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(np.float32)
    residual = np.zeros(n, dtype=np.float32)
    k = max(1, n // 100)
    w, g = x.copy(), rng.standard_normal(n).astype(np.float32)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    acc = np.zeros(n, np.float32)
    q, scales = kernels.quantize_int8(x, 256)
    idx, vals, _ = kernels.topk_ef(x, residual, k)
    step = [0]

    def adamw() -> None:
        step[0] += 1
        kernels.adamw_step(w, g, m, v, step=step[0], lr=1e-3)

    timings = {
        "quantize_int8": _timed(lambda: kernels.quantize_int8(x, 256)),
        "dequantize_int8": _timed(lambda: kernels.dequantize_int8(q, scales, 256)),
        "topk_ef_1pct": _timed(lambda: kernels.topk_ef(x, residual, k)),
        "adamw_step": _timed(adamw),
        "dequant_accumulate": _timed(lambda: kernels.dequant_accumulate(acc, q, scales, 256, 0.5)),
        "scatter_add_1pct": _timed(lambda: kernels.scatter_add(acc, idx, vals, 0.5)),
    }
    info["elements"] = n
    info["throughput_melem_s"] = {name: n / t / 1e6 for name, t in timings.items()}
    info["median_ms"] = {name: 1000 * t for name, t in timings.items()}
    return info


def _synthetic_batch(opts: BenchOptions, bundle: Any) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    b = opts.batch_size
    batch: dict[str, np.ndarray] = {}
    if opts.task == "text":
        ids = rng.integers(1000, 20000, size=(b, opts.seq_len), dtype=np.int64)
        ids[:, 0] = 101  # [CLS]
        mask = np.ones((b, opts.seq_len), dtype=np.int64)
        mask[: b // 2, opts.seq_len // 2 :] = 0  # half the batch padded, as real text is
        batch = {"input_ids": ids, "attention_mask": mask}
    else:
        shape = (b, 3, opts.image_size, opts.image_size)
        batch = {"pixel_values": rng.standard_normal(shape).astype(np.float32)}
    names = set(bundle.input_names) - {"labels"}
    ensure(names <= set(batch), f"the bundle needs inputs {sorted(names)}; the bench feeds {sorted(batch)}")
    batch = {k: v for k, v in batch.items() if k in names}
    classes = getattr(bundle.spec, "head_classes", None) or opts.num_classes
    batch["labels"] = rng.integers(0, classes, size=b, dtype=np.int64)
    return batch


def _load_model(opts: BenchOptions, log: Callable[[str], None]) -> Any:
    """The model the backend trains: a GradientModel (gradient) or an ArtifactBundle (ort)."""
    from fedpeft_edge.peft.lowering import MANIFEST, GradientModel

    given = opts.bundle_dir
    if given is not None and (Path(given) / MANIFEST).is_file():
        ensure(opts.backend == "gradient",
               f"{given} is a gradient model (stock onnxruntime); the ort backend needs an artifact bundle")
        return GradientModel.load(given)
    bundle = _load_bundle(opts, log)
    if opts.backend == "ort":
        return bundle
    from fedpeft_edge.faces.tasks import get_gradient_model

    # An artifact bundle on a gradient-backend bench: lowered once into the cache (central side only).
    return get_gradient_model(bundle, opts.cache_dir, log=log)


def _make_trainer(opts: BenchOptions, model: Any) -> Any:
    if opts.backend == "ort":
        from fedpeft_edge.training.ort_trainer import OrtTrainer

        return OrtTrainer(model, threads=opts.threads, lr=1e-3)
    from fedpeft_edge.training.gradient_trainer import GradientTrainer

    return GradientTrainer(model, threads=opts.threads, lr=1e-3)


def trainer_label(backend: str) -> str:
    """What ran the steps, e.g. ``"onnxruntime 1.32.0"`` (stock build, gradient model) or
    ``"onnxruntime-training 1.19.2 (training API)"``."""
    from fedpeft_edge.runtime.ort_import import runtime_label

    return runtime_label() if backend == "gradient" else f"{runtime_label()} (training API)"


def _load_bundle(opts: BenchOptions, log: Callable[[str], None]) -> Any:
    from fedpeft_edge.peft.artifacts import ArtifactBundle

    if opts.bundle_dir is not None:
        return ArtifactBundle.load(opts.bundle_dir)
    # No bundle given: the central-side prepare step (needs the [prepare] extra on a cache miss).
    from fedpeft_edge.faces.tasks import TaskConfig, get_bundle, method_spec, prepare_backbone

    kind = opts.task
    task = TaskConfig(
        kind=kind,
        dataset="reuters_r8" if kind == "text" else "mnist5k",
        max_len=opts.seq_len,
        image_size=opts.image_size,
    )
    prepared = prepare_backbone(task, opts.cache_dir)
    spec = method_spec(opts.method, kind, opts.num_classes)
    return get_bundle(prepared, spec, opts.cache_dir, log=log)


def bench_training(opts: BenchOptions, log: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    bundle = _load_model(opts, log)
    t_bundle = time.perf_counter() - t0
    # A given bundle decides the model family, whatever --task said.
    kind = "image" if "pixel_values" in bundle.input_names else "text"
    if kind != opts.task:
        opts = dataclasses.replace(opts, task=kind)
    t0 = time.perf_counter()
    trainer = _make_trainer(opts, bundle)
    t_load = time.perf_counter() - t0
    batch = _synthetic_batch(opts, bundle)
    step_times = []
    losses = []
    for _ in range(opts.steps + 1):
        metrics = trainer.train([batch], max_steps=1)
        step_times.append(metrics.seconds)
        losses.append(metrics.loss)
    flat = trainer.get_flat()
    return {
        "trainer": trainer_label(opts.backend),
        "backend": opts.backend,
        "task": opts.task,
        "method": bundle.spec.method,
        "spec_hash": bundle.spec_hash,
        "bundle_dir": str(bundle.directory),
        "trainable_params": int(flat.size),
        "batch_size": opts.batch_size,
        "seq_len": opts.seq_len if opts.task == "text" else None,
        "image_size": opts.image_size if opts.task == "image" else None,
        "threads": opts.threads,
        "bundle_seconds": t_bundle,
        "session_load_seconds": t_load,
        "first_step_seconds": step_times[0],
        "step_seconds_median": statistics.median(step_times[1:]),
        "samples_per_second": opts.batch_size / statistics.median(step_times[1:]),
        "losses": losses,
        "loss_finite": bool(np.all(np.isfinite(losses))),
        "_flat": flat,
    }


def bench_codec(n: int) -> dict[str, Any]:
    from fedpeft_edge.protocol.codec import CodecConfig, decode_dense
    from fedpeft_edge.site.encoder import UpdateEncoder

    rng = np.random.default_rng(1)
    delta = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    out: dict[str, Any] = {"params": n, "dense_fp32_bytes": 4 * n, "modes": {}}
    for mode in ("fp32", "int8", "topk_int8"):
        encoder = UpdateEncoder(CodecConfig(mode=mode), n, seed=0)
        t0 = time.perf_counter()
        encoded = encoder.encode(delta)
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        decoded = decode_dense(encoded, n)
        t_dec = time.perf_counter() - t0
        err = float(np.linalg.norm(decoded - delta) / max(np.linalg.norm(delta), 1e-30))
        out["modes"][mode] = {
            "bytes": encoded.nbytes,
            "ratio_vs_fp32": encoded.nbytes / (4 * n),
            "encode_ms": 1000 * t_enc,
            "decode_ms": 1000 * t_dec,
            "relative_error": err,
        }
    return out


def bench_mqtt(broker: str | TransportConfig, payload_bytes: int, *, topic: str | None = None,
               timeout: float = 10.0) -> dict[str, Any]:
    """Publish ``payload_bytes`` with QoS 1 to a bench topic and receive it back; times in ms.

    ``broker`` is ``host:port`` (plain, anonymous) or the site's own transport settings (TLS, login): the
    check then goes exactly the way the agent's connection goes. The plant ACL lets every account read and
    write ``fedpeft/<fleet>/bench/<user>`` for this.
    """
    from fedpeft_edge.protocol.transport import MqttTransport, TransportError

    if isinstance(broker, str):
        host, _, port_text = broker.rpartition(":")
        ensure(host and port_text.isdigit(), f"--broker must be host:port, got {broker!r}")
        tcfg = TransportConfig(host=host, port=int(port_text),
                               client_id=f"fedpeft-bench-{secrets.token_hex(4)}")
    else:
        tcfg = dataclasses.replace(broker)
    # A clean session: the bench must not leave one at the broker, nor take over queued messages.
    tcfg.clean_start = True
    topic = topic or f"fedpeft/bench/{secrets.token_hex(6)}"
    transport = MqttTransport(tcfg)
    transport.subscribe(topic, qos=1)
    result: dict[str, Any] = {"broker": f"{tcfg.host}:{tcfg.port}", "tls": tcfg.tls_ca is not None,
                              "login": tcfg.username is not None, "payload_bytes": payload_bytes}
    t0 = time.perf_counter()
    try:
        transport.connect(timeout)
    except (TransportError, OSError) as exc:
        diagnosis = transport.last_diagnosis
        result.update(ok=False, error=f"cannot connect: {exc}" + (f" ({diagnosis})" if diagnosis else ""))
        transport.close()
        return result
    try:
        result["connect_ms"] = 1000 * (time.perf_counter() - t0)
        result["protocol"] = transport.protocol_used
        time.sleep(0.2)  # the SUBACK: MqttTransport subscribes on connect
        rtts = []
        for size in (64, payload_bytes):
            body = os.urandom(size)
            start = time.perf_counter()
            transport.publish(topic, body, qos=1)
            while True:
                left = timeout - (time.perf_counter() - start)
                msg = transport.get(timeout=max(0.0, left))
                if msg is None:
                    result.update(ok=False, error=f"a {size}-byte message did not come back within "
                                                  f"{timeout} s (may this account read and write {topic}?)")
                    return result
                if msg.topic == topic and msg.payload == body:
                    break
            rtts.append(1000 * (time.perf_counter() - start))
        result.update(ok=True, rtt_small_ms=rtts[0], rtt_update_ms=rtts[1])
        return result
    finally:
        transport.close()


def _peak_rss_mb() -> float:
    import resource

    import psutil

    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return max(usage / 1024.0 * 1.048576, psutil.Process().memory_info().rss / 1e6)


def run_bench(opts: BenchOptions, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every check; return the JSON-ready result with per-check verdicts."""
    ensure(opts.task in ("text", "image"), f"task must be text or image, got {opts.task!r}")
    ensure(opts.steps >= 1, "steps must be >= 1")
    ensure(opts.backend in ("gradient", "ort"), f"backend must be gradient or ort, got {opts.backend!r}")
    ensure(opts.deadline_s is None or opts.deadline_s > 0, "the round deadline must be > 0 s")
    os.environ.setdefault("OMP_NUM_THREADS", str(opts.threads))
    import fedpeft_edge

    result: dict[str, Any] = {
        "system": {
            "fedpeft_edge": fedpeft_edge.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
    }
    verdicts: list[dict[str, str]] = []

    def verdict(check: str, status: str, detail: str) -> None:
        verdicts.append({"check": check, "status": status, "detail": detail})

    log("kernels ...")
    try:
        result["kernels"] = bench_kernels(opts.kernel_elements)
        k = result["kernels"]
        status = OK if k["backend"] == "c" else WARN
        verdict(
            "C core",
            status,
            f"backend {k['backend']}, path {k.get('cpu_path')}; quantize "
            f"{k['throughput_melem_s']['quantize_int8']:.0f} M/s, top-k "
            f"{k['throughput_melem_s']['topk_ef_1pct']:.0f} M/s",
        )
    except (FedPeftError, ImportError) as exc:
        result["kernels"] = {"error": str(exc)}
        verdict("C core", FAIL, str(exc))

    n_params = 100_000
    if opts.skip_training:
        result["training"] = {"skipped": True}
        verdict("training step", SKIP, "skipped (--skip-training)")
    else:
        log(f"training: {opts.task} / {opts.method}, batch {opts.batch_size} ...")
        try:
            training = bench_training(opts, log)
            flat = training.pop("_flat")
            n_params = int(flat.size)
            result["training"] = training
            med = training["step_seconds_median"]
            status = (
                OK
                if training["loss_finite"] and med <= opts.step_limit_s
                else (FAIL if not training["loss_finite"] else WARN)
            )
            verdict(
                "training step",
                status,
                f"{med * 1000:.0f} ms/step median ({training['samples_per_second']:.1f} samples/s), "
                f"{training['trainable_params']:,} trainable parameters, on {training['trainer']}",
            )
        except (FedPeftError, ImportError, OSError) as exc:
            result["training"] = {"error": str(exc)}
            verdict("training step", FAIL, str(exc))

    training = result.get("training", {})
    if "step_seconds_median" in training:
        result["round"] = round_estimate(training["step_seconds_median"], opts)
        r = result["round"]
        verdict("round time", r["status"], r["detail"])

    peak = _peak_rss_mb()
    result["memory"] = {"peak_rss_mb": peak, "limit_mb": opts.rss_limit_mb}
    # Over the limit fails: a site that swaps or is OOM-killed takes the plant PC down with it.
    verdict(
        "peak memory",
        OK if peak <= opts.rss_limit_mb else FAIL,
        f"{peak:.0f} MB peak RSS (limit {opts.rss_limit_mb:.0f} MB)",
    )

    log("codec ...")
    try:
        result["codec"] = bench_codec(n_params)
        modes = result["codec"]["modes"]
        verdict(
            "codec",
            OK,
            ", ".join(f"{m} {rep.human_bytes(v['bytes'])}" for m, v in modes.items())
            + f" for {n_params:,} parameters",
        )
    except (FedPeftError, ImportError) as exc:
        result["codec"] = {"error": str(exc)}
        verdict("codec", FAIL, str(exc))

    target: str | TransportConfig | None = opts.connection or opts.broker
    if target is not None:
        where = opts.broker or f"{opts.connection.host}:{opts.connection.port}"  # type: ignore[union-attr]
        log(f"MQTT round trip via {where} ...")
        size = int(result.get("codec", {}).get("modes", {}).get("topk_int8", {}).get("bytes", 4096)) + 200
        try:
            result["mqtt"] = bench_mqtt(target, size, topic=opts.bench_topic)
        except (FedPeftError, OSError) as exc:
            result["mqtt"] = {"ok": False, "error": str(exc)}
        m = result["mqtt"]
        if m.get("ok"):
            verdict(
                "MQTT round trip",
                OK,
                f"{m['rtt_small_ms']:.1f} ms (64 B), {m['rtt_update_ms']:.1f} ms "
                f"({rep.human_bytes(m['payload_bytes'])} update) via {m['broker']}"
                f"{' over TLS' if m.get('tls') else ''}{' with login' if m.get('login') else ''}",
            )
        else:
            verdict("MQTT round trip", FAIL, m.get("error", "failed"))
    else:
        result["mqtt"] = {"skipped": True}
        verdict("MQTT round trip", SKIP, "no --broker given")

    result["verdicts"] = verdicts
    result["passed"] = all(v["status"] != FAIL for v in verdicts)
    result["verdict"] = final_verdict(result, opts)
    return result


def round_estimate(step_s: float, opts: BenchOptions) -> dict[str, Any]:
    """ms/step turned into "a round takes N s against a deadline of M s"."""
    out: dict[str, Any] = {"step_seconds": step_s, "steps": opts.round_steps, "deadline_s": opts.deadline_s}
    if opts.round_steps is None:
        out.update(status=WARN, detail=f"{step_s * 1000:.0f} ms/step; steps per round unknown: set [agent] "
                                       "local_steps (or --round-steps) to get the round time")
        return out
    seconds = step_s * opts.round_steps
    out["round_seconds"] = seconds
    text = f"{opts.round_steps} steps × {step_s * 1000:.0f} ms = {seconds:.0f} s of training per round"
    if opts.deadline_s is None:
        out.update(status=OK, detail=text + " (no deadline given: --deadline)")
    elif seconds > opts.deadline_s:
        out.update(status=FAIL, detail=text + f", over the {opts.deadline_s:.0f} s deadline: fewer local "
                                              "steps, a smaller batch or more threads")
    elif seconds > 0.8 * opts.deadline_s:
        out.update(status=WARN, detail=text + f", close to the {opts.deadline_s:.0f} s deadline (> 80 %)")
    else:
        out.update(status=OK, detail=text + f" against a deadline of {opts.deadline_s:.0f} s "
                                            f"({100 * seconds / opts.deadline_s:.0f} %)")
    return out


def final_verdict(result: dict[str, Any], opts: BenchOptions) -> str:
    """One line: is this box good enough for the site?"""
    who = f"site {opts.site}" if opts.site else "a site"
    failed = [v["check"] for v in result["verdicts"] if v["status"] == FAIL]
    if failed:
        return f"NOT GOOD ENOUGH for {who}: {', '.join(failed)} failed"
    warned = [v["check"] for v in result["verdicts"] if v["status"] == WARN]
    return f"GOOD ENOUGH for {who}" + (f" (look at: {', '.join(warned)})" if warned else "")


def verdict_table(result: dict[str, Any]) -> str:
    return rep.markdown_table(
        ["check", "verdict", "details"],
        [[v["check"], v["status"].upper(), v["detail"]] for v in result["verdicts"]],
    )


def print_verdicts(result: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional for printing; plain Markdown is as readable
        print(verdict_table(result))
        return
    colours = {OK: "green", WARN: "yellow", FAIL: "red", SKIP: "dim"}
    table = Table(title="fedpeft-edge device check")
    for col in ("check", "verdict", "details"):
        table.add_column(col)
    for v in result["verdicts"]:
        table.add_row(v["check"], f"[{colours[v['status']]}]{v['status'].upper()}[/]", v["detail"])
    Console().print(table)


def main_bench(opts: BenchOptions, out: Path | None) -> int:
    result = run_bench(opts)
    print_verdicts(result)
    print(f"VERDICT: {result['verdict']}")
    if out is not None:
        rep.write_json(out, result)
        print(f"wrote {out}")
    return 0 if result["passed"] else 1


def load_bench_json(path: Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    missing = [k for k in BENCH_KEYS if k not in data]
    if missing:
        raise InvalidValueError(f"{path} lacks keys {missing}")
    return data
