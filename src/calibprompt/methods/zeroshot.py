"""Zero-shot classification: class text features from templates, logits with the backbone's scale.

With several templates the class feature is the normalised mean of the normalised template
features (the prompt ensemble of Radford et al. 2021).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from calibprompt.backbones.base import Backbone
from calibprompt.prompts import check_distinct_prompts

__all__ = ["zeroshot_logits", "zeroshot_text_features"]


@torch.no_grad()
def zeroshot_text_features(backbone: Backbone, classnames: Sequence[str],
                           templates: Sequence[str]) -> torch.Tensor:
    """(C, D) L2-normalised class features from ``templates`` (each with one ``{}``)."""
    if not templates:
        raise ValueError("templates: expected at least one template with a '{}'")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"templates: each needs exactly one '{{}}', got {bad}")
    for t in templates:
        check_distinct_prompts(backbone.tokenize([t.format(name) for name in classnames]), classnames, backbone.name)
    prompts = [t.format(name) for name in classnames for t in templates]
    feats = backbone.encode_texts(prompts).view(len(classnames), len(templates), -1)
    return F.normalize(feats.mean(dim=1), dim=-1)


def zeroshot_logits(image_features: torch.Tensor, text_features: torch.Tensor,
                    logit_scale: float) -> torch.Tensor:
    """``s * F T^T`` of normalised image features F (N, D) and class features T (C, D)."""
    return logit_scale * image_features @ text_features.to(image_features.dtype).T
