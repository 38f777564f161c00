"""Image files: content hashes and decoding with the failure recorded, never swallowed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from PIL import Image

__all__ = ["check_image", "file_hash", "open_image"]

_CHUNK = 1 << 20


def file_hash(path: str | os.PathLike[str]) -> str:
    """BLAKE2b-128 of the file's bytes (hex): the identity of an image in caches and manifests."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode fully (so truncated files fail here, not later) and return the image."""
    with Image.open(path) as image:
        image.load()
        return image.copy() if image.mode in ("RGB", "L") else image.convert("RGB")


def check_image(path: str | os.PathLike[str]) -> str | None:
    """None if the file decodes as an image, else the reason it does not."""
    try:
        open_image(Path(path))
    except Exception as exc:  # PIL raises many types for corrupt input
        return f"unreadable image ({type(exc).__name__}: {str(exc)[:120]})"
    return None
