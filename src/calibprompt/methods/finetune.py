"""Full fine-tuning: every weight of both towers trains (the paper's second regime).

CalibPrompt compares its objectives under prompt tuning and under full fine-tuning of the whole
model at lr 2e-7 (8 shots). The published code has no fine-tuning path, so everything but the lr
follows the prompt-tuning protocol (:mod:`calibprompt.methods.coop`):

- head: the C class prompts of the dataset's template, re-encoded by the (training) text tower at
  every step -- no context vectors; logits ``z = s · f(x) · T(prompts)ᵀ``;
- SGD (momentum 0.9, weight decay 5e-4), batch 16 with drop_last, cosine per epoch after an
  optional constant warm-up (:func:`~calibprompt.methods.coop.coop_lr`), last-epoch model;
- every epoch sees a fresh augmented view of each image (the prompt-tuning crops), seeded per
  (image, epoch, seed), decoded once and kept in memory (few-shot sets are small);
- fp32 master weights always (a 2e-7 step is below fp16's spacing at typical weight sizes and
  would be rounded away); the backbone's precision only sets the forward's autocast;
- towers in train mode (BERT dropout is active on BiomedCLIP / MedCLIP; CLIP towers have none);
- the logit scale frozen unless ``train_logit_scale`` (a trained temperature is itself a
  calibrator);
- objectives that need zero-shot logits (ZS-Norm, Penalty) get them from the frozen initial model
  on the same augmented view, without gradients; the frozen copy is used only then.

Parameters off the forward path (e.g. a BERT pooler the features do not use) receive no gradient;
:func:`off_path_parameters` finds them with one probe step so that they are frozen and listed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from calibprompt.methods.coop import EpochLog, EpochTally, TrainConfig, coop_lr, epoch_batches
from calibprompt.objective import Objective

__all__ = [
    "FineTuned",
    "finetune",
    "logit_scale_names",
    "off_path_parameters",
    "train_mode_record",
    "trainable_copy",
]


def logit_scale_names(model: nn.Module) -> list[str]:
    """Names of the model's logit-scale (temperature) parameters."""
    return [name for name, _ in model.named_parameters() if name.split(".")[-1] == "logit_scale"]


def trainable_copy(backbone: Any, train_logit_scale: bool = False) -> Any:
    """A deep copy of ``backbone`` whose weights train (requires_grad) -- the logit scale only if
    ``train_logit_scale`` -- in fp32, in train mode. The original stays frozen and untouched (it
    is shared between the runs of a sweep). The copy's cached fingerprint is dropped: it is
    recomputed from the trained weights."""
    model = copy.deepcopy(backbone)
    model.__dict__.pop("fingerprint", None)
    scales = set(logit_scale_names(model.model))
    for name, p in model.model.named_parameters():
        if p.dtype != torch.float32:
            p.data = p.data.float()
        p.requires_grad_(train_logit_scale or name not in scales)
    model.model.train()
    return model


def train_mode_record(model: nn.Module) -> dict[str, Any]:
    """What train mode switches on: the dropout modules with p > 0 (count and rates)."""
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    return {"train_mode": True, "active_dropout_modules": len(dropouts),
            "dropout_rates": sorted(set(float(p) for p in dropouts))}


def _scale(model: Any) -> torch.Tensor | float:
    """The logit scale: a tensor with gradient when it trains (exp, clamped to 100), else the
    backbone's own float."""
    names = logit_scale_names(model.model)
    params = dict(model.model.named_parameters())
    if names and params[names[0]].requires_grad:
        return params[names[0]].exp().clamp(max=100.0).reshape(())
    return model.logit_scale


def _features(model: Any, pixels: torch.Tensor, tokens: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image features of ``pixels`` and text features of the class prompts, with
    gradients through both towers."""
    with model.autocast():
        image = model._encode_pixels(pixels.to(model.device))
    image = nn.functional.normalize(image.float(), dim=-1)
    text = model.encode_token_embeddings(model.embed_tokens(tokens.ids), tokens).float()
    return image, text


def off_path_parameters(model: Any, pixels: torch.Tensor, tokens: Any) -> list[str]:
    """Trainable parameters that get no gradient from a forward through both towers (one probe
    step on ``pixels`` and the class prompts; nothing is updated)."""
    image, text = _features(model, pixels, tokens)
    scale = _scale(model)
    (scale * image @ text.T).logsumexp(dim=1).sum().backward()
    off = [name for name, p in model.model.named_parameters() if p.requires_grad and p.grad is None]
    model.model.zero_grad(set_to_none=True)
    return off


@dataclass
class FineTuned:
    """What :func:`finetune` returns: the per-epoch logs and the names of frozen parameters."""

    logs: list[EpochLog]
    frozen: list[str]


def finetune(
    model: Any,
    views: Callable[[Sequence[int], int], torch.Tensor],
    labels: torch.Tensor,
    prompts: Sequence[str],
    objective: Objective,
    config: TrainConfig,
    reference: Any | None = None,
    on_epoch: Callable[[EpochLog, torch.optim.Optimizer], None] | None = None,
    start_epoch: int = 0,
    optimizer_state: dict[str, Any] | None = None,
) -> FineTuned:
    """Fine-tune every trainable weight of ``model`` (from :func:`trainable_copy`) on ``N``
    labelled images.

    ``views(indices, epoch)`` returns the preprocessed pixels (B, 3, H, W) of those images' views
    for that epoch (seeded per image and epoch, so a resumed run sees what an uninterrupted one
    would). ``prompts`` are the C class prompts; ``reference`` is the frozen initial model, needed
    (and used) only by objectives with zero-shot logits. Epoch e shuffles with the generator of
    ``(config.seed, 3, e)`` as prompt tuning does; the lr follows
    :func:`~calibprompt.methods.coop.coop_lr`. ``on_epoch(log, optimizer)`` is called after each
    epoch (for checkpoints); ``start_epoch`` and ``optimizer_state`` resume.
    """
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        return _finetune(model, views, labels, prompts, objective, config, reference, on_epoch, start_epoch,
                         optimizer_state)


def _finetune(model: Any, views: Callable[[Sequence[int], int], torch.Tensor], labels: torch.Tensor,
              prompts: Sequence[str], objective: Objective, config: TrainConfig, reference: Any | None,
              on_epoch: Callable[[EpochLog, torch.optim.Optimizer], None] | None, start_epoch: int,
              optimizer_state: dict[str, Any] | None) -> FineTuned:
    needs_zs = "zs_logits" in objective.required_inputs
    if needs_zs and reference is None:
        raise ValueError(f"objective {objective}: needs the frozen initial model (reference) for zero-shot logits")
    n = int(labels.shape[0])
    tokens = model.tokenize(list(prompts))
    probe = views(list(range(min(n, config.batch_size))), 0)
    frozen = off_path_parameters(model, probe, tokens)
    params = dict(model.model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    trainable = [p for p in model.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=coop_lr(start_epoch, config), momentum=config.momentum,
                                weight_decay=config.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    zs_text = None
    if needs_zs:
        zs_text = reference.encode_texts(list(prompts)).float()
    labels = labels.to(model.device)
    logs = []
    for epoch in range(start_epoch, config.epochs):
        # dropout draws from the global generator: seeded per (seed, epoch), so resuming is exact
        torch.manual_seed(int(np.random.SeedSequence([config.seed, 4, epoch]).generate_state(1)[0]))
        lr = coop_lr(epoch, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 3, epoch]))
        batches = epoch_batches(n, config.batch_size, rng)
        tally = EpochTally(objective, optimizer)
        for batch in batches:
            pixels = views(batch.tolist(), epoch)
            image, text = _features(model, pixels, tokens)
            scale = _scale(model)
            logits = scale * image @ text.T
            index = torch.as_tensor(batch, device=model.device)
            inputs: dict[str, torch.Tensor] = {"logits": logits, "labels": labels[index], "text_features": text}
            if needs_zs:
                with torch.no_grad():
                    inputs["zs_logits"] = reference.logit_scale * reference.encode_images(pixels).float() @ zs_text.T
            tally.step(inputs)
        log = tally.log(epoch, lr)
        logs.append(log)
        if on_epoch is not None:
            on_epoch(log, optimizer)
    model.model.eval()
    return FineTuned(logs, frozen)
