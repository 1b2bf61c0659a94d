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

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fedpeft_edge.peft.spec import PeftSpec
from fedpeft_edge.runtime.errors import SpecError

LOGITS = "logits"
HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
LORA_SCALING = "peft.lora.scaling"
PROMPT_EMBEDDINGS = "peft.prompt.embeddings"
MASK_INPUT = "attention_mask"


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


# ---- LoRA ---------------------------------------------------------------------------------------
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


# ---- bottleneck adapter -------------------------------------------------------------------------
def _activation(gv: _Graph, x: str, kind: str, base: str) -> str:
    if kind == "relu":
        return gv.node("Relu", [x], base=base)[0]
    half = gv.const(f"{base}/half", np.array(0.5, np.float32))
    one = gv.const(f"{base}/one", np.array(1.0, np.float32))
    if kind == "gelu":  # 0.5 x (1 + erf(x / sqrt 2))
        inv_sqrt2 = gv.const(f"{base}/inv_sqrt2", np.array(1 / math.sqrt(2), np.float32))
        (t,) = gv.node("Mul", [x, inv_sqrt2], base=base)
        (t,) = gv.node("Erf", [t], base=base)
    else:  # tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        c = gv.const(f"{base}/c", np.array(0.044715, np.float32))
        k = gv.const(f"{base}/k", np.array(math.sqrt(2 / math.pi), np.float32))
        (x3,) = gv.node("Mul", [x, x], base=base)
        (x3,) = gv.node("Mul", [x3, x], base=base)
        (t,) = gv.node("Mul", [x3, c], base=base)
        (t,) = gv.node("Add", [x, t], base=base)
        (t,) = gv.node("Mul", [t, k], base=base)
        (t,) = gv.node("Tanh", [t], base=base)
    (t,) = gv.node("Add", [t, one], base=base)
    (t,) = gv.node("Mul", [t, x], base=base)
    return gv.node("Mul", [t, half], base=base)[0]


def _apply_adapter(gv: _Graph, spec: PeftSpec, rng: np.random.Generator) -> None:
    pool = _select_sites(gv, spec, _lora_candidates(gv), "adapter")
    d = spec.adapter_dim
    for k, (node, kind) in enumerate(pool):
        shape = gv.shape_of(node.input[1])
        base = f"peft/adapter/{k}"
        prefix = f"peft.adapter.{k}"
        inner, original = _reroute_output(gv, node, base)
        if kind == "conv":
            hidden = shape[0]
            down = gv.add_init(f"{prefix}.down.weight",
                               (rng.uniform(-1, 1, (d, hidden, 1, 1)) / math.sqrt(hidden)).astype(np.float32))
            down_b = gv.add_init(f"{prefix}.down.bias", np.zeros(d, np.float32))
            up = gv.add_init(f"{prefix}.up.weight", np.zeros((hidden, d, 1, 1), np.float32))
            up_b = gv.add_init(f"{prefix}.up.bias", np.zeros(hidden, np.float32))
            (h,) = gv.node("Conv", [inner, down, down_b], base=base)
            h = _activation(gv, h, spec.adapter_activation, base)
            (h,) = gv.node("Conv", [h, up, up_b], base=base)
        else:
            trans_b = kind == "gemm" and bool(_attr(node, "transB", 0))
            hidden = shape[0] if trans_b else shape[1]
            down = gv.add_init(f"{prefix}.down.weight",
                               (rng.uniform(-1, 1, (hidden, d)) / math.sqrt(hidden)).astype(np.float32))
            down_b = gv.add_init(f"{prefix}.down.bias", np.zeros(d, np.float32))
            up = gv.add_init(f"{prefix}.up.weight", np.zeros((d, hidden), np.float32))
            up_b = gv.add_init(f"{prefix}.up.bias", np.zeros(hidden, np.float32))
            (h,) = gv.node("MatMul", [inner, down], base=base)
            (h,) = gv.node("Add", [h, down_b], base=base)
            h = _activation(gv, h, spec.adapter_activation, base)
            (h,) = gv.node("MatMul", [h, up], base=base)
            (h,) = gv.node("Add", [h, up_b], base=base)
        gv.node("Add", [inner, h], [original], base=base)


# ---- prompt tuning ------------------------------------------------------------------------------
def _rewire(gv: _Graph, tensor: str, replacement: str, skip: set[str]) -> int:
    count = 0
    for node in gv.g.node:
        if node.name in skip:
            continue
        for i, x in enumerate(node.input):
            if x == tensor:
                node.input[i] = replacement
                count += 1
    return count


def _apply_prompt(gv: _Graph, spec: PeftSpec, rng: np.random.Generator) -> None:
    inputs = {i.name: i for i in gv.g.input}
    if MASK_INPUT not in inputs:
        raise SpecError("prompt tuning needs a graph input 'attention_mask' to extend; this model has "
                        f"inputs {sorted(inputs)}")
    lns = [n for n in gv.g.node if n.op_type == "LayerNormalization"]
    if spec.targets:
        lns = [n for n in lns if _matches(spec.targets, n.name, n.output[0])]
    if not lns:
        raise SpecError("prompt tuning inserts virtual tokens after the embedding LayerNormalization; "
                        "no (matching) LayerNormalization node was found")
    ln = lns[0]
    if not gv.is_float_init(ln.input[1]) or len(gv.shape_of(ln.input[1])) != 1:
        raise SpecError(f"LayerNormalization {ln.name!r} has no 1-D scale initializer to read the width")
    hidden = gv.shape_of(ln.input[1])[0]
    n = spec.num_virtual_tokens
    emb = ln.output[0]
    base = "peft/prompt"
    before = {node.name for node in gv.g.node}
    prompt = gv.add_init(PROMPT_EMBEDDINGS, (rng.standard_normal((1, n, hidden)) * 0.02).astype(np.float32))
    zero = gv.const(f"{base}/idx0", np.array([0], np.int64))
    n_h = gv.const(f"{base}/n_h", np.array([n, hidden], np.int64))
    n_only = gv.const(f"{base}/n", np.array([n], np.int64))
    (shape_e,) = gv.node("Shape", [emb], base=base)
    (batch,) = gv.node("Gather", [shape_e, zero], base=base, axis=0)
    (target_shape,) = gv.node("Concat", [batch, n_h], base=base, axis=0)
    (p_exp,) = gv.node("Expand", [prompt, target_shape], base=base)
    (emb_ext,) = gv.node("Concat", [p_exp, emb], base=base, axis=1)
    mask_type = inputs[MASK_INPUT].type.tensor_type.elem_type
    (shape_m,) = gv.node("Shape", [MASK_INPUT], base=base)
    (batch_m,) = gv.node("Gather", [shape_m, zero], base=base, axis=0)
    (ones_shape,) = gv.node("Concat", [batch_m, n_only], base=base, axis=0)
    one_value = numpy_helper.from_array(np.array([1], dtype=helper.tensor_dtype_to_np_dtype(mask_type)))
    (ones,) = gv.node("ConstantOfShape", [ones_shape], base=base, value=one_value)
    (mask_ext,) = gv.node("Concat", [ones, MASK_INPUT], base=base, axis=1)
    added = {node.name for node in gv.g.node} - before
    if _rewire(gv, emb, emb_ext, added) == 0:
        raise SpecError(f"embedding output {emb!r} has no consumers to extend")
    if _rewire(gv, MASK_INPUT, mask_ext, added) == 0:
        raise SpecError("attention_mask is not used by the graph; the prompt would be unmasked")


def _check_prompt_runs(model: onnx.ModelProto) -> None:
    """Run the rewired graph once: fixed-length reshapes show up here, not during training."""
    from fedpeft_edge.runtime.ort_import import ort

    feeds = {}
    for inp in model.graph.input:
        if any(inp.name == t.name for t in model.graph.initializer):
            continue
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if len(dims) != 2 or tt.elem_type not in (TensorProto.INT64, TensorProto.INT32):
            raise SpecError(f"prompt tuning check supports [batch, seq] integer inputs; {inp.name!r} is not")
        seq = dims[1] or 8
        feeds[inp.name] = np.ones((2, seq), dtype=helper.tensor_dtype_to_np_dtype(tt.elem_type))
    try:
        sess = ort().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
    except Exception as exc:  # ORT raises its own exception types
        raise SpecError("prompt tuning does not fit this graph (sequence length is baked into a shape "
                        f"or mask arithmetic?): {str(exc).splitlines()[0][:300]}") from exc


# ---- head ---------------------------------------------------------------------------------------
def _feature_output(gv: _Graph) -> onnx.ValueInfoProto:
    outs = list(gv.g.output)
    named = [o for o in outs if o.name == "features"]
    if named:
        return named[0]
    if len(outs) != 1:
        raise SpecError(f"model has outputs {[o.name for o in outs]}; expected one (or one named 'features')")
    return outs[0]


def _add_head(gv: _Graph, spec: PeftSpec, rng: np.random.Generator) -> None:
    feat = _feature_output(gv)
    dims = feat.type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].HasField("dim_value"):
        raise SpecError(f"head needs a [batch, dim] feature output with a known dim; {feat.name!r} has "
                        f"shape {[d.dim_value or d.dim_param for d in dims]}")
    f_dim, c = int(dims[1].dim_value), int(spec.head_classes or 0)
    bound = math.sqrt(6.0 / (f_dim + c))
    w = gv.add_init(HEAD_WEIGHT, rng.uniform(-bound, bound, (f_dim, c)).astype(np.float32))
    b = gv.add_init(HEAD_BIAS, np.zeros(c, np.float32))
    (t,) = gv.node("MatMul", [feat.name, w], base="peft/head")
    gv.node("Add", [t, b], [gv.unique(LOGITS)], base="peft/head")
    out_name = gv.g.node[-1].output[0]
    del gv.g.output[:]
    batch = dims[0].dim_param or "batch" if not dims[0].HasField("dim_value") else dims[0].dim_value
    gv.g.output.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, c]))


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
