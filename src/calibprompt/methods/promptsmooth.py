"""PromptSmooth's test-time step (Hussein et al., MICCAI 2024), optionally calibration-aware.

Per test image, before it is certified: ``copies`` noisy copies of it at the certification σ
(their own seeded draws, disjoint from certification's), one AdamW step on a fresh copy of the
prompt context minimising the entropy of the *mean* softmax over all copies (no confident-view
selection), plus ``as_weight`` times the angular separation of the class text features (the
calibration-aware zero-shot version; SMAC needs labels). The prompt is reset for every image.

The certificate then covers the smoothed classifier of the prompt tuned on this image, around
this image -- not the map x' -> g_{θ(x')}(x'): a perturbed input would get another prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibprompt.losses import angular_separation
from calibprompt.prompts import PromptLearner

__all__ = ["TestTimeConfig", "adapt_to_noisy_copies"]


@dataclass(frozen=True)
class TestTimeConfig:
    """The published test-time step: 100 copies, one AdamW step at lr 5e-3 (weight decay 0.01,
    AdamW's default), no AS term."""

    copies: int = 100
    lr: float = 5e-3
    steps: int = 1
    as_weight: float = 0.0
    weight_decay: float = 0.01


def adapt_to_noisy_copies(learner: PromptLearner, initial_ctx: torch.Tensor, features: torch.Tensor,
                          scale: float, config: TestTimeConfig) -> torch.Tensor:
    """Reset ``learner.ctx`` to ``initial_ctx``, take ``config.steps`` AdamW steps (fresh state) on
    ``H(mean_k softmax(s · f_k · Tᵀ)) + as_weight · AS(T)`` over the copies' image features
    ``features`` (K, D), and return the tuned class text features T (C, D), without gradient."""
    with torch.no_grad():
        learner.ctx.copy_(initial_ctx)
    optimizer = torch.optim.AdamW([learner.ctx], lr=config.lr, weight_decay=config.weight_decay)
    feats = features.to(learner.ctx.device, torch.float32)
    for _ in range(config.steps):
        text = learner()
        mean = torch.softmax(scale * feats @ text.T, dim=-1).mean(0)
        loss = -(mean * torch.log(mean.clamp_min(1e-12))).sum()
        if config.as_weight:
            loss = loss + config.as_weight * angular_separation(text)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return learner().detach()
