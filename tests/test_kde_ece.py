"""``kde_ece`` against an independent loop re-derivation of Popordanoska et al.'s estimator as
their code computes it (tpopordanoska/ece-kde, ``get_ece_kde(..., p=1, "top_label")`` and
``get_bandwidth``), written from the definition: Beta kernel of the *data point* c_j evaluated
at c_i, leave-one-out sums, the score sum_i [log sum_{j != i} K - log((N - 1) h)] over 15
log-spaced bandwidths in [1e-5, 1e-1] and 5 linear ones in [0.2, 1], true maximum."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibprompt import metrics as M
from calibprompt.metrics.smooth import _kde_bandwidth
from tests.test_metrics import calibrated_sample, random_predictions, softmax

GRID = [10.0 ** (-5.0 + 4.0 * t / 14.0) for t in range(15)] + [0.2, 0.4, 0.6, 0.8, 1.0]


def loop_top_label(probs, labels) -> tuple[list[float], list[float]]:
    conf, correct = [], []
    for row, label in zip(probs.tolist(), labels.tolist(), strict=True):
        best = 0
        for k in range(1, len(row)):
            if row[k] > row[best]:
                best = k
        conf.append(row[best])
        correct.append(1.0 if best == label else 0.0)
    return conf, correct


def log_kernel(x: float, centre: float, h: float) -> float:
    """log of the Beta density with parameters (centre / h + 1, (1 - centre) / h + 1) at x."""
    a, b = centre / h + 1.0, (1.0 - centre) / h + 1.0
    log_norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return (a - 1.0) * math.log(x) + (b - 1.0) * math.log(1.0 - x) - log_norm


def loo_sums(
    conf: list[float], i: int, h: float, weights: list[float]
) -> tuple[float, float, float]:
    """(log-shift m, sum_{j != i} e^(log K_ij - m) w_j, sum_{j != i} e^(log K_ij - m))."""
    logs = [log_kernel(conf[i], conf[j], h) for j in range(len(conf)) if j != i]
    w = [weights[j] for j in range(len(conf)) if j != i]
    m = max(logs)
    num = sum(math.exp(v - m) * wj for v, wj in zip(logs, w, strict=True))
    den = sum(math.exp(v - m) for v in logs)
    return m, num, den


def loop_kde_ece(conf: list[float], correct: list[float], h: float) -> float:
    total = 0.0
    for i in range(len(conf)):
        _, num, den = loo_sums(conf, i, h, correct)
        total += abs(num / den - conf[i])
    return total / len(conf)


def loop_scores(conf: list[float]) -> list[float]:
    n = len(conf)
    scores = []
    for h in GRID:
        score = 0.0
        for i in range(n):
            m, _, den = loo_sums(conf, i, h, [0.0] * n)
            score += m + math.log(den) - math.log((n - 1) * h)
        scores.append(score)
    return scores


def loop_bandwidth(conf: list[float]) -> float:
    best_h, best = None, -math.inf
    for h, score in zip(GRID, loop_scores(conf), strict=True):
        if score > best:
            best_h, best = h, score
    return best_h


CASES = [(25, 2, 0, 2.0), (40, 3, 1, 1.0), (33, 4, 2, 3.0), (48, 5, 3, 0.5), (30, 5, 4, 2.0)]


@pytest.mark.parametrize(("n", "k", "seed", "scale"), CASES)
@pytest.mark.parametrize("h", [1e-4, 0.003, 0.05, 0.3, 1.0])
def test_kde_ece_equals_loop_derivation_at_fixed_bandwidth(n, k, seed, scale, h):
    probs, labels = random_predictions(n, k, seed, scale)
    conf, correct = loop_top_label(probs, labels)
    expected = loop_kde_ece(conf, correct, h)
    assert M.kde_ece(probs, labels, bandwidth=h) == pytest.approx(expected, abs=1e-9)
    assert M.kde_ece(probs, labels, bandwidth=h, chunk=7) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(("n", "k", "seed", "scale"), CASES)
def test_bandwidth_rule_equals_loop_grid_search(n, k, seed, scale):
    probs, labels = random_predictions(n, k, seed, scale)
    conf, correct = loop_top_label(probs, labels)
    h = loop_bandwidth(conf)
    assert _kde_bandwidth(np.array(conf)) == pytest.approx(h, rel=1e-12)
    assert M.kde_ece(probs, labels) == pytest.approx(loop_kde_ece(conf, correct, h), abs=1e-9)


def test_all_negative_scores_take_the_true_maximum_not_minus_one():
    # three widely spread confidences: every candidate's score is negative, where the
    # authors' search (best score starting at 0) would return -1
    probs = np.array([[0.4, 0.3, 0.3], [0.7, 0.2, 0.1], [0.999, 0.0005, 0.0005]])
    labels = np.array([0, 1, 0])
    conf, correct = loop_top_label(probs, labels)
    scores = loop_scores(conf)
    assert max(scores) < 0
    argmax = GRID[scores.index(max(scores))]
    assert 0.2 < argmax < 1.0  # an interior candidate, not the grid's end
    chosen = _kde_bandwidth(np.array(conf))
    assert chosen == pytest.approx(argmax, rel=1e-12)
    assert chosen != -1
    assert M.kde_ece(probs, labels) == pytest.approx(loop_kde_ece(conf, correct, argmax), abs=1e-12)


@pytest.mark.parametrize("bandwidth", [None, 0.02])
def test_kde_ece_invariant_to_row_permutation(bandwidth):
    probs, labels = random_predictions(150, 4, 7)
    perm = np.random.default_rng(8).permutation(150)
    assert M.kde_ece(probs[perm], labels[perm], bandwidth=bandwidth) == pytest.approx(
        M.kde_ece(probs, labels, bandwidth=bandwidth), abs=1e-12
    )


def test_kde_ece_small_when_calibrated_larger_when_not():
    probs, labels = calibrated_sample(3000, 3, 13)
    sharp = softmax(np.log(probs) * 4)  # overconfident version of the same predictor
    assert M.kde_ece(probs, labels, bandwidth=0.05) < 0.03
    assert M.kde_ece(sharp, labels, bandwidth=0.05) > 0.1
    # the authors' bandwidth rule picks very small bandwidths here (its -log h term), which
    # biases the estimate upwards, so at the default only the ordering is asserted
    assert M.kde_ece(probs, labels) < M.kde_ece(sharp, labels) - 0.05


def test_kernel_is_the_data_points_not_chens():
    # Chen's orientation (kernel of the evaluation point evaluated at the data) is another metric
    probs, labels = random_predictions(40, 3, 21)
    conf, correct = loop_top_label(probs, labels)
    h = 0.05
    chen = 0.0
    for i in range(40):
        logs = [log_kernel(conf[j], conf[i], h) for j in range(40) if j != i]
        w = [correct[j] for j in range(40) if j != i]
        m = max(logs)
        num = sum(math.exp(v - m) * wj for v, wj in zip(logs, w, strict=True))
        chen += abs(num / sum(math.exp(v - m) for v in logs) - conf[i]) / 40
    value = M.kde_ece(probs, labels, bandwidth=h)
    assert value == pytest.approx(loop_kde_ece(conf, correct, h), abs=1e-9)
    assert abs(value - chen) > 1e-4


def test_kde_ece_edge_cases():
    # a confidence of exactly 1 (NaN in the authors' code) is clipped to 1 - 1e-10
    probs = np.array([[1.0, 0.0], [0.7, 0.3], [0.6, 0.4]])
    labels = np.array([0, 0, 1])
    conf, correct = loop_top_label(probs, labels)
    conf[0] = 1.0 - 1e-10
    assert M.kde_ece(probs, labels, bandwidth=0.1) == pytest.approx(
        loop_kde_ece(conf, correct, 0.1), abs=1e-9
    )
    # no sample correct: every estimate is 0, so the value is the mean confidence
    probs, labels = random_predictions(30, 3, 5)
    wrong = (probs.argmax(1) + 1) % 3
    assert M.kde_ece(probs, wrong, bandwidth=0.01) == pytest.approx(probs.max(1).mean(), abs=1e-12)
    with pytest.raises(ValueError, match="at least 2 samples"):
        M.kde_ece(probs[:1], labels[:1])
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="bandwidth"):
            M.kde_ece(probs, labels, bandwidth=bad)
    with pytest.raises(ValueError, match="chunk"):
        M.kde_ece(probs, labels, chunk=0)
