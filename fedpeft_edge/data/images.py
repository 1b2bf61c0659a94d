"""Image preprocessing in numpy (no PIL/torch): resize, channel replication, normalisation, NCHW."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedpeft_edge.runtime.errors import InvalidTypeError, ensure


def _bilinear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights for half-pixel-centre bilinear resampling (``align_corners=False``)."""
    scale = in_size / out_size
    centres = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    centres = np.clip(centres, 0.0, in_size - 1)
    lo = np.floor(centres).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (centres - lo).astype(np.float32)
    return lo, hi, frac


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Resize float32 ``[N, H, W, C]`` to ``[N, size, size, C]`` (separable bilinear)."""
    _, height, width, _ = images.shape
    if height == size and width == size:
        return images
    lo, hi, frac = _bilinear_weights(height, size)
    rows = images[:, lo] * (1.0 - frac)[None, :, None, None] + images[:, hi] * frac[None, :, None, None]
    lo, hi, frac = _bilinear_weights(width, size)
    return rows[:, :, lo] * (1.0 - frac)[None, None, :, None] + rows[:, :, hi] * frac[None, None, :, None]


def preprocess_images(
    images: np.ndarray,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int = 3,
    *,
    batch_size: int = 4096,
) -> np.ndarray:
    """uint8 ``[N, H, W]`` or ``[N, H, W, C]`` -> float32 ``[N, channels, S, S]``, ``(x/255 - mean) / std``.

    Grayscale is replicated to ``channels``; sizes change by bilinear resampling. Work is done in chunks
    of ``batch_size`` images to bound the float temporaries.
    """
    ensure(isinstance(images, np.ndarray), "images must be a numpy array", raising=InvalidTypeError)
    ensure(images.dtype == np.uint8, f"images must be uint8, got {images.dtype}", raising=InvalidTypeError)
    ensure(images.ndim in (3, 4), f"images must be [N, H, W] or [N, H, W, C], got shape {images.shape}")
    ensure(isinstance(image_size, (int, np.integer)) and image_size >= 1, f"bad image_size {image_size!r}")
    ensure(channels in (1, 3), f"channels must be 1 or 3, got {channels}")
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(-1)
    std_arr = np.asarray(std, dtype=np.float32).reshape(-1)
    ensure(
        mean_arr.size in (1, channels) and std_arr.size in (1, channels),
        "mean/std need 1 or `channels` values",
    )
    ensure(bool(np.all(std_arr > 0)), "std must be positive")
    if images.ndim == 3:
        images = images[..., None]
    in_channels = images.shape[-1]
    ensure(in_channels in (1, channels), f"cannot map {in_channels} input channels to {channels}")
    n = images.shape[0]
    out = np.empty((n, channels, image_size, image_size), dtype=np.float32)
    mean_b = np.broadcast_to(mean_arr, (channels,)).reshape(1, 1, 1, channels)
    inv_std_b = (1.0 / np.broadcast_to(std_arr, (channels,))).reshape(1, 1, 1, channels)
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size].astype(np.float32) * np.float32(1.0 / 255.0)
        chunk = resize_bilinear(chunk, int(image_size))
        if in_channels != channels:
            chunk = np.repeat(chunk, channels, axis=-1)
        chunk = (chunk - mean_b) * inv_std_b
        out[start : start + batch_size] = chunk.transpose(0, 3, 1, 2)
    return out


__all__ = ["preprocess_images", "resize_bilinear"]
