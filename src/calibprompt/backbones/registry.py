"""Backbone names -> loaders: ``load_backbone(name, weights=None, device="cpu")``.

Registered: ``plip``, ``quiltnet``, ``biomedclip``, ``medclip``, ``demo`` (the embedded demo
model) and ``clip:<open_clip architecture>``. ``weights`` is a hub id, a local directory or file,
or (for ``clip:``) a pretrained tag or ``"random"``; ``None`` means the family's default
(:data:`~calibprompt.backbones.sources.HUB_IDS`; the packaged files for ``demo``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from calibprompt.backbones.base import Backbone, BackboneLoadError
from calibprompt.backbones.demo import load_demo_backbone
from calibprompt.backbones.hf_clip import load_plip
from calibprompt.backbones.medclip import load_medclip
from calibprompt.backbones.openclip import load_biomedclip, load_open_clip, load_quiltnet
from calibprompt.backbones.sources import HUB_IDS

__all__ = [
    "BACKBONES",
    "OPEN_CLIP_ENTRY",
    "OPEN_CLIP_PREFIX",
    "BackboneInfo",
    "list_backbones",
    "load_backbone",
    "register_backbone",
]

#: ``clip:<architecture>`` loads any open_clip architecture; listed as :data:`OPEN_CLIP_ENTRY`.
OPEN_CLIP_PREFIX = "clip:"
OPEN_CLIP_ENTRY = f"{OPEN_CLIP_PREFIX}<open_clip model name>"


@dataclass(frozen=True)
class BackboneInfo:
    """A registered family: its loader, default weights (``None``: the loader's own default or
    none) and a one-line description."""

    name: str
    loader: Callable[..., Backbone]
    default_weights: str | None
    description: str


BACKBONES: dict[str, BackboneInfo] = {}


def register_backbone(name: str, loader: Callable[..., Backbone], default_weights: str | None,
                      description: str) -> None:
    """Add a backbone family: ``loader(weights=..., device=..., precision=..., **options)``."""
    BACKBONES[name] = BackboneInfo(name, loader, default_weights, description)


register_backbone("plip", load_plip, HUB_IDS["plip"], "PLIP: transformers CLIPModel, pathology")
register_backbone("quiltnet", load_quiltnet, HUB_IDS["quiltnet"], "QuiltNet-B-32: open_clip ViT-B/32, pathology")
register_backbone("biomedclip", load_biomedclip, HUB_IDS["biomedclip"],
                  "BiomedCLIP: open_clip ViT-B/16 + PubMedBERT, biomedical")
register_backbone("medclip", load_medclip, None, "MedCLIP-ViT: Swin-tiny + Bio_ClinicalBERT, chest X-ray")
register_backbone("demo", load_demo_backbone, None, "the embedded demo model (offline)")


def list_backbones() -> list[str]:
    """Registered names; ``clip:<name>`` accepts any architecture of ``open_clip.list_models()``."""
    return [*BACKBONES, OPEN_CLIP_ENTRY]


def load_backbone(
    name: str, weights: str | None = None, device: str | torch.device = "cpu",
    precision: str = "fp32", **options: Any,
) -> Backbone:
    """Load a frozen backbone by registered name (see :func:`list_backbones`)."""
    if not isinstance(name, str) or not name:
        raise BackboneLoadError(f"backbone: expected a name, got {name!r}")
    if name.startswith(OPEN_CLIP_PREFIX):
        arch = name[len(OPEN_CLIP_PREFIX):]
        if not arch:
            raise BackboneLoadError("backbone 'clip:': name an open_clip architecture, e.g. clip:ViT-B-32")
        return load_open_clip(arch, weights=weights, device=device, precision=precision, **options)
    if name not in BACKBONES:
        raise BackboneLoadError(f"backbone {name!r} is unknown; available: {', '.join(list_backbones())}")
    info = BACKBONES[name]
    weights = weights if weights is not None else info.default_weights
    return info.loader(weights=weights, device=device, precision=precision, **options)
