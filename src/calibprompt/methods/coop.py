"""Few-shot prompt tuning (CoOp) with any Objective, on cached image features.

Protocol of CalibPrompt / CoOp (Zhou et al. 2022, as CalibPrompt runs it), the defaults of :class:`TrainConfig`: SGD lr 0.002,
momentum 0.9, weight decay 5e-4, batch 16 (drop_last when the set has >= 16 images), 50 epochs,
one warm-up epoch at a constant 1e-5 (1e-3 for MedCLIP), then cosine annealing stepped per epoch
(Dassl's ``ConstantWarmupScheduler`` around ``CosineAnnealingLR(T_max=epochs)``), last-epoch
model. Each epoch uses one augmented view per image, drawn from pre-computed view features
(``FeatureStore.views(..., kind="train")``, (N, V, D)), so no image is encoded during training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from calibprompt.objective import Objective
from calibprompt.prompts import PromptLearner

__all__ = ["EpochLog", "EpochTally", "TrainConfig", "coop_lr", "epoch_batches", "steps_per_epoch", "train_prompt"]


@dataclass(frozen=True)
class TrainConfig:
    """Prompt-tuning hyperparameters (the CoOp / CalibPrompt defaults)."""

    epochs: int = 50
    batch_size: int = 16
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def coop_lr(epoch: int, config: TrainConfig) -> float:
    """Learning rate used during ``epoch`` (0-based).

    Warm-up epochs use ``warmup_lr``; afterwards Dassl's wrapper hands over to
    ``CosineAnnealingLR(T_max=epochs)`` starting from its step 0, so epoch e >= w trains at
    ``lr * (1 + cos(pi * (e - w) / epochs)) / 2``.
    """
    if epoch < config.warmup_epochs:
        return config.warmup_lr
    t = epoch - config.warmup_epochs
    return config.lr * (1.0 + math.cos(math.pi * t / config.epochs)) / 2.0


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch: ``floor(n / b)`` (drop_last) when n >= b, else one batch of all n."""
    return n // batch_size if n >= batch_size else 1


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A seeded shuffle of ``range(n)`` cut into batches (drop_last when n >= batch_size)."""
    order = rng.permutation(n)
    k = steps_per_epoch(n, batch_size)
    size = batch_size if n >= batch_size else n
    return [order[i * size:(i + 1) * size] for i in range(k)]


@dataclass
class EpochLog:
    epoch: int
    lr: float
    loss: float
    terms: dict[str, float] = field(default_factory=dict)
    accuracy: float = 0.0


class EpochTally:
    """One epoch's optimisation steps and their running log: :meth:`step` applies the objective
    to a batch and takes the optimizer step; :meth:`log` averages the loss, its terms and the
    training accuracy over the epoch's batches (shared by prompt tuning and full fine-tuning)."""

    def __init__(self, objective: Objective, optimizer: torch.optim.Optimizer) -> None:
        self.objective, self.optimizer = objective, optimizer
        self.total, self.sums, self.correct, self.seen, self.batches = 0.0, {}, 0, 0, 0

    def step(self, inputs: dict[str, torch.Tensor]) -> None:
        """Loss of the objective on ``inputs`` (logits, labels, ... -- the ones it needs), backward,
        optimizer step, and the batch added to the tally."""
        result = self.objective(**{k: v for k, v in inputs.items() if k in self.objective.required_inputs})
        self.optimizer.zero_grad(set_to_none=True)
        result.total.backward()
        self.optimizer.step()
        self.total += float(result.total.detach())
        for key, value in result.terms.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.correct += int((inputs["logits"].argmax(1) == inputs["labels"]).sum())
        self.seen += int(inputs["labels"].shape[0])
        self.batches += 1

    def log(self, epoch: int, lr: float) -> EpochLog:
        return EpochLog(epoch, lr, self.total / self.batches, {k: v / self.batches for k, v in self.sums.items()},
                        self.correct / self.seen)


def train_prompt(
    learner: PromptLearner,
    views: torch.Tensor,
    labels: torch.Tensor,
    objective: Objective,
    config: TrainConfig = TrainConfig(),
    zs_text_features: torch.Tensor | None = None,
    on_epoch: Callable[[EpochLog, PromptLearner, torch.optim.Optimizer], None] | None = None,
    start_epoch: int = 0,
    optimizer_state: dict[str, Any] | None = None,
    features_fn: Callable[[np.ndarray, int], torch.Tensor] | None = None,
) -> list[EpochLog]:
    """Tune ``learner.ctx`` on image features ``views`` (N, V, D) -- V augmented views of each
    image, as :meth:`calibprompt.data.FeatureStore.views` returns them; (N, D) is one view -- with
    ``labels`` (N,).

    Epoch e draws, for every image, view ``rng.integers(V)`` and a shuffle, both from a generator
    seeded by ``(config.seed, e)`` -- so a run resumed at ``start_epoch`` (with the learner's
    context and ``optimizer_state`` from the end of the previous epoch) continues exactly as an
    uninterrupted run would. ``zs_text_features`` (C, D) give the zero-shot logits of the same
    image features for objectives that need them (ZS-Norm, Penalty).

    ``features_fn(batch, epoch) -> (B, D)`` replaces the view bank with features computed when
    they are needed (e.g. of fresh noisy views, which cannot be cached); ``views`` then only gives
    N (its views are not used).
    """
    if views.ndim == 2:
        views = views[:, None]
    if views.ndim != 3 or views.shape[0] != labels.shape[0]:
        raise ValueError(f"views: expected (N, V, D) with N = {labels.shape[0]}, got {tuple(views.shape)}")
    needs_zs = "zs_logits" in objective.required_inputs
    if needs_zs and zs_text_features is None:
        raise ValueError(f"objective {objective}: needs zero-shot text features (zs_text_features)")
    device = learner.ctx.device
    feats = views.to(device, torch.float32)
    labels = labels.to(device)
    zs_text = zs_text_features.to(device) if needs_zs else None
    scale = learner.backbone.logit_scale
    n, n_views = feats.shape[0], feats.shape[1]
    optimizer = torch.optim.SGD([learner.ctx], lr=coop_lr(start_epoch, config), momentum=config.momentum,
                                weight_decay=config.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    logs = []
    for epoch in range(start_epoch, config.epochs):
        lr = coop_lr(epoch, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 3, epoch]))
        drawn = rng.integers(0, n_views, size=n)  # the view of each image this epoch
        batches = epoch_batches(n, config.batch_size, rng)
        tally = EpochTally(objective, optimizer)
        for batch in batches:
            index = torch.as_tensor(batch, device=device)
            if features_fn is None:
                image = feats[index, torch.as_tensor(drawn[batch], device=device)]
            else:
                image = features_fn(batch, epoch).to(device, torch.float32)
            text = learner()
            logits = scale * image @ text.T
            inputs: dict[str, torch.Tensor] = {"logits": logits, "labels": labels[index],
                                               "text_features": text}
            if needs_zs:
                inputs["zs_logits"] = (scale * image @ zs_text.T).detach()
            tally.step(inputs)
        log = tally.log(epoch, lr)
        logs.append(log)
        if on_epoch is not None:
            on_epoch(log, learner, optimizer)
    return logs
