"""Non-LoRA PEFT surgery: bottleneck adapters, prompt-tuning virtual tokens and the classification head."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fedpeft_edge.peft.graph_edit import (
    _attr,
    _Graph,
    _lora_candidates,
    _matches,
    _reroute_output,
    _select_sites,
)
from fedpeft_edge.peft.spec import PeftSpec
from fedpeft_edge.runtime.errors import SpecError

LOGITS = "logits"
HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
PROMPT_EMBEDDINGS = "peft.prompt.embeddings"
MASK_INPUT = "attention_mask"


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
