"""H&E-like nucleus tiles for the 19 PanNuke tissue types (MINT application 2).

Each tissue has a fixed look (``LOOKS``): nucleus size and pleomorphism,
shape, density, hematoxylin and background colours, chromatin texture and
architecture (scattered cells, glands/follicles around a lumen, layers). Tiles
add stain, density and placement variation on top. The values are plausible
caricatures (spindle nuclei in uterus and ovarian stroma, large vesicular
nuclei in liver, dense small nuclei in skin's basal layer), not measurements.
The student sees the image only, so tiles carry no note.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from mint_ray.data import Case, LabelInfo, images
from mint_ray.tasks import TISSUE_TYPES
from mint_ray.tasks.tissue_type import tissue_id

GENERATOR = "tissue_type/1"
Layout = Literal["scattered", "glands", "layers"]


@dataclass(frozen=True)
class TissueLook:
    """How a tissue's nuclei look; sizes are shares of the tile side, density per tile."""

    radius: float
    pleomorphism: float  # coefficient of variation of the radius
    roundness: float  # minor / major axis: 1 round, ~0.4 spindle
    density: float  # nuclei per tile
    nucleus: images.RGB
    background: images.RGB
    chromatin: float  # 0 smooth and dark, 1 coarse and speckled (vesicular)
    layout: Layout


LOOKS: dict[str, TissueLook] = {
    "Adrenal Glands": TissueLook(0.030, 0.15, 0.85, 45, (95, 60, 140), (235, 200, 215), 0.30, "scattered"),
    "Bile Duct": TissueLook(0.024, 0.12, 0.80, 60, (70, 45, 130), (225, 160, 190), 0.25, "glands"),
    "Bladder": TissueLook(0.030, 0.20, 0.70, 80, (85, 55, 140), (220, 165, 195), 0.40, "layers"),
    "Breast": TissueLook(0.036, 0.30, 0.75, 65, (80, 45, 135), (230, 170, 200), 0.50, "scattered"),
    "Cervix": TissueLook(0.034, 0.22, 0.80, 55, (90, 60, 150), (225, 150, 185), 0.45, "layers"),
    "Colon": TissueLook(0.028, 0.15, 0.40, 90, (60, 35, 115), (215, 140, 180), 0.20, "glands"),
    "Esophagus": TissueLook(0.032, 0.15, 0.85, 50, (100, 65, 150), (240, 150, 180), 0.35, "layers"),
    "Head & Neck": TissueLook(0.040, 0.35, 0.80, 55, (85, 50, 140), (235, 160, 185), 0.60, "scattered"),
    "Kidney": TissueLook(0.026, 0.12, 0.90, 55, (75, 50, 135), (240, 215, 225), 0.30, "glands"),
    "Liver": TissueLook(0.036, 0.12, 0.95, 30, (100, 60, 145), (220, 120, 160), 0.70, "scattered"),
    "Lung": TissueLook(0.028, 0.25, 0.60, 35, (80, 55, 135), (235, 190, 210), 0.30, "scattered"),
    "Ovarian": TissueLook(0.026, 0.15, 0.45, 85, (70, 45, 130), (220, 165, 195), 0.25, "scattered"),
    "Pancreatic": TissueLook(0.025, 0.12, 0.85, 75, (65, 40, 125), (200, 130, 185), 0.30, "glands"),
    "Prostate": TissueLook(0.027, 0.12, 0.85, 60, (80, 55, 140), (235, 200, 215), 0.35, "glands"),
    "Skin": TissueLook(0.024, 0.15, 0.70, 95, (60, 35, 110), (235, 165, 190), 0.20, "layers"),
    "Stomach": TissueLook(0.029, 0.18, 0.70, 70, (75, 50, 135), (220, 155, 195), 0.30, "glands"),
    "Testis": TissueLook(0.038, 0.15, 0.95, 100, (90, 55, 150), (225, 170, 200), 0.60, "scattered"),
    "Thyroid": TissueLook(0.024, 0.08, 0.95, 60, (65, 40, 120), (240, 150, 180), 0.15, "glands"),
    "Uterus": TissueLook(0.026, 0.15, 0.35, 70, (75, 50, 135), (225, 145, 180), 0.30, "layers"),
}


# ----------------------------------------------------------------- placing nuclei


def _scattered(n: int, w: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Uniform centres, random orientations."""
    return rng.uniform(0, w, (n, 2)), rng.uniform(0, math.pi, n)


def _layers(n: int, w: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Centres on parallel bands (epithelial layers, muscle bundles), aligned with them."""
    theta = rng.uniform(0, math.pi)
    spacing = w * rng.uniform(0.16, 0.24)
    # Bands are laid over a square of half-side 0.72 w, which covers the tile at
    # any angle; 3n candidates leave n inside the tile (it is ~48% of that square).
    along = rng.uniform(-0.72 * w, 0.72 * w, 3 * n)
    across = np.round(rng.uniform(-0.72 * w, 0.72 * w, 3 * n) / spacing) * spacing
    across += rng.normal(0.0, 0.08 * spacing, 3 * n)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    centres = np.stack([w / 2 + along * cos_t - across * sin_t,
                        w / 2 + along * sin_t + across * cos_t], axis=1)
    centres = centres[((centres >= 0) & (centres < w)).all(axis=1)][:n]
    return centres, theta + rng.normal(0.0, 0.15, len(centres))


def _gland_rings(w: float, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """A few lumens (glands, tubules, follicles) as (x, y, radius)."""
    return [(float(rng.uniform(0.15, 0.85) * w), float(rng.uniform(0.15, 0.85) * w),
             float(rng.uniform(0.10, 0.18) * w)) for _ in range(int(rng.integers(2, 5)))]


def _glands(n: int, w: float, rings: list[tuple[float, float, float]],
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Most nuclei line the lumens, pointing at their centre; the rest sit in stroma."""
    on_ring = int(0.7 * n)
    which = rng.integers(len(rings), size=on_ring)
    phi = rng.uniform(0, 2 * math.pi, on_ring)
    ring = np.asarray(rings)[which]
    radius = ring[:, 2] * rng.normal(1.0, 0.05, on_ring)
    lined = np.stack([ring[:, 0] + radius * np.cos(phi), ring[:, 1] + radius * np.sin(phi)], axis=1)
    stroma, stroma_angles = _scattered(n - on_ring, w, rng)
    return np.concatenate([lined, stroma]), np.concatenate([phi, stroma_angles])


# ----------------------------------------------------------------- one tile


def render_tile(look: TissueLook, size: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """An RGB tile of ``look`` with stain and placement variation; returns (pixels, nuclei)."""
    # Stain batches differ: scale both colours together by a few percent.
    stain = rng.normal(1.0, 0.04, 3)
    background = _stained(look.background, stain)
    nucleus = _stained(look.nucleus, stain)
    img, draw = images.canvas(size, background)
    w = float(img.width)
    mask = Image.new("L", img.size, 0)
    mask_draw = ImageDraw.Draw(mask)

    n = max(1, int(rng.poisson(look.density * rng.uniform(0.75, 1.25))))
    if look.layout == "glands":
        rings = _gland_rings(w, rng)
        lumen = images.shade(background, 0.6)
        for x, y, r in rings:
            draw.ellipse([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], fill=lumen)
        centres, angles = _glands(n, w, rings, rng)
    elif look.layout == "layers":
        centres, angles = _layers(n, w, rng)
    else:
        centres, angles = _scattered(n, w, rng)

    # One radius per centre actually placed: a layout may place fewer than n.
    radii = look.radius * w * rng.lognormal(0.0, look.pleomorphism, len(centres))
    for (x, y), r, angle in zip(centres, radii, angles, strict=True):
        ry = r * look.roundness * rng.uniform(0.9, 1.1)
        points = images.ellipse_points(float(x), float(y), float(r), float(ry), float(angle), n=12)
        shade = float(rng.normal(0.0, 0.08))
        draw.polygon(points, fill=images.shade(nucleus, shade))
        mask_draw.polygon(points, fill=255)

    pixels = images.downsample(img, size)
    inside = images.downsample(mask, size)[..., None] / 255.0
    # Chromatin: grainy intensity inside nuclei only, coarser for vesicular nuclei.
    grain = rng.normal(0.0, 45.0 * look.chromatin, pixels.shape[:2])[..., None]
    return images.to_uint8(pixels + inside * grain, rng, 4.0), len(centres)


def _stained(color: images.RGB, stain: np.ndarray) -> images.RGB:
    r, g, b = (int(v) for v in np.clip(np.rint(np.asarray(color) * stain), 0, 255))
    return (r, g, b)


class TissueTypeGenerator:
    """Nucleus tiles of the 19 tissue types, all of them labels."""

    def __init__(self, image_size: int) -> None:
        self._image_size = image_size

    @property
    def catalog(self) -> list[LabelInfo]:
        return [LabelInfo(name, tissue_id(name)) for name in TISSUE_TYPES]

    def describe(self) -> dict[str, Any]:
        return {"generator": GENERATOR}

    def case(self, label_index: int, rng: np.random.Generator) -> Case:
        name = TISSUE_TYPES[label_index]
        look = LOOKS[name]
        pixels, n_nuclei = render_tile(look, self._image_size, rng)
        meta = {"generator": GENERATOR, "label_id": tissue_id(name), "n_nuclei": n_nuclei}
        return Case(LabelInfo(name, tissue_id(name)), None, pixels, meta)
