"""The per-op rewrites of ORT Training's training-only ops into ops stock onnxruntime runs.

Each training op is rewritten into standard ops with the same math:

=============================  ====================================================================
training op                    lowered to
=============================  ====================================================================
InPlaceAccumulator(V2)         nothing: the gradient it would accumulate becomes a graph output (the
                               accumulation buffers and ``lazy_reset_grad`` inputs go away; done by
                               :mod:`.gradient_model`, which knows each buffer's parameter)
SoftmaxCrossEntropyLossGrad    ``(exp(log_prob) - onehot(labels)) * dY / N`` (mean; sum and none too)
ConcatTraining / SplitTraining ``Concat`` (lengths from ``Shape`` when read) / ``Split``
GeluGrad                       ``dY * (½(1 + erf(x/√2)) + x·exp(-x²/2)/√(2π))``
ReluGrad                       ``Where(Y > 0, dY, 0)``
SigmoidGrad / TanhGrad         ``dY·Y·(1-Y)`` / ``dY·(1-Y²)``
LayerNormalizationGrad         elementwise ops and reductions (dX, dScale, dBias)
SoftmaxGrad_13                 ``Y * (dY - sum(dY * Y))``
GatherGrad (axis 0)            ``ScatterND(zeros, indices, dY, reduction="add")``
ConvGrad                       dX ``ConvTranspose``; dW ``Gemm`` (1x1) or ``Conv`` of the transposed
                               operands (group 1); dB ``ReduceSum``
Scale                          ``Mul`` / ``Div``
=============================  ====================================================================

``FusedMatMul`` and ``Gelu`` stay: they are contrib ops of the stock CPU build (:data:`STOCK_CONTRIB_OPS`).
Any other node outside the standard ONNX domains and that list raises :class:`LoweringError` naming the
op and the node; there is no fallback. The training-only opset imports are dropped.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.shape_inference
from onnx import TensorProto, helper

from fedpeft_edge.peft.artifacts import _GraphRewriter
from fedpeft_edge.peft.lowering.stock import (
    _MS,
    LoweringError,
    _attrs,
    _describe,
    _remove_dead_nodes,
    _tidy,
    unsupported_nodes,
)


class _Lowerer(_GraphRewriter):
    """Rewrites the training-only nodes of one graph (shares the artifact rewriter's helpers)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__(model)
        self.shapes, self.types = _static_info(model)
        self.counts: Counter[str] = Counter()

    # Own name spaces: the artifact rewriter's "fedpeft/speedup/..." names already live in this graph.
    def const(self, value: float | list[int] | np.ndarray) -> str:
        array = value if isinstance(value, np.ndarray) else (
            np.array(value, np.int64) if isinstance(value, list) else np.array(value, np.float32))
        key = f"{array.dtype}|{array.shape}|{array.tobytes().hex()}"
        if key not in self.consts:
            name = f"fedpeft/lower/const_{len(self.consts)}"
            self.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
            self.consts[key] = name
        return self.consts[key]

    def names(self, *keys: str) -> dict[str, str]:
        self.serial += 1
        return {k: f"fedpeft/lower/{self.serial}/{k}" for k in keys}

    def reduce_axes(self, op: str, src: str, dst: str, axes: list[int], keepdims: int = 1) -> onnx.NodeProto:
        if op == "ReduceSum" or self.opset >= 18:
            return helper.make_node(op, [src, self.const(list(axes))], [dst], keepdims=keepdims)
        return helper.make_node(op, [src], [dst], axes=list(axes), keepdims=keepdims)

    def needed(self, name: str) -> bool:
        return bool(name) and name in self.read

    def static_shape(self, name: str, node: onnx.NodeProto, what: str) -> list[int]:
        shape = self.shapes.get(name)
        if shape is None or any(d is None for d in shape):
            raise LoweringError(f"cannot lower {_describe(node)}: the shape of its {what} {name!r} is not "
                                f"static ({shape})")
        return [int(d) for d in shape]

    def cast_float(self, name: str, out: list[onnx.NodeProto]) -> str:
        if self.types.get(name) == TensorProto.FLOAT:
            return name
        t = self.names("f")["f"]
        out.append(helper.make_node("Cast", [name], [t], to=TensorProto.FLOAT))
        return t

    # ---- handlers: each returns the replacement nodes or raises LoweringError -------------------------
    def relu_grad(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        dy, y = node.input[:2]  # ORT's ReluGrad reads the Relu output: y > 0 exactly where x > 0
        t = self.names("pos")
        zero = self.const(0.0)
        return [helper.make_node("Greater", [y, zero], [t["pos"]]),
                helper.make_node("Where", [t["pos"], dy, zero], [node.output[0]])]

    def sigmoid_grad(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        dy, y = node.input[:2]
        t = self.names("one_minus", "d")
        return [helper.make_node("Sub", [self.const(1.0), y], [t["one_minus"]]),
                helper.make_node("Mul", [dy, y], [t["d"]]),
                helper.make_node("Mul", [t["d"], t["one_minus"]], [node.output[0]])]

    def tanh_grad(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        dy, y = node.input[:2]
        t = self.names("y2", "one_minus")
        return [helper.make_node("Mul", [y, y], [t["y2"]]),
                helper.make_node("Sub", [self.const(1.0), t["y2"]], [t["one_minus"]]),
                helper.make_node("Mul", [dy, t["one_minus"]], [node.output[0]])]

    def gelu_grad(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """``dY * (½(1 + erf(x/√2)) + x·exp(-x²/2)/√(2π))`` (exact erf GELU, like ORT's kernel).

        With ``a = x/√2`` that is ``½·dY·(1 + erf(a) + (2/√π)·a/exp(a²))``: ten elementwise passes
        (``a/exp(a²)`` is 0, not NaN, where ``exp(a²)`` overflows), all of them ops ORT runs on every
        intra-op thread (a three-input ``Sum`` would save a pass, but ORT runs it on one thread).
        ``x`` is read through ``Reshape(x, Shape(dY))``, a no-op that makes every node wait for
        ``dY``: without it the scheduler computes the ``x``-only part right after the forward pass and
        keeps its full-size result alive through the whole backward pass, one per GELU (the activation
        peak of a step).
        """
        dy, x = node.input[:2]
        t = self.names("shape", "x", "a", "erf", "a2", "ea", "r", "u", "e1", "s", "d")
        mk = helper.make_node
        return [mk("Shape", [dy], [t["shape"]]),
                mk("Reshape", [x, t["shape"]], [t["x"]]),
                mk("Mul", [t["x"], self.const(1.0 / math.sqrt(2.0))], [t["a"]]),
                mk("Erf", [t["a"]], [t["erf"]]),
                mk("Mul", [t["a"], t["a"]], [t["a2"]]),
                mk("Exp", [t["a2"]], [t["ea"]]),
                mk("Div", [t["a"], t["ea"]], [t["r"]]),                            # a·exp(-a²)
                mk("Mul", [t["r"], self.const(2.0 / math.sqrt(math.pi))], [t["u"]]),  # 2x·φ(x)
                mk("Add", [t["erf"], self.const(1.0)], [t["e1"]]),                 # 2Φ(x)
                mk("Add", [t["e1"], t["u"]], [t["s"]]),                             # 2(Φ(x) + x·φ(x))
                mk("Mul", [dy, t["s"]], [t["d"]]),
                mk("Mul", [t["d"], self.const(0.5)], [node.output[0]])]

    def sce_loss_grad(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        a = _attrs(node)
        if any(node.input[3:]) or "ignore_index" in a:
            raise LoweringError(f"cannot lower {_describe(node)}: class weights and ignore_index are not "
                                "supported")
        reduction = a.get("reduction", "mean")
        dy, log_prob, label = node.input[:3]
        t = self.names("p", "shape", "depth", "onehot", "diff", "n", "nf", "scale")
        mk = helper.make_node
        out = [mk("Exp", [log_prob], [t["p"]]),
               mk("Shape", [log_prob], [t["shape"]]),
               mk("Gather", [t["shape"], self.const([1])], [t["depth"]]),
               mk("OneHot", [label, t["depth"], self.const(np.array([0.0, 1.0], np.float32))], [t["onehot"]],
                  axis=1),
               mk("Sub", [t["p"], t["onehot"]], [t["diff"]])]
        if reduction == "mean":  # no weights, no ignore_index: N = number of labels
            out += [mk("Size", [label], [t["n"]]), mk("Cast", [t["n"]], [t["nf"]], to=TensorProto.FLOAT),
                    mk("Div", [dy, t["nf"]], [t["scale"]])]
        elif reduction == "sum":
            out.append(mk("Identity", [dy], [t["scale"]]))
        elif reduction == "none":
            out.append(mk("Unsqueeze", [dy, self.const([1])], [t["scale"]]))
        else:
            raise LoweringError(f"cannot lower {_describe(node)}: reduction {reduction!r}")
        out.append(mk("Mul", [t["diff"], t["scale"]], [node.output[0]]))
        return out

    def concat_training(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        axis = _attrs(node).get("axis", 0)
        out = [helper.make_node("Concat", list(node.input), [node.output[0]], axis=axis)]
        if len(node.output) > 1 and self.needed(node.output[1]):  # per-input lengths along axis
            parts = []
            for i, x in enumerate(node.input):
                t = self.names(f"s{i}", f"l{i}")
                out += [helper.make_node("Shape", [x], [t[f"s{i}"]]),
                        helper.make_node("Gather", [t[f"s{i}"], self.const([axis])], [t[f"l{i}"]])]
                parts.append(t[f"l{i}"])
            out.append(helper.make_node("Concat", parts, [node.output[1]], axis=0))
        return out

    def split_training(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        axis = _attrs(node).get("axis", 0)
        inputs = [x for x in node.input[:2]]
        if len(inputs) > 1 and inputs[1]:
            return [helper.make_node("Split", inputs, list(node.output), axis=axis)]
        extra = {"num_outputs": len(node.output)} if self.opset >= 18 else {}
        return [helper.make_node("Split", inputs[:1], list(node.output), axis=axis, **extra)]

    def scale(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        x, s = node.input[:2]
        out: list[onnx.NodeProto] = []
        s = self.cast_float(s, out)
        op = "Div" if _attrs(node).get("scale_down", 0) else "Mul"
        return [*out, helper.make_node(op, [x, s], [node.output[0]])]

    def softmax_grad_13(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        return self.softmax_grad(node)  # type: ignore[return-value]  # always lowers

    def softmax_grad_legacy(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        # pre-13 semantics (flatten from axis) equal the per-axis form only on the last axis
        if _attrs(node).get("axis", 1) != -1:
            raise LoweringError(f"cannot lower {_describe(node)}: only axis=-1 is supported")
        return self.softmax_grad(node)  # type: ignore[return-value]

    def gather_grad(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        if _attrs(node).get("axis", 0) != 0:
            raise LoweringError(f"cannot lower {_describe(node)}: only axis 0 is supported")
        if self.opset < 16:
            raise LoweringError(f"cannot lower {_describe(node)}: ScatterND with reduction needs opset "
                                f">= 16, the model has {self.opset}")
        shape, indices, dy = node.input[:3]
        t = self.names("zeros", "idx64", "idx")
        mk = helper.make_node
        zero = onnx.numpy_helper.from_array(np.zeros(1, np.float32), "value")
        return [mk("ConstantOfShape", [shape], [t["zeros"]], value=zero),
                mk("Cast", [indices], [t["idx64"]], to=TensorProto.INT64),
                mk("Unsqueeze", [t["idx64"], self.const([-1])], [t["idx"]]),
                mk("ScatterND", [t["zeros"], t["idx"], dy], [node.output[0]], reduction="add")]

    def layernorm_grad_full(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """dX, dScale, dBias with ``x_hat = (X - mean) * inv_std`` over the normalised (trailing) axes:
        ``dX = inv_std * (g - mean(g) - x_hat * mean(g * x_hat))``, ``g = dY * scale``;
        ``dScale = sum(dY * x_hat)``, ``dBias = sum(dY)`` over the leading axes."""
        fast = self.layernorm_grad(node)  # the artifact rewriter's dX-only form when it applies
        if fast is not None:
            return fast
        a = _attrs(node)
        axis = int(a.get("axis", -1))
        dy, x, scale, mean, inv_std = node.input[:5]
        dx, dscale, dbias = [*node.output, "", ""][:3]
        sshape = self.static_shape(scale, node, "scale")
        axes = list(range(axis, 0)) if axis < 0 else list(range(axis, axis + len(sshape)))
        t = self.names("xc", "xhat", "g", "mg", "gx", "mgx", "u", "v", "w", "dyx", "r1", "r2")
        mk = helper.make_node
        out: list[onnx.NodeProto] = []
        if self.needed(dx) or self.needed(dscale):
            out += [mk("Sub", [x, mean], [t["xc"]]), mk("Mul", [t["xc"], inv_std], [t["xhat"]])]
        if self.needed(dx):
            out += [mk("Mul", [dy, scale], [t["g"]]), self.reduce_axes("ReduceMean", t["g"], t["mg"], axes),
                    mk("Mul", [t["g"], t["xhat"]], [t["gx"]]),
                    self.reduce_axes("ReduceMean", t["gx"], t["mgx"], axes),
                    mk("Mul", [t["xhat"], t["mgx"]], [t["u"]]), mk("Sub", [t["g"], t["mg"]], [t["v"]]),
                    mk("Sub", [t["v"], t["u"]], [t["w"]]), mk("Mul", [t["w"], inv_std], [dx])]
        flat = self.const([-1, *sshape])
        if self.needed(dscale):
            out += [mk("Mul", [dy, t["xhat"]], [t["dyx"]]), mk("Reshape", [t["dyx"], flat], [t["r1"]]),
                    self.reduce_axes("ReduceSum", t["r1"], dscale, [0], keepdims=0)]
        if self.needed(dbias):
            out += [mk("Reshape", [dy, flat], [t["r2"]]),
                    self.reduce_axes("ReduceSum", t["r2"], dbias, [0], keepdims=0)]
        return out

    def conv_grad(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        a = _attrs(node)
        dy, x, w = node.input[:3]
        dx, dw, db = [*node.output, "", ""][:3]
        wshape = self.static_shape(w, node, "weight")
        k = len(wshape) - 2
        kernel = list(a.get("kernel_shape", wshape[2:]))
        strides = list(a.get("strides", [1] * k))
        dil = list(a.get("dilations", [1] * k))
        pads = list(a.get("pads", [0] * (2 * k)))
        group = int(a.get("group", 1))
        auto_pad = a.get("auto_pad", "NOTSET")
        if auto_pad == "VALID":
            pads = [0] * (2 * k)
        elif auto_pad != "NOTSET":
            raise LoweringError(f"cannot lower {_describe(node)}: auto_pad={auto_pad} (only explicit pads)")
        mk = helper.make_node
        conv_attrs = {"strides": strides, "dilations": dil, "pads": pads, "group": group,
                      "kernel_shape": kernel}
        out: list[onnx.NodeProto] = []
        if self.needed(dx):  # dX = ConvTranspose(dY, W); strided convs may leave trailing rows unread
            xshape = self.shapes.get(x)
            spatial = list(xshape[2:]) if xshape is not None and len(xshape) == k + 2 else [None] * k
            if all(s == 1 for s in strides):
                out.append(mk("ConvTranspose", [dy, w], [dx], **conv_attrs))
            elif all(h is not None for h in spatial):
                extra = []
                for i, h in enumerate(spatial):
                    span = h + pads[i] + pads[i + k] - dil[i] * (kernel[i] - 1) - 1
                    rows = span // strides[i] + 1  # forward output size
                    extra.append(h - (strides[i] * (rows - 1) + dil[i] * (kernel[i] - 1) + 1
                                      - pads[i] - pads[i + k]))
                out.append(mk("ConvTranspose", [dy, w], [dx], output_padding=extra, **conv_attrs))
            else:  # unknown spatial size: pad the transposed result up to X's shape at run time
                t = self.names("ct", "sx", "sct", "diff", "pads")
                out += [mk("ConvTranspose", [dy, w], [t["ct"]], **conv_attrs),
                        mk("Shape", [x], [t["sx"]]), mk("Shape", [t["ct"]], [t["sct"]]),
                        mk("Sub", [t["sx"], t["sct"]], [t["diff"]]),
                        mk("Concat", [self.const([0] * (k + 2)), t["diff"]], [t["pads"]], axis=0),
                        mk("Pad", [t["ct"], t["pads"]], [dx])]
        if self.needed(dw):
            perm = [1, 0, *range(2, k + 2)]
            t = self.names("dyt", "dym", "xt", "xm", "dwm", "r", "rs")
            if group == 1 and all(v == 1 for v in kernel) and all(v == 1 for v in strides) and not any(pads):
                # 1x1: one GEMM over batch x pixels, dW[o, i] = sum dY[n, o, p] X[n, i, p]
                out += [mk("Transpose", [dy], [t["dyt"]], perm=perm),
                        mk("Reshape", [t["dyt"], self.const([wshape[0], -1])], [t["dym"]]),
                        mk("Transpose", [x], [t["xt"]], perm=perm),
                        mk("Reshape", [t["xt"], self.const([wshape[1], -1])], [t["xm"]]),
                        mk("Gemm", [t["dym"], t["xm"]], [t["dwm"]], transB=1),
                        mk("Reshape", [t["dwm"], self.const(list(wshape))], [dw])]
            elif group == 1:
                # correlate X with dY, batch as channels: strides and dilations swap roles
                out += [mk("Transpose", [x], [t["xt"]], perm=perm),
                        mk("Transpose", [dy], [t["dyt"]], perm=perm),
                        mk("Conv", [t["xt"], t["dyt"]], [t["r"]], strides=dil, dilations=strides, pads=pads),
                        mk("Slice", [t["r"], self.const([0] * k), self.const(kernel),
                                     self.const(list(range(2, k + 2)))], [t["rs"]]),
                        mk("Transpose", [t["rs"]], [dw], perm=perm)]
            else:
                raise LoweringError(f"cannot lower {_describe(node)}: the weight gradient of a grouped "
                                    f"convolution (group={group}) is not supported")
        if self.needed(db):
            t = self.names("r")
            out += [mk("Reshape", [dy, self.const([0, 0, -1])], [t["r"]]),
                    self.reduce_axes("ReduceSum", t["r"], db, [0, 2], keepdims=0)]
        return out

    # ---- driver ---------------------------------------------------------------------------------------
    def lower(self) -> dict[str, int]:
        handlers: dict[tuple[str, str], Callable[[onnx.NodeProto], list[onnx.NodeProto]]] = {
            (_MS, "ReluGrad"): self.relu_grad, (_MS, "SigmoidGrad"): self.sigmoid_grad,
            (_MS, "TanhGrad"): self.tanh_grad, (_MS, "GeluGrad"): self.gelu_grad,
            (_MS, "SoftmaxCrossEntropyLossGrad"): self.sce_loss_grad,
            (_MS, "ConcatTraining"): self.concat_training, (_MS, "SplitTraining"): self.split_training,
            (_MS, "Scale"): self.scale, (_MS, "SoftmaxGrad_13"): self.softmax_grad_13,
            (_MS, "SoftmaxGrad"): self.softmax_grad_legacy, (_MS, "GatherGrad"): self.gather_grad,
            (_MS, "LayerNormalizationGrad"): self.layernorm_grad_full, (_MS, "ConvGrad"): self.conv_grad,
            ("", "ConvGrad"): self.conv_grad,
        }
        self.read = {n for node in self.graph.node for n in node.input} | {o.name for o in self.graph.output}
        new_nodes: list[onnx.NodeProto] = []
        for node in self.graph.node:
            handler = handlers.get((node.domain, node.op_type))
            if handler is None:
                new_nodes.append(node)
                continue
            for i, rep in enumerate(handler(node)):
                rep.name = f"{node.name or node.output[0]}/lowered_{i}"
                new_nodes.append(rep)
            self.counts[node.op_type] += 1
        del self.graph.node[:]
        self.graph.node.extend(new_nodes)
        return dict(self.counts)


def _static_info(model: onnx.ModelProto) -> tuple[dict[str, list[int | None]], dict[str, int]]:
    """Shapes (None = unknown dimension) and element types of every tensor onnx can infer."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is an aid here; a graph it cannot handle still lowers where shapes allow
        inferred = model
    shapes: dict[str, list[int | None]] = {}
    types: dict[str, int] = {}
    for t in inferred.graph.initializer:
        shapes[t.name] = [int(d) for d in t.dims]
        types[t.name] = t.data_type
    for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tt = v.type.tensor_type
        if tt.elem_type:
            types.setdefault(v.name, tt.elem_type)
        if tt.HasField("shape"):
            shapes.setdefault(v.name, [d.dim_value if d.HasField("dim_value") else None
                                       for d in tt.shape.dim])
    return shapes, types


def lower_training_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite every training-only node of ``model`` in place into ops stock onnxruntime runs.

    Returns how many nodes of each op type were lowered. Raises :class:`LoweringError` naming the op and
    node of anything left that stock onnxruntime cannot run (InPlaceAccumulator* included: those are
    removed by :func:`lower_to_gradient_model`, which knows which parameter each one belongs to).
    """
    counts = _Lowerer(model).lower()
    _remove_dead_nodes(model.graph)
    bad = unsupported_nodes(model)
    if bad:
        ops = sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in bad})
        raise LoweringError(f"cannot lower training op {_describe(bad[0])} to stock onnxruntime ops "
                            f"({len(bad)} node(s) left of {', '.join(ops)})")
    _tidy(model)
    return counts
