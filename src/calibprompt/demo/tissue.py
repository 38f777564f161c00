"""Procedural H&E-like tissue patches for the embedded demo.

Each patch is rendered from a few latent quantities -- nuclei density and size, fibre strength
and orientation, vacuole (fat) fraction, stain intensity -- whose class-conditional distributions
overlap, so some patches of one class look like another: zero-shot classification works but is
imperfect, and a tuned prompt has something to calibrate. Everything is a pure function of the
seed (NumPy ``default_rng``), vectorised over a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["CAPTION_TEMPLATES", "CLASSES", "render_batch", "sample_latents", "write_demo_dataset"]

#: folder -> class name used in prompts (label order = sorted folders).
CLASSES = {
    "ADI": "adipose tissue",
    "LYM": "lymphocytes",
    "STR": "cancer-associated stroma",
    "TUM": "colorectal adenocarcinoma epithelium",
}
#: caption templates of the pre-training corpus (the zero-shot template is the first).
CAPTION_TEMPLATES = (
    "An H&E image of {}.",
    "a histology patch of {}.",
    "{} in an H&E stained section.",
    "microscopy of {}.",
)

# class-conditional means of (nuclei density, nuclei size, fibre strength, fat fraction, stain)
_MEANS = np.array([
    [0.10, 0.30, 0.15, 0.75, 0.35],   # ADI: fat vacuoles, few nuclei
    [0.85, 0.25, 0.10, 0.05, 0.80],   # LYM: dense small dark nuclei
    [0.25, 0.35, 0.80, 0.10, 0.45],   # STR: fibres
    [0.60, 0.70, 0.30, 0.10, 0.65],   # TUM: large nuclei, some fibres
])
_SPREAD = 0.16


@dataclass(frozen=True)
class Latents:
    density: np.ndarray
    size: np.ndarray
    fibre: np.ndarray
    fat: np.ndarray
    stain: np.ndarray
    angle: np.ndarray


def sample_latents(labels: np.ndarray, rng: np.random.Generator, spread: float = _SPREAD) -> Latents:
    """Class-conditional latents with Gaussian spread (clipped to [0, 1])."""
    z = np.clip(_MEANS[labels] + rng.normal(0.0, spread, (len(labels), 5)), 0.0, 1.0)
    return Latents(*z.T, angle=rng.uniform(0, np.pi, len(labels)))


def render_batch(latents: Latents, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """uint8 images (B, size, size, 3) of the latents."""
    b = len(latents.density)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # eosin background with a little texture
    base = np.array([232, 170, 205], np.float32)
    img = np.broadcast_to(base, (b, size, size, 3)).copy()
    img += rng.normal(0, 6, (b, size, size, 1)).astype(np.float32)
    # fibres: oriented sinusoidal stripes, darker pink
    ang = latents.angle[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, (b, 1, 1))
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * 5 * (xx * np.cos(ang) + yy * np.sin(ang)) + phase)
    fib = (latents.fibre[:, None, None] * stripes)[..., None]
    img = img * (1 - 0.45 * fib) + np.array([200, 90, 150], np.float32) * 0.45 * fib
    # fat vacuoles: white discs
    n_vac = 6
    cy, cx = rng.uniform(0, 1, (2, b, n_vac, 1, 1))
    radius = (0.06 + 0.22 * latents.fat[:, None, None, None]) * rng.uniform(0.7, 1.3, (b, n_vac, 1, 1))
    inside = ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2).any(axis=1)
    vac = (inside & (rng.uniform(0, 1, (b, 1, 1)) < 0.2 + 0.8 * latents.fat[:, None, None]))[..., None]
    img = np.where(vac, np.array([248, 244, 248], np.float32), img)
    # nuclei: dark purple dots, count ~ density, radius ~ size
    n_max = 40
    count = (latents.density * n_max).astype(int)
    ny, nx = rng.uniform(0, 1, (2, b, n_max, 1, 1))
    r = (0.02 + 0.05 * latents.size[:, None, None, None]) * rng.uniform(0.8, 1.2, (b, n_max, 1, 1))
    active = (np.arange(n_max)[None, :] < count[:, None])[:, :, None, None]
    nuclei = (((yy - ny) ** 2 + (xx - nx) ** 2 < r**2) & active).any(axis=1)[..., None]
    hema = np.array([95, 50, 140], np.float32) * (1.25 - 0.5 * latents.stain[:, None, None, None])
    img = np.where(nuclei, hema, img)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_demo_dataset(
    root: Path, per_class: dict[str, int] | None = None, size: int = 32, seed: int = 0,
) -> Path:
    """The demo dataset in the BAPLe layout: ``root/demo/images/{train,test}/<class>/*.png``
    plus ``classnames.txt``. Returns ``root/demo``."""
    per_class = per_class or {"train": 40, "test": 150}
    base = Path(root) / "demo"
    folders = sorted(CLASSES)
    for s, (split, n) in enumerate(sorted(per_class.items())):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 17, s]))
        labels = np.repeat(np.arange(len(folders)), n)
        images = render_batch(sample_latents(labels, rng), rng, size)
        for i, (label, pixels) in enumerate(zip(labels, images, strict=True)):
            path = base / "images" / split / folders[label] / f"{folders[label].lower()}_{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    (base / "classnames.txt").write_text("".join(f"{f} {CLASSES[f]}\n" for f in folders))
    return base
