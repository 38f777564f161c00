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


# -- TCA: attribute prompts, marginalised probabilities, inter/intra regulariser -------------------------
#: attribute words from the demo model's small vocabulary (words it does not know would all become
#: the unknown token, and the prompts of a class would be identical)
ATTRIBUTES = {"adipose tissue": ["stained", "histology"], "lymphocytes": ["stained", "microscopy", "section"],
              "cancer-associated stroma": ["patch"], "colorectal adenocarcinoma epithelium": ["image", "histology"]}


def ref_tca(t, groups):
    """Inter / intra dispersion by loops over Python lists."""
    rows = [[v / sum(x * x for x in r) ** 0.5 for v in r] for r in t.tolist()]
    classes = sorted(set(groups))
    means = {c: [sum(rows[k][d] for k in range(len(rows)) if groups[k] == c) / groups.count(c)
                 for d in range(len(rows[0]))] for c in classes}
    mu = [sum(means[c][d] for c in classes) / len(classes) for d in range(len(rows[0]))]
    dist = lambda a, b: sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) ** 0.5  # noqa: E731
    inter = sum(dist(means[c], mu) for c in classes) / len(classes)
    intra = sum(dist(rows[k], means[groups[k]]) for k in range(len(rows))) / len(rows)
    return inter, intra


def test_tca_dispersion_matches_loops_is_invariant_and_differentiable():
    from calibprompt import losses

    g = torch.Generator().manual_seed(4)
    t = torch.randn(8, 5, generator=g, dtype=torch.float64)
    groups = [0, 0, 1, 1, 1, 2, 3, 3]
    inter, intra = losses.tca_dispersion(t, torch.tensor(groups))
    ref = ref_tca(t, groups)
    assert inter.item() == pytest.approx(ref[0], rel=1e-12) and intra.item() == pytest.approx(ref[1], rel=1e-12)
    # class order (prompts moved with their class), prompt order within a class and feature scale
    relabel = {0: 2, 1: 0, 2: 3, 3: 1}
    perm = [5, 6, 7, 0, 1, 4, 3, 2]
    moved = losses.tca_dispersion(t[perm] * 3.0, torch.tensor([relabel[groups[k]] for k in perm]))
    assert moved[0].item() == pytest.approx(inter.item(), rel=1e-12)
    assert moved[1].item() == pytest.approx(intra.item(), rel=1e-12)
    x = t.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: torch.stack(losses.tca_dispersion(z, torch.tensor(groups))), (x,),
                                    eps=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="every class"):
        losses.tca_dispersion(t, torch.tensor([0, 0, 2, 2, 2, 2, 2, 2]))


def test_tca_probabilities_are_attribute_marginalised_once():
    from calibprompt.methods.tpt import class_logits

    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 6, generator=g, dtype=torch.float64) * 5
    groups = torch.tensor([1, 0, 1, 2, 0, 1])
    probs = torch.softmax(class_logits(z, groups), dim=-1)
    e = z.exp()
    expected = torch.stack([e[:, groups == c].sum(1) for c in range(3)], dim=1) / e.sum(1, keepdim=True)
    assert torch.allclose(probs, expected, atol=1e-12)
    assert not torch.allclose(probs, torch.softmax(probs, dim=-1))  # not softmax applied twice
    assert torch.equal(class_logits(z, None), z)


def test_tca_adapts_batched_like_per_image_and_its_regulariser_moves_the_features(demo_backbone):
    from calibprompt import losses
    from calibprompt.methods.tpt import tca_learner

    learner = tca_learner(demo_backbone, CLASSES, ATTRIBUTES)
    assert learner.groups.tolist() == [0, 0, 1, 1, 1, 2, 3, 3] and len(learner.classnames) == 8
    feats = views()
    config = TPTConfig(method="tca", lam=5.0, beta=5.0)
    logits, ctx = tpt_adapt(learner, feats, config)
    assert logits.shape == (3, 4)  # class logits, not prompt logits
    for i in range(3):
        alone, _ = tpt_adapt(learner, feats[i:i + 1], config)
        assert torch.allclose(alone, logits[i:i + 1], atol=1e-5)
    shared, _ = tpt_adapt(learner, feats, replace(config, share_initial_forward=False))
    assert torch.allclose(shared, logits, atol=1e-5)
    with torch.no_grad():
        before = losses.tca_dispersion(learner(), learner.groups)
    for lam, beta, part, sign in ((1e4, 0.0, 0, +1), (0.0, 1e4, 1, -1)):  # inter up; intra down
        _, ctx = tpt_adapt(learner, views(b=2), TPTConfig(method="tca", lam=lam, beta=beta))
        with torch.no_grad():
            after = losses.tca_dispersion(learner.contexts_features(ctx)[0], learner.groups)
        assert sign * (after[part] - before[part]) > 0
    with pytest.raises(ValueError, match="no attribute words"):
        tca_learner(demo_backbone, CLASSES, {"adipose tissue": ["stained"]})
    with pytest.raises(ValueError, match="beta"):
        TPTConfig(method="ctpt", beta=1.0)


def test_tca_loss_gradient_through_the_text_encoder_matches_finite_differences(learner64):
    """The whole TCA loss (entropy of the marginalised class probabilities - alpha Inter + beta
    Intra), through the text encoder in float64, against central differences; the shared first
    gradient (batched VJP) equals it."""
    from calibprompt.methods.tpt import class_logits, tca_learner

    learner = tca_learner(learner64.backbone, CLASSES, ATTRIBUTES)
    learner.ctx.data = learner.ctx.data.double()
    feats = views(b=1, d=learner.backbone.embed_dim).double()
    scale, config = learner.backbone.logit_scale, TPTConfig(method="tca", lam=3.0, beta=2.0)

    def loss(ctx):
        text = learner.contexts_features(ctx[None]).double()
        logits = class_logits(scale * torch.einsum("bvd,bcd->bvc", feats, text), learner.groups)
        return _image_losses(logits, text, config, groups=learner.groups).sum()

    ctx = learner.ctx.detach().double().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (ctx,), eps=1e-6, atol=1e-6, rtol=1e-4)
    shared = _shared_first_gradient(learner, feats, config)
    (analytic,) = torch.autograd.grad(loss(ctx), ctx)
    assert torch.allclose(shared[0].double(), analytic, atol=1e-9)


@pytest.mark.parametrize("config", [TPTConfig(method="ctpt", lam=50.0), TPTConfig(steps=2),
                                    TPTConfig(steps=0), TPTConfig(method="atpt", lam=80.0)],
                         ids=["ctpt", "two-steps", "zero-shot", "atpt"])
def test_the_ensemble_batched_across_templates_equals_each_template_alone(demo_backbone, config):
    """Templates of one context length run as K x B rows of one adaptation, others as their own
    group; every template's logits and contexts equal its own tpt_adapt, and the prediction is
    their mean."""
    from calibprompt.methods.tpt import tpt_adapt_ensemble

    words = ["a photo of a", "a photo of the", "a picture of", "a picture of the"]  # lengths 4, 4, 3, 4
    learners = [PromptLearner(demo_backbone, CLASSES, init="words", init_words=w) for w in words]
    feats = views(b=3)
    mean, contexts = tpt_adapt_ensemble(learners, feats, config)
    alone = [tpt_adapt(learner, feats, config) for learner in learners]
    assert torch.allclose(mean, torch.stack([logits for logits, _ in alone]).mean(0), atol=1e-5)
    for (_, ctx), got in zip(alone, contexts, strict=True):
        assert got.shape == ctx.shape and torch.allclose(got, ctx, atol=1e-6)
