"""Image files to uint8 arrays without PIL (a device has numpy only): PNG, PGM/PPM, ``.npy``.

PNG: 8-bit, non-interlaced, gray / RGB / palette / gray+alpha / RGBA (alpha dropped), decoded with zlib
and numpy. Other formats (JPEG, ...) are read with Pillow when it happens to be installed.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from fedpeft_edge.runtime.errors import InvalidValueError, ensure

IMAGE_FILE_SUFFIXES = (".png", ".pgm", ".ppm", ".npy", ".jpg", ".jpeg", ".bmp")
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
MAX_PIXELS = 64_000_000  # a hostile header cannot make us allocate more


def _unfilter(raw: bytes, height: int, stride: int, bpp: int) -> np.ndarray:
    rows = np.frombuffer(raw, np.uint8)
    ensure(rows.size == height * (stride + 1), "PNG: image data has the wrong length")
    rows = rows.reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.int32)
    for y in range(height):
        kind, line = int(rows[y, 0]), rows[y, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 2:
            cur = (line + prev) & 0xFF
        elif kind == 1:  # each byte adds the one bpp to its left: a running sum per channel
            cur = (line.reshape(-1, bpp).cumsum(axis=0) & 0xFF).reshape(-1)
        elif kind in (3, 4):  # these depend on the left neighbour: one pixel at a time
            cur = np.zeros(stride, np.int32)
            for x in range(stride):
                left = cur[x - bpp] if x >= bpp else 0
                if kind == 3:
                    cur[x] = (line[x] + ((left + prev[x]) >> 1)) & 0xFF
                else:
                    up, ul = prev[x], (prev[x - bpp] if x >= bpp else 0)
                    p = left + up - ul
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - ul)
                    pred = left if pa <= pb and pa <= pc else (up if pb <= pc else ul)
                    cur[x] = (line[x] + pred) & 0xFF
        else:
            raise InvalidValueError(f"PNG: unknown row filter {kind}")
        out[y] = cur
        prev = cur
    return out


def read_png(data: bytes) -> np.ndarray:
    """uint8 ``[H, W]`` (gray) or ``[H, W, 3]`` (colour) from PNG bytes."""
    ensure(data[:8] == _PNG_SIG, "not a PNG file")
    pos, idat, palette = 8, [], None
    width = height = depth = ctype = interlace = -1
    while pos + 8 <= len(data):
        length, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if tag == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif tag == b"PLTE":
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
    ensure(width > 0 and height > 0 and width * height <= MAX_PIXELS, "PNG: bad or huge size")
    ensure(depth == 8 and ctype in _PNG_CHANNELS and interlace == 0,
           f"PNG: only 8-bit non-interlaced images are read without Pillow (depth {depth}, "
           f"colour type {ctype}, interlace {interlace})")
    channels = _PNG_CHANNELS[ctype]
    pixels = _unfilter(zlib.decompress(b"".join(idat)), height, width * channels, channels)
    img = pixels.reshape(height, width, channels)
    if ctype == 3:
        ensure(palette is not None, "PNG: palette image without a palette")
        return palette[img[..., 0]]
    if channels in (2, 4):
        img = img[..., :-1]  # alpha dropped
    return img[..., 0] if img.shape[-1] == 1 else img


def read_netpbm(data: bytes) -> np.ndarray:
    """Binary PGM (P5) or PPM (P6) with maxval <= 255."""
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while end < len(data) and not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    magic, width, height, maxval = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    ensure(magic in (b"P5", b"P6") and 0 < maxval <= 255, "only binary 8-bit PGM/PPM are read")
    ensure(0 < width * height <= MAX_PIXELS, "PGM/PPM: bad or huge size")
    channels = 3 if magic == b"P6" else 1
    body = np.frombuffer(data, np.uint8, count=width * height * channels, offset=pos + 1)
    img = body.reshape(height, width, channels) if channels == 3 else body.reshape(height, width)
    return img if maxval == 255 else (img.astype(np.uint32) * 255 // maxval).astype(np.uint8)


def read_image(path: Path | str) -> np.ndarray:
    """One image file as uint8 ``[H, W]`` or ``[H, W, 3]``."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            img = np.load(path, allow_pickle=False)
        elif suffix in (".png", ".pgm", ".ppm"):
            data = path.read_bytes()
            img = read_png(data) if suffix == ".png" else read_netpbm(data)
        else:
            try:
                from PIL import Image  # optional: JPEG and the rest
            except ImportError:
                raise InvalidValueError(f"{path}: {suffix} needs Pillow; use PNG, PGM/PPM or .npy") from None
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, zlib.error, struct.error, IndexError) as exc:
        if isinstance(exc, InvalidValueError):
            raise InvalidValueError(f"{path}: {exc}") from exc
        raise InvalidValueError(f"{path}: unreadable image ({exc})") from exc
    img = np.asarray(img)
    ensure(img.dtype == np.uint8 and (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (1, 3))),
           f"{path}: need uint8 [H, W] or [H, W, 1|3], got {img.dtype} {img.shape}")
    return img


def image_files(directory: Path | str) -> list[Path]:
    """The image files directly in ``directory``, by name."""
    directory = Path(directory)
    ensure(directory.is_dir(), f"{directory} is not a directory")
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_FILE_SUFFIXES)


__all__ = ["IMAGE_FILE_SUFFIXES", "image_files", "read_image", "read_netpbm", "read_png"]
