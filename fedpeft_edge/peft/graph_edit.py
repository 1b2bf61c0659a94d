"""PEFT surgery toolkit: a mutable ONNX graph view and the weight sites LoRA and adapters attach to."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fedpeft_edge.peft.spec import PeftSpec
from fedpeft_edge.runtime.errors import SpecError


class _Graph:
    """Small mutable view over a GraphProto with unique-name helpers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.used = {n for node in self.g.node for n in (*node.input, *node.output)}
        self.used |= set(self.inits) | {i.name for i in self.g.input} | {o.name for o in self.g.output}
        self.used |= {n.name for n in self.g.node}
        self.added: list[str] = []
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name

    def add_init(self, name: str, array: np.ndarray, *, reserved: bool = False) -> str:
        if not reserved:
            if name in self.used:
                raise SpecError(f"initializer name {name!r} already exists in the model")
            self.used.add(name)
        tensor = numpy_helper.from_array(np.array(array, order="C"), name)  # keeps 0-d scalars 0-d
        self.g.initializer.append(tensor)
        self.inits[name] = tensor
        self.added.append(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        return self.add_init(self.unique(base), array, reserved=True)

    def node(self, op: str, inputs: list[str], outputs: list[str] | None = None, base: str = "peft/node",
             **attrs: Any) -> list[str]:
        outs = outputs if outputs is not None else [self.unique(f"{base}/{op}_out")]
        self.g.node.append(helper.make_node(op, inputs, outs, name=self.unique(f"{base}/{op}"), **attrs))
        return outs

    def is_float_init(self, name: str) -> bool:
        t = self.inits.get(name)
        return t is not None and t.data_type == TensorProto.FLOAT

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.inits[name].dims)

    def producers(self) -> dict[str, onnx.NodeProto]:
        return {o: n for n in self.g.node for o in n.output}

    def consumers(self, tensor: str) -> list[tuple[onnx.NodeProto, int]]:
        return [(n, i) for n in self.g.node for i, x in enumerate(n.input) if x == tensor]

    def topo_sort(self) -> None:
        """Re-order nodes topologically (we append branch nodes at the end)."""
        available = {i.name for i in self.g.input} | set(self.inits) | {""}
        nodes = list(self.g.node)
        ordered: list[onnx.NodeProto] = []
        pending = nodes
        while pending:
            rest = []
            for n in pending:
                if all(x in available for x in n.input):
                    ordered.append(n)
                    available.update(n.output)
                else:
                    rest.append(n)
            if len(rest) == len(pending):
                missing = sorted({x for n in rest for x in n.input if x not in available})[:5]
                raise SpecError(f"graph has unresolved inputs after surgery: {missing}")
            pending = rest
        del self.g.node[:]
        self.g.node.extend(ordered)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _matches(patterns: Iterable[str], *names: str) -> bool:
    return any(re.search(p, n) for p in patterns for n in names if n)


def fix_layernorm_outputs(model: onnx.ModelProto) -> int:
    """Give every LayerNormalization all three outputs (ORT's gradient builder needs Mean/InvStdDev)."""
    gv = _Graph(model)
    fixed = 0
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and len(node.output) < 3:
            while len(node.output) < 3:
                suffix = "mean" if len(node.output) == 1 else "inv_std_dev"
                node.output.append(gv.unique(f"{node.output[0]}.{suffix}"))
            fixed += 1
    return fixed


# ---- weight sites (LoRA, adapters) ---------------------------------------------------------------
def _lora_candidates(gv: _Graph) -> list[tuple[onnx.NodeProto, str]]:
    """(node, kind) for MatMul/Gemm/1x1-Conv nodes whose weight is a float initializer."""
    out = []
    for node in gv.g.node:
        if len(node.input) < 2 or not gv.is_float_init(node.input[1]):
            continue
        shape = gv.shape_of(node.input[1])
        if node.op_type == "MatMul" and len(shape) == 2 and not gv.is_float_init(node.input[0]):
            out.append((node, "matmul"))
        elif node.op_type == "Gemm" and len(shape) == 2 and not _attr(node, "transA", 0):
            out.append((node, "gemm"))
        elif (node.op_type == "Conv" and len(shape) == 4 and shape[2:] == (1, 1)
              and _attr(node, "group", 1) == 1):
            out.append((node, "conv"))
    return out


_KIND_OP = {"matmul": "MatMul", "gemm": "Gemm", "conv": "Conv"}


def _select_sites(gv: _Graph, spec: PeftSpec, candidates: list[tuple[onnx.NodeProto, str]], what: str
                  ) -> list[tuple[onnx.NodeProto, str]]:
    ops = set(spec.target_ops)
    for op in ops:
        if not any(_KIND_OP[k] == op for _, k in candidates):
            raise SpecError(f"{what}: the model has no eligible {op} node (weight initializer"
                            f"{', 1x1 kernel, group 1' if op == 'Conv' else ''}) to target")
    pool = [(n, k) for n, k in candidates if not ops or _KIND_OP[k] in ops]
    if spec.targets:
        for pattern in spec.targets:
            if not any(_matches([pattern], n.name, n.input[1], *n.output) for n, _ in pool):
                raise SpecError(f"{what}: target pattern {pattern!r} matches no eligible "
                                f"{'/'.join(sorted(ops)) or 'MatMul/Gemm/Conv'} node or weight")
        pool = [(n, k) for n, k in pool if _matches(spec.targets, n.name, n.input[1], *n.output)]
    if not pool:
        raise SpecError(f"{what}: no eligible node selected")
    return pool


def _reroute_output(gv: _Graph, node: onnx.NodeProto, base: str) -> tuple[str, str]:
    """Rename node's first output; return (new internal name, original name to be produced anew)."""
    original = node.output[0]
    inner = gv.unique(f"{original}.base")
    node.output[0] = inner
    return inner, original
