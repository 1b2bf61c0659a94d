"""PEFT on ONNX backbones: declarative spec, graph surgery, ORT training bundles, merged export.

``PeftSpec`` (spec) → ``apply_peft`` (surgery) → ``generate_artifacts``/``ArtifactBundle`` (artifacts) →
train with ``fedpeft_edge.training.ort_trainer.OrtTrainer`` → ``export_inference_model`` (merge).
``lowering.lower_to_gradient_model`` turns a bundle into a gradient model that stock onnxruntime runs
(``fedpeft_edge.training.gradient_trainer.GradientTrainer``); import it from its module.
"""

from fedpeft_edge.peft.artifacts import ArtifactBundle, generate_artifacts
from fedpeft_edge.peft.lora import LoraSite
from fedpeft_edge.peft.merge import export_inference_model
from fedpeft_edge.peft.spec import METHODS, PeftSpec
from fedpeft_edge.peft.surgery import PeftPlan, apply_peft

__all__ = ["METHODS", "ArtifactBundle", "LoraSite", "PeftPlan", "PeftSpec", "apply_peft",
           "export_inference_model", "generate_artifacts"]
