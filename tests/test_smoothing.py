"""Randomized smoothing (Cohen et al. 2019) as calibprompt certifies: the arithmetic against
independent computations, the noise's seeding, and a base classifier whose smoothed prediction is
known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import binom, binomtest, norm

from calibprompt.methods.smoothing import (
    ABSTAIN,
    certified_accuracy,
    certify,
    clopper_pearson_lower,
    max_certifiable_radius,
    noise,
    noisy_counts,
    pixel_transform,
    predict,
)


@pytest.mark.parametrize(("n_a", "n", "alpha"), [(90, 100, 0.001), (9_990, 10_000, 0.001), (55, 100, 0.05),
                                                  (1, 10, 0.01), (100, 100, 0.001)])
def test_clopper_pearson_lower_bound_is_the_p_at_which_seeing_n_a_or_more_has_probability_alpha(n_a, n, alpha):
    # independent: solve P(Bin(n, p) >= n_a) = alpha for p by root finding on the binomial tail
    expected = brentq(lambda p: binom.sf(n_a - 1, n, p) - alpha, 1e-12, 1 - 1e-15, xtol=1e-14)
    assert clopper_pearson_lower(n_a, n, alpha) == pytest.approx(expected, abs=1e-9)
    assert clopper_pearson_lower(0, n, alpha) == 0.0


def test_certify_radius_abstention_and_the_largest_certifiable_radius():
    c = certify(np.array([1, 9, 0]), np.array([10, 85, 5]), sigma=0.5, alpha=0.001)
    p = clopper_pearson_lower(85, 100, 0.001)
    assert (c.prediction, c.candidate, c.n_a, c.n) == (1, 1, 85, 100)
    assert c.p_lower == pytest.approx(p) and c.radius == pytest.approx(0.5 * norm.ppf(p))
    # the candidate comes from the selection draws only, even when estimation disagrees
    c = certify(np.array([6, 4]), np.array([30, 70]), sigma=0.25, alpha=0.001)
    assert c.candidate == 0 and c.n_a == 30 and c.prediction == ABSTAIN and c.radius == 0.0
    # p_lower just below 1/2 abstains, just above certifies a tiny radius
    assert certify(np.array([1, 0]), np.array([500, 500]), 1.0, 0.001).prediction == ABSTAIN
    # independent of the quantile function: the radius maps back to p_lower through the normal CDF
    for n_a in (600, 800, 990):
        c = certify(np.array([0, 5]), np.array([1000 - n_a, n_a]), sigma=0.7, alpha=0.001)
        assert norm.cdf(c.radius / 0.7) == pytest.approx(c.p_lower, abs=1e-12)
        assert 1 - 0.5 * math.erfc(c.radius / 0.7 / math.sqrt(2)) == pytest.approx(c.p_lower, abs=1e-12)
    every = certify(np.array([10, 0]), np.array([10_000, 0]), sigma=1.0, alpha=0.001)
    assert every.radius == pytest.approx(max_certifiable_radius(1.0, 10_000, 0.001))
    assert max_certifiable_radius(1.0, 10_000, 0.001) == pytest.approx(3.20, abs=0.01)
    assert max_certifiable_radius(2.0, 100_000, 0.001) == pytest.approx(2 * 3.81, abs=0.02)


@pytest.mark.parametrize(("counts", "alpha"), [([60, 40, 0], 0.05), ([900, 100, 0], 0.001), ([51, 49], 0.05),
                                               ([0, 30, 29], 0.5), ([5, 0, 0], 0.05)])
def test_predict_abstains_exactly_when_the_binomial_test_says_so(counts, alpha):
    top = sorted(counts, reverse=True)
    abstain = binomtest(top[0], top[0] + top[1], 0.5).pvalue > alpha
    assert predict(np.array(counts), alpha) == (ABSTAIN if abstain else int(np.argmax(counts)))


def test_certified_accuracy_counts_abstentions_as_wrong_and_radius_at_least_r():
    radii = [0.0, 0.3, 0.5, 1.2]
    correct = [False, True, True, True]  # the first abstained (radius 0, wrong)
    np.testing.assert_allclose(certified_accuracy(radii, correct, [0.0, 0.3, 0.5, 1.0, 2.0]),
                               [0.75, 0.75, 0.5, 0.25, 0.0])


def test_noise_is_seeded_per_draw_disjoint_and_independent_of_batching():
    a = noise((3, 4, 4), 1, "img0", 0.25, range(0, 10))
    b = torch.cat([noise((3, 4, 4), 1, "img0", 0.25, range(0, 3)), noise((3, 4, 4), 1, "img0", 0.25, range(3, 10))])
    assert torch.equal(a, b)
    assert not torch.equal(noise((3, 4, 4), 1, "img0", 0.25, [0]), noise((3, 4, 4), 1, "img0", 0.25, [10]))
    assert not torch.equal(noise((3, 4, 4), 1, "img1", 0.25, [0]), a[:1])  # per image
    assert not torch.equal(noise((3, 4, 4), 2, "img0", 0.25, [0]), a[:1])  # per seed
    assert a.std().item() == pytest.approx(0.25, rel=0.2)


def linear_classifier(w: torch.Tensor, b: float):
    def classify(x: torch.Tensor) -> torch.Tensor:
        score = x.flatten(1).double() @ w.double() + b
        return torch.stack([-score, score], dim=1)  # class 1 where w·x + b > 0
    return classify


def test_a_linear_base_classifier_smooths_as_the_closed_form_says():
    """For f(x) = 1[w·x + b > 0], P(f(x + δ) = f(x)) = Φ(|w·x + b| / (σ‖w‖)) and the exact certified
    radius is |w·x + b| / ‖w‖: the counts follow that probability and CERTIFY's radius stays below it."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 4 * 4, generator=g)
    x = torch.rand(3, 4, 4, generator=g)
    b = 0.3 * float(w.norm()) - float(x.flatten() @ w)  # distance 0.3 to the hyperplane, class 1
    sigma, n0, n = 0.5, 20, 4000
    classify = linear_classifier(w, b)
    ident = lambda t: t  # noqa: E731 - no normalisation in this toy pixel space
    sel, _ = noisy_counts(classify, x, ident, 2, 7, "x", sigma, range(n0), batch_size=7)
    est, probs = noisy_counts(classify, x, ident, 2, 7, "x", sigma, range(n0, n0 + n), batch_size=64)
    p_true = norm.cdf(0.3 / sigma)
    assert abs(est[1] / n - p_true) < 4 * np.sqrt(p_true * (1 - p_true) / n)
    cert = certify(sel, est, sigma, alpha=0.001)
    assert cert.prediction == 1 and 0 < cert.radius < 0.3
    assert cert.radius > 0.3 - 0.15  # close to the true radius at n = 4000
    # the same draws in other batch sizes give identical counts and probabilities
    est2, probs2 = noisy_counts(classify, x, ident, 2, 7, "x", sigma, range(n0, n0 + n), batch_size=1000)
    assert (est2 == est).all() and torch.allclose(probs, probs2)


def test_pixel_space_is_before_the_normalisation():
    from PIL import Image

    from calibprompt.backbones import load_backbone

    transform = load_backbone("demo").image_transform()
    split = pixel_transform(transform)
    image = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8))
    pixels = split.to_pixels(image)
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.shape == (3, 32, 32)
    assert torch.allclose(split.normalize(pixels), transform(image))
    assert torch.allclose(split.normalize(pixels[None]), transform(image)[None])


def test_medclip_noise_is_drawn_on_its_one_grey_channel():
    from PIL import Image

    from calibprompt.backbones.transforms import medclip_transform

    transform = medclip_transform(32)
    split = pixel_transform(transform)
    image = Image.fromarray((np.random.default_rng(1).random((20, 30, 3)) * 255).astype(np.uint8))
    pixels = split.to_pixels(image)
    assert pixels.shape == (1, 32, 32)  # the grey image: noise goes on one channel
    assert torch.allclose(split.normalize(pixels), transform(image)) and transform(image).shape == (3, 32, 32)


def test_certifying_an_image_of_the_demo_model_does_not_depend_on_the_batch_size(tmp_path):
    from calibprompt.backbones import load_backbone
    from calibprompt.data import load_dataset
    from calibprompt.data.images import file_hash, open_image
    from calibprompt.demo.tissue import write_demo_dataset
    from calibprompt.methods.smoothing import certify_image, prompted_classifier

    backbone = load_backbone("demo")
    write_demo_dataset(tmp_path, per_class={"test": 1})
    test = load_dataset("demo", tmp_path, "test")
    split = pixel_transform(backbone.image_transform())
    classify = prompted_classifier(backbone, backbone.encode_texts(test.prompts()))
    pixels = split.to_pixels(open_image(test.paths[0]))
    kw = {"key": file_hash(test.paths[0]), "sigma": 0.25, "n0": 10, "n": 60, "alpha": 0.01, "seed": 3}
    a = certify_image(classify, pixels, split.normalize, test.num_classes, batch_size=7, **kw)
    b = certify_image(classify, pixels, split.normalize, test.num_classes, batch_size=60, **kw)
    assert a.certificate == b.certificate and (a.counts == b.counts).all()
    np.testing.assert_allclose(a.mean_probs, b.mean_probs, atol=1e-6)  # float32 encoder: batch rounding only
    assert a.counts.sum() == 60 and a.mean_probs.sum() == pytest.approx(1.0)
    # sigma -> 0 recovers the base classifier on the clean image, certified at every draw
    clean = classify(split.normalize(pixels[None])).argmax(1).item()
    tiny = certify_image(classify, pixels, split.normalize, test.num_classes, batch_size=60,
                         **{**kw, "sigma": 1e-6})
    assert tiny.certificate.prediction == clean and tiny.counts[clean] == 60
    with pytest.raises(ValueError, match="n0"):
        certify_image(classify, pixels, split.normalize, test.num_classes, **{**kw, "n0": 0})
