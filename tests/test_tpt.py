"""TPT core: batched adaptation equals per-image adaptation; AdamW first step; view selection."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from calibprompt.methods.tpt import (
    TPTConfig,
    _image_losses,
    _shared_first_gradient,
    confident_views,
    tpt_adapt,
)
from calibprompt.prompts import PromptLearner

CLASSES = ["adipose tissue", "lymphocytes", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"]


def views(b=3, v=16, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, v, d, generator=g), dim=-1)


@pytest.fixture(scope="module")
def demo_backbone():
    from calibprompt.backbones import load_backbone

    return load_backbone("demo")


@pytest.fixture
def learner(demo_backbone):
    """The embedded demo model with TPT's initial prompt."""
    return PromptLearner(demo_backbone, CLASSES, init="words", init_words="a photo of a")


def test_context_features_match_the_learner(learner):
    ctx = learner.ctx.detach()[None].repeat(2, 1, 1)
    ctx[1] += 0.1
    feats = learner.contexts_features(ctx)
    assert torch.allclose(feats[0], learner(), atol=1e-6)
    with torch.no_grad():
        learner.ctx.add_(0.1)
    assert torch.allclose(feats[1], learner(), atol=1e-6)


@pytest.mark.parametrize("config", [
    TPTConfig(), TPTConfig(method="ctpt", lam=50.0), TPTConfig(method="otpt", lam=18.0),
    TPTConfig(method="otpt_fro", lam=18.0), TPTConfig(method="soc", lam=5.0, delta=0.2), TPTConfig(steps=2),
    TPTConfig(method="atpt", lam=80.0),
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


# -- shared initial forward ----------------------------------------------------------------------
METHOD_CONFIGS = [TPTConfig(), TPTConfig(method="ctpt", lam=50.0), TPTConfig(method="otpt", lam=18.0),
                  TPTConfig(method="otpt_fro", lam=18.0), TPTConfig(method="soc", lam=5.0, delta=0.2),
                  TPTConfig(method="atpt", lam=80.0)]


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda c: c.method)
def test_shared_initial_forward_equals_one_forward_per_image(learner, config):
    feats = views(b=4)
    assert _shared_first_gradient(learner, feats, config) is not None  # the batched path ran
    shared_logits, shared_ctx = tpt_adapt(learner, feats, config)
    plain_logits, plain_ctx = tpt_adapt(learner, feats, replace(config, share_initial_forward=False))
    assert torch.equal(shared_logits.argmax(1), plain_logits.argmax(1))
    assert torch.allclose(shared_logits, plain_logits, atol=1e-5)
    assert torch.allclose(shared_ctx, plain_ctx, atol=1e-6)


@pytest.mark.parametrize("case", ["plip", "biomedclip", "medclip", "quiltnet"])
def test_shared_initial_forward_works_for_every_family(backbones, case):
    learner = PromptLearner(backbones[case], CLASSES, init="words", init_words="a photo of a")
    feats = views(b=3, d=backbones[case].embed_dim)
    config = TPTConfig(method="ctpt", lam=50.0)
    assert _shared_first_gradient(learner, feats, config) is not None
    shared_logits, _ = tpt_adapt(learner, feats, config)
    plain_logits, _ = tpt_adapt(learner, feats, replace(config, share_initial_forward=False))
    assert torch.allclose(shared_logits, plain_logits, atol=1e-5)


# -- gradients against finite differences ----------------------------------------------------------
@pytest.fixture(scope="module")
def learner64(tiny_backbone):
    backbone = copy.deepcopy(tiny_backbone)
    backbone.model.double()
    learner = PromptLearner(backbone, CLASSES, init="words", init_words="a photo of a", shared_prefix=False)
    learner.ctx.data = learner.ctx.data.double()
    return learner


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda c: c.method)
def test_loss_gradient_through_the_text_encoder_matches_finite_differences(learner64, config):
    """d(entropy + regulariser)/d(context) through the text encoder, in float64, against central
    differences (the view selection is fixed by the initial logits, as the algorithm detaches it)."""
    feats = views(b=1, d=learner64.backbone.embed_dim).double()
    scale = learner64.backbone.logit_scale

    def loss(ctx):
        text = learner64.contexts_features(ctx[None]).double()
        return _image_losses(scale * torch.einsum("bvd,bcd->bvc", feats, text), text, config).sum()

    ctx = learner64.ctx.detach().double().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (ctx,), eps=1e-6, atol=1e-6, rtol=1e-4)
    # the batched VJP of the shared forward gives the same gradient
    shared = _shared_first_gradient(learner64, feats, config)
    (analytic,) = torch.autograd.grad(loss(ctx), ctx)
    assert torch.allclose(shared[0].double(), analytic, atol=1e-9)


@pytest.mark.parametrize(("method", "name", "sign"), [("ctpt", "atfd", +1), ("otpt", "orth", -1),
                                                      ("otpt_fro", "orth_fro", -1), ("soc", "soc", -1),
                                                      ("atpt", "ad", +1)])
def test_a_dominant_regulariser_moves_the_text_features_its_way(learner, method, name, sign):
    """With a large weight, one step raises ATFD (C-TPT) or the nearest-class angles (A-TPT: the
    paper's L_TPT - lambda * AD; its repository's flipped sign would lower them), or lowers the
    orthogonality / Huber penalty (O-TPT, SoC) relative to the initial prompt."""
    from calibprompt import losses

    feats = views(b=2)
    _, ctx = tpt_adapt(learner, feats, TPTConfig(method=method, lam=1e4, delta=0.2))
    fn = losses.LOSSES[name].fn
    kwargs = {"delta": 0.2} if name == "soc" else {}
    with torch.no_grad():
        before = fn(learner(), **kwargs)
        after = fn(learner.contexts_features(ctx)[0], **kwargs)
    assert sign * (after - before) > 0


def test_zero_steps_is_zero_shot_with_the_initial_prompt(learner):
    feats = views(b=2)
    logits, ctx = tpt_adapt(learner, feats, TPTConfig(steps=0))
    with torch.no_grad():
        expected = learner.backbone.logit_scale * feats[:, 0] @ learner().T
    assert torch.allclose(logits, expected, atol=1e-5)
    assert torch.equal(ctx[0], learner.ctx.detach())


# -- several steps: the published code selects the confident views once -------------------------
def _manual_tpt(learner, feats, steps, lr, reselect):
    """Plain TPT on one image, written out: marginal entropy of the selected views, AdamW; the
    views selected at the first step (the published ``selected_idx``) or at every step."""
    from calibprompt import losses

    scale = learner.backbone.logit_scale
    ctx = learner.ctx.detach()[None].clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([ctx], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    chosen = None
    for _ in range(steps):
        text = learner.contexts_features(ctx)[0]
        view_logits = scale * feats[0] @ text.T  # (V, C)
        if chosen is None or reselect:
            entropy = -(view_logits.softmax(-1) * view_logits.log_softmax(-1)).sum(-1)
            chosen = entropy.detach().argsort()[: max(1, int(0.25 * feats.shape[1]))]
        loss = losses.marginal_entropy(view_logits[chosen])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return scale * feats[0, 0] @ learner.contexts_features(ctx)[0].T, chosen


def test_several_steps_select_the_confident_views_once_as_published(learner):
    feats = views(b=1, v=16, seed=3)
    lr = 0.5  # large steps, so that a re-selection picks other views
    published, first = _manual_tpt(learner, feats, 4, lr, reselect=False)
    every_step, last = _manual_tpt(learner, feats, 4, lr, reselect=True)
    assert set(first.tolist()) != set(last.tolist())  # the two algorithms really differ here
    config = TPTConfig(steps=4, lr=lr, selection=0.25)
    ours, _ = tpt_adapt(learner, feats, config)
    assert torch.allclose(ours[0], published, atol=1e-4)
    reselected, _ = tpt_adapt(learner, feats, replace(config, reselect=True))
    assert torch.allclose(reselected[0], every_step, atol=1e-4)
    assert not torch.allclose(ours[0], reselected[0], atol=1e-4)


def test_a_float64_backbone_adapts_in_float64(learner64):
    feats = views(b=2, d=learner64.backbone.embed_dim)  # cached features are float32
    for steps in (1, 2):
        logits, ctx = tpt_adapt(learner64, feats, TPTConfig(steps=steps))
        assert logits.dtype == torch.float64 and torch.isfinite(logits).all() and ctx.dtype == torch.float64
