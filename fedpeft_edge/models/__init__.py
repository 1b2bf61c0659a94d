"""Central-site model preparation (ONNX export of pretrained backbones). torch is imported lazily."""

from fedpeft_edge.data.prepared_model import PreparedModel, load_prepared
from fedpeft_edge.models.prepare import (
    EXPORT_CODE_VERSION,
    OPSET,
    default_cache_dir,
    prepare_image_model,
    prepare_text_model,
)

__all__ = [
    "EXPORT_CODE_VERSION",
    "OPSET",
    "PreparedModel",
    "default_cache_dir",
    "load_prepared",
    "prepare_image_model",
    "prepare_text_model",
]
