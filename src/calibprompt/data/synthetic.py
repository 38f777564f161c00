"""Small image trees in a dataset's real on-disk layout (tests, benchmarks, the demo)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from calibprompt.data.datasets import DATASETS

__all__ = ["make_dataset_tree", "write_image"]


def write_image(path: Path, seed: int, size: int = 32, fmt: str | None = None) -> Path:
    """A random RGB image (uniform noise, per-seed tint) saved in the format of its suffix."""
    rng = np.random.default_rng(seed)
    tint = rng.integers(0, 256, 3)
    pixels = (rng.integers(0, 256, (size, size, 3)) * 0.5 + tint * 0.5).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_dataset_tree(
    root: Path, name: str, per_class: dict[str, int] | Sequence[int] = (6, 6),
    splits: Sequence[str] = ("train", "test"), size: int = 32, seed: int = 0,
    shuffle_creation: bool = True, classnames_file: bool = True, suffix: str = ".png",
) -> Path:
    """``root/<dir>/images/<split>/<class_folder>/img_XXX<suffix>`` for a registered dataset,
    plus ``classnames.txt``. Files are created in a shuffled order when ``shuffle_creation``
    (so directory listing order differs from sorted order). Returns ``root/<dir>``."""
    spec = DATASETS[name]
    base = root / spec.directory
    folders = list(spec.classes)
    counts = per_class if isinstance(per_class, dict) else dict(zip(folders, per_class, strict=False))
    jobs = [(split, folder, i) for split in splits for folder in folders for i in range(counts.get(folder, 0))]
    if shuffle_creation:
        random.Random(seed).shuffle(jobs)
    for n, (split, folder, i) in enumerate(jobs):
        write_image(base / "images" / split / folder / f"img_{i:03d}{suffix}", seed * 100003 + n, size)
    for split in splits:
        for folder in folders:
            (base / "images" / split / folder).mkdir(parents=True, exist_ok=True)
    if classnames_file:
        lines = [f"{folder} {spec.classes[folder]}" for folder in folders]
        (base / "classnames.txt").write_text("\n".join(lines) + "\n")
    return base
