"""Lowering an ORT Training bundle to a *gradient model* that stock ``onnxruntime`` runs (central side).

``onnxruntime-training`` (1.19.2, x86-64 only, no newer release) is the only build with the training API.
Stock ``onnxruntime`` has none, but it runs any graph made of standard ops and the contrib ops of its CPU
build. The bundle's training graph computes loss and gradients with a handful of training-only ops; each
is rewritten into standard ops with the same math. The package's modules:

``stock``           what stock onnxruntime runs (:data:`STOCK_CONTRIB_OPS`, :func:`is_stock_node`),
                    :class:`LoweringError`, graph clean-up shared by the other two
``ops``             the per-op rewrites (GeluGrad, SoftmaxCrossEntropyLossGrad, LayerNormalizationGrad,
                    ConvGrad, ...) and :func:`lower_training_ops`, which applies them to one graph
``gradient_model``  :func:`lower_to_gradient_model`, which writes a bundle's gradient model, eval model,
                    frozen base and manifest
``model``           :class:`GradientModel`, which loads and verifies them (imports no onnx: what a
                    device needs; the other modules load on first use of their names)

Frozen values come from the bundle's checkpoint (the only place the bundle keeps them), read with ORT
Training's ``CheckpointState``: lowering runs where artifacts are made, never on a device.
"""

from fedpeft_edge.peft.lowering.model import (
    BASE_DATA,
    EVAL_MODEL,
    GRADIENT_FORMAT,
    GRADIENT_MODEL,
    INITIAL_PARAMS,
    LABELS,
    MANIFEST,
    GradientModel,
)
from fedpeft_edge.runtime.lazy import lazy_attributes

# onnx-importing names, loaded on first use (PEP 562): a device reading a gradient model needs none.
_LAZY = {"lower_to_gradient_model": "gradient_model", "lower_training_ops": "ops",
         "STOCK_CONTRIB_OPS": "stock", "TRAINING_ONLY_OPS": "stock", "LoweringError": "stock",
         "is_stock_node": "stock", "unsupported_nodes": "stock"}

__all__ = ["BASE_DATA", "EVAL_MODEL", "GRADIENT_FORMAT", "GRADIENT_MODEL", "INITIAL_PARAMS", "LABELS",
           "MANIFEST", "STOCK_CONTRIB_OPS", "TRAINING_ONLY_OPS", "GradientModel", "LoweringError",
           "is_stock_node", "lower_to_gradient_model", "lower_training_ops", "unsupported_nodes"]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
