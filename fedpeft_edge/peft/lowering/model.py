"""The gradient model folder as a device reads it: :class:`GradientModel` (no onnx import).

A device loads the manifest, the starting vector and the frozen base (mapped from the file) through this
module; the lowering itself (:mod:`.gradient_model`, central side) imports onnx and ORT Training. The
folder's layout is described in :mod:`.gradient_model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.peft.layout import FlatLayout
from fedpeft_edge.peft.spec import PeftSpec
from fedpeft_edge.runtime.durable import file_sha256 as _sha256
from fedpeft_edge.runtime.errors import InvalidValueError

GRADIENT_FORMAT = 1
MANIFEST = "gradient.json"
GRADIENT_MODEL = "gradient_model.onnx"
EVAL_MODEL = "eval_model.onnx"
BASE_DATA = "base.data"
INITIAL_PARAMS = "initial_params.npy"
LABELS = "labels"




@dataclass(frozen=True)
class GradientModel:
    """A lowered bundle: what a device with stock onnxruntime needs to train (see the module docstring)."""

    directory: Path
    spec: PeftSpec
    spec_hash: str
    model_sha256: str
    param_order: tuple[str, ...]            # flat-vector order (= the bundle's)
    param_shapes: tuple[tuple[int, ...], ...]
    input_names: tuple[str, ...]            # model inputs, labels excluded
    input_dtypes: dict[str, str]            # numpy dtype name of every input, labels included
    loss_output: str
    logits_output: str | None
    grad_outputs: tuple[str, ...]           # one per trainable tensor, flat-vector order
    eval_outputs: tuple[str, str]           # loss and logits of the eval model
    lowered_ops: dict[str, int]
    source_bundle: str
    # The frozen tensors in BASE_DATA: name -> (numpy dtype name, shape, byte offset), and which of them
    # each graph reads ({"gradient_model": [...], "eval_model": [...]}). Empty for a folder lowered
    # before they were recorded: onnxruntime then loads the external data itself, once per session.
    base_tensors: dict[str, tuple[str, tuple[int, ...], int]] = field(default_factory=dict)
    base_names: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def gradient_model(self) -> Path:
        return self.directory / GRADIENT_MODEL

    @property
    def eval_model(self) -> Path:
        return self.directory / EVAL_MODEL

    @property
    def base_data(self) -> Path:
        return self.directory / BASE_DATA

    @property
    def labels_name(self) -> str:
        return LABELS

    @property
    def layout(self) -> FlatLayout:
        return FlatLayout.from_shapes(zip(self.param_order, self.param_shapes, strict=True))

    @property
    def num_trainable(self) -> int:
        return self.layout.total

    def initial_vector(self) -> np.ndarray:
        """The trainable tensors' starting values (a fresh float32 vector)."""
        value = np.load(self.directory / INITIAL_PARAMS, allow_pickle=False)
        if value.dtype != np.float32 or value.shape != (self.num_trainable,):
            raise InvalidValueError(f"{INITIAL_PARAMS}: {value.dtype} {value.shape}, expected float32 "
                                    f"({self.num_trainable},)")
        return np.array(value, np.float32, order="C")

    def manifest(self, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {"format": GRADIENT_FORMAT, "spec": self.spec.to_dict(), "spec_hash": self.spec_hash,
                "model_sha256": self.model_sha256, "param_order": list(self.param_order),
                "param_shapes": [list(s) for s in self.param_shapes], "input_names": list(self.input_names),
                "input_dtypes": dict(self.input_dtypes), "labels": LABELS,
                "outputs": {"loss": self.loss_output, "logits": self.logits_output,
                            "gradients": list(self.grad_outputs), "eval": list(self.eval_outputs)},
                "lowered_ops": dict(self.lowered_ops), "source_bundle": self.source_bundle, "files": files,
                "base_tensors": {n: [d, list(s), o] for n, (d, s, o) in self.base_tensors.items()},
                "base_names": {k: list(v) for k, v in self.base_names.items()}}

    @classmethod
    def load(cls, directory: Path | str) -> GradientModel:
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise InvalidValueError(f"{directory} is not a gradient model (no {MANIFEST})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != GRADIENT_FORMAT:
                raise InvalidValueError(f"gradient model format {data.get('format')!r} not supported "
                                        f"(need {GRADIENT_FORMAT})")
            spec = PeftSpec.from_dict(data["spec"])
            if spec.spec_hash(data["model_sha256"]) != data["spec_hash"]:
                raise InvalidValueError("gradient model spec_hash does not match its spec and model hash")
            for role, info in data["files"].items():  # sizes only: hashing the base on every start is slow
                f = directory / info["name"]
                if not f.is_file() or f.stat().st_size != int(info["bytes"]):
                    raise InvalidValueError(f"gradient model {directory}: {role} file {info['name']} is "
                                            "missing or has the wrong size")
            outputs = data["outputs"]
            return cls(directory=directory, spec=spec, spec_hash=data["spec_hash"],
                       model_sha256=data["model_sha256"], param_order=tuple(data["param_order"]),
                       param_shapes=tuple(tuple(int(d) for d in s) for s in data["param_shapes"]),
                       input_names=tuple(data["input_names"]), input_dtypes=dict(data["input_dtypes"]),
                       loss_output=outputs["loss"], logits_output=outputs["logits"],
                       grad_outputs=tuple(outputs["gradients"]), eval_outputs=tuple(outputs["eval"]),
                       lowered_ops=dict(data["lowered_ops"]),
                       source_bundle=data["source_bundle"],
                       base_tensors={n: (str(d), tuple(int(x) for x in s), int(o))
                                     for n, (d, s, o) in data.get("base_tensors", {}).items()},
                       base_names={k: tuple(v) for k, v in data.get("base_names", {}).items()})
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidValueError):
                raise
            raise InvalidValueError(f"unreadable gradient model manifest {path}: {exc}") from exc

    def map_base(self) -> dict[str, np.ndarray]:
        """The frozen tensors as read-only views of one copy-on-write mapping of BASE_DATA (nothing is
        read until touched; the pages are the file's, shared with the page cache). Empty when the
        manifest has no table (see ``base_tensors``)."""
        if not self.base_tensors:
            return {}
        raw = np.memmap(self.base_data, dtype=np.uint8, mode="c")
        out = {}
        for name, (dtype, shape, offset) in self.base_tensors.items():
            dt = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            if offset < 0 or offset + count * dt.itemsize > raw.size:
                raise InvalidValueError(f"gradient model {self.directory}: frozen tensor {name!r} lies "
                                        f"outside {BASE_DATA}")
            view = np.ndarray(shape, dtype=dt.newbyteorder("<"), buffer=raw, offset=offset)
            out[name] = view
        return out

    def verify(self) -> None:
        """Check every file against the sha256 in the manifest (reads the whole base)."""
        data = json.loads((self.directory / MANIFEST).read_text(encoding="utf-8"))
        for role, info in data["files"].items():
            if _sha256(self.directory / info["name"]) != info["sha256"]:
                raise InvalidValueError(f"gradient model {self.directory}: {role} file {info['name']} "
                                        "does not match its sha256")
