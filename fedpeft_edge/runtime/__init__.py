"""The bottom room: error types, atomic files, the name registry, the torch-free ONNX Runtime import.

Imports nothing else of the package. Key names: ``errors.FedPeftError`` (the root of every error raised
here) and ``errors.ensure``; ``durable.atomic_file``; ``names`` (every name a user can choose, no numpy);
``ort_import.ort`` / ``ort_import.training_api``. Submodules are not imported eagerly.
"""

__all__ = ["durable", "errors", "names", "ort_import"]
