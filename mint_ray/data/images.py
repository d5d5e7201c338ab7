"""Small PIL/numpy helpers shared by the face and nucleus renderers.

Shapes are drawn on a canvas ``SUPERSAMPLE`` times larger than the output and
box-filtered down: at 64x64 an aliased ellipse edge would move by whole
pixels and drown the sub-pixel differences the labels are made of.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 2

RGB = tuple[int, int, int]


def canvas(size: int, background: RGB) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """An RGB canvas ``SUPERSAMPLE * size`` pixels wide and a drawer on it."""
    image = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), background)
    return image, ImageDraw.Draw(image)


def ellipse_points(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0,
                   n: int = 16) -> list[tuple[float, float]]:
    """A rotated ellipse as a polygon (PIL's ``ellipse`` cannot rotate)."""
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    points = []
    for k in range(n):
        t = 2.0 * math.pi * k / n
        x, y = rx * math.cos(t), ry * math.sin(t)
        points.append((cx + x * cos_a - y * sin_a, cy + x * sin_a + y * cos_a))
    return points


def shade(color: RGB, amount: float) -> RGB:
    """``color`` moved towards white (amount > 0) or black (amount < 0), clipped to a byte."""
    target = 255.0 if amount > 0 else 0.0
    k = min(abs(amount), 1.0)
    r, g, b = (round(c + (target - c) * k) for c in color)
    return (r, g, b)


def random_rgb(rng: np.random.Generator, low: int, high: int) -> RGB:
    """A colour with each channel uniform in [low, high)."""
    r, g, b = (int(v) for v in rng.integers(low, high, 3))
    return (r, g, b)


def downsample(image: Image.Image, size: int) -> np.ndarray:
    """Box-filter a supersampled canvas to ``size`` pixels; float32 array (H, W[, C])."""
    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.float32)


def to_uint8(pixels: np.ndarray, rng: np.random.Generator, noise_sigma: float) -> np.ndarray:
    """Add sensor-like Gaussian noise and round to bytes."""
    noisy = pixels + rng.normal(0.0, noise_sigma, pixels.shape) if noise_sigma > 0 else pixels
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array; a fixed compression level keeps bytes reproducible."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
