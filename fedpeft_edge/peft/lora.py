"""LoRA / FFA-LoRA graph surgery: a scaled low-rank ``x·A·B`` branch beside each selected weight."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from fedpeft_edge.peft.graph_edit import _attr, _Graph, _lora_candidates, _reroute_output, _select_sites
from fedpeft_edge.peft.spec import PeftSpec
from fedpeft_edge.runtime.errors import SpecError

LORA_SCALING = "peft.lora.scaling"


@dataclass(frozen=True)
class LoraSite:
    """One LoRA-adapted weight: ``kind`` is matmul | gemm | conv."""

    kind: str
    weight: str
    a: str
    b: str
    scale: float
    nodes: tuple[str, ...]
    gemm_alpha: float = 1.0
    trans_b: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "weight": self.weight, "a": self.a, "b": self.b, "scale": self.scale,
                "nodes": list(self.nodes), "gemm_alpha": self.gemm_alpha, "trans_b": self.trans_b}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraSite:
        return cls(kind=d["kind"], weight=d["weight"], a=d["a"], b=d["b"], scale=float(d["scale"]),
                   nodes=tuple(d["nodes"]), gemm_alpha=float(d["gemm_alpha"]), trans_b=bool(d["trans_b"]))


def _apply_lora(gv: _Graph, spec: PeftSpec, rng: np.random.Generator) -> list[LoraSite]:
    pool = _select_sites(gv, spec, _lora_candidates(gv), spec.method)
    by_weight: dict[str, list[tuple[onnx.NodeProto, str]]] = {}
    for node, kind in pool:
        by_weight.setdefault(node.input[1], []).append((node, kind))
    scale_name = gv.add_init(LORA_SCALING, np.array(spec.scaling, dtype=np.float32))
    sites = []
    r = spec.rank
    for weight, nodes in by_weight.items():
        kinds = {k for _, k in nodes}
        if len(kinds) != 1 or (kinds == {"gemm"} and len({_attr(n, "transB", 0) for n, _ in nodes}) > 1):
            raise SpecError(f"weight {weight!r} is shared by nodes of different kinds; cannot LoRA it")
        kind = kinds.pop()
        shape = gv.shape_of(weight)
        trans_b = bool(_attr(nodes[0][0], "transB", 0)) if kind == "gemm" else False
        gemm_alpha = float(_attr(nodes[0][0], "alpha", 1.0)) if kind == "gemm" else 1.0
        if kind == "conv":
            c_out, c_in = shape[0], shape[1]
            a = rng.uniform(-1, 1, size=(r, c_in, 1, 1)) / math.sqrt(c_in)
            b = np.zeros((c_out, r, 1, 1))
        else:
            d_in, d_out = (shape[1], shape[0]) if trans_b else (shape[0], shape[1])
            a = rng.uniform(-1, 1, size=(d_in, r)) / math.sqrt(d_in)
            b = np.zeros((r, d_out))
        a_name = gv.add_init(f"{weight}.lora_A", a.astype(np.float32))
        b_name = gv.add_init(f"{weight}.lora_B", b.astype(np.float32))
        for node, _ in nodes:
            base = f"peft/lora/{node.name or weight}"
            x = node.input[0]
            if kind == "conv":
                conv_attrs = {k: _attr(node, k, None) for k in ("strides", "pads", "auto_pad")}
                conv_attrs = {k: v for k, v in conv_attrs.items() if v is not None}
                if isinstance(conv_attrs.get("auto_pad"), bytes):
                    conv_attrs["auto_pad"] = conv_attrs["auto_pad"].decode()
                (t1,) = gv.node("Conv", [x, a_name], base=base, **conv_attrs)
                (t1,) = gv.node("Mul", [t1, scale_name], base=base)
                (t3,) = gv.node("Conv", [t1, b_name], base=base)
            else:
                # scale the rank-r intermediate, not the d_out-wide output: same product, r/d_out the
                # elementwise work (forward and backward) per step
                (t1,) = gv.node("MatMul", [x, a_name], base=base)
                (t1,) = gv.node("Mul", [t1, scale_name], base=base)
                (t3,) = gv.node("MatMul", [t1, b_name], base=base)
            inner, original = _reroute_output(gv, node, base)
            gv.node("Add", [inner, t3], [original], base=base)
        sites.append(LoraSite(kind=kind, weight=weight, a=a_name, b=b_name, scale=spec.scaling,
                              nodes=tuple(n.name for n, _ in nodes), gemm_alpha=gemm_alpha,
                              trans_b=trans_b))
    return sites
