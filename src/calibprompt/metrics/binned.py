"""Binned calibration errors: equal-width and equal-mass binning and the metrics built on it.

Equal-width bins follow ``BINNING_CONVENTION`` (bin ``min(floor(s * B), B - 1)``, [lo, hi) bins,
the last one closed). Equal-mass bins follow ``EQUAL_MASS_CONVENTION``: the edges are order
statistics of the scores and a score goes to its bin *by value*, so tied scores always share a
bin and no result depends on the order of the rows. ECE, MCE, top-label equal-mass ECE,
classwise ECE, ACE and the reliability-diagram statistics (:func:`reliability_bins`) all bin
through the kernels below.

Speed: every kernel is a fixed number of whole-array passes (``np.bincount`` for equal-width
bins; one sort per column plus binary searches for equal-mass bins), with sums accumulated in
float64. Public functions accept float32 probabilities without a float64 copy of the matrix
(float32 values are exact in float64, so the results are those of the float64 conversion).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calibprompt.metrics._validation import (
    ArrayLike,
    _check_n_bins,
    check_probs_labels,
    top_label,
)

__all__ = [
    "EQUAL_MASS_CONVENTION",
    "ReliabilityBins",
    "ace",
    "bin_index",
    "classwise_ece",
    "ece",
    "mce",
    "reliability_bins",
    "top_label_equal_mass_ece",
]

#: How equal-mass bins are formed (ACE, top-label equal-mass ECE, equal-mass reliability bins).
EQUAL_MASS_CONVENTION = (
    "equal-mass; R = min(n_bins, N) bins; sorted scores s_(0) <= ... <= s_(N-1); edges "
    "e_r = s_(ceil(r*N/R)) for r = 1..R-1; a score s goes to bin #{r : e_r <= s} "
    "([lo,hi) bins: a score equal to an edge goes up, so tied scores share one bin); "
    "without ties the sample of rank j is in bin floor(j*R/N); empty bins (only possible "
    "with ties) are skipped; float64"
)


# --------------------------------------------------------------------------------------------
# Binning kernels (the only places bins are formed)
# --------------------------------------------------------------------------------------------


def bin_index(scores: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index ``min(floor(s * B), B - 1)``: [lo, hi) bins, the last one closed.

    ``s * B`` is computed in float64 whatever the dtype of ``scores`` (float32 scores are
    exact in float64), so a float32 score gets the bin of its float64 value.
    """
    x = np.multiply(scores, float(n_bins), dtype=np.float64)
    np.floor(x, out=x)
    index = x.astype(np.int64)
    np.minimum(index, n_bins - 1, out=index)
    return index


def _bin_index_nonneg(scores: np.ndarray, n_bins: int, n_groups: int = 1) -> np.ndarray:
    """:func:`bin_index` for scores known to be >= 0 (validated probabilities): the truncation
    of ``astype`` is then the floor, and the index is int32 when ``n_groups * n_bins`` fits
    (half the memory traffic of int64 over (N, K) matrices)."""
    dtype = np.int32 if n_groups * n_bins < np.iinfo(np.int32).max else np.int64
    index = np.multiply(scores, float(n_bins), dtype=np.float64).astype(dtype)
    np.minimum(index, n_bins - 1, out=index)
    return index


def _group_sorted(rows: np.ndarray, values: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``values`` grouped by ``rows`` (0..n_rows-1) and sorted within each group: returns the
    grouped values and the (n_rows + 1) group boundaries."""
    if n_rows == 1:
        return np.sort(values), np.array([0, values.shape[0]])
    # a stable argsort of 16-bit keys is a radix sort: linear in N
    key = rows.astype(np.int16 if n_rows <= np.iinfo(np.int16).max else np.int64)
    grouped = values[np.argsort(key, kind="stable")]
    bounds = np.zeros(n_rows + 1, dtype=np.intp)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=bounds[1:])
    for g in range(n_rows):
        grouped[bounds[g] : bounds[g + 1]].sort()
    return grouped, bounds


def _equal_mass(
    sorted_scores: np.ndarray, n_bins: int, hit_rows: np.ndarray, hit_values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Equal-mass bins of each row of ``sorted_scores`` (G, N), ascending, ``n_bins`` <= N, and
    the number of "hits" (samples with outcome 1, given as their row and score) in each bin.

    Edges ``e_r = s_(ceil(r N / R))`` (r = 1..R-1) and bin ``#{r : e_r <= s}`` (see
    ``EQUAL_MASS_CONVENTION``). A bin is a run of the sorted row, so only the R - 1 edges are
    searched: bin r holds sorted positions ``[start_r, start_{r+1})`` with ``start_r = #{s < e_r}``
    (the first position of the edge's tie group), and holds the hits h with
    ``e_r <= h < e_{r+1}``, counted the same way in the row's sorted hits. Everything is
    found by comparing values, so it is exact and blind to the order of the input.

    Returns starts (G, R), counts (G, R), hits per bin (G, R) and per-bin score sums (G, R)
    in float64 (0 for empty bins).
    """
    g, n = sorted_scores.shape
    ranks = -(-np.arange(1, n_bins) * n // n_bins)  # ceil(r N / R): rank rule's first rank of bin r
    edges = sorted_scores[:, ranks]
    hits_sorted, hit_bounds = _group_sorted(hit_rows, hit_values, g)
    starts = np.zeros((g, n_bins + 1), dtype=np.intp)
    starts[:, n_bins] = n
    below = np.zeros((g, n_bins + 1), dtype=np.intp)  # hits below each edge
    for row in range(g):
        starts[row, 1:n_bins] = np.searchsorted(sorted_scores[row], edges[row], side="left")
        row_hits = hits_sorted[hit_bounds[row] : hit_bounds[row + 1]]
        below[row, 1:n_bins] = np.searchsorted(row_hits, edges[row], side="left")
        below[row, n_bins] = row_hits.shape[0]
    counts = np.diff(starts, axis=1)
    hits = np.diff(below, axis=1)
    flat_starts = (starts[:, :n_bins] + n * np.arange(g)[:, None]).reshape(-1)
    sums = np.add.reduceat(sorted_scores.reshape(-1), flat_starts, dtype=np.float64)
    sums = np.where(counts > 0, sums.reshape(g, n_bins), 0.0)  # reduceat gives a value for empties
    return starts[:, :n_bins], counts, hits, sums


def _equal_mass_top(conf: np.ndarray, correct: np.ndarray, n_bins: int):
    """Equal-mass bins of top-label confidences: (sorted conf, starts, counts, correct per bin,
    conf sum per bin), R = min(n_bins, N)."""
    r = min(n_bins, conf.shape[0])
    s = np.sort(conf)[None, :]
    hits = conf[correct > 0]
    starts, counts, acc_sum, conf_sum = _equal_mass(s, r, np.zeros(hits.shape, np.intp), hits)
    return s[0], starts[0], counts[0], acc_sum[0], conf_sum[0]


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of top-label confidence.

    ``accuracy`` and ``confidence`` are NaN for empty bins. For equal-width bins ``lower`` and
    ``upper`` are the bin edges; for equal-mass bins they are the smallest and largest
    confidence in each bin (NaN for empty bins, which equal-mass binning has only with ties).
    """

    counts: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    n_samples: int
    scheme: str

    @property
    def n_bins(self) -> int:
        return int(self.counts.shape[0])

    @property
    def gaps(self) -> np.ndarray:
        """|accuracy - confidence| per bin, 0 for empty bins."""
        return np.where(self.counts > 0, np.abs(self.accuracy - self.confidence), 0.0)

    @property
    def weights(self) -> np.ndarray:
        return self.counts / self.n_samples

    @property
    def ece(self) -> float:
        return float(np.sum(self.weights * self.gaps))

    @property
    def mce(self) -> float:
        nonempty = self.counts > 0
        return float(self.gaps[nonempty].max()) if nonempty.any() else 0.0

    @property
    def n_nonempty(self) -> int:
        return int(np.count_nonzero(self.counts))


def reliability_bins(
    probs: ArrayLike, labels: ArrayLike, n_bins: int = 15, scheme: str = "equal_width"
) -> ReliabilityBins:
    """Top-label reliability statistics: per-bin count, accuracy and mean confidence.

    ``scheme="equal_width"`` uses the project's convention (``BINNING_CONVENTION``);
    ``scheme="equal_mass"`` uses ``EQUAL_MASS_CONVENTION`` with ``R = min(n_bins, N)`` bins
    (tied confidences share a bin, so with ties some bins may be empty).
    """
    p, y = check_probs_labels(probs, labels, allow_float32=True)
    n_bins = _check_n_bins(n_bins)
    conf, correct = top_label(p, y)
    return _reliability_fromtop_label(conf, correct, n_bins, scheme)


def _reliability_fromtop_label(
    conf: np.ndarray, correct: np.ndarray, n_bins: int, scheme: str
) -> ReliabilityBins:
    if scheme == "equal_width":
        idx = bin_index(conf, n_bins)
        count = np.bincount(idx, minlength=n_bins).astype(np.float64)
        acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
        conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        lower, upper = edges[:-1], edges[1:]
    elif scheme == "equal_mass":
        s, starts, count, acc_sum, conf_sum = _equal_mass_top(conf, correct, n_bins)
        nonempty = count > 0
        lower = np.where(nonempty, s[starts], np.nan)
        upper = np.where(nonempty, s[starts + count - 1], np.nan)
    else:
        raise ValueError(f"scheme: expected 'equal_width' or 'equal_mass', got {scheme!r}")
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(count > 0, acc_sum / np.where(count > 0, count, 1), np.nan)
        confidence = np.where(count > 0, conf_sum / np.where(count > 0, count, 1), np.nan)
    return ReliabilityBins(
        counts=count.astype(np.int64), accuracy=accuracy, confidence=confidence,
        lower=lower, upper=upper, n_samples=int(conf.shape[0]), scheme=scheme,
    )


# --------------------------------------------------------------------------------------------
# Binned calibration errors
# --------------------------------------------------------------------------------------------


def _ece_top(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    idx = _bin_index_nonneg(conf, n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    return float(np.sum(np.abs(acc_sum - conf_sum)) / conf.shape[0])


def _mce_top(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    idx = _bin_index_nonneg(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    nonempty = count > 0
    return float((np.abs(acc_sum[nonempty] - conf_sum[nonempty]) / count[nonempty]).max())


def ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017), top-label, equal-width bins.

    ``ECE = sum_b (n_b / N) * |acc_b - conf_b|`` with the bins of ``BINNING_CONVENTION``; the
    top label of a row whose maximum is tied is its lowest tied index.
    """
    p, y = check_probs_labels(probs, labels, allow_float32=True)
    return _ece_top(*top_label(p, y), _check_n_bins(n_bins))


def mce(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Maximum calibration error: ``max_b |acc_b - conf_b|`` over non-empty equal-width bins
    (unweighted, so MCE >= ECE)."""
    p, y = check_probs_labels(probs, labels, allow_float32=True)
    return _mce_top(*top_label(p, y), _check_n_bins(n_bins))


def _top_label_equal_mass(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    _, _, _, acc_sum, conf_sum = _equal_mass_top(conf, correct, n_bins)
    return float(np.sum(np.abs(acc_sum - conf_sum)) / conf.shape[0])


def top_label_equal_mass_ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Top-label ECE with equal-mass (adaptive) bins: ``sum_b (n_b/N) |acc_b - conf_b|``.

    Bins follow ``EQUAL_MASS_CONVENTION``: with ``R = min(n_bins, N)`` and the confidences
    sorted, the edges are ``e_r = s_(ceil(r N / R))`` and a confidence c goes to bin
    ``#{r : e_r <= c}``, so tied confidences share a bin (the bin of the last of them in sorted
    order) and the result does not depend on the order of the rows. Without ties this is the
    rank rule "the sample of rank j goes to bin floor(j R / N)". Empty bins (ties only) have
    weight 0. (What the CalibPrompt code reports as "ACE".)
    """
    p, y = check_probs_labels(probs, labels, allow_float32=True)
    return _top_label_equal_mass(*top_label(p, y), _check_n_bins(n_bins))


def _classwise_equal_width(p: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    n, k = p.shape
    # per (class, bin): sum of p_ik by one bincount over the (N, K) cells, and the number of
    # samples of class k in the bin from the N scores p_{i, y_i} (each sample hits one class)
    cells = _bin_index_nonneg(p, n_bins, n_groups=k)
    cells += (n_bins * np.arange(k)).astype(cells.dtype)
    conf_sum = np.bincount(cells.reshape(-1), weights=p.reshape(-1), minlength=k * n_bins)
    hits = p[np.arange(n), y]
    acc_sum = np.bincount(y * n_bins + _bin_index_nonneg(hits, n_bins), minlength=k * n_bins)
    return float(np.sum(np.abs(acc_sum - conf_sum)) / (n * k))


def _classwise_equal_mass(p: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    n = p.shape[0]
    r = min(n_bins, n)
    columns = np.array(p.T, order="C")  # (K, N) in p's dtype, sorted in place below
    columns.sort(axis=1)
    hits = p[np.arange(n), y]  # sample i is a hit of class y_i only
    _, counts, acc_sum, conf_sum = _equal_mass(columns, r, y, hits)
    nonempty = counts > 0
    gaps = np.abs(acc_sum - conf_sum) / np.where(nonempty, counts, 1)  # 0 for empty bins
    ranges = nonempty.sum(axis=1)  # R_k
    if np.all(ranges == r):  # no empty range (always so without ties): 1/(K R) sum_k sum_r
        return float(np.sum(gaps) / (gaps.shape[0] * r))
    return float(np.mean(gaps.sum(axis=1) / ranges))


def _classwise(p: np.ndarray, y: np.ndarray, n_bins: int, scheme: str) -> float:
    if scheme == "equal_width":
        return _classwise_equal_width(p, y, n_bins)
    return _classwise_equal_mass(p, y, n_bins)


def classwise_ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Classwise ECE (Kull et al. 2019): ``(1/K) sum_k ECE_k`` where ECE_k bins column k of
    ``probs`` into equal-width bins against the outcome ``1[y = k]``."""
    p, y = check_probs_labels(probs, labels, allow_float32=True)
    return _classwise(p, y, _check_n_bins(n_bins), "equal_width")


def ace(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Adaptive calibration error (Nixon et al. 2019), classwise with equal-mass ranges.

    ``ACE = (1/K) sum_k (1/R_k) sum_r |acc(r, k) - conf(r, k)|``: for every class k, column k
    is cut into ``R = min(n_bins, N)`` equal-mass ranges by ``EQUAL_MASS_CONVENTION`` (edges
    ``e_r = s_(ceil(r N / R))`` of the sorted column, a value v in range ``#{r : e_r <= v}``,
    so tied values share a range); acc(r, k) is the fraction of range r whose label is k,
    conf(r, k) its mean probability for k, and the sum runs over the R_k non-empty ranges.
    Without ties every range is non-empty (R_k = R) and this is Nixon et al.'s
    ``1/(K R) sum_k sum_r |acc(r, k) - conf(r, k)|`` with ranges of floor(N/R) or ceil(N/R)
    samples (the sample of rank j in range floor(j R / N)).
    """
    p, y = check_probs_labels(probs, labels, allow_float32=True)
    return _classwise(p, y, _check_n_bins(n_bins), "equal_mass")
