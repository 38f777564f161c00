"""PromptLearner on every backbone family, zero-shot features, and the CoOp trainer."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from calibprompt.methods.coop import (
    TrainConfig,
    coop_lr,
    epoch_batches,
    steps_per_epoch,
    train_prompt,
)
from calibprompt.methods.zeroshot import zeroshot_logits, zeroshot_text_features
from calibprompt.objective import Objective
from calibprompt.prompts import PromptLearner
from tests.conftest import FAMILIES

CLASSES = ["adipose tissue", "lymphocytes", "colorectal adenocarcinoma epithelium"]


@pytest.mark.parametrize("case", sorted(FAMILIES))
@pytest.mark.parametrize(("position", "template"), [
    ("end", "a photo of a {}."), ("front", "{} a photo of a."), ("middle", "a photo {} of a."),
])
def test_word_initialised_context_reproduces_the_hand_written_prompt(backbones, case, position, template):
    b = backbones[case]
    learner = PromptLearner(b, CLASSES, init="words", init_words="a photo of a", position=position)
    assert learner.n_ctx == 4
    with torch.no_grad():
        ours = learner()
        reference = b.encode_texts([template.format(c) for c in CLASSES])
    assert (ours - reference).abs().max().item() <= 1e-5


def test_class_specific_context_and_gradients(tiny_backbone):
    learner = PromptLearner(tiny_backbone, CLASSES, n_ctx=6, class_specific=True, seed=3)
    assert learner.ctx.shape == (3, 6, 32) and learner.ctx.dtype == torch.float32
    learner().sum().backward()
    assert learner.ctx.grad is not None and (learner.ctx.grad.abs().sum(dim=(1, 2)) > 0).all()
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert list(dict(learner.named_parameters())) == ["ctx"]


def test_random_init_is_seeded_coop_normal(tiny_backbone):
    a = PromptLearner(tiny_backbone, CLASSES, n_ctx=16, seed=0)
    b = PromptLearner(tiny_backbone, CLASSES, n_ctx=16, seed=0)
    c = PromptLearner(tiny_backbone, CLASSES, n_ctx=16, seed=1)
    assert torch.equal(a.ctx, b.ctx) and not torch.equal(a.ctx, c.ctx)
    big = PromptLearner(tiny_backbone, CLASSES, n_ctx=64, seed=0)
    assert big.ctx.std().item() == pytest.approx(0.02, rel=0.1)
    # the context replaces exactly the 16 placeholder positions after the start token
    assert learner_positions(a) == list(range(1, 17))
    with pytest.raises(ValueError, match="position"):
        PromptLearner(tiny_backbone, CLASSES, position="side")


def learner_positions(learner):
    rows = learner.ctx_positions.tolist()
    assert all(r == rows[0] for r in rows)
    return rows[0]


def test_zeroshot_ensemble(tiny_backbone):
    templates = ["An H&E image of {}.", "a photo of {}."]
    feats = zeroshot_text_features(tiny_backbone, CLASSES, templates)
    single = [tiny_backbone.encode_texts([t.format(c) for c in CLASSES]) for t in templates]
    expected = torch.nn.functional.normalize(single[0] + single[1], dim=-1)
    assert torch.allclose(feats, expected, atol=1e-6)
    image = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    assert torch.allclose(zeroshot_logits(image, feats, 10.0), 10.0 * image @ feats.T)
    with pytest.raises(ValueError, match="exactly one"):
        zeroshot_text_features(tiny_backbone, CLASSES, ["no placeholder"])


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------


def dassl_schedule(config: TrainConfig) -> list[float]:
    """Dassl's ConstantWarmupScheduler around CosineAnnealingLR, re-enacted with torch's own
    scheduler: the lr in effect during each epoch (scheduler stepped after every epoch)."""
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=config.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    wrapper_epoch = 0  # the wrapper's last_epoch after its initial step
    for group in opt.param_groups:
        group["lr"] = config.warmup_lr
    lrs = []
    for _ in range(config.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # (no gradient: a no-op that keeps torch's step-order check quiet)
        if wrapper_epoch >= config.warmup_epochs:
            cosine.step()
        else:
            wrapper_epoch += 1
            if wrapper_epoch >= config.warmup_epochs:
                for group, lr in zip(opt.param_groups, cosine.get_last_lr(), strict=True):
                    group["lr"] = lr
    return lrs


def test_learning_rate_schedule_matches_dassl():
    config = TrainConfig()
    ours = [coop_lr(e, config) for e in range(config.epochs)]
    assert ours[0] == 1e-5 and ours[1] == 0.002
    assert ours[2] == pytest.approx(0.002 * (1 + math.cos(math.pi / 50)) / 2)
    assert ours[49] == pytest.approx(0.002 * (1 + math.cos(math.pi * 48 / 50)) / 2)
    np.testing.assert_allclose(ours, dassl_schedule(config), rtol=1e-9)
    medclip = TrainConfig(warmup_lr=1e-3)
    assert coop_lr(0, medclip) == 1e-3


def test_step_counts_follow_the_protocol():
    rng = np.random.default_rng(0)
    assert steps_per_epoch(16, 16) * 50 == 50  # binary datasets, 8 shots
    assert steps_per_epoch(24, 16) * 50 == 50  # RSNA18, 8 shots x 3 classes
    assert steps_per_epoch(72, 16) * 50 == 200  # Kather, 8 shots x 9 classes
    batches = epoch_batches(72, 16, rng)
    assert [len(b) for b in batches] == [16] * 4 and len(set(np.concatenate(batches))) == 64
    assert [len(b) for b in epoch_batches(10, 16, rng)] == [10]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class CountingObjective(Objective):
    calls = 0

    def __call__(self, **inputs):
        CountingObjective.calls += 1
        return super().__call__(**inputs)


def toy_problem(backbone, n_per_class=8, views=3, seed=0):
    """Image features near each class's zero-shot text feature, with noise and several views."""
    g = torch.Generator().manual_seed(seed)
    text = zeroshot_text_features(backbone, CLASSES, ["An H&E image of {}."])
    labels = torch.arange(3).repeat_interleave(n_per_class)
    bank = text[labels][:, None] + 0.6 * torch.randn(views, len(labels), text.shape[1], generator=g).transpose(0, 1)
    return torch.nn.functional.normalize(bank, dim=-1), labels, text


def test_training_runs_the_protocol_and_lowers_the_loss(tiny_backbone):
    bank, labels, _zs = toy_problem(tiny_backbone)
    learner = PromptLearner(tiny_backbone, CLASSES, n_ctx=4, seed=0)
    objective = CountingObjective.parse("ce")
    CountingObjective.calls = 0
    config = TrainConfig(epochs=12, batch_size=16, lr=0.05, warmup_lr=1e-5, seed=0)
    logs = train_prompt(learner, bank, labels, objective, config)
    assert CountingObjective.calls == 12 * steps_per_epoch(24, 16)
    assert [log.lr for log in logs] == [coop_lr(e, config) for e in range(12)]
    assert logs[-1].loss < logs[1].loss
    assert set(logs[0].terms) == {"ce"}


def test_same_seed_same_context_and_resume_equals_uninterrupted(tiny_backbone):
    bank, labels, _zs = toy_problem(tiny_backbone)
    config = TrainConfig(epochs=6, lr=0.05, seed=7)
    objective = Objective.preset("calibprompt")

    def fresh():
        return PromptLearner(tiny_backbone, CLASSES, n_ctx=4, seed=1)

    full = fresh()
    train_prompt(full, bank, labels, objective, config)
    again = fresh()
    train_prompt(again, bank, labels, objective, config)
    assert torch.equal(full.ctx, again.ctx)

    saved = {}

    def checkpoint(log, learner, optimizer):
        if log.epoch == 2:
            saved["ctx"] = learner.ctx.detach().clone()
            saved["opt"] = copy.deepcopy(optimizer.state_dict())

    interrupted = fresh()
    train_prompt(interrupted, bank, labels, objective, config, on_epoch=checkpoint)
    resumed = fresh()
    with torch.no_grad():
        resumed.ctx.copy_(saved["ctx"])
    train_prompt(resumed, bank, labels, objective, config, start_epoch=3, optimizer_state=saved["opt"])
    assert torch.allclose(resumed.ctx, full.ctx, atol=1e-7)


def test_zero_shot_objectives_get_zero_shot_logits(tiny_backbone):
    bank, labels, zs = toy_problem(tiny_backbone)
    learner = PromptLearner(tiny_backbone, CLASSES, n_ctx=4)
    logs = train_prompt(learner, bank, labels, Objective.preset("penalty"), TrainConfig(epochs=2), zs)
    assert "penalty" in logs[0].terms
    with pytest.raises(ValueError, match="zero-shot text features"):
        train_prompt(learner, bank, labels, Objective.preset("zsnorm"), TrainConfig(epochs=1))


@pytest.mark.parametrize("case", ["quiltnet", "quiltnet_safetensors", "plip", "demo"])
def test_shared_prefix_is_exact(backbones, case):
    b = backbones[case]
    shared = PromptLearner(b, CLASSES, n_ctx=5, seed=2, shared_prefix=True)
    plain = PromptLearner(b, CLASSES, n_ctx=5, seed=2, shared_prefix=False)
    assert not PromptLearner(b, CLASSES[:1], n_ctx=5).use_shared_prefix  # auto: nothing to share
    assert PromptLearner(b, CLASSES[:2], n_ctx=5).use_shared_prefix
    assert shared.shares_prefix
    n = 1 + shared.n_ctx
    prefix = torch.cat([shared.base_embeddings[:1, :1], shared.ctx[None]], dim=1)
    assert b.encode_shared_prefix(prefix, shared.base_embeddings[:, n:], shared.batch) is not None
    f_shared, f_plain = shared(), plain()
    assert (f_shared - f_plain).abs().max().item() <= 1e-5
    f_shared.square().sum().backward()
    f_plain.square().sum().backward()
    assert torch.allclose(shared.ctx.grad, plain.ctx.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["quiltnet", "plip", "biomedclip"])
def test_contexts_features_batch_equals_each_context_alone(backbones, case):
    """B contexts in one pass (lockstep runs, batched TPT) = each context through its own learner;
    on a causal tower through the batched shared prefix, on BERT through full prompts; gradients
    reach each context as if alone."""
    b = backbones[case]
    learner = PromptLearner(b, CLASSES, n_ctx=5, seed=2, shared_prefix=True)
    assert learner.shares_prefix and (case != "biomedclip") == (b.encode_shared_prefix(
        torch.zeros(3, 6, learner.ctx.shape[-1]), learner.base_embeddings[:, 6:], learner.batch) is not None)
    ctx = torch.stack([PromptLearner(b, CLASSES, n_ctx=5, seed=s).ctx.detach() for s in (3, 4, 5)]).requires_grad_()
    together = learner.contexts_features(ctx)
    assert together.shape == (3, len(CLASSES), b.embed_dim)
    weights = torch.randn(together.shape, generator=torch.Generator().manual_seed(0))
    (together * weights).sum().backward()
    for i in range(3):
        alone = PromptLearner(b, CLASSES, n_ctx=5, seed=2, shared_prefix=False)
        with torch.no_grad():
            alone.ctx.copy_(ctx[i])
        features = alone()
        assert (features - together[i]).abs().max().item() <= 1e-5
        (features * weights[i]).sum().backward()
        assert torch.allclose(alone.ctx.grad, ctx.grad[i], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="contexts"):
        learner.contexts_features(ctx[0])


def test_shared_prefix_is_not_used_where_it_would_be_wrong(backbones):
    assert not PromptLearner(backbones["quiltnet"], CLASSES, n_ctx=4, position="front").shares_prefix
    assert not PromptLearner(backbones["quiltnet"], CLASSES, n_ctx=4, class_specific=True).shares_prefix
    bert = PromptLearner(backbones["biomedclip"], CLASSES, n_ctx=4)
    n = 1 + bert.n_ctx
    prefix = torch.cat([bert.base_embeddings[:1, :1], bert.ctx[None]], dim=1)
    assert backbones["biomedclip"].encode_shared_prefix(prefix, bert.base_embeddings[:, n:], bert.batch) is None
