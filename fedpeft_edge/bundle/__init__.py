"""Site bundles: one signed file holding everything a site needs to train (the gradient model, the
tokenizer or image preprocessing, the label names, the PEFT spec and the fleet's defaults).

``format``   the file layout, manifest, limits and the strict reader (no member leaves its folder)
``signing``  Ed25519 keys and the signature over the manifest (``cryptography``, imported on first use)
``build``    central side: write a bundle from a gradient model folder, sign an existing bundle
``verify``   site side: verify every member, extract atomically into a folder keyed by the bundle id

This room imports ``runtime`` and ``peft`` (the gradient model's manifest) only; ``site``, ``central`` and
``faces`` use it. Importing the package imports nothing heavy (no numpy, onnx or cryptography).
"""

from fedpeft_edge.bundle.format import (
    DEFAULT_LIMITS,
    FORMAT_VERSION,
    REASONS,
    BundleError,
    BundleLimits,
    open_bundle,
)

__all__ = ["DEFAULT_LIMITS", "FORMAT_VERSION", "REASONS", "BundleError", "BundleLimits", "open_bundle"]
