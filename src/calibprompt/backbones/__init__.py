"""Frozen vision-language backbones behind one interface (see :mod:`calibprompt.backbones.base`)."""

from calibprompt.backbones.base import PRECISIONS, Backbone, BackboneLoadError, TokenBatch
from calibprompt.backbones.registry import (
    BACKBONES,
    list_backbones,
    load_backbone,
    register_backbone,
)

__all__ = [
    "BACKBONES",
    "PRECISIONS",
    "Backbone",
    "BackboneLoadError",
    "TokenBatch",
    "list_backbones",
    "load_backbone",
    "register_backbone",
]
