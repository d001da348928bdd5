"""Decoder output to 8-bit RGB and PNG, with the standard library only (no Pillow on the device)."""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np


def to_uint8_image(decoded: np.ndarray) -> np.ndarray:
    """A decoder output in [-1, 1], NCHW (batch 1) or CHW, to HWC uint8 (as diffusers' postprocess does)."""
    array = np.asarray(decoded, dtype=np.float32)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {array.shape[0]}")
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a CHW image, got shape {list(array.shape)}")
    image = np.clip(array / 2 + 0.5, 0.0, 1.0).transpose(1, 2, 0)
    return (image * 255).round().astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """Encode an HWC uint8 image (1, 3 or 4 channels) as PNG."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"expected an HWC uint8 image with 1, 3 or 4 channels, got {image.dtype} {image.shape}"
        )
    height, width, channels = image.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    # every scanline starts with filter type 0 (none)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * channels)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write ``image`` to ``path`` atomically (an interrupted run leaves no truncated file)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = encode_png(image)
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return target
