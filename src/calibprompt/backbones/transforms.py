"""Image preprocessing of each family, as picklable torchvision pipelines.

- CLIP-style (PLIP, QuiltNet, BiomedCLIP, open_clip): evaluation = resize the shorter side to
  ``size`` (bicubic) + centre crop + RGB + normalise with the checkpoint's mean/std -- open_clip's
  own evaluation transform; training = the prompt-tuning augmentation of CoOp / CalibPrompt,
  RandomResizedCrop(size, scale 0.08–1, bicubic) + horizontal flip.
- MedCLIP: grayscale, zero-padded to a square (at least ``size``), resized to ``size`` x ``size``
  (bilinear, as its evaluation dataset), normalised with its single-channel mean/std and repeated
  to 3 channels; training replaces the resize with the same RandomResizedCrop + flip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = [
    "MEDCLIP_MEAN",
    "MEDCLIP_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "AugMix",
    "clip_transform",
    "medclip_transform",
    "tpt_view_transform",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MEDCLIP_MEAN = 0.5862785803043838
MEDCLIP_STD = 0.27950088968644304

_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


class ToRGB:
    """Convert a PIL image to RGB (a class, not a function, so that its repr -- part of the
    feature-cache key -- is the same in every process)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


class PadToSquare:
    """Grayscale and zero-pad to a centred square of side ``max(min_size, width, height)``
    (MedCLIP's ``_pad_img``)."""

    def __init__(self, min_size: int = 224) -> None:
        self.min_size = min_size

    def __call__(self, image: Image.Image) -> Image.Image:
        image = image.convert("L")
        x, y = image.size
        size = max(self.min_size, x, y)
        canvas = Image.new("L", (size, size), 0)
        canvas.paste(image, (int((size - x) / 2), int((size - y) / 2)))
        return canvas

    def __repr__(self) -> str:
        return f"PadToSquare(min_size={self.min_size})"


class RepeatChannels:
    """(1, H, W) -> (3, H, W)."""

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.repeat(3, 1, 1) if tensor.shape[0] == 1 else tensor

    def __repr__(self) -> str:
        return "RepeatChannels()"


def _train_crop(size: int) -> list:
    return [T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip()]


def clip_transform(
    size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
    train: bool = False, interpolation: str = "bicubic",
) -> T.Compose:
    """CLIP-style preprocessing (see the module docstring)."""
    if train:
        geometry = _train_crop(size)
    else:
        geometry = [T.Resize(size, interpolation=_INTERPOLATION[interpolation]), T.CenterCrop(size)]
    return T.Compose([*geometry, ToRGB(), T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


def medclip_transform(size: int = 224, train: bool = False) -> T.Compose:
    """MedCLIP preprocessing (see the module docstring)."""
    geometry = _train_crop(size) if train else [T.Resize((size, size))]
    return T.Compose([PadToSquare(size), *geometry, T.ToTensor(),
                      T.Normalize((MEDCLIP_MEAN,), (MEDCLIP_STD,)), RepeatChannels()])


# -- test-time views (TPT, Shu et al. 2022) ----------------------------------------------------------
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
        from PIL import ImageOps

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


def _split_eval_transform(eval_transform: T.Compose) -> tuple[list, int, list]:
    """(ops before the resize, crop size, ops after the geometry) of a family's eval pipeline."""
    ops = list(getattr(eval_transform, "transforms", []))
    geometry = [i for i, op in enumerate(ops) if isinstance(op, T.Resize | T.CenterCrop)]
    if not geometry:
        raise ValueError(f"test-time views: cannot find the resize/crop in {eval_transform!r}")
    last = ops[geometry[-1]]
    size = last.size if isinstance(last.size, int) else last.size[0]
    if isinstance(size, Sequence):
        size = size[0]
    return ops[: geometry[0]], int(size), ops[geometry[-1] + 1 :]


def tpt_view_transform(eval_transform: T.Compose, augmix: bool = True) -> T.Compose:
    """Transform of TPT's augmented views (views 1..V-1; view 0 is ``eval_transform`` itself):
    the family's pre-geometry ops, ``RandomResizedCrop(size)`` (scale 0.08-1, bilinear, as TPT's
    ``get_preaugment``) + horizontal flip, then the family's tensor ops, through
    :class:`AugMix` (severity 1) when ``augmix``."""
    before, size, after = _split_eval_transform(eval_transform)
    crop = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    tensor = T.Compose(after)
    if augmix:
        return T.Compose([*before, *crop, AugMix(tensor)])
    return T.Compose([*before, *crop, *after])
