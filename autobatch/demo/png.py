"""Writing an RGB image as a PNG file, with the standard library alone.

    >>> write_png("out.png", torch.rand(3, 64, 64))   # values in [0, 1]
"""
from __future__ import annotations

import pathlib
import struct
import zlib
from typing import Union

import torch

__all__ = ["write_png"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: Union[str, pathlib.Path], image: torch.Tensor) -> None:
    """Save ``image`` (3, H, W), values in [0, 1], as an 8-bit RGB PNG."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    height, width, _ = pixels.shape
    # Each row starts with filter type 0 (none).
    rows = b"".join(b"\x00" + bytes(pixels[row].flatten().tolist()) for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b"")
    pathlib.Path(path).write_bytes(data)
