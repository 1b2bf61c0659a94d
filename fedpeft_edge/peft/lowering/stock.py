"""What stock onnxruntime runs (op sets, node checks), the lowering's error, and shared graph clean-up.

A gradient graph may hold standard ONNX ops and the contrib ops of :data:`STOCK_CONTRIB_OPS`, nothing
else; :data:`TRAINING_ONLY_OPS` lists the ORT Training ops that stock onnxruntime lacks (for checks and
tests). :func:`_remove_dead_nodes` and :func:`_tidy` are used by :mod:`.ops` and :mod:`.gradient_model`.
"""

from __future__ import annotations

from typing import Any

import onnx
import onnx.defs
from onnx import helper

from fedpeft_edge.runtime.errors import FedPeftError

# Contrib ops (domain com.microsoft) a gradient graph may keep: CPU kernels of stock onnxruntime (checked in
# the kernel registry of stock 1.32.0), all of them also present in 1.19.
STOCK_CONTRIB_OPS = frozenset({
    "FusedMatMul", "TransposeMatMul", "FusedGemm", "FusedConv", "Gelu", "FastGelu", "BiasGelu", "QuickGelu",
    "SkipLayerNormalization", "Range", "Trilu", "ExpandDims",
})
# ORT Training's training-only operator types (CPU kernels of the training build that stock onnxruntime
# lacks). Used by checks and tests; the lowering itself accepts only the standard ops + STOCK_CONTRIB_OPS.
TRAINING_ONLY_OPS = frozenset({
    "AdamOptimizer", "AdamWOptimizer", "AveragePoolGrad", "BatchNormalizationGrad", "BiasFastGeluGrad_dX",
    "BiasGeluGrad_dX", "BitmaskDropoutGrad", "BroadcastGradientArgs", "ConcatTraining", "ConvGrad",
    "ConvTransposeGrad", "DropoutGrad", "FakeQuantGrad", "FastGeluGrad", "GatherElementsGrad", "GatherGrad",
    "GatherNDGrad", "GeluGrad", "GRUGrad", "GRUTraining", "Group", "InPlaceAccumulator",
    "InPlaceAccumulatorV2", "InplaceClipGradNorm", "InvertibleLayerNormalizationGrad", "LambOptimizer",
    "LayerNormalizationGrad", "LeakyReluGrad", "LogSoftmaxGrad", "LogSoftmaxGrad_13", "LSTMGrad",
    "LSTMTraining", "MaxPoolGrad", "PassThrough", "PythonOp", "PythonOpGrad", "QuickGeluGrad", "ReduceAllL2",
    "ReduceSumTraining", "ReluGrad", "ResizeGrad", "Scale", "SGDOptimizer", "SGDOptimizerV2", "SigmoidGrad",
    "SimplifiedLayerNormalizationGrad", "SinGrad", "SliceGrad", "SoftmaxCrossEntropy",
    "SoftmaxCrossEntropyGrad", "SoftmaxCrossEntropyLossGrad", "SoftmaxCrossEntropyLossInternal",
    "SoftmaxCrossEntropyLossInternalGrad", "SoftmaxDropoutGrad", "SoftmaxGrad", "SoftmaxGrad_13",
    "SparseSoftmaxCrossEntropy", "SparseSoftmaxCrossEntropyGrad", "SplitTraining", "TanhGrad", "YieldOp",
    "ZeroGradient",
})
_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
_MS = "com.microsoft"


class LoweringError(FedPeftError):
    """A training-graph node has no lowering to ops that stock onnxruntime runs."""


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _describe(node: onnx.NodeProto) -> str:
    return f"{node.domain or 'ai.onnx'}::{node.op_type} (node {node.name or node.output[0]!r})"


def is_stock_node(node: onnx.NodeProto) -> bool:
    """True if stock onnxruntime's CPU build has the node's op (standard ONNX or a known contrib op)."""
    if node.domain in _STANDARD_DOMAINS:
        return onnx.defs.has(node.op_type, node.domain if node.domain == "ai.onnx.ml" else "")
    return node.domain == _MS and node.op_type in STOCK_CONTRIB_OPS


def unsupported_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes of ``model`` that stock onnxruntime cannot run."""
    return [n for n in model.graph.node if not is_stock_node(n)]


def _remove_dead_nodes(graph: onnx.GraphProto) -> None:
    keep = list(graph.node)
    while True:
        read = {n for node in keep for n in node.input} | {o.name for o in graph.output}
        alive = [n for n in keep if any(o in read for o in n.output if o)]
        if len(alive) == len(keep):
            break
        keep = alive
    del graph.node[:]
    graph.node.extend(keep)


def _tidy(model: onnx.ModelProto) -> None:
    """Drop value_info of tensors that no longer exist, unused initializers and unused opset imports."""
    graph = model.graph
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    kept_vi = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(kept_vi)
    read = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    inits = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    used = {n.domain for n in graph.node}
    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
