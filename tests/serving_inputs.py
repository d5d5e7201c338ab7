"""What the serving tests send: PNGs (flat or noise, any mode and format), a
decompression bomb's header, base64, and the small request limits they are served with."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib

from PIL import Image

from mint_ray.serving.config import RequestLimitsConfig

SMALL = RequestLimitsConfig(max_body_bytes=2**20, max_note_chars=2000, max_image_bytes=200_000,
                            max_image_pixels=512 * 512, max_top_k=10)


def png(size: tuple[int, int] = (64, 64), mode: str = "RGB", noise: bool = False, fmt: str = "PNG") -> bytes:
    image = Image.frombytes(mode, size, os.urandom(size[0] * size[1] * len(mode))) if noise \
        else Image.new(mode, size, 128)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def bomb_header(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG whose header claims ``width`` x ``height`` pixels (a few hundred bytes)."""
    raw = png((1, 1), "L")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
