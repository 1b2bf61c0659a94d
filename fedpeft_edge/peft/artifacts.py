"""Training artifacts (ORT on-device training) for a backbone + PEFT spec, as one self-describing folder.

Layout of a bundle directory::

    bundle.json           manifest: spec, spec hash, base model sha256, plan, parameter order, files
    training_model.onnx   forward + loss + gradient graph; base weights are *inputs* (in the checkpoint)
    eval_model.onnx       forward + loss
    optimizer_model.onnx  ORT AdamW (used by the "ort_adamw" optimizer only)
    checkpoint            all parameters: trainable and frozen base weights

Frozen base weights live in the checkpoint rather than as constants inside both graphs: the training and
eval sessions then share one copy of the base in memory (the constants layout holds two), and the base is
stored once on disk. The trainer's resume state is written by the trainer itself (adapter + optimizer
moments only), so the big checkpoint is never rewritten on the device.

Generation runs ``onnxruntime.training.artifacts.generate_artifacts`` in a child process: it writes
``temp.onnx`` into its working directory, prints INFO lines, and holds the whole model graph in memory;
a child with its own working directory keeps all three away from the caller. Results land in a private
temp directory beside ``out_dir`` and are renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper

from fedpeft_edge.peft.spec import PeftSpec
from fedpeft_edge.peft.surgery import PeftPlan, apply_peft
from fedpeft_edge.runtime.errors import FedPeftError, InvalidValueError, SpecError
from fedpeft_edge.runtime.ort_import import training_api

BUNDLE_FORMAT = 1
MANIFEST = "bundle.json"
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
# ORT's AdamW block defaults (onnxblock.optim.AdamW); the trainer's "ort_adamw" must use the same.
ORT_ADAMW = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.0}

_CHILD = r"""
import json, sys
from fedpeft_edge.runtime.ort_import import training_artifacts
art = training_artifacts()
job = json.loads(sys.argv[1])
art.generate_artifacts(job["model"], requires_grad=job["requires_grad"], frozen_params=job["frozen"],
                       loss=art.LossType.CrossEntropyLoss, optimizer=art.OptimType.AdamW,
                       artifact_directory=job["out"], additional_output_names=[job["output"]])
assert "torch" not in sys.modules, "artifact generation imported torch"
"""


def file_sha256(path: Path) -> str:
    """sha256 of a model file and, in name order, every external-data file it references."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    model = onnx.load(str(path), load_external_data=False)
    locations = sorted({e.value for t in model.graph.initializer for e in t.external_data
                        if e.key == "location"})
    for loc in locations:
        digest.update(b"|" + loc.encode())
        with open(path.parent / loc, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ArtifactBundle:
    directory: Path
    spec: PeftSpec
    spec_hash: str
    model_sha256: str
    plan: PeftPlan
    param_order: tuple[str, ...]          # trainable names in training-graph order (flat-vector order)
    param_shapes: tuple[tuple[int, ...], ...]
    source_model: str
    ort_adamw: dict[str, float]

    @property
    def trainable(self) -> tuple[str, ...]:
        return self.param_order

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.plan.input_names

    @property
    def training_model(self) -> Path:
        return self.directory / TRAINING_MODEL

    @property
    def eval_model(self) -> Path:
        return self.directory / EVAL_MODEL

    @property
    def optimizer_model(self) -> Path:
        return self.directory / OPTIMIZER_MODEL

    @property
    def checkpoint(self) -> Path:
        return self.directory / CHECKPOINT

    @property
    def num_trainable(self) -> int:
        total = 0
        for shape in self.param_shapes:
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def initial_vector(self) -> np.ndarray:
        """The trainable tensors' starting values as one flat float32 vector (flat-vector order).

        Read from the checkpoint alone (no training session), so the aggregator can start its first
        global without a trainer or data.
        """
        state = training_api().CheckpointState.load_checkpoint(str(self.checkpoint))
        params = state.parameters
        parts = []
        for name, shape in zip(self.param_order, self.param_shapes, strict=True):
            value = np.asarray(params[name].data, dtype=np.float32)
            if value.shape != tuple(shape):
                raise InvalidValueError(
                    f"checkpoint tensor {name} has shape {value.shape}, manifest says {shape}")
            parts.append(value.reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def manifest(self) -> dict[str, Any]:
        return {"format": BUNDLE_FORMAT, "spec": self.spec.to_dict(), "spec_hash": self.spec_hash,
                "model_sha256": self.model_sha256, "plan": self.plan.to_dict(),
                "param_order": list(self.param_order), "param_shapes": [list(s) for s in self.param_shapes],
                "source_model": self.source_model, "ort_adamw": dict(self.ort_adamw),
                "files": {"training_model": TRAINING_MODEL, "eval_model": EVAL_MODEL,
                          "optimizer_model": OPTIMIZER_MODEL, "checkpoint": CHECKPOINT}}

    @classmethod
    def load(cls, directory: Path | str) -> ArtifactBundle:
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise InvalidValueError(f"{directory} is not an artifact bundle (no {MANIFEST})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidValueError(f"unreadable bundle manifest {path}: {exc}") from exc
        if data.get("format") != BUNDLE_FORMAT:
            raise InvalidValueError(
                f"bundle format {data.get('format')!r} not supported (need {BUNDLE_FORMAT})")
        spec = PeftSpec.from_dict(data["spec"])
        if spec.spec_hash(data["model_sha256"]) != data["spec_hash"]:
            raise InvalidValueError("bundle manifest spec_hash does not match its spec and model hash")
        for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT):
            if not (directory / name).exists():
                raise InvalidValueError(f"bundle {directory} lacks {name}")
        return cls(directory=directory, spec=spec, spec_hash=data["spec_hash"],
                   model_sha256=data["model_sha256"], plan=PeftPlan.from_dict(data["plan"]),
                   param_order=tuple(data["param_order"]),
                   param_shapes=tuple(tuple(int(d) for d in s) for s in data["param_shapes"]),
                   source_model=data["source_model"], ort_adamw=dict(data["ort_adamw"]))


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _run_child(job: dict[str, Any], cwd: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_package_root(), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(job)], cwd=str(cwd), env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        raise FedPeftError(f"ORT artifact generation failed (exit {proc.returncode}):\n{tail}")


class _GraphRewriter:
    """Replaces nodes of ORT's generated training graph by cheaper equivalents with the same math.

    ORT 1.19's CPU kernels for ``LayerNormalizationGrad``, ``SoftmaxGrad_13`` and ``Sum`` run on one
    thread, whereas plain elementwise ops and reductions use the intra-op pool (MiniLM LoRA step at 2
    threads: about 12 % faster; at 1 thread about 8 %). ``GeluGrad`` is single-threaded too, but its
    elementwise expansion (10 passes over the FFN activations) measured no faster, so it stays.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        self.read = {n for node in self.graph.node for n in node.input} | {o.name for o in self.graph.output}
        self.consts: dict[str, str] = {}
        self.serial = 0

    def const(self, value: float | list[int]) -> str:
        key = repr(value)
        if key not in self.consts:
            name = f"fedpeft/speedup/const_{len(self.consts)}"
            array = (np.array(value, np.int64) if isinstance(value, list) else np.array(value, np.float32))
            self.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
            self.consts[key] = name
        return self.consts[key]

    def reduce(self, op: str, src: str, dst: str, axis: int) -> onnx.NodeProto:
        # ReduceSum takes axes as an input from opset 13, ReduceMean from opset 18
        if op == "ReduceSum" or self.opset >= 18:
            return onnx.helper.make_node(op, [src, self.const([axis])], [dst], keepdims=1)
        return onnx.helper.make_node(op, [src], [dst], axes=[axis], keepdims=1)

    def names(self, *keys: str) -> dict[str, str]:
        self.serial += 1
        return {k: f"fedpeft/speedup/{self.serial}/{k}" for k in keys}

    def layernorm_grad(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        """dX only, when the scale/bias gradients are unread (frozen base):
        ``dX = inv_std * (g - mean(g) - x_hat * mean(g * x_hat))``, ``g = dY * scale``,
        ``x_hat = (X - mean) * inv_std`` from the forward's saved mean and inv_std."""
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if axis != -1 or len(node.input) != 5 or any(o and o in self.read for o in list(node.output)[1:]):
            return None
        dy, x, scale, mean, inv_std = node.input
        t = self.names("xc", "xhat", "g", "mg", "gx", "mgx", "u", "v", "w")
        mk = onnx.helper.make_node
        return [mk("Sub", [x, mean], [t["xc"]]), mk("Mul", [t["xc"], inv_std], [t["xhat"]]),
                mk("Mul", [dy, scale], [t["g"]]), self.reduce("ReduceMean", t["g"], t["mg"], -1),
                mk("Mul", [t["g"], t["xhat"]], [t["gx"]]), self.reduce("ReduceMean", t["gx"], t["mgx"], -1),
                mk("Mul", [t["xhat"], t["mgx"]], [t["u"]]), mk("Sub", [t["g"], t["mg"]], [t["v"]]),
                mk("Sub", [t["v"], t["u"]], [t["w"]]), mk("Mul", [t["w"], inv_std], [node.output[0]])]

    def softmax_grad(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        """``dX = Y * (dY - sum(dY * Y, axis))``."""
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        dy, y = node.input
        t = self.names("p", "s", "d")
        mk = onnx.helper.make_node
        return [mk("Mul", [dy, y], [t["p"]]), self.reduce("ReduceSum", t["p"], t["s"], axis),
                mk("Sub", [dy, t["s"]], [t["d"]]), mk("Mul", [y, t["d"]], [node.output[0]])]

    def sum_(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        """A chain of Adds (Add broadcasts like Sum)."""
        if len(node.input) < 2:
            return None
        t = self.names(*(f"s{i}" for i in range(len(node.input) - 2)))
        acc, out = node.input[0], []
        for i, name in enumerate(node.input[1:]):
            dst = node.output[0] if i == len(node.input) - 2 else t[f"s{i}"]
            out.append(onnx.helper.make_node("Add", [acc, name], [dst]))
            acc = dst
        return out

    def run(self) -> dict[str, int]:
        handlers = {("com.microsoft", "LayerNormalizationGrad"): ("layernorm_grads", self.layernorm_grad),
                    ("com.microsoft", "SoftmaxGrad_13"): ("softmax_grads", self.softmax_grad),
                    ("", "Sum"): ("sums", self.sum_)}
        stats = {key: 0 for key, _ in handlers.values()}
        new_nodes: list[onnx.NodeProto] = []
        for node in self.graph.node:
            key, handler = handlers.get((node.domain, node.op_type), (None, None))
            replacement = handler(node) if handler is not None else None
            if replacement is None:
                new_nodes.append(node)
                continue
            for i, rep in enumerate(replacement):
                rep.name = f"{node.name or node.output[0]}/fedpeft_{i}"
            new_nodes.extend(replacement)
            stats[key] += 1
        del self.graph.node[:]
        self.graph.node.extend(new_nodes)
        return stats


def _speed_up_training_model(path: Path) -> dict[str, int]:
    """Rewrite ORT's generated training graph in place (same math, cheaper CPU step); returns counts."""
    model = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return {}  # only small graphs (weights in the checkpoint) are rewritten in place
    stats = _GraphRewriter(model).run()
    if any(stats.values()):
        onnx.save(model, str(path))
    return stats


def generate_artifacts(onnx_path: Path | str, spec: PeftSpec, out_dir: Path | str, *,
                       overwrite: bool = False) -> ArtifactBundle:
    """Apply ``spec`` to the backbone at ``onnx_path`` and write a training bundle to ``out_dir``.

    Spec errors (bad pattern, missing op, ...) are raised before anything is written.
    """
    onnx_path, out_dir = Path(onnx_path).resolve(), Path(out_dir).resolve()
    if not isinstance(spec, PeftSpec):
        raise SpecError(f"spec must be a PeftSpec, got {type(spec).__name__}")
    if not onnx_path.is_file():
        raise InvalidValueError(f"no ONNX model at {onnx_path}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InvalidValueError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    model = onnx.load(str(onnx_path))  # pulls external data in
    model_sha = file_sha256(onnx_path)
    peft_model, plan = apply_peft(model, spec)  # SpecError here: nothing written yet
    del model

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        work, result = tmp / "work", tmp / "bundle"
        work.mkdir()
        result.mkdir()
        peft_path = work / "peft_model.onnx"
        if peft_model.ByteSize() > 1_800_000_000:
            onnx.save_model(peft_model, str(peft_path), save_as_external_data=True,
                            location="peft_model.onnx.data")
        else:
            onnx.save(peft_model, str(peft_path))
        del peft_model
        _run_child({"model": str(peft_path), "requires_grad": list(plan.trainable),
                    "frozen": list(plan.frozen), "out": str(result),
                    "output": plan.output_name}, cwd=work)
        _speed_up_training_model(result / TRAINING_MODEL)
        train_graph = onnx.load(str(result / TRAINING_MODEL), load_external_data=False).graph
        trainable = set(plan.trainable)
        order = [i.name for i in train_graph.input if i.name in trainable]
        if sorted(order) != sorted(trainable):
            raise FedPeftError(f"training graph parameters {sorted(order)} differ from the plan")
        shapes = {t.name: tuple(int(d) for d in t.dims) for t in onnx.load(
            str(peft_path), load_external_data=False).graph.initializer if t.name in trainable}
        bundle = ArtifactBundle(directory=out_dir, spec=spec, spec_hash=spec.spec_hash(model_sha),
                                model_sha256=model_sha, plan=plan, param_order=tuple(order),
                                param_shapes=tuple(shapes[n] for n in order), source_model=str(onnx_path),
                                ort_adamw=dict(ORT_ADAMW))
        (result / MANIFEST).write_text(json.dumps(bundle.manifest(), indent=1, sort_keys=True),
                                       encoding="utf-8")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(result, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(result, out_dir)
        return bundle
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
