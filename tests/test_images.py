"""The one image decoder: limits, the PNG/JPEG allow-list, and a reason for every refusal."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mint_ray import images
from mint_ray.images import ImageLimits, ImageRejected, decode_rgb, resize, to_pil


def encoded(fmt: str, size: tuple[int, int] = (12, 8), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 90).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + b"\0\0\0\0IEND\xaeB`\x82")


def reason(data: bytes, limits: ImageLimits | None = None) -> str:
    with pytest.raises(ImageRejected) as err:
        decode_rgb(data, limits or ImageLimits())
    assert err.value.reason in images.REASONS
    return err.value.reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_allowed_formats_decode_to_rgb(fmt: str, mode: str) -> None:
    if fmt == "JPEG" and mode == "RGBA":
        mode = "CMYK"
    pixels = decode_rgb(encoded(fmt, (12, 8), mode), ImageLimits())
    assert pixels.shape == (8, 12, 3) and pixels.dtype == np.uint8


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP", "PPM"])
def test_other_formats_are_refused_by_name(fmt: str) -> None:
    with pytest.raises(ImageRejected, match=f"{fmt}; allowed formats: PNG, JPEG") as err:
        decode_rgb(encoded(fmt), ImageLimits())
    assert err.value.reason == images.UNSUPPORTED_FORMAT
    assert decode_rgb(encoded(fmt), ImageLimits(formats=(fmt,))).shape == (8, 12, 3)


def test_each_kind_of_bad_file_has_its_reason() -> None:
    png = encoded("PNG", (32, 32))
    assert reason(png, ImageLimits(max_bytes=len(png) - 1)) == images.TOO_LARGE
    assert reason(png, ImageLimits(max_pixels=32 * 32 - 1)) == images.TOO_MANY_PIXELS
    assert reason(png[:-12]) == images.TRUNCATED
    assert reason(encoded("JPEG", (64, 64))[:200]) in (images.TRUNCATED, images.CORRUPT)
    assert reason(b"") == images.CORRUPT
    assert reason(b"not an image at all") == images.CORRUPT
    assert reason(png[:40] + b"\0" * 40 + png[80:]) in (images.CORRUPT, images.TRUNCATED)


def test_a_bomb_is_refused_from_its_header_and_quotes_our_limit() -> None:
    # 100k x 100k pixels would be 30 GB decoded; the header alone decides.
    with pytest.raises(ImageRejected, match="> max_image_pixels 1000000") as err:
        decode_rgb(png_header_only(100_000, 100_000), ImageLimits(max_pixels=1_000_000))
    assert err.value.reason == images.TOO_MANY_PIXELS
    with pytest.raises(ImageRejected, match="5000x5000 > max_image_pixels 1000000"):
        decode_rgb(png_header_only(5000, 5000), ImageLimits(max_pixels=1_000_000))


def test_to_pil_and_resize() -> None:
    array = np.zeros((5, 7, 3), np.uint8)
    assert to_pil(array).size == (7, 5)
    assert to_pil(encoded("PNG")).mode == "RGB"
    with pytest.raises(ImageRejected):
        to_pil(encoded("GIF"))
    assert resize(array, 4).shape == (4, 4, 3)
    assert resize(np.zeros((4, 4, 3), np.uint8), 4) is not None
