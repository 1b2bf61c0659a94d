"""Central-site model preparation (ONNX export of pretrained backbones). torch is imported lazily."""

from fedpeft_edge.data.prepared_model import PreparedModel, load_prepared
from fedpeft_edge.models.prepare import default_cache_dir, prepare_image_model, prepare_text_model
from fedpeft_edge.models.toolchain import EXPORT_CODE_VERSION, OPSET

__all__ = [
    "EXPORT_CODE_VERSION",
    "OPSET",
    "PreparedModel",
    "default_cache_dir",
    "load_prepared",
    "prepare_image_model",
    "prepare_text_model",
]
