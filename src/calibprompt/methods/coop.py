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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibprompt.objective import Objective
from calibprompt.prompts import PromptLearner

__all__ = [
    "MAX_LOCKSTEP",
    "EpochLog",
    "EpochTally",
    "PromptJob",
    "TrainConfig",
    "coop_lr",
    "epoch_batches",
    "free_memory",
    "lockstep_capacity",
    "shares_text_pass",
    "steps_per_epoch",
    "train_prompt",
    "train_prompts",
]


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

    def loss(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective's loss on ``inputs`` (logits, labels, ... -- the ones it needs), added to
        the tally; the caller runs backward and the optimizer step."""
        result = self.objective(**{k: v for k, v in inputs.items() if k in self.objective.required_inputs})
        self.total += float(result.total.detach())
        for key, value in result.terms.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.correct += int((inputs["logits"].argmax(1) == inputs["labels"]).sum())
        self.seen += int(inputs["labels"].shape[0])
        self.batches += 1
        return result.total

    def step(self, inputs: dict[str, torch.Tensor]) -> None:
        """:meth:`loss`, backward and the optimizer step (one model trained alone)."""
        loss = self.loss(inputs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def log(self, epoch: int, lr: float) -> EpochLog:
        return EpochLog(epoch, lr, self.total / self.batches, {k: v / self.batches for k, v in self.sums.items()},
                        self.correct / self.seen)


@dataclass
class PromptJob:
    """One run's prompt tuning, as :func:`train_prompts` takes it: the learner whose context is
    tuned, its image features ``views`` (N, V, D) -- V augmented views per image; (N, D) is one
    view -- with ``labels`` (N,), its objective and schedule, and where it resumes.

    Epoch e draws, for every image, view ``rng.integers(V)`` and a shuffle, both from a generator
    seeded by ``(config.seed, e)`` -- so a run resumed at ``start_epoch`` (with the learner's
    context and ``optimizer_state`` from the end of the previous epoch) continues exactly as an
    uninterrupted run would. ``zs_text_features`` (C, D) give the zero-shot logits of the same
    image features for objectives that need them (ZS-Norm, Penalty). ``features_fn(batch, epoch)
    -> (B, D)`` replaces the view bank with features computed when they are needed (e.g. of fresh
    noisy views, which cannot be cached); ``views`` then only gives N. ``on_epoch(log, learner,
    optimizer)`` is called after each of the job's epochs (checkpoints, progress)."""

    learner: PromptLearner
    views: torch.Tensor
    labels: torch.Tensor
    objective: Objective
    config: TrainConfig = TrainConfig()
    zs_text_features: torch.Tensor | None = None
    on_epoch: Callable[[EpochLog, PromptLearner, torch.optim.Optimizer], None] | None = None
    start_epoch: int = 0
    optimizer_state: dict[str, Any] | None = None
    features_fn: Callable[[np.ndarray, int], torch.Tensor] | None = None


class _Active:
    """A job's state while it trains: device tensors, optimizer, and the current epoch's draws."""

    def __init__(self, job: PromptJob) -> None:
        views, labels = job.views, job.labels
        if views.ndim == 2:
            views = views[:, None]
        if views.ndim != 3 or views.shape[0] != labels.shape[0]:
            raise ValueError(f"views: expected (N, V, D) with N = {labels.shape[0]}, got {tuple(views.shape)}")
        self.needs_zs = "zs_logits" in job.objective.required_inputs
        if self.needs_zs and job.zs_text_features is None:
            raise ValueError(f"objective {job.objective}: needs zero-shot text features (zs_text_features)")
        self.job, self.device = job, job.learner.ctx.device
        self.feats = views.to(self.device, torch.float32)
        self.labels = labels.to(self.device)
        self.zs_text = job.zs_text_features.to(self.device) if self.needs_zs else None
        self.scale = job.learner.backbone.logit_scale
        config = job.config
        self.optimizer = torch.optim.SGD([job.learner.ctx], lr=coop_lr(job.start_epoch, config),
                                         momentum=config.momentum, weight_decay=config.weight_decay)
        if job.optimizer_state is not None:
            self.optimizer.load_state_dict(job.optimizer_state)
        self.logs: list[EpochLog] = []

    def begin_epoch(self, epoch: int) -> None:
        config, n = self.job.config, self.feats.shape[0]
        self.epoch, self.lr = epoch, coop_lr(epoch, config)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 3, epoch]))
        self.drawn = rng.integers(0, self.feats.shape[1], size=n)  # the view of each image this epoch
        self.batches = epoch_batches(n, config.batch_size, rng)
        self.tally = EpochTally(self.job.objective, self.optimizer)

    def loss(self, step: int, text: torch.Tensor) -> torch.Tensor:
        batch = self.batches[step]
        index = torch.as_tensor(batch, device=self.device)
        if self.job.features_fn is None:
            image = self.feats[index, torch.as_tensor(self.drawn[batch], device=self.device)]
        else:
            image = self.job.features_fn(batch, self.epoch).to(self.device, torch.float32)
        inputs: dict[str, torch.Tensor] = {"logits": self.scale * image @ text.T, "labels": self.labels[index],
                                           "text_features": text}
        if self.needs_zs:
            inputs["zs_logits"] = (self.scale * image @ self.zs_text.T).detach()
        return self.tally.loss(inputs)

    def end_epoch(self) -> None:
        log = self.tally.log(self.epoch, self.lr)
        self.logs.append(log)
        if self.job.on_epoch is not None:
            self.job.on_epoch(log, self.job.learner, self.optimizer)


def shares_text_pass(learners: list[PromptLearner]) -> bool:
    """Whether the contexts of ``learners`` complete the same prompts on the same backbone, so that
    one encoder pass (:meth:`PromptLearner.contexts_features`) serves them all."""
    lead = learners[0]
    return all(not other.class_specific and other.backbone is lead.backbone and other.classnames == lead.classnames
               and other.n_ctx == lead.n_ctx and other.position == lead.position
               and other.use_shared_prefix == lead.use_shared_prefix and other.ctx.shape == lead.ctx.shape
               and torch.equal(other.ctx_positions, lead.ctx_positions)
               for other in learners)


#: The most runs one lockstep group holds, whatever the memory (beyond it a step is as wide as
#: the encoder's arithmetic can use on any device we measured).
MAX_LOCKSTEP = 64
#: The share of the free memory a lockstep group may fill with its activations (a step also holds
#: their gradients, about as much, during the backward pass).
LOCKSTEP_MEMORY_SHARE = {"cuda": 0.5, "cpu": 0.25}


def _saved_bytes(learner: PromptLearner, contexts: int) -> int:
    """Bytes autograd keeps for the backward pass of ``contexts`` contexts' text features."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    ctx = learner.ctx.detach()[None].repeat(contexts, *([1] * learner.ctx.ndim)).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        learner.contexts_features(ctx)
    return total


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: the CUDA allocator's free memory, or the host's
    available memory (``MemAvailable`` of /proc/meminfo; 4 GiB where it cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def lockstep_capacity(learner: PromptLearner, budget: int | None = None) -> int:
    """How many runs like ``learner``'s train in one lockstep group: the memory one more run adds to
    a step -- the activations autograd saves for one more context, measured by probing the encoder
    with two and three contexts -- times 2 (their gradients), into ``budget`` bytes (default: a share
    of the free memory, :data:`LOCKSTEP_MEMORY_SHARE`), at most :data:`MAX_LOCKSTEP`, at least 1."""
    if learner.class_specific:
        return MAX_LOCKSTEP  # no shared pass: runs step together but encode their prompts one by one
    device = learner.ctx.device
    if budget is None:
        budget = int(free_memory(device) * LOCKSTEP_MEMORY_SHARE.get(device.type, 0.25))
    per_run = max(1, _saved_bytes(learner, 3) - _saved_bytes(learner, 2))
    return int(max(1, min(MAX_LOCKSTEP, budget // (2 * per_run))))


def _text_features(active: list[_Active]) -> list[torch.Tensor]:
    learners = [a.job.learner for a in active]
    if len(learners) > 1 and shares_text_pass(learners):
        features = learners[0].contexts_features(torch.stack([learner.ctx for learner in learners]))
        return list(features.unbind(0))
    return [learner() for learner in learners]


def train_prompts(jobs: list[PromptJob]) -> list[list[EpochLog]]:
    """Train several prompt-tuning runs in lockstep: at every step the contexts of the runs that
    take one go through **one** text-encoder forward and backward (stacked along a run axis,
    :meth:`PromptLearner.contexts_features`), while each run keeps its own images, view draws,
    batches, objective, optimizer state, learning-rate schedule and epoch callbacks.

    The loss backpropagated is the sum of the runs' losses; a run's context receives the gradient
    of its own loss only (the runs share no parameter), so every run follows the trajectory it
    follows alone up to floating-point rounding of the batched arithmetic. Runs whose prompts
    differ, or that resume at different epochs or have different schedules, are allowed: a step
    batches the runs that take it. Returns each job's epoch logs (from its ``start_epoch``).
    """
    if not jobs:
        return []
    active = [_Active(job) for job in jobs]
    first = min(job.start_epoch for job in jobs)
    last = max(job.config.epochs for job in jobs)
    for epoch in range(first, last):
        running = [a for a in active if a.job.start_epoch <= epoch < a.job.config.epochs]
        for a in running:
            a.begin_epoch(epoch)
        for step in range(max((len(a.batches) for a in running), default=0)):
            stepping = [a for a in running if step < len(a.batches)]
            texts = _text_features(stepping)
            total = sum(a.loss(step, text) for a, text in zip(stepping, texts, strict=True))
            for a in stepping:
                a.optimizer.zero_grad(set_to_none=True)
            total.backward()
            for a in stepping:
                a.optimizer.step()
        for a in running:
            a.end_epoch()
    return [a.logs for a in active]


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
    """Tune ``learner.ctx`` on image features ``views`` (N, V, D) with ``labels`` (N,): one run
    alone, :func:`train_prompts` of one :class:`PromptJob` (see there for every argument)."""
    return train_prompts([PromptJob(learner, views, labels, objective, config, zs_text_features, on_epoch,
                                    start_epoch, optimizer_state, features_fn)])[0]
