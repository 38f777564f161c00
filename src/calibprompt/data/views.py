"""Augmented views of an image, built from a backbone's own evaluation transform.

A backbone only knows its preprocessing (``backbone.image_transform()``: resize/crop to its
resolution, its normalisation). Every augmentation is built here from that pipeline: the ops
before its resize/crop (e.g. MedCLIP's grey padding), its crop size, and the tensor ops after it
(to-RGB, to-tensor, normalise) are kept; only the geometry is replaced.

- ``kind="train"`` (:func:`train_view_transform`): the prompt-tuning augmentation of CoOp /
  CalibPrompt, ``RandomResizedCrop(size, scale 0.08-1, bicubic)`` + horizontal flip.
- ``kind="test_time"`` (:func:`tpt_view_transform`): TPT's views (Shu et al. 2022),
  ``RandomResizedCrop(size)`` (scale 0.08-1, bilinear, as TPT's ``get_preaugment``) + horizontal
  flip, through :class:`AugMix` (severity 1).

View ``v`` of an image runs under the torch seed :func:`view_seed` (image hash, v, augmentation
seed), so it is the same crop on every machine, in every worker, in any order, and for every
backbone with the same preprocessing. Every op has a repr without object addresses: the repr is
part of the feature-cache key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from torchvision import transforms as T


def torchvision_transforms():
    """``torchvision.transforms``, imported when the first view pipeline is built (importing
    torchvision costs ~1.5 s, which commands that never touch an image should not pay)."""
    from torchvision import transforms

    return transforms

__all__ = [
    "VIEW_KINDS",
    "AugMix",
    "SeededViews",
    "tpt_view_transform",
    "train_view_transform",
    "view_seed",
    "view_transform",
]

#: The kinds of augmented views: prompt-tuning training crops and TPT's test-time views.
VIEW_KINDS = ("train", "test_time")


def view_seed(image_hash: str, view: int, aug_seed: int) -> int:
    """The torch seed of augmentation view ``view`` of an image (63-bit, from BLAKE2b)."""
    digest = hashlib.blake2b(f"{image_hash}|{view}|{aug_seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# -- AugMix ----------------------------------------------------------------------------------------
def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _signed(value: float) -> float:
    return -value if float(torch.rand(())) > 0.5 else value


class AugMix:
    """AugMix (Hendrycks et al. 2020) as TPT applies it to a pre-cropped PIL image.

    ``width`` chains of 1-3 operations drawn uniformly from :attr:`OPERATIONS`, each at a
    magnitude ``level ~ U(0.1, severity)`` on AugMix's 0-10 scale; chain weights
    ``w ~ Dirichlet(1, ..., 1)``, skip weight ``m ~ Beta(1, 1)``; the result is
    ``m * preprocess(x) + (1 - m) * sum_i w_i * preprocess(chain_i(x))``. Every random draw comes
    from torch's global generator, so a seeded view is reproducible.
    """

    OPERATIONS = ("autocontrast", "equalize", "posterize", "rotate", "solarize",
                  "shear_x", "shear_y", "translate_x", "translate_y")

    def __init__(self, preprocess: Callable[[Any], torch.Tensor], severity: int = 1, width: int = 3) -> None:
        self.preprocess, self.severity, self.width = preprocess, int(severity), int(width)

    def _operate(self, name: str, image: Image.Image) -> Image.Image:
        level = _uniform(0.1, self.severity)  # AugMix's sample_level
        w, h = image.size
        if name == "autocontrast":
            return ImageOps.autocontrast(image)
        if name == "equalize":
            return ImageOps.equalize(image)
        if name == "posterize":
            return ImageOps.posterize(image, 4 - int(level * 4 / 10))
        if name == "solarize":
            return ImageOps.solarize(image, 256 - int(level * 256 / 10))
        if name == "rotate":
            return image.rotate(_signed(int(level * 30 / 10)), resample=Image.BILINEAR)
        if name.startswith("shear"):
            s = _signed(level * 0.3 / 10)
            matrix = (1, s, 0, 0, 1, 0) if name == "shear_x" else (1, 0, 0, s, 1, 0)
        else:
            t = _signed(int(level * (w if name == "translate_x" else h) / 3 / 10))
            matrix = (1, 0, t, 0, 1, 0) if name == "translate_x" else (1, 0, 0, 0, 1, t)
        return image.transform(image.size, Image.AFFINE, matrix, resample=Image.BILINEAR)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        clean = self.preprocess(image)
        exp = -torch.log(torch.rand(self.width).clamp_min(1e-12))
        weights = (exp / exp.sum()).tolist()  # Dirichlet(1, ..., 1)
        skip = float(torch.rand(()))  # Beta(1, 1)
        mix = torch.zeros_like(clean)
        for weight in weights:
            chained = image
            for _ in range(int(torch.randint(1, 4, ()))):
                name = self.OPERATIONS[int(torch.randint(len(self.OPERATIONS), ()))]
                chained = self._operate(name, chained)
            mix += weight * self.preprocess(chained)
        return skip * clean + (1 - skip) * mix

    def __repr__(self) -> str:
        return f"AugMix(severity={self.severity}, width={self.width}, preprocess={self.preprocess!r})"


# -- view transforms -------------------------------------------------------------------------------
def _split_eval_transform(eval_transform: T.Compose) -> tuple[list, int, list]:
    """(ops before the resize, crop size, ops after the geometry) of a backbone's eval pipeline."""
    ops = list(getattr(eval_transform, "transforms", []))
    T = torchvision_transforms()
    geometry = [i for i, op in enumerate(ops) if isinstance(op, T.Resize | T.CenterCrop)]
    if not geometry:
        raise ValueError(f"augmented views: cannot find the resize/crop in {eval_transform!r}")
    last = ops[geometry[-1]]
    size = last.size if isinstance(last.size, int) else last.size[0]
    if isinstance(size, Sequence):
        size = size[0]
    return ops[: geometry[0]], int(size), ops[geometry[-1] + 1 :]


def _augmented(eval_transform: T.Compose, crop: list, augmix: bool) -> T.Compose:
    """``eval_transform`` with its resize/crop replaced by ``crop``, the tensor ops through
    :class:`AugMix` when ``augmix``."""
    T = torchvision_transforms()
    before, _, after = _split_eval_transform(eval_transform)
    if augmix:
        return T.Compose([*before, *crop, AugMix(T.Compose(after))])
    return T.Compose([*before, *crop, *after])


def train_view_transform(eval_transform: T.Compose, augmix: bool = False) -> T.Compose:
    """Transform of the prompt-tuning training views: the backbone's pre-geometry ops,
    ``RandomResizedCrop(size, scale 0.08-1, bicubic)`` + horizontal flip (CoOp / CalibPrompt),
    then its tensor ops (through :class:`AugMix` when ``augmix``)."""
    _, size, _ = _split_eval_transform(eval_transform)
    T = torchvision_transforms()
    crop = [T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip()]
    return _augmented(eval_transform, crop, augmix)


def tpt_view_transform(eval_transform: T.Compose, augmix: bool = True) -> T.Compose:
    """Transform of TPT's augmented views (views 1..V-1; view 0 is ``eval_transform`` itself):
    the backbone's pre-geometry ops, ``RandomResizedCrop(size)`` (scale 0.08-1, bilinear, as TPT's
    ``get_preaugment``) + horizontal flip, then its tensor ops, through :class:`AugMix`
    (severity 1) when ``augmix``."""
    _, size, _ = _split_eval_transform(eval_transform)
    T = torchvision_transforms()
    return _augmented(eval_transform, [T.RandomResizedCrop(size), T.RandomHorizontalFlip()], augmix)


def view_transform(kind: str, eval_transform: T.Compose, augmix: bool | None = None) -> T.Compose:
    """The augmentation of ``kind`` (see :data:`VIEW_KINDS`) built from ``eval_transform``;
    ``augmix=None`` takes the kind's published default (train: off, test_time: on)."""
    if kind == "train":
        return train_view_transform(eval_transform, augmix=bool(augmix))
    if kind == "test_time":
        return tpt_view_transform(eval_transform, augmix=True if augmix is None else augmix)
    raise ValueError(f"views: kind must be one of {VIEW_KINDS}, got {kind!r}")


class SeededViews:
    """Augmented views drawn as training needs them (when they cannot be cached): the images are
    decoded once and kept in memory (few-shot sets are small); view ``epoch`` of image i is
    ``transform`` run under the torch seed :func:`view_seed` (image hash, epoch, ``seed``) -- the
    same seed the cached view bank gives its view ``epoch``."""

    def __init__(self, paths: Sequence[Any], transform: Callable[[Any], torch.Tensor], seed: int) -> None:
        from calibprompt.data.images import file_hash, open_image

        self.images = [open_image(p) for p in paths]
        self.hashes = [file_hash(p) for p in paths]
        self.transform, self.seed = transform, int(seed)

    def __call__(self, indices: Sequence[int], epoch: int) -> torch.Tensor:
        """The views (B, ...) of images ``indices`` for ``epoch``."""
        out = []
        for i in indices:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(self.hashes[int(i)], epoch, self.seed))
                out.append(self.transform(self.images[int(i)]))
        return torch.stack(out)
