"""Backbone names -> loaders: ``load_backbone(name, weights=None, device="cpu")``.

Registered: ``plip``, ``quiltnet``, ``biomedclip``, ``medclip``, ``clip:<open_clip architecture>``
and ``demo`` (the embedded demo model). ``weights`` is a hub id, a local directory or file, or
(for ``clip:``) a pretrained tag or ``"random"``; ``None`` means the family's default hub id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from calibprompt.backbones.base import Backbone, BackboneLoadError

__all__ = ["BACKBONES", "BackboneInfo", "list_backbones", "load_backbone", "register_backbone"]


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    loader: Callable[..., Backbone]
    default_weights: str | None
    description: str


BACKBONES: dict[str, BackboneInfo] = {}


def register_backbone(name: str, loader: Callable[..., Backbone], default_weights: str | None,
                      description: str) -> None:
    """Add a backbone family: ``loader(weights=..., device=..., precision=..., **options)``."""
    BACKBONES[name] = BackboneInfo(name, loader, default_weights, description)


def _plip(**kw: Any) -> Backbone:
    from calibprompt.backbones.hf_clip import load_plip

    return load_plip(**kw)


def _quiltnet(**kw: Any) -> Backbone:
    from calibprompt.backbones.openclip import load_quiltnet

    return load_quiltnet(**kw)


def _biomedclip(**kw: Any) -> Backbone:
    from calibprompt.backbones.openclip import load_biomedclip

    return load_biomedclip(**kw)


def _medclip(**kw: Any) -> Backbone:
    from calibprompt.backbones.medclip import load_medclip

    return load_medclip(**kw)


def _demo(**kw: Any) -> Backbone:
    try:
        from calibprompt.demo.model import load_demo_backbone
    except ImportError as exc:
        raise BackboneLoadError("backbone 'demo': the embedded demo model is not part of this "
                                "build yet") from exc
    return load_demo_backbone(**kw)


register_backbone("plip", _plip, "vinid/plip", "PLIP: transformers CLIPModel, pathology")
register_backbone("quiltnet", _quiltnet, "hf-hub:wisdomik/QuiltNet-B-32",
                  "QuiltNet-B-32: open_clip ViT-B/32, pathology")
register_backbone("biomedclip", _biomedclip,
                  "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
                  "BiomedCLIP: open_clip ViT-B/16 + PubMedBERT, biomedical")
register_backbone("medclip", _medclip, None, "MedCLIP-ViT: Swin-tiny + Bio_ClinicalBERT, chest X-ray")
register_backbone("demo", _demo, None, "the embedded demo model (offline)")


def list_backbones() -> list[str]:
    """Registered names; ``clip:<name>`` accepts any architecture of ``open_clip.list_models()``."""
    return [*BACKBONES, "clip:<open_clip model name>"]


def load_backbone(
    name: str, weights: str | None = None, device: str | torch.device = "cpu",
    precision: str = "fp32", **options: Any,
) -> Backbone:
    """Load a frozen backbone by registered name (see :func:`list_backbones`)."""
    if not isinstance(name, str) or not name:
        raise BackboneLoadError(f"backbone: expected a name, got {name!r}")
    if name.startswith("clip:"):
        from calibprompt.backbones.openclip import load_open_clip

        arch = name[len("clip:"):]
        if not arch:
            raise BackboneLoadError("backbone 'clip:': name an open_clip architecture, e.g. clip:ViT-B-32")
        return load_open_clip(arch, weights=weights, device=device, precision=precision, **options)
    if name not in BACKBONES:
        raise BackboneLoadError(f"backbone {name!r} is unknown; available: {', '.join(list_backbones())}")
    return BACKBONES[name].loader(weights=weights, device=device, precision=precision, **options)
