"""TPT core: batched adaptation equals per-image adaptation; AdamW first step; view selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from calibprompt.methods.tpt import TPTConfig, confident_views, contexts_text_features, tpt_adapt
from calibprompt.prompts import PromptLearner

CLASSES = ["adipose tissue", "lymphocytes", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"]


def views(b=3, v=16, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, v, d, generator=g), dim=-1)


@pytest.fixture
def learner(tiny_backbone):
    return PromptLearner(tiny_backbone, CLASSES, init="words", init_words="a photo of a")


def test_context_features_match_the_learner(learner):
    ctx = learner.ctx.detach()[None].repeat(2, 1, 1)
    ctx[1] += 0.1
    feats = contexts_text_features(learner, ctx)
    assert torch.allclose(feats[0], learner(), atol=1e-6)
    with torch.no_grad():
        learner.ctx.add_(0.1)
    assert torch.allclose(feats[1], learner(), atol=1e-6)


@pytest.mark.parametrize("config", [
    TPTConfig(), TPTConfig(method="ctpt", lam=50.0), TPTConfig(method="otpt", lam=18.0),
    TPTConfig(method="soc", lam=5.0, delta=0.2), TPTConfig(steps=2),
])
def test_batched_equals_per_image(learner, config):
    feats = views()
    logits, ctx = tpt_adapt(learner, feats, config)
    for i in range(feats.shape[0]):
        alone_logits, alone_ctx = tpt_adapt(learner, feats[i:i + 1], config)
        assert torch.allclose(alone_logits[0], logits[i], atol=1e-5)
        assert torch.allclose(alone_ctx[0], ctx[i], atol=1e-6)
    # prompt reset: the order of the images changes nothing
    perm = torch.tensor([2, 0, 1])
    perm_logits, _ = tpt_adapt(learner, feats[perm], config)
    assert torch.allclose(perm_logits, logits[perm], atol=1e-5)


def test_first_adamw_step_moves_each_coordinate_by_lr(learner):
    config = TPTConfig(lr=5e-3, weight_decay=0.01)
    _, ctx = tpt_adapt(learner, views(b=1), config)
    start = learner.ctx.detach() * (1 - config.lr * config.weight_decay)  # decoupled weight decay
    moved = (ctx[0] - start).abs()
    assert torch.allclose(moved[moved > 1e-6], torch.full_like(moved[moved > 1e-6], config.lr), rtol=1e-3)
    assert (moved > 1e-6).float().mean() > 0.9  # nearly every coordinate had a gradient


def test_confident_views_pick_the_lowest_entropy():
    logits = torch.tensor([[[5.0, 0.0], [0.0, 0.0], [2.0, 0.0], [0.0, 9.0]]])
    assert sorted(confident_views(logits, 0.5)[0].tolist()) == [0, 3]
    assert confident_views(logits, 0.1).shape == (1, 1)  # at least one view
    with pytest.raises(ValueError, match="method"):
        TPTConfig(method="ttt")
