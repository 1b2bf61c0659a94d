"""PEFT on ONNX backbones: declarative spec, graph surgery, ORT training bundles, merged export.

``PeftSpec`` (spec) → ``apply_peft`` (surgery) → ``generate_artifacts``/``ArtifactBundle`` (artifacts) →
train with ``fedpeft_edge.training.ort_trainer.OrtTrainer`` → ``export_inference_model`` (merge).
``lowering.lower_to_gradient_model`` turns a bundle into a gradient model that stock onnxruntime runs
(``fedpeft_edge.training.gradient_trainer.GradientTrainer``); import it from its module.
"""

# Loaded on first use (PEP 562): the surgery and artifact modules import onnx (about 18 MB and 0.6 s),
# which a device needs for none of spec, layout or the gradient model (fedpeft_edge.peft.lowering.model).
from fedpeft_edge.runtime.lazy import lazy_attributes

_LAZY = {
    "ArtifactBundle": "artifacts", "generate_artifacts": "artifacts", "LoraSite": "lora",
    "export_inference_model": "merge", "METHODS": "spec", "PeftSpec": "spec", "PeftPlan": "surgery",
    "apply_peft": "surgery",
}

__all__ = ["METHODS", "ArtifactBundle", "LoraSite", "PeftPlan", "PeftSpec", "apply_peft",
           "export_inference_model", "generate_artifacts"]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
