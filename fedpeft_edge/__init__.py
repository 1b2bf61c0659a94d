"""fedpeft_edge: federated parameter-efficient fine-tuning on edge devices over MQTT."""

__version__ = "0.1.0"
