"""Properties every metric must have, for every metric of ``METRICS`` (and ``kde_ece``).

- A metric of a set of predictions does not depend on the order of its rows, also when scores
  are tied (probabilities on a 0.01 grid, saturated rows of exact 1.0 / 0.0, repeated rows).
- Relabelling the classes (permuting the columns together with the labels) changes nothing
  when every row has a unique top class. When the top is tied, the top label is the lowest
  tied index (``np.argmax``'s rule), tested on its own below.
- float32 and float64 inputs agree to 1e-6 on inputs away from every bin edge: probabilities
  on the lattice ``(j + 1/K) / 4000``, at least 1/(4000 K) from any multiple of 1/4000 -- so
  from the equal-width edges of every ``n_bins`` dividing 4000, from smooth ECE's 1/2000 grid,
  and distinct values stay distinct (equal-mass bins and top labels do not change).
- The textbook vectors A, B, C, and the equal-mass rule (``EQUAL_MASS_CONVENTION``) against a
  reference written from its words.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calibprompt import metrics as M
from calibprompt.metrics._validation import check_probs_labels

#: Every metric of the registry, plus the O(N^2) KDE ECE (kept to small inputs).
ALL_METRICS = {**M.METRICS, "kde_ece": M.METRICS.get("kde_ece", M.kde_ece)}
NAMES = sorted(ALL_METRICS)
SMALL = {"kde_ece"}  # O(N^2): at most SMALL_N rows
SMALL_N = 24
TOL = 1e-9  # summation order only (a split tie group moves a metric by far more)
FLOAT32_TOL = 1e-6

SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def takes_bins(fn) -> bool:
    return "n_bins" in inspect.signature(fn).parameters


def measure(name: str, probs, labels, n_bins: int) -> float:
    fn = ALL_METRICS[name]
    return fn(probs, labels, n_bins=n_bins) if takes_bins(fn) else fn(probs, labels)


def outcome(name: str, probs, labels, n_bins: int) -> float | str:
    """The metric, or "ValueError" where it refuses the input (e.g. kde_ece with N = 1)."""
    try:
        return measure(name, probs, labels, n_bins)
    except ValueError:
        return "ValueError"


def same(a: float | str, b: float | str, tol: float) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def assert_invariant(probs, labels, n_bins: int, transform, tol: float, what: str) -> None:
    """``metric(transform(probs, labels)) == metric(probs, labels)`` for every metric (the
    O(N^2) ones on the first SMALL_N rows, transformed as such)."""
    bad = {}
    for name in NAMES:
        p, y = (probs[:SMALL_N], labels[:SMALL_N]) if name in SMALL else (probs, labels)
        a, b = outcome(name, p, y, n_bins), outcome(name, *transform(p, y), n_bins)
        if not same(a, b, tol):
            bad[name] = (a, b)
    assert not bad, f"{what} changed: {bad}"


# ---------------------------------------------------------------------------------------------
# Strategies: predictions with ties on purpose
# ---------------------------------------------------------------------------------------------


@st.composite
def grid_row(draw, k: int, steps: int = 100) -> list[int]:
    """A row of K non-negative integers summing to ``steps`` (probabilities = row / steps)."""
    kind = draw(st.sampled_from(["grid", "grid", "saturated", "uniform"]))
    if kind == "saturated":  # exact 1.0 and 0.0
        row = [0] * k
        row[draw(st.integers(0, k - 1))] = steps
        return row
    if kind == "uniform" and steps % k == 0:  # every class tied for the top
        return [steps // k] * k
    cuts = sorted(draw(st.lists(st.integers(0, steps), min_size=k - 1, max_size=k - 1)))
    return [b - a for a, b in zip([0, *cuts], [*cuts, steps], strict=True)]


@st.composite
def tied_predictions(draw, max_n: int = 60):
    """(probs, labels, n_bins): rows drawn from a small pool (so whole rows repeat), each row
    on the 0.01 grid or saturated, so confidences and class probabilities tie across rows."""
    k = draw(st.integers(2, 5))
    pool = draw(st.lists(grid_row(k), min_size=1, max_size=6))
    n = draw(st.integers(1, max_n))
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))
    probs = np.array([pool[i] for i in picks], dtype=np.float64) / 100.0
    labels = np.array(draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    n_bins = draw(st.integers(1, 20))
    return probs, labels, n_bins


# ---------------------------------------------------------------------------------------------
# Row order
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(data=tied_predictions(), seed=st.integers(0, 2**32 - 1))
def test_every_metric_ignores_row_order_with_ties(data, seed):
    probs, labels, n_bins = data
    rng = np.random.default_rng(seed)

    def shuffle(p, y):
        perm = rng.permutation(len(y))
        return p[perm], y[perm]

    assert_invariant(probs, labels, n_bins, shuffle, TOL, "row permutation")


def test_tied_confidences_are_never_split_by_row_order():
    """Confidences 0.7, 0.8, 0.8, 0.9 with one of the 0.8s wrong, 2 equal-mass bins: the old
    rank rule put the first 0.8 in bin 0 and the second in bin 1 (0.30 or 0.20 by row order);
    by value the bins are {0.7} and {0.8, 0.8, 0.9} whatever the order."""
    probs, labels = two_class([0.7, 0.8, 0.8, 0.9], [1, 1, 0, 1])
    swapped = [0, 2, 1, 3]
    # (1/4)|1 - 0.7| + (3/4)|2/3 - 2.5/3|
    assert M.top_label_equal_mass_ece(probs, labels, 2) == pytest.approx(0.2, abs=1e-12)
    assert M.top_label_equal_mass_ece(probs[swapped], labels[swapped], 2) == pytest.approx(0.2, abs=1e-12)
    assert M.ace(probs, labels, 2) == pytest.approx(M.ace(probs[swapped], labels[swapped], 2), abs=1e-15)
    assert M.reliability_bins(probs, labels, 2, scheme="equal_mass").counts.tolist() == [1, 3]


# ---------------------------------------------------------------------------------------------
# Class order
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(data=tied_predictions(), seed=st.integers(0, 2**32 - 1))
def test_every_metric_ignores_class_order_when_the_top_is_unique(data, seed):
    probs, labels, n_bins = data
    unique_top = (probs == probs.max(axis=1, keepdims=True)).sum(axis=1) == 1
    probs, labels = probs[unique_top], labels[unique_top]
    if len(labels) == 0:
        return
    pi = np.random.default_rng(seed).permutation(probs.shape[1])  # class j is called pi[j]

    def relabel(p, y):
        q = np.empty_like(p)
        q[:, pi] = p
        return q, pi[y]

    assert_invariant(probs, labels, n_bins, relabel, TOL, "class permutation")


def test_tied_top_label_is_the_lowest_index():
    probs = np.array([[0.4, 0.4, 0.2], [0.1, 0.45, 0.45]])
    conf, correct = M.top_label(probs, np.array([0, 1]))
    assert conf.tolist() == [0.4, 0.45] and correct.tolist() == [1.0, 1.0]
    assert M.accuracy(probs, [0, 1]) == 1.0
    assert M.accuracy(probs, [1, 2]) == 0.0
    # so relabelling tied classes moves the top-label metrics: swap classes 0 and 1
    assert M.accuracy(probs[:, [1, 0, 2]], [1, 0]) == 0.5
    assert M.ece(probs, [0, 1], n_bins=10) == pytest.approx((0.6 + 0.55) / 2)


@pytest.mark.parametrize("k", [3, 64, 65, 200])  # both sides of top_label's column/row switch
def test_top_label_matches_argmax_with_ties(k):
    rng = np.random.default_rng(k)
    w = rng.integers(1, 4, size=(500, k)).astype(np.float64) + 1e-9 * (rng.random((500, k)) < 0.01)
    probs = w / w.sum(axis=1, keepdims=True)
    labels = rng.integers(0, k, 500)
    labels[:100] = probs[:100].argmax(axis=1)  # make many rows correct
    for layout in (probs, np.asfortranarray(probs)):
        conf, correct = M.top_label(layout, labels)
        assert np.array_equal(conf, probs.max(axis=1))
        assert np.array_equal(correct, (probs.argmax(axis=1) == labels).astype(float))
    assert ((probs == probs.max(axis=1, keepdims=True)).sum(axis=1) > 1).any()  # ties were there


# ---------------------------------------------------------------------------------------------
# float32 vs float64
# ---------------------------------------------------------------------------------------------

LATTICE = 4000
DIVISORS = [d for d in range(1, 41) if LATTICE % d == 0]


@st.composite
def lattice_predictions(draw, max_n: int = 60):
    """Probabilities (j + 1/K) / 4000 with sum_k j = 3999: rows sum to 1 exactly in real
    arithmetic, every value is >= 1/(4000 K) from a multiple of 1/4000."""
    k = draw(st.integers(2, 5))
    pool = draw(st.lists(grid_row(k, steps=LATTICE - 1), min_size=1, max_size=8))
    n = draw(st.integers(1, max_n))
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))
    probs = (np.array([pool[i] for i in picks], dtype=np.float64) + 1.0 / k) / LATTICE
    labels = np.array(draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    return probs, labels, draw(st.sampled_from(DIVISORS))


@SETTINGS
@given(data=lattice_predictions())
def test_float32_and_float64_agree_away_from_bin_edges(data):
    probs, labels, n_bins = data
    assert_invariant(probs, labels, n_bins, lambda p, y: (p.astype(np.float32), y), FLOAT32_TOL,
                     "float32 input")


def test_float32_is_not_copied_to_float64():
    p32 = np.full((10, 4), 0.25, dtype=np.float32)
    p, _ = check_probs_labels(p32, np.zeros(10, dtype=int), allow_float32=True)
    assert p.dtype == np.float32 and np.shares_memory(p, p32)
    p, _ = check_probs_labels(p32, np.zeros(10, dtype=int))
    assert p.dtype == np.float64
    with pytest.raises(ValueError, match="sum to 1"):
        check_probs_labels(p32 * 1.01, np.zeros(10, dtype=int), allow_float32=True)
    with pytest.raises(ValueError, match="NaN or infinite"):
        M.ece(np.array([[np.inf, 0.0]], dtype=np.float32), [0])


# ---------------------------------------------------------------------------------------------
# Textbook vectors
# ---------------------------------------------------------------------------------------------


def two_class(conf: list[float], correct: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Binary probability rows whose top-label confidence is ``conf`` (class 0 predicted)."""
    c = np.asarray(conf, dtype=np.float64)
    return np.stack([c, 1.0 - c], axis=1), np.where(np.asarray(correct) == 1, 0, 1)


VECTORS = {
    # name: (confidences, correct, ECE with 10 bins)
    "A": ([0.95, 1.0], [1, 0], 0.475),
    "B": ([1.0] * 10, [1, 0] * 5, 0.5),
    "C": ([1, 1, 0.95, 0.95], [1, 1, 1, 0], 0.225),
}


@pytest.mark.parametrize("vector", sorted(VECTORS))
def test_textbook_vectors_in_every_row_order_and_precision(vector):
    conf, correct, expected = VECTORS[vector]
    probs, labels = two_class(conf, correct)
    rng = np.random.default_rng(0)
    for _ in range(10):
        perm = rng.permutation(len(labels))
        assert M.ece(probs[perm], labels[perm], n_bins=10) == pytest.approx(expected, abs=1e-12)
    assert M.ece(probs.astype(np.float32), labels, n_bins=10) == pytest.approx(expected, abs=1e-7)


def test_textbook_vectors_with_equal_mass_bins():
    # B: every confidence tied at 1.0 -> one bin; both columns of ACE are one tie group
    probs, labels = two_class(*VECTORS["B"][:2])
    assert M.top_label_equal_mass_ece(probs, labels, 10) == pytest.approx(0.5, abs=1e-12)
    assert M.ace(probs, labels, 10) == pytest.approx(0.5, abs=1e-12)
    # C: R = 4 ranges, edges s_(1), s_(2), s_(3) = 0.95, 1, 1: {0.95, 0.95} and {1, 1}, so
    # equal-mass bins by value coincide with the equal-width ones (ECE 0.225)
    probs, labels = two_class(*VECTORS["C"][:2])
    assert M.top_label_equal_mass_ece(probs, labels, 10) == pytest.approx(0.225, abs=1e-12)
    assert M.ace(probs, labels, 10) == pytest.approx(0.225, abs=1e-12)
    bins = M.reliability_bins(probs, labels, 10, scheme="equal_mass")
    assert bins.counts.tolist() == [0, 2, 0, 2]
    assert np.isnan(bins.lower[[0, 2]]).all() and bins.lower[[1, 3]].tolist() == [0.95, 1.0]


# ---------------------------------------------------------------------------------------------
# The equal-mass rule, from its words
# ---------------------------------------------------------------------------------------------


def reference_bins(scores: np.ndarray, n_bins: int) -> tuple[list[int], int]:
    """EQUAL_MASS_CONVENTION literally: R = min(n_bins, N); e_r = s_(ceil(rN/R)) of the sorted
    scores, r = 1..R-1; a score s is in bin #{r : e_r <= s}."""
    n = len(scores)
    r = min(n_bins, n)
    s = sorted(scores.tolist())
    edges = [s[-(-j * n // r)] for j in range(1, r)]
    return [sum(e <= v for e in edges) for v in scores.tolist()], r


def reference_top_label_equal_mass(probs, labels, n_bins):
    conf, correct = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(float)
    bins, r = reference_bins(conf, n_bins)
    n, total = len(conf), 0.0
    for b in range(r):
        m = np.array(bins) == b
        if m.any():
            total += m.sum() / n * abs(correct[m].mean() - conf[m].mean())
    return total


def reference_ace(probs, labels, n_bins):
    per_class = []
    for c in range(probs.shape[1]):
        bins, r = reference_bins(probs[:, c], n_bins)
        gaps = []
        for b in range(r):
            m = np.array(bins) == b
            if m.any():  # empty ranges (ties only) are skipped
                gaps.append(abs((labels[m] == c).mean() - probs[m, c].mean()))
        per_class.append(np.mean(gaps))
    return float(np.mean(per_class))


@settings(max_examples=100, deadline=None)
@given(data=tied_predictions(max_n=40))
def test_equal_mass_metrics_follow_the_stated_rule(data):
    probs, labels, n_bins = data
    assert M.top_label_equal_mass_ece(probs, labels, n_bins) == pytest.approx(
        reference_top_label_equal_mass(probs, labels, n_bins), abs=1e-12)
    assert M.ace(probs, labels, n_bins) == pytest.approx(reference_ace(probs, labels, n_bins), abs=1e-12)
    bins = M.reliability_bins(probs, labels, n_bins, scheme="equal_mass")
    ref, r = reference_bins(probs.max(axis=1), n_bins)
    assert bins.counts.tolist() == np.bincount(ref, minlength=r).tolist()
    full = bins.counts > 0  # a tie group is never split: non-empty bins are disjoint in value
    assert np.all(bins.lower[full][1:] > bins.upper[full][:-1])
    assert bins.ece == pytest.approx(M.top_label_equal_mass_ece(probs, labels, n_bins), abs=1e-12)


def test_without_ties_equal_mass_is_the_rank_rule():
    """No ties: the sample of (sorted) rank j is in bin floor(j R / N), bins of floor(N/R) or
    ceil(N/R) samples, as before the tie rule."""
    rng = np.random.default_rng(5)
    conf = rng.permutation(np.linspace(0.5, 1.0, 103))
    bins, r = reference_bins(conf, 10)
    ranks = np.argsort(np.argsort(conf))
    assert bins == (ranks * r // len(conf)).tolist()
    probs, labels = two_class(conf.tolist(), (rng.random(103) < conf).astype(int).tolist())
    assert sorted(set(M.reliability_bins(probs, labels, 10, scheme="equal_mass").counts)) == [10, 11]
