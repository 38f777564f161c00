"""Each family's own image preprocessing (its evaluation transform), as picklable torchvision
pipelines whose reprs hold no object addresses (a repr is part of the feature-cache key).

- CLIP-style (PLIP, QuiltNet, BiomedCLIP, open_clip, the demo model): resize the shorter side to
  ``size`` (bicubic) + centre crop + RGB + normalise with the checkpoint's mean/std -- open_clip's
  own evaluation transform.
- MedCLIP: grayscale, zero-padded to a square (at least ``size``), resized to ``size`` x ``size``
  (bilinear, as its evaluation dataset), normalised with its single-channel mean/std and repeated
  to 3 channels.

Augmented views (the prompt-tuning crops, TPT's test-time views) are not built here: they come
from these pipelines in :mod:`calibprompt.data.views`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:
    from torchvision import transforms as T

__all__ = [
    "MEDCLIP_MEAN",
    "MEDCLIP_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PadToSquare",
    "RepeatChannels",
    "ToRGB",
    "clip_transform",
    "medclip_transform",
    "torchvision_transforms",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MEDCLIP_MEAN = 0.5862785803043838
MEDCLIP_STD = 0.27950088968644304



def torchvision_transforms():
    """``torchvision.transforms``, imported when the first pipeline is built: importing
    torchvision costs ~1.5 s (it loads torch._dynamo), which commands that never touch an image
    -- ``--help``, reports, metrics, every input error -- should not pay."""
    from torchvision import transforms

    return transforms


class ToRGB:
    """Convert a PIL image to RGB (a class, not a function, so that its repr -- part of the
    feature-cache key -- is the same in every process)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        """The image in RGB mode."""
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


class PadToSquare:
    """Grayscale and zero-pad to a centred square of side ``max(min_size, width, height)``
    (MedCLIP's ``_pad_img``)."""

    def __init__(self, min_size: int = 224) -> None:
        self.min_size = min_size

    def __call__(self, image: Image.Image) -> Image.Image:
        """The image in grayscale, centred on a black square."""
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
        """Three channels from one (others pass unchanged)."""
        return tensor.repeat(3, 1, 1) if tensor.shape[0] == 1 else tensor

    def __repr__(self) -> str:
        return "RepeatChannels()"


def clip_transform(
    size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
    interpolation: str = "bicubic",
) -> T.Compose:
    """CLIP-style evaluation preprocessing (see the module docstring)."""
    T = torchvision_transforms()
    modes = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
    return T.Compose([T.Resize(size, interpolation=modes[interpolation]), T.CenterCrop(size),
                      ToRGB(), T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


def medclip_transform(size: int = 224) -> T.Compose:
    """MedCLIP evaluation preprocessing (see the module docstring)."""
    T = torchvision_transforms()
    return T.Compose([PadToSquare(size), T.Resize((size, size)), T.ToTensor(),
                      T.Normalize((MEDCLIP_MEAN,), (MEDCLIP_STD,)), RepeatChannels()])
