"""Test-time prompt tuning (TPT, Shu et al. 2022) and its calibrated variants, batched over images.

Per test image (the protocol of TPT, Shu et al. 2022): the context is reset to its initial value ("a photo of a", 4 vectors),
the ``ratio`` lowest-entropy of the image's V views are kept, the loss is the entropy of their
*averaged* distribution plus the method's regulariser on the class text features (C-TPT:
``-lambda * ATFD``, O-TPT: ``lambda * orthogonality``, SoC: ``lambda * Huber``, A-TPT:
``-lambda * angular diversity``), one AdamW step
(lr 5e-3, weight decay 0.01) is taken from fresh optimiser state, and the prediction comes from
the original view (view 0) with the updated prompt. With several steps the confident views are
selected once, at the first step (under the initial context), and reused at every later step, as
the published code does (its ``selected_idx``); ``reselect=True`` re-selects them at every step,
a different algorithm under its own name.

Batching: B images are adapted at once with a context tensor of shape (B, n_ctx, W). The loss is
the *sum* of the per-image losses, so each image's gradient is its own; AdamW is elementwise, so
one AdamW over the stacked tensor is exactly B independent AdamW optimisers. Every image's update
is therefore the one it would get alone.

Shared initial forward: every image starts from the same context, so the class text features
of the first step are computed once per batch (C prompts, not B x C); each image's gradient is
then one vector-Jacobian product through that single graph, B of them batched with
``torch.autograd.grad(..., is_grads_batched=True)``. The result equals B separate forwards.

This module holds the algorithm on pre-computed view features, (B, V, D) with the original at
view 0 (``FeatureStore.views(..., kind="test_time")``); runs over a test set, presets and the
CLI are in :mod:`calibprompt.runs.tpt`.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from calibprompt import losses
from calibprompt.prompts import PromptLearner

__all__ = ["REGULARIZERS", "TPTConfig", "class_logits", "confident_views", "tca_learner", "tpt_adapt",
           "tpt_adapt_ensemble"]

#: method -> (loss name in calibprompt.losses.LOSSES); the sign comes from the registry.
REGULARIZERS = {"tpt": None, "ctpt": "atfd", "otpt": "orth", "otpt_fro": "orth_fro", "soc": "soc", "atpt": "ad",
                "tca": "tca"}


@dataclass(frozen=True)
class TPTConfig:
    """TPT hyperparameters (the published TPT defaults) and the method's regulariser."""

    method: str = "tpt"
    lam: float = 0.0
    delta: float = losses.SOC_DELTA
    beta: float = 0.0  # TCA: weight of the intra-class dispersion (lam weights the inter-class one)
    selection: float = 0.1
    steps: int = 1
    lr: float = 5e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    share_initial_forward: bool = True
    autocast: bool = False  # fp16 autocast of the published code; applies on CUDA only
    reselect: bool = False  # re-select the confident views at every step (not the published algorithm)

    def to_dict(self) -> dict:
        return {**asdict(self), "betas": list(self.betas)}

    def __post_init__(self) -> None:
        if self.method not in REGULARIZERS:
            raise ValueError(f"method: expected one of {sorted(REGULARIZERS)}, got {self.method!r}")
        if not 0.0 < self.selection <= 1.0:
            raise ValueError(f"selection: expected a fraction in (0, 1], got {self.selection}")
        if self.steps < 0:
            raise ValueError(f"steps: expected a non-negative integer, got {self.steps}")
        if self.method != "tpt" and self.lam < 0:
            raise ValueError(f"lam: expected a non-negative weight, got {self.lam}")
        if self.beta < 0 or (self.beta and self.method != "tca"):
            raise ValueError(f"beta: the intra-class weight of TCA, non-negative; got {self.beta} for {self.method}")


def confident_views(logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (B, k) of the ``k = max(1, floor(ratio * V))`` lowest-entropy views per image;
    ``logits`` is (B, V, C)."""
    v = logits.shape[1]
    k = max(1, int(ratio * v))
    log_p = F.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return entropy.topk(k, dim=1, largest=False).indices


def _view_logits(feats: torch.Tensor, text: torch.Tensor, scale: float, pattern: str) -> torch.Tensor:
    """``scale * einsum(pattern, feats, text)`` in the wider of the two dtypes (a float64 backbone
    gives float64 text features; cached image features are float32)."""
    dtype = torch.promote_types(feats.dtype, text.dtype)
    return scale * torch.einsum(pattern, feats.to(dtype), text.to(dtype))


def class_logits(prompt_logits: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """Class logits from prompt logits (..., K): unchanged without ``groups``; with TCA's attribute
    prompts (``groups[k]`` = class of prompt k) ``z_c = logsumexp_{k in c} z_k``, so that
    ``softmax(z)_c = sum_a exp(s cos(x, t_{c,a})) / sum_{c',a} exp(s cos(x, t_{c',a}))`` -- the
    attribute-marginalised probability, taken once (TCA's code applies a second softmax on top of
    it for view selection and entropy; not reproduced)."""
    if groups is None:
        return prompt_logits
    groups = groups.to(prompt_logits.device)
    c = int(groups.max()) + 1
    width = int(torch.bincount(groups, minlength=c).max())
    index = torch.zeros(c, width, dtype=torch.long, device=prompt_logits.device)
    mask = torch.zeros(c, width, dtype=torch.bool, device=prompt_logits.device)
    slot = torch.zeros(c, dtype=torch.long)
    for k, g in enumerate(groups.tolist()):  # prompts of class g, in order (K is small)
        index[g, slot[g]] = k
        mask[g, slot[g]] = True
        slot[g] += 1
    gathered = prompt_logits[..., index].masked_fill(~mask, float("-inf"))
    return torch.logsumexp(gathered, dim=-1)


def _image_losses(view_logits: torch.Tensor, text: torch.Tensor, config: TPTConfig,
                  chosen: torch.Tensor | None = None, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image loss (B,): marginal entropy of the confident views (``chosen``, or selected from
    these logits; class logits, see :func:`class_logits`) + the regulariser on the prompt
    features ``text`` (B, K, D)."""
    if chosen is None:
        chosen = confident_views(view_logits.detach(), config.selection)
    picked = view_logits.gather(1, chosen[:, :, None].expand(-1, -1, view_logits.shape[-1]))
    per_image = torch.stack([losses.marginal_entropy(p) for p in picked])
    name = REGULARIZERS[config.method]
    if name == "tca":
        if groups is None:
            raise ValueError("tca: needs attribute prompts (a learner with groups)")
        inter, intra = zip(*(losses.tca_dispersion(t, groups) for t in text), strict=True)
        return per_image - config.lam * torch.stack(inter) + config.beta * torch.stack(intra)
    if name is not None and config.lam != 0.0:
        spec = losses.LOSSES[name]
        kwargs = {"delta": config.delta} if name == "soc" else {}
        reg = torch.stack([spec.fn(t, **kwargs) for t in text])
        per_image = per_image + (-1.0 if spec.maximize else 1.0) * config.lam * reg
    return per_image


def _autocast(config: TPTConfig, device: torch.device):
    if config.autocast and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _shared_first_gradient(
    learner: PromptLearner, feats: torch.Tensor, config: TPTConfig,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-image gradients (B, n_ctx, W) at the common initial context, with one text forward,
    and the confident views selected there.

    ``d loss_b / d ctx = J^T g_b`` where J is the Jacobian of the C class features at the
    initial context (the same for every image) and ``g_b = d loss_b / d T``; the B products run
    batched through the one graph. Returns None when the encoder does not support batched
    gradients (the caller then uses B forwards, which give the same result).
    """
    b = feats.shape[0]
    ctx = learner.ctx.detach().clone().requires_grad_(True)
    with _autocast(config, ctx.device):
        text = learner.contexts_features(ctx[None])[0]  # (C, D) once per batch
    per_image = text.detach()[None].repeat(b, 1, 1).requires_grad_(True)
    groups = getattr(learner, "groups", None)
    view_logits = class_logits(_view_logits(feats, per_image, learner.backbone.logit_scale, "bvd,bcd->bvc"), groups)
    chosen = confident_views(view_logits.detach(), config.selection)
    (cotangents,) = torch.autograd.grad(_image_losses(view_logits, per_image, config, chosen, groups).sum(),
                                        per_image)
    try:
        (grad,) = torch.autograd.grad(text, ctx, grad_outputs=cotangents, is_grads_batched=True)
    except RuntimeError as exc:
        warnings.warn(f"TPT: {type(learner.backbone).__name__} does not support batched gradients "
                      f"({str(exc)[:200]}); using one forward per image (same result, slower)",
                      RuntimeWarning, stacklevel=3)
        return None
    return grad, chosen


def tpt_adapt(
    learner: PromptLearner, view_features: torch.Tensor, config: TPTConfig = TPTConfig(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapt one context per image and classify the original view.

    ``view_features`` (B, V, D) are normalised image features with view 0 the original image.
    ``learner`` provides the initial (generic) context and the prompts -- "a photo of a", or a
    CoOp-tuned context for TPT + CoOp. Returns the logits of view 0 under each image's adapted
    prompt (B, C) and the adapted contexts (B, n_ctx, W). ``steps=0`` is zero-shot with the
    initial prompt.
    """
    feats = _check_views(learner, view_features)
    return _adapt_rows(learner, feats, learner.ctx.detach()[None], config,
                       lambda: _shared_first_gradient(learner, feats, config))


def _check_views(learner: PromptLearner, view_features: torch.Tensor) -> torch.Tensor:
    if learner.class_specific:
        raise ValueError("tpt_adapt: needs a generic (shared) initial context")
    if view_features.ndim != 3:
        raise ValueError(f"view_features: expected (B, V, D), got {tuple(view_features.shape)}")
    return view_features.to(learner.ctx.device, torch.promote_types(view_features.dtype, torch.float32))


def _adapt_rows(learner: PromptLearner, feats: torch.Tensor, starts: torch.Tensor, config: TPTConfig,
                first_gradient: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The algorithm on K x B rows: row k*B + i adapts image i from initial context ``starts[k]``
    (K, n_ctx, W) -- K = 1 for one prompt, one per template for the ensemble. Every row's loss is
    its own and AdamW is elementwise, so each row follows the trajectory it follows alone.
    ``first_gradient()`` gives the rows' first gradients and confident views through the shared
    initial forward (None: computed by a forward over the rows). Returns per-row logits (K*B, C)
    and contexts."""
    b, k = feats.shape[0], starts.shape[0]
    scale = learner.backbone.logit_scale
    groups = getattr(learner, "groups", None)  # TCA: the class of each attribute prompt
    rows = feats.repeat(k, 1, 1)  # row k*B + i: image i
    ctx = starts.repeat_interleave(b, dim=0).requires_grad_(True)  # reset per image
    optimizer = torch.optim.AdamW([ctx], lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    chosen = None  # the confident views, selected at the first step (published) or every step
    for step in range(config.steps):
        shared = first_gradient() if step == 0 and config.share_initial_forward else None
        if shared is not None:
            grad, chosen = shared
        else:
            with _autocast(config, ctx.device):
                text = learner.contexts_features(ctx)
            view_logits = class_logits(_view_logits(rows, text, scale, "bvd,bcd->bvc"), groups)
            if chosen is None or config.reselect:
                chosen = confident_views(view_logits.detach(), config.selection)
            loss = _image_losses(view_logits, text, config, chosen, groups).sum()  # each row keeps its gradient
            grad = torch.autograd.grad(loss, ctx)[0]
        ctx.grad = grad.to(ctx.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad(), _autocast(config, ctx.device):
        if config.steps == 0:  # zero-shot: one text pass per initial context
            text = learner.contexts_features(starts).repeat_interleave(b, dim=0)
        else:
            text = learner.contexts_features(ctx)
        logits = class_logits(_view_logits(rows[:, 0], text, scale, "bd,bcd->bc"), groups)
    return logits, ctx.detach()


def tpt_adapt_ensemble(
    learners: list[PromptLearner], view_features: torch.Tensor, config: TPTConfig = TPTConfig(),
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The template-ensemble setting (C-TPT's "TPT_Ensemble"; as the one public implementation, the
    TCA repository, runs it): one model per template -- its own context initialised from that
    template's words, its own AdamW state, confident-view selection, entropy and regulariser over
    its C class features -- all adapted on the same views; the prediction is the arithmetic mean
    of the templates' logits. Returns the mean logits (B, C) and each template's adapted contexts.

    Batched across images and templates: templates whose contexts have the same length (their
    prompts then differ only in the context values) are K x B rows of one adaptation -- one text
    pass for all rows at every later step and at the prediction -- and each template's first
    gradient still comes from its own shared initial forward. Templates of other lengths are
    adapted as groups of their own."""
    if not learners:
        raise ValueError("tpt_adapt_ensemble: needs at least one template's learner")
    feats = _check_views(learners[0], view_features)
    b = feats.shape[0]
    by_length: dict[int, list[int]] = {}
    for i, learner in enumerate(learners):
        by_length.setdefault(learner.ctx.shape[0], []).append(i)
    logits: list[torch.Tensor | None] = [None] * len(learners)
    contexts: list[torch.Tensor | None] = [None] * len(learners)
    for members in by_length.values():
        group = [learners[i] for i in members]

        def first_gradient(group: list[PromptLearner] = group) -> tuple[torch.Tensor, torch.Tensor] | None:
            parts = [_shared_first_gradient(learner, feats, config) for learner in group]
            if any(part is None for part in parts):
                return None
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        starts = torch.stack([learner.ctx.detach() for learner in group])
        out, ctx = _adapt_rows(group[0], feats, starts, config, first_gradient)
        for j, i in enumerate(members):
            logits[i], contexts[i] = out[j * b:(j + 1) * b], ctx[j * b:(j + 1) * b]
    return torch.stack(logits).mean(dim=0), contexts

def tca_learner(backbone: Any, classnames: list[str], attributes: dict[str, list[str]],
                ctx_init: str = "a photo of a") -> PromptLearner:
    """TCA's prompts "a photo of a {attr} {class}." for every attribute word of every class
    (``attributes``: class name -> words), one shared context initialised from ``ctx_init``; the
    learner's ``groups`` give each prompt's class, which :func:`tpt_adapt` uses for the
    attribute-marginalised class probabilities and the inter/intra regulariser."""
    missing = [c for c in classnames if not attributes.get(c)]
    if missing:
        raise ValueError(f"attributes: no attribute words for class(es) {missing}")
    prompts, groups = [], []
    for c, name in enumerate(classnames):
        for word in attributes[name]:
            prompts.append(f"{word} {name}")
            groups.append(c)
    learner = PromptLearner(backbone, prompts, init="words", init_words=ctx_init)
    learner.groups = torch.tensor(groups)
    return learner
