"""Local training on the device behind one small interface (flat float32 vector in, flat vector out).

``base.LocalTrainer`` is all federation code sees. Two implementations, the optimizer running in the C core
in both (shared code in ``flat_trainer``): ``ort_trainer.OrtTrainer`` over an ORT Training bundle, and
``gradient_trainer.GradientTrainer`` over a lowered gradient model (``peft.lowering``) on a plain
``InferenceSession`` of stock onnxruntime. No torch in either. Submodules are not imported eagerly.
"""

__all__ = ["base", "flat_trainer", "gradient_trainer", "ort_trainer"]
