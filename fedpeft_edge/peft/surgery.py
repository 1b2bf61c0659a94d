"""PEFT graph surgery on ONNX models: add LoRA / adapters / prompts / a head, decide what trains.

The input is a backbone whose single output (preferably named ``features``) is ``[batch, dim]``; the
result is a model whose single output ``logits`` feeds a cross-entropy loss, plus a :class:`PeftPlan`
naming the trainable initializers (in graph order) and the frozen ones.

Naming of what we add (merge and tests rely on it):
- LoRA on weight ``W``: ``W.lora_A`` and ``W.lora_B``; scaling constant ``peft.lora.scaling``.
- adapter site ``k``: ``peft.adapter.{k}.down.weight|down.bias|up.weight|up.bias``.
- prompt: ``peft.prompt.embeddings`` ``[1, num_virtual_tokens, hidden]``.
- head: ``head.weight`` ``[dim, classes]`` and ``head.bias`` ``[classes]``; output ``logits``.
All added nodes have names starting with ``peft/``.

Frozen = every float initializer of rank >= 1 that does not train (they become checkpoint parameters of
the training graph). Scalars stay graph constants.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from fedpeft_edge.peft.graph_edit import _Graph, fix_layernorm_outputs
from fedpeft_edge.peft.insertions import (
    HEAD_BIAS,
    HEAD_WEIGHT,
    PROMPT_EMBEDDINGS,
    _add_head,
    _apply_adapter,
    _apply_prompt,
    _check_prompt_runs,
)
from fedpeft_edge.peft.lora import LoraSite, _apply_lora
from fedpeft_edge.peft.spec import PeftSpec
from fedpeft_edge.runtime.errors import SpecError


@dataclass(frozen=True)
class PeftPlan:
    method: str
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    input_names: tuple[str, ...]
    output_name: str
    num_classes: int | None
    lora_sites: tuple[LoraSite, ...] = ()
    added_initializers: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "trainable": list(self.trainable), "frozen": list(self.frozen),
                "input_names": list(self.input_names), "output_name": self.output_name,
                "num_classes": self.num_classes, "lora_sites": [s.to_dict() for s in self.lora_sites],
                "added_initializers": list(self.added_initializers), "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PeftPlan:
        return cls(method=d["method"], trainable=tuple(d["trainable"]), frozen=tuple(d["frozen"]),
                   input_names=tuple(d["input_names"]), output_name=d["output_name"],
                   num_classes=d["num_classes"],
                   lora_sites=tuple(LoraSite.from_dict(s) for s in d["lora_sites"]),
                   added_initializers=tuple(d["added_initializers"]), notes=tuple(d["notes"]))


# ---- what trains ---------------------------------------------------------------------------------
def _bias_initializers(gv: _Graph) -> list[str]:
    prod = gv.producers()
    found: list[str] = []
    for node in gv.g.node:
        cand: list[str] = []
        if node.op_type == "Add" and len(node.input) == 2:
            for i in (0, 1):
                other = prod.get(node.input[1 - i])
                if other is not None and other.op_type in ("MatMul", "Gemm"):
                    cand.append(node.input[i])
        elif node.op_type in ("Gemm", "Conv", "LayerNormalization", "BatchNormalization") \
                and len(node.input) >= 3:
            cand.append(node.input[2])
        for name in cand:
            if gv.is_float_init(name) and len(gv.shape_of(name)) == 1 and name not in found:
                found.append(name)
    return found


def _float_params(gv: _Graph) -> list[str]:
    return [t.name for t in gv.g.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) >= 1]


def apply_peft(model: onnx.ModelProto, spec: PeftSpec, *, adapters: bool = True
               ) -> tuple[onnx.ModelProto, PeftPlan]:
    """Return a modified copy of ``model`` and its plan; raise SpecError before changing anything.

    ``adapters=False`` skips the LoRA/adapter/prompt insertion (base + head only: the skeleton a merged
    deployment model is written into).
    """
    if not isinstance(spec, PeftSpec):
        raise SpecError(f"spec must be a PeftSpec, got {type(spec).__name__}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    gv = _Graph(out)
    base_params = set(_float_params(gv))
    rng = np.random.default_rng(spec.seed)
    fix_layernorm_outputs(out)
    lora_sites: list[LoraSite] = []
    notes: list[str] = []
    if not adapters:
        pass
    elif spec.method in ("lora", "ffa_lora"):
        lora_sites = _apply_lora(gv, spec, rng)
    elif spec.method == "adapter":
        _apply_adapter(gv, spec, rng)
    elif spec.method == "prompt":
        _apply_prompt(gv, spec, rng)
    if spec.head_classes is not None:  # own stream: the head starts equal whatever else was drawn
        _add_head(gv, spec, np.random.default_rng([spec.seed, 1]))
    elif len(gv.g.output) != 1:
        raise SpecError("without head_classes the model must have exactly one output (the logits)")
    gv.topo_sort()
    if spec.method == "prompt" and adapters:
        _check_prompt_runs(out)

    params = _float_params(gv)
    head = {HEAD_WEIGHT, HEAD_BIAS} if spec.head_classes is not None else set()
    added = set(gv.added)
    if spec.method == "lora":
        train = {n for s in lora_sites for n in (s.a, s.b)}
    elif spec.method == "ffa_lora":
        train = {s.b for s in lora_sites}
    elif spec.method == "adapter":
        train = {n for n in added if n.startswith("peft.adapter.")}
    elif spec.method == "prompt":
        train = {PROMPT_EMBEDDINGS}
    elif spec.method == "bitfit":
        train = set(_bias_initializers(gv)) & base_params
        if not train:
            raise SpecError("bitfit: the model has no bias initializers (Add after MatMul/Gemm, Conv, "
                            "LayerNormalization bias)")
    elif spec.method == "select":
        train = set()
        for pattern in spec.select_patterns:
            hit = {n for n in base_params if re.search(pattern, n)}
            if not hit:
                raise SpecError(f"select pattern {pattern!r} matches no float initializer")
            train |= hit
    elif spec.method == "full":
        train = set(base_params)
    else:  # head_only
        train = set()
    train |= head
    trainable = tuple(n for n in params if n in train)
    frozen = tuple(n for n in params if n not in train)
    graph_inputs = {t.name for t in gv.g.initializer}
    input_names = tuple(i.name for i in gv.g.input if i.name not in graph_inputs)
    plan = PeftPlan(method=spec.method, trainable=trainable, frozen=frozen, input_names=input_names,
                    output_name=gv.g.output[0].name, num_classes=spec.head_classes,
                    lora_sites=tuple(lora_sites), added_initializers=tuple(gv.added), notes=tuple(notes))
    return out, plan
