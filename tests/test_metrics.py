"""Metrics against hand-computed vectors, torchmetrics, loop references and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.functional.classification import (
    multiclass_auroc,
    multiclass_calibration_error,
    multiclass_f1_score,
)

from calibprompt import metrics as M


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def random_predictions(n: int, k: int, seed: int, scale: float = 2.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * scale
    y = rng.integers(0, k, n)
    z[np.arange(n), y] += rng.normal(1.0, 1.0, n)  # informative but imperfect
    return softmax(z), y


def two_class(conf: list[float], correct: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Binary probabilities with top-label confidence ``conf`` (class 0 predicted)."""
    c = np.asarray(conf, dtype=np.float64)
    probs = np.stack([c, 1.0 - c], axis=1)
    labels = np.where(np.asarray(correct) == 1, 0, 1)
    return probs, labels


# ---------------------------------------------------------------------------------------------
# SPEC.md §3 test vectors
# ---------------------------------------------------------------------------------------------


def test_vector_a_confidence_one_is_kept():
    probs, labels = two_class([0.95, 1.0], [1, 0])
    assert M.ece(probs, labels, n_bins=10) == pytest.approx(0.475, abs=1e-12)


def test_vector_b_all_saturated_half_correct():
    probs, labels = two_class([1.0] * 10, [1, 0] * 5)
    assert M.ece(probs, labels, n_bins=10) == pytest.approx(0.5, abs=1e-12)
    assert M.mce(probs, labels, n_bins=10) == pytest.approx(0.5, abs=1e-12)


def test_vector_c():
    probs, labels = two_class([1, 1, 0.95, 0.95], [1, 1, 1, 0])
    assert M.ece(probs, labels, n_bins=10) == pytest.approx(0.225, abs=1e-12)
    # both samples of conf 0.95 sit in the last bin with the two conf-1.0 samples:
    # acc 3/4, conf 0.975 -> gap 0.225 (one non-empty bin, so MCE = ECE)
    assert M.mce(probs, labels, n_bins=10) == pytest.approx(0.225, abs=1e-12)


def test_mce_is_the_unweighted_maximum():
    # bin [0.6, 0.7): 1 sample, conf 0.65, wrong -> gap 0.65; bin [0.9, 1]: 9 samples all right
    probs, labels = two_class([0.65] + [0.95] * 9, [0] + [1] * 9)
    assert M.mce(probs, labels, n_bins=10) == pytest.approx(0.65)
    assert M.ece(probs, labels, n_bins=10) == pytest.approx(0.1 * 0.65 + 0.9 * 0.05)


def test_bin_index_convention():
    scores = np.array([0.0, 0.0999, 0.1, 0.55, 0.9999, 1.0])
    assert M.bin_index(scores, 10).tolist() == [0, 0, 1, 5, 9, 9]


# ---------------------------------------------------------------------------------------------
# Independent implementations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k", "n_bins", "seed"), [(500, 3, 15, 0), (2000, 9, 10, 1), (301, 2, 20, 2)])
def test_ece_mce_match_torchmetrics(n, k, n_bins, seed):
    probs, labels = random_predictions(n, k, seed)
    assert probs.max() < 1.0  # no exact edges: torchmetrics puts conf == 1.0 in a phantom bin
    p_t, y_t = torch.from_numpy(probs), torch.from_numpy(labels)
    tm_ece = multiclass_calibration_error(p_t, y_t, num_classes=k, n_bins=n_bins, norm="l1")
    tm_mce = multiclass_calibration_error(p_t, y_t, num_classes=k, n_bins=n_bins, norm="max")
    assert M.ece(probs, labels, n_bins) == pytest.approx(float(tm_ece), abs=1e-6)
    assert M.mce(probs, labels, n_bins) == pytest.approx(float(tm_mce), abs=1e-6)


def test_macro_f1_and_auroc_match_torchmetrics():
    probs, labels = random_predictions(800, 5, 3)
    p_t, y_t = torch.from_numpy(probs), torch.from_numpy(labels)
    f1 = multiclass_f1_score(p_t, y_t, num_classes=5, average="macro")
    auc = multiclass_auroc(p_t, y_t, num_classes=5, average="macro")
    assert M.macro_f1(probs, labels) == pytest.approx(float(f1), abs=1e-6)
    assert M.auroc(probs, labels) == pytest.approx(float(auc), abs=1e-6)


def reference_classwise_ece(probs, labels, n_bins):
    n, k = probs.shape
    total = 0.0
    for c in range(k):
        col = probs[:, c]
        hit = (labels == c).astype(float)
        ece_c = 0.0
        for b in range(n_bins):
            lo, hi = b / n_bins, (b + 1) / n_bins
            mask = (col >= lo) & ((col < hi) if b < n_bins - 1 else (col <= hi))
            if mask.any():
                ece_c += mask.sum() / n * abs(hit[mask].mean() - col[mask].mean())
        total += ece_c
    return total / k


def reference_ace(probs, labels, n_ranges):
    """Nixon et al.: per class, sort, R ranges; the sample of rank j is in range r iff
    r*N/R <= j < (r+1)*N/R."""
    n, k = probs.shape
    r_count = min(n_ranges, n)
    total = 0.0
    for c in range(k):
        order = np.argsort(probs[:, c], kind="stable")
        col, hit = probs[order, c], (labels[order] == c).astype(float)
        for r in range(r_count):
            start, stop = math.ceil(r * n / r_count), math.ceil((r + 1) * n / r_count)
            total += abs(hit[start:stop].mean() - col[start:stop].mean())
    return total / (k * r_count)


def reference_equal_mass_top(probs, labels, n_bins):
    conf, pred = probs.max(1), probs.argmax(1)
    order = np.argsort(conf, kind="stable")
    conf, correct = conf[order], (pred == labels)[order].astype(float)
    n = len(conf)
    b_count = min(n_bins, n)
    out = 0.0
    for b in range(b_count):
        s, e = math.ceil(b * n / b_count), math.ceil((b + 1) * n / b_count)
        out += (e - s) / n * abs(correct[s:e].mean() - conf[s:e].mean())
    return out


@pytest.mark.parametrize(("n", "k", "n_bins"), [(200, 3, 15), (1003, 9, 10), (7, 2, 15)])
def test_binned_metrics_match_loop_references(n, k, n_bins):
    probs, labels = random_predictions(n, k, seed=n)
    assert M.classwise_ece(probs, labels, n_bins) == pytest.approx(
        reference_classwise_ece(probs, labels, n_bins), abs=1e-12)
    assert M.ace(probs, labels, n_bins) == pytest.approx(reference_ace(probs, labels, n_bins), abs=1e-12)
    assert M.top_label_equal_mass_ece(probs, labels, n_bins) == pytest.approx(
        reference_equal_mass_top(probs, labels, n_bins), abs=1e-12)


def test_brier_nll_accuracy_match_loops():
    probs, labels = random_predictions(300, 4, 5)
    brier = np.mean([sum((probs[i, c] - (labels[i] == c)) ** 2 for c in range(4)) for i in range(300)])
    nll = np.mean([-math.log(probs[i, labels[i]]) for i in range(300)])
    acc = np.mean([probs[i].argmax() == labels[i] for i in range(300)])
    assert M.brier(probs, labels) == pytest.approx(brier, abs=1e-12)
    assert M.nll(probs, labels) == pytest.approx(nll, abs=1e-12)
    assert M.accuracy(probs, labels) == pytest.approx(acc)


def test_nll_is_finite_for_zero_probability():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert M.nll(probs, [1, 0]) == pytest.approx((-math.log(1e-12) + math.log(2)) / 2)


def test_macro_f1_ignores_classes_absent_from_labels_and_predictions():
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    labels = np.array([0, 1, 1])
    # class 0: tp 1, fp 1, fn 0 -> 2/3; class 1: tp 1, fp 0, fn 1 -> 2/3; class 2 absent
    assert M.macro_f1(probs, labels) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------
# Selective prediction
# ---------------------------------------------------------------------------------------------


def test_risk_coverage_by_hand():
    probs, labels = two_class([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    coverage, risk = M.risk_coverage(probs, labels)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk == pytest.approx([0.0, 0.5, 1 / 3, 0.5])
    assert M.aurc(probs, labels) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)


def test_risk_coverage_averages_over_ties():
    # two tied samples, one wrong: at coverage 1/2 the expected risk is 1/2 whatever the order
    probs, labels = two_class([0.7, 0.7], [1, 0])
    _, risk = M.risk_coverage(probs, labels)
    assert risk == pytest.approx([0.5, 0.5])
    probs2, labels2 = two_class([0.7, 0.7], [0, 1])
    assert M.aurc(probs, labels) == M.aurc(probs2, labels2)


# ---------------------------------------------------------------------------------------------
# Kernel estimators
# ---------------------------------------------------------------------------------------------


def reflected_gaussian(t, x, sigma, terms=6):
    out = 0.0
    for k in range(-terms, terms + 1):
        for centre in (x + 2 * k, -x + 2 * k):
            out += np.exp(-0.5 * ((t - centre) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return out


def test_smooth_ece_at_matches_direct_integration():
    from calibprompt.metrics import _smooth_ece_at

    probs, labels = random_predictions(300, 3, 11)
    conf, correct = M.top_label(probs, labels)
    sigma, grid = 0.05, 2000
    cells = M.bin_index(conf, grid)
    hist = np.bincount(cells, weights=correct - conf, minlength=grid)
    t = (np.arange(4000) + 0.5) / 4000
    centres = (cells + 0.5) / grid  # the deposit position of each sample
    dens = sum(reflected_gaussian(t, c, sigma) * r for c, r in zip(centres, correct - conf, strict=True))
    direct = np.abs(dens / len(conf)).mean()
    assert _smooth_ece_at(hist, sigma, len(conf)) == pytest.approx(direct, rel=1e-3)


def test_smooth_ece_fixed_point_and_limits():
    from calibprompt.metrics import _smooth_ece

    probs, labels = random_predictions(2000, 4, 12)
    conf, correct = M.top_label(probs, labels)
    value, sigma = _smooth_ece(conf, correct, 2000)
    assert value == pytest.approx(sigma, abs=1e-6)
    assert value == M.smooth_ece(probs, labels)
    # for large sigma smECE tends to |mean residual|, and it never exceeds the fine-binned ECE
    from calibprompt.metrics import _smooth_ece_at

    hist = np.bincount(M.bin_index(conf, 2000), weights=correct - conf, minlength=2000)
    assert _smooth_ece_at(hist, 50.0, 2000) == pytest.approx(abs((correct - conf).mean()), rel=1e-6)
    assert value <= M.ece(probs, labels, n_bins=2000) + 1e-12


def calibrated_sample(n: int, k: int, seed: int):
    """Labels drawn from the predicted distribution: perfectly calibrated in expectation."""
    rng = np.random.default_rng(seed)
    probs = softmax(rng.normal(size=(n, k)) * 2)
    labels = (rng.random(n)[:, None] > probs.cumsum(1)).sum(1).clip(max=k - 1)
    return probs, labels


def test_kernel_estimators_small_when_calibrated_large_when_not():
    probs, labels = calibrated_sample(3000, 3, 13)
    assert M.smooth_ece(probs, labels) < 0.03
    assert M.kde_ece(probs[:800], labels[:800], bandwidth=0.05) < 0.05
    sharp = softmax(np.log(probs) * 4)  # overconfident version of the same predictor
    assert M.smooth_ece(sharp, labels) > 0.1
    assert M.kde_ece(sharp[:800], labels[:800], bandwidth=0.05) > 0.1


def test_kde_ece_matches_scipy_beta_reference_for_fixed_bandwidth():
    # Popordanoska et al.'s orientation: the Beta kernel of the data point conf_j, evaluated at
    # conf_i (tests/test_kde_ece.py has the loop re-derivation and the bandwidth rule)
    from scipy.stats import beta

    probs, labels = random_predictions(60, 3, 14)
    conf, correct = M.top_label(probs, labels)
    h = 0.05
    terms = []
    for i in range(60):
        w = np.array([beta.pdf(conf[i], conf[j] / h + 1, (1 - conf[j]) / h + 1) if j != i else 0.0
                      for j in range(60)])
        terms.append(abs((w * correct).sum() / w.sum() - conf[i]))
    assert M.kde_ece(probs, labels, bandwidth=h) == pytest.approx(np.mean(terms), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

prob_rows = st.integers(2, 6).flatmap(
    lambda k: st.lists(
        st.tuples(st.lists(st.floats(0.01, 10.0), min_size=k, max_size=k), st.integers(0, k - 1)),
        min_size=1, max_size=60,
    )
)


def to_arrays(rows):
    w = np.array([r[0] for r in rows], dtype=np.float64)
    return w / w.sum(axis=1, keepdims=True), np.array([r[1] for r in rows])


@settings(max_examples=60, deadline=None)
@given(rows=prob_rows, n_bins=st.integers(1, 20), seed=st.integers(0, 1000))
def test_binned_metric_properties(rows, n_bins, seed):
    probs, labels = to_arrays(rows)
    e, m = M.ece(probs, labels, n_bins), M.mce(probs, labels, n_bins)
    assert 0.0 <= e <= 1.0
    assert m >= e - 1e-12
    perm = np.random.default_rng(seed).permutation(len(labels))
    for fn in (M.ece, M.mce, M.classwise_ece, M.aurc, M.brier, M.nll):
        a = fn(probs, labels, n_bins) if fn in (M.ece, M.mce, M.classwise_ece) else fn(probs, labels)
        b = fn(probs[perm], labels[perm], n_bins) if fn in (M.ece, M.mce, M.classwise_ece) else fn(
            probs[perm], labels[perm])
        assert a == pytest.approx(b, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(levels=st.lists(st.integers(1, 9), min_size=1, max_size=8), reps=st.integers(1, 4))
def test_ece_zero_for_perfectly_calibrated_construction(levels, reps):
    """At confidence c/10 exactly c of every 10 samples are correct -> every bin matches."""
    conf, correct = [], []
    for c in levels:
        level = 0.5 + 0.05 * c  # in (0.5, 1): top label of a binary prediction
        hits = round(level * 20)
        for _ in range(reps):
            conf += [level] * 20
            correct += [1] * hits + [0] * (20 - hits)
    probs, labels = two_class(conf, correct)
    assert M.ece(probs, labels, n_bins=20) == pytest.approx(0.0, abs=1e-12)
    assert M.mce(probs, labels, n_bins=20) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# evaluate, inputs, validation
# ---------------------------------------------------------------------------------------------


def test_evaluate_reports_everything_with_its_convention():
    probs, labels = random_predictions(500, 4, 21)
    out = M.evaluate(probs, labels, n_bins=10)
    for name, fn in M.METRICS.items():
        expected = fn(probs, labels, 10) if name in (
            "ece", "mce", "ace", "classwise_ece", "top_label_equal_mass_ece") else fn(probs, labels)
        assert out[name] == pytest.approx(expected, abs=1e-12), name
    assert out["n_bins"] == 10 and out["n_samples"] == 500 and out["n_classes"] == 4
    assert out["binning"] == M.BINNING_CONVENTION
    bins = M.reliability_bins(probs, labels, 10)
    assert out["n_nonempty_bins"] == bins.n_nonempty == int((bins.counts > 0).sum())
    assert bins.ece == pytest.approx(out["ece"]) and bins.mce == pytest.approx(out["mce"])
    assert bins.counts.sum() == 500


def test_reliability_bins_equal_mass():
    probs, labels = random_predictions(103, 3, 22)
    bins = M.reliability_bins(probs, labels, 10, scheme="equal_mass")
    assert sorted(set(bins.counts.tolist())) == [10, 11]
    assert np.all(bins.lower[1:] >= bins.upper[:-1])
    assert bins.ece == pytest.approx(M.top_label_equal_mass_ece(probs, labels, 10))


def test_accepts_torch_tensors_of_any_float_dtype():
    probs, labels = random_predictions(200, 3, 23)
    expected = M.ece(probs, labels)
    assert M.ece(torch.from_numpy(probs), torch.from_numpy(labels)) == pytest.approx(expected)
    t32 = torch.from_numpy(probs).float()
    assert M.ece(t32, torch.from_numpy(labels)) == pytest.approx(expected, abs=1e-6)
    assert math.isfinite(M.ece(t32.bfloat16(), torch.from_numpy(labels)))
    assert M.ece(probs.tolist(), labels.tolist()) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "empty"),
        (np.array([0.2, 0.8]), np.array([1, 0]), r"shape \(N, K\).*np.stack"),
        (np.array([[1.0], [1.0]]), np.array([0, 0]), "at least 2 classes"),
        (np.array([[0.5, 0.5]]), np.array([0, 1]), r"labels: expected shape \(1,\)"),
        (np.array([[np.nan, 0.5]]), np.array([0]), "NaN"),
        (np.array([[2.0, -1.0]]), np.array([0]), "apply softmax first"),
        (np.array([[0.9, 0.9]]), np.array([0]), "sum to 1.*apply softmax first"),
        (np.array([[0.5, 0.5]]), np.array([2]), r"class indices in \[0, 1\]"),
        (np.array([[0.5, 0.5]]), np.array([-1]), "class indices"),
        (np.array([[0.5, 0.5]]), np.array([0.5]), "integer"),
        (np.array([[0.5, 0.5]]), np.array(["a"]), "integer"),
    ],
)
def test_bad_input_is_named(probs, labels, message):
    with pytest.raises(ValueError, match=message):
        M.ece(probs, labels)


def test_bad_n_bins():
    probs, labels = random_predictions(10, 2, 0)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n_bins"):
            M.ece(probs, labels, bad)


# ---------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------


def test_bootstrap_is_deterministic_and_seed_dependent():
    probs, labels = random_predictions(400, 3, 31)
    a = M.bootstrap("ece", probs, labels, n_resamples=200, seed=5)
    b = M.bootstrap("ece", probs, labels, n_resamples=200, seed=5)
    c = M.bootstrap("ece", probs, labels, n_resamples=200, seed=6)
    assert np.array_equal(a.samples, b.samples)
    assert not np.array_equal(a.samples, c.samples)
    assert a.estimate == M.ece(probs, labels)
    assert a.low <= np.median(a.samples) <= a.high
    assert a.to_dict()["n_resamples"] == 200


def test_bootstrap_is_stratified_by_label():
    _, labels = random_predictions(150, 3, 32)
    idx = M.stratified_bootstrap_indices(labels, 50, seed=0)
    counts = np.bincount(labels, minlength=3)
    for row in idx:
        assert np.array_equal(np.bincount(labels[row], minlength=3), counts)


@pytest.mark.parametrize("name", ["ece", "mce", "brier", "nll", "accuracy", "ace", "smooth_ece"])
def test_bootstrap_fast_paths_equal_the_plain_metric(name):
    probs, labels = random_predictions(300, 4, 33)
    fast = M.bootstrap(name, probs, labels, n_resamples=30, seed=1, n_bins=10)
    plain = M.bootstrap(lambda p, y: M.METRICS[name](p, y, 10) if name in ("ece", "mce", "ace")
                        else M.METRICS[name](p, y), probs, labels, n_resamples=30, seed=1)
    np.testing.assert_allclose(fast.samples, plain.samples, atol=1e-12)


def test_bootstrap_interval_shrinks_with_more_data_and_basic_method():
    small = M.bootstrap("accuracy", *random_predictions(200, 3, 34), n_resamples=300)
    large = M.bootstrap("accuracy", *random_predictions(5000, 3, 34), n_resamples=300)
    assert (large.high - large.low) < (small.high - small.low) / 2
    basic = M.bootstrap("accuracy", *random_predictions(200, 3, 34), n_resamples=300, method="basic")
    assert basic.low == pytest.approx(2 * small.estimate - small.high)
    with pytest.raises(ValueError, match="unknown name"):
        M.bootstrap("nope", *random_predictions(20, 2, 0))
    with pytest.raises(ValueError, match="confidence"):
        M.bootstrap("ece", *random_predictions(20, 2, 0), confidence=1.5)
