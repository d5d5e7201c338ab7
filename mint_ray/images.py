"""Images from untrusted bytes: one decoder with limits, one resize.

Every stage that reads an image (the preference build, teachers, training,
evaluation and serving) decodes it here, so one allow-list of formats and one
set of limits holds everywhere. The header is read before any pixel is
decoded: a decompression bomb is refused from its declared size.

Rejections carry a ``reason`` code; callers map it to their own shape (a
quarantine reason in the preference build, an HTTP status in serving).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

# What the cohort contract and the Serve API accept (ARCHITECTURE.md: PNG/JPEG).
ALLOWED_FORMATS = ("PNG", "JPEG")

# Reasons, in the order they are checked.
TOO_LARGE = "image_too_large"
UNSUPPORTED_FORMAT = "unsupported_image_format"
TOO_MANY_PIXELS = "too_many_pixels"
TRUNCATED = "truncated_image"
CORRUPT = "corrupt_image"
REASONS = (TOO_LARGE, UNSUPPORTED_FORMAT, TOO_MANY_PIXELS, TRUNCATED, CORRUPT)

# A PNG ends with its IEND chunk; PIL decodes files that lost only their tail
# without complaint, so the trailer is checked explicitly.
_PNG_TRAILER = b"IEND\xaeB`\x82"


@dataclass(frozen=True)
class ImageLimits:
    """What one image may be: bytes on disk, pixels (width x height), formats."""

    max_bytes: int = 5 * 2**20
    max_pixels: int = 4096 * 4096
    formats: tuple[str, ...] = ALLOWED_FORMATS


class ImageRejected(ValueError):
    """An image that cannot be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def check_size(num_bytes: int, limits: ImageLimits) -> None:
    """The byte limit, checkable from a file's size before it is read."""
    if num_bytes > limits.max_bytes:
        raise ImageRejected(TOO_LARGE, f"{num_bytes} bytes > max_image_bytes {limits.max_bytes}")


def open_rgb(data: bytes, limits: ImageLimits) -> Image.Image:
    """Bytes -> a decoded RGB PIL image, or :class:`ImageRejected` saying why not."""
    check_size(len(data), limits)
    try:
        with warnings.catch_warnings():
            # PIL warns (and above twice its own limit raises) on huge headers: ours is stricter.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # parses the header only
            _check_header(image, data, limits)
            image.load()
            return image.convert("RGB")
    except ImageRejected:
        raise
    except Image.DecompressionBombError:
        # PIL refuses headers over twice its own limit before we can read the size.
        raise ImageRejected(TOO_MANY_PIXELS, f"the header declares over {2 * Image.MAX_IMAGE_PIXELS} pixels "
                                             f"> max_image_pixels {limits.max_pixels}") from None
    except UnidentifiedImageError:
        raise ImageRejected(CORRUPT, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as err:
        text = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        reason = TRUNCATED if "truncated" in text.lower() else CORRUPT
        raise ImageRejected(reason, f"{type(err).__name__}: {text}") from None


def _check_header(image: Image.Image, data: bytes, limits: ImageLimits) -> None:
    if image.format not in limits.formats:
        raise ImageRejected(UNSUPPORTED_FORMAT, f"{image.format or 'unknown'}; allowed formats: "
                                                f"{', '.join(limits.formats)}")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageRejected(TOO_MANY_PIXELS, f"{width}x{height} > max_image_pixels {limits.max_pixels}")
    if image.format == "PNG" and not data.endswith(_PNG_TRAILER):
        raise ImageRejected(TRUNCATED, "PNG without its IEND trailer")


def decode_rgb(data: bytes, limits: ImageLimits) -> np.ndarray:
    """Bytes -> an HxWx3 uint8 RGB array, or :class:`ImageRejected`."""
    return np.asarray(open_rgb(data, limits), dtype=np.uint8)


def to_pil(image: Any, limits: ImageLimits | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image, encoded bytes (decoded with ``limits``) or an array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        return open_rgb(bytes(image), limits or ImageLimits())
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 uint8 (bilinear); the same array when already that size."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
