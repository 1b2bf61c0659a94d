"""Local training on the device behind one small interface (flat float32 vector in, flat vector out).

``base.LocalTrainer`` is all federation code sees; ``ort_trainer.OrtTrainer`` implements it with ONNX
Runtime Training (no torch), the optimizer running in the C core. Submodules are not imported eagerly.
"""

__all__ = ["base", "ort_trainer"]
