"""Test-time prompt tuning (TPT, Shu et al. 2022) and its calibrated variants, batched over images.

Per test image (SPEC.md §7): the context is reset to its initial value ("a photo of a", 4 vectors),
the ``ratio`` lowest-entropy of the image's V views are kept, the loss is the entropy of their
*averaged* distribution plus the method's regulariser on the class text features (C-TPT:
``-lambda * ATFD``, O-TPT: ``lambda * orthogonality``, SoC: ``lambda * Huber``), one AdamW step
(lr 5e-3, weight decay 0.01) is taken from fresh optimiser state, and the prediction comes from
the original view (view 0) with the updated prompt.

Batching: B images are adapted at once with a context tensor of shape (B, n_ctx, W). The loss is
the *sum* of the per-image losses, so each image's gradient is its own; AdamW is elementwise, so
one AdamW over the stacked tensor is exactly B independent AdamW optimisers. Every image's update
is therefore the one it would get alone.

This module holds the algorithm on pre-computed view features; the CLI, view caching per
(image, view seed), presets and the benchmark come with the rest of the TPT issue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calibprompt import losses
from calibprompt.prompts import PromptLearner

__all__ = ["REGULARIZERS", "TPTConfig", "confident_views", "contexts_text_features", "tpt_adapt"]

#: method -> (loss name in calibprompt.losses.LOSSES); the sign comes from the registry.
REGULARIZERS = {"tpt": None, "ctpt": "atfd", "otpt": "orth", "otpt_fro": "orth_fro", "soc": "soc"}


@dataclass(frozen=True)
class TPTConfig:
    """TPT hyperparameters (SPEC.md §7 defaults) and the method's regulariser."""

    method: str = "tpt"
    lam: float = 0.0
    delta: float = 0.5
    selection: float = 0.1
    steps: int = 1
    lr: float = 5e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.method not in REGULARIZERS:
            raise ValueError(f"method: expected one of {sorted(REGULARIZERS)}, got {self.method!r}")
        if not 0.0 < self.selection <= 1.0:
            raise ValueError(f"selection: expected a fraction in (0, 1], got {self.selection}")


def confident_views(logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (B, k) of the ``k = max(1, floor(ratio * V))`` lowest-entropy views per image;
    ``logits`` is (B, V, C)."""
    v = logits.shape[1]
    k = max(1, int(ratio * v))
    log_p = F.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return entropy.topk(k, dim=1, largest=False).indices


def contexts_text_features(learner: PromptLearner, ctx: torch.Tensor) -> torch.Tensor:
    """Class text features (B, C, D) for B contexts (B, n_ctx, W) of a generic PromptLearner."""
    b, c = ctx.shape[0], len(learner.classnames)
    base = learner.base_embeddings.expand(b, -1, -1, -1)  # (B, C, L, W)
    index = learner.ctx_positions[None, :, :, None].expand(b, -1, -1, ctx.shape[-1])
    embeds = base.scatter(2, index, ctx[:, None].expand(-1, c, -1, -1))
    batch = learner.batch.select(torch.arange(c).repeat(b))
    dtype = next(learner.backbone.model.parameters()).dtype
    flat = embeds.reshape(b * c, *embeds.shape[2:]).to(dtype)
    return learner.backbone.encode_token_embeddings(flat, batch).view(b, c, -1)


def _image_losses(view_logits: torch.Tensor, text: torch.Tensor, config: TPTConfig) -> torch.Tensor:
    """Per-image loss (B,): marginal entropy of the confident views + the regulariser."""
    chosen = confident_views(view_logits.detach(), config.selection)
    picked = view_logits.gather(1, chosen[:, :, None].expand(-1, -1, view_logits.shape[-1]))
    per_image = torch.stack([losses.marginal_entropy(p) for p in picked])
    name = REGULARIZERS[config.method]
    if name is not None and config.lam != 0.0:
        spec = losses.LOSSES[name]
        kwargs = {"delta": config.delta} if name == "soc" else {}
        reg = torch.stack([spec.fn(t, **kwargs) for t in text])
        per_image = per_image + (-1.0 if spec.maximize else 1.0) * config.lam * reg
    return per_image


def tpt_adapt(
    learner: PromptLearner, view_features: torch.Tensor, config: TPTConfig = TPTConfig(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapt one context per image and classify the original view.

    ``view_features`` (B, V, D) are normalised image features with view 0 the original image.
    ``learner`` provides the initial (generic) context and the prompts. Returns the logits of
    view 0 under each image's adapted prompt (B, C) and the adapted contexts (B, n_ctx, W).
    """
    if learner.class_specific:
        raise ValueError("tpt_adapt: needs a generic (shared) initial context")
    if view_features.ndim != 3:
        raise ValueError(f"view_features: expected (B, V, D), got {tuple(view_features.shape)}")
    b = view_features.shape[0]
    scale = learner.backbone.logit_scale
    feats = view_features.to(learner.ctx.device, torch.float32)
    ctx = learner.ctx.detach()[None].repeat(b, 1, 1).requires_grad_(True)  # reset per image
    optimizer = torch.optim.AdamW([ctx], lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    for _ in range(config.steps):
        text = contexts_text_features(learner, ctx)
        view_logits = scale * torch.einsum("bvd,bcd->bvc", feats, text)
        loss = _image_losses(view_logits, text, config).sum()  # sum: each image keeps its gradient
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        text = contexts_text_features(learner, ctx)
        logits = scale * torch.einsum("bd,bcd->bc", feats[:, 0], text)
    return logits, ctx.detach()
