"""Binned calibration errors: equal-width and equal-mass binning and the metrics built on it.

Equal-width bins follow ``BINNING_CONVENTION`` (bin ``min(floor(s * B), B - 1)``, [lo, hi) bins,
the last one closed); equal-mass bins put the sample of (stable) confidence rank r in bin
``floor(r * B / N)``. ECE, MCE, top-label equal-mass ECE, classwise ECE, ACE and the
reliability-diagram statistics (:func:`reliability_bins`) all bin through the kernels below.
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
    "ReliabilityBins",
    "ace",
    "bin_index",
    "classwise_ece",
    "ece",
    "mce",
    "reliability_bins",
    "top_label_equal_mass_ece",
]


# --------------------------------------------------------------------------------------------
# Binning kernels (the only places bins are formed)
# --------------------------------------------------------------------------------------------


def bin_index(scores: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index ``min(floor(s * B), B - 1)``: [lo, hi) bins, the last one closed."""
    return np.minimum(np.floor(scores * n_bins).astype(np.int64), n_bins - 1)


def _equal_mass_sums(
    scores: np.ndarray, outcomes: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Equal-mass bins along the last axis: after a stable sort, the sample of rank r goes to
    bin ``floor(r * B / N)`` -- a contiguous run of floor(N/B) or ceil(N/B) samples (B <= N).

    Returns per-bin (count, sum of outcomes, sum of scores, smallest score, largest score).
    """
    n = scores.shape[-1]
    order = np.argsort(scores, axis=-1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    sorted_outcomes = np.take_along_axis(outcomes, order, axis=-1)
    starts = -(-np.arange(n_bins) * n // n_bins)  # ceil(r N / B): first rank of bin r
    ends = np.r_[starts[1:], n]
    return (
        (ends - starts).astype(np.float64),
        np.add.reduceat(sorted_outcomes, starts, axis=-1),
        np.add.reduceat(sorted_scores, starts, axis=-1),
        sorted_scores[..., starts],
        sorted_scores[..., ends - 1],
    )


def _bin_sums(
    index: np.ndarray, scores: np.ndarray, outcomes: np.ndarray, n_bins: int,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, sum of outcomes, sum of scores) via ``np.bincount``.

    ``index`` may carry a leading group axis (G, N); bins are then returned as (G, n_bins).
    """
    if index.ndim == 2:
        groups = index.shape[0]
        flat = (index + n_bins * np.arange(groups)[:, None]).ravel()
        size = groups * n_bins
        w = None if weights is None else np.broadcast_to(weights, index.shape).ravel()
        count = np.bincount(flat, weights=w, minlength=size)
        acc = np.bincount(flat, weights=outcomes.ravel() * (1 if w is None else w), minlength=size)
        conf = np.bincount(flat, weights=scores.ravel() * (1 if w is None else w), minlength=size)
        return count.reshape(groups, n_bins), acc.reshape(groups, n_bins), conf.reshape(groups, n_bins)
    count = np.bincount(index, weights=weights, minlength=n_bins).astype(np.float64)
    ow = outcomes if weights is None else outcomes * weights
    sw = scores if weights is None else scores * weights
    return (
        count,
        np.bincount(index, weights=ow, minlength=n_bins),
        np.bincount(index, weights=sw, minlength=n_bins),
    )


def _binned_gaps(count: np.ndarray, acc_sum: np.ndarray, conf_sum: np.ndarray) -> np.ndarray:
    """|acc_b - conf_b| per bin (0 for empty bins)."""
    safe = np.where(count > 0, count, 1.0)
    return np.where(count > 0, np.abs(acc_sum - conf_sum) / safe, 0.0)


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of top-label confidence.

    ``accuracy`` and ``confidence`` are NaN for empty bins. ``edges`` has ``n_bins + 1`` entries
    for equal-width bins; for equal-mass bins it holds the smallest and largest confidence of
    each bin (NaN for empty bins) as ``lower``/``upper`` instead.
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
    ``scheme="equal_mass"`` sorts confidences (stable) and puts the sample of rank r in bin
    ``floor(r * B / N)`` with ``B = min(n_bins, N)``.
    """
    p, y = check_probs_labels(probs, labels)
    n_bins = _check_n_bins(n_bins)
    conf, correct = top_label(p, y)
    return _reliability_fromtop_label(conf, correct, n_bins, scheme)


def _reliability_fromtop_label(
    conf: np.ndarray, correct: np.ndarray, n_bins: int, scheme: str
) -> ReliabilityBins:
    if scheme == "equal_width":
        idx = bin_index(conf, n_bins)
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        lower, upper = edges[:-1], edges[1:]
    elif scheme == "equal_mass":
        n_bins = min(n_bins, conf.shape[0])
        count, acc_sum, conf_sum, lower, upper = _equal_mass_sums(conf, correct, n_bins)
    else:
        raise ValueError(f"scheme: expected 'equal_width' or 'equal_mass', got {scheme!r}")
    if scheme == "equal_width":
        count, acc_sum, conf_sum = _bin_sums(idx, conf, correct, n_bins)
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
    _, acc_sum, conf_sum = _bin_sums(bin_index(conf, n_bins), conf, correct, n_bins)
    return float(np.sum(np.abs(acc_sum - conf_sum)) / conf.shape[0])


def _mce_top(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    count, acc_sum, conf_sum = _bin_sums(bin_index(conf, n_bins), conf, correct, n_bins)
    return float(_binned_gaps(count, acc_sum, conf_sum)[count > 0].max())


def ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017), top-label, equal-width bins.

    ``ECE = sum_b (n_b / N) * |acc_b - conf_b|`` with the bins of ``BINNING_CONVENTION``.
    """
    p, y = check_probs_labels(probs, labels)
    return _ece_top(*top_label(p, y), _check_n_bins(n_bins))


def mce(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Maximum calibration error: ``max_b |acc_b - conf_b|`` over non-empty equal-width bins
    (unweighted, so MCE >= ECE)."""
    p, y = check_probs_labels(probs, labels)
    return _mce_top(*top_label(p, y), _check_n_bins(n_bins))


def _top_label_equal_mass(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    n_bins = min(n_bins, conf.shape[0])
    _, acc_sum, conf_sum, _, _ = _equal_mass_sums(conf, correct, n_bins)
    return float(np.sum(np.abs(acc_sum - conf_sum)) / conf.shape[0])


def top_label_equal_mass_ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Top-label ECE with equal-mass (adaptive) bins: ``sum_b (n_b/N) |acc_b - conf_b|`` where
    the sample of confidence rank r (stable sort) falls in bin ``floor(r * B / N)``,
    ``B = min(n_bins, N)``. (What the CalibPrompt code reports as "ACE".)"""
    p, y = check_probs_labels(probs, labels)
    return _top_label_equal_mass(*top_label(p, y), _check_n_bins(n_bins))


def _classwise(p: np.ndarray, y: np.ndarray, n_bins: int, scheme: str) -> float:
    n, k = p.shape
    scores = p.T  # (K, N)
    outcomes = (y[None, :] == np.arange(k)[:, None]).astype(np.float64)
    if scheme == "equal_width":
        idx = bin_index(scores, n_bins)
        count, acc_sum, conf_sum = _bin_sums(idx, scores, outcomes, n_bins)
        return float(np.sum(np.abs(acc_sum - conf_sum)) / (n * k))
    r = min(n_bins, n)
    count, acc_sum, conf_sum, _, _ = _equal_mass_sums(np.ascontiguousarray(scores), outcomes, r)
    return float(np.sum(_binned_gaps(count, acc_sum, conf_sum)) / (k * r))


def classwise_ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Classwise ECE (Kull et al. 2019): ``(1/K) sum_k ECE_k`` where ECE_k bins column k of
    ``probs`` into equal-width bins against the outcome ``1[y = k]``."""
    p, y = check_probs_labels(probs, labels)
    return _classwise(p, y, _check_n_bins(n_bins), "equal_width")


def ace(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Adaptive calibration error (Nixon et al. 2019), classwise with equal-mass ranges.

    ``ACE = 1/(K R) sum_k sum_r |acc(r, k) - conf(r, k)|`` where, for every class k, the N
    values of column k are sorted (stable) and split into ``R = min(n_bins, N)`` ranges of
    floor(N/R) or ceil(N/R) samples; acc(r, k) is the fraction of range r whose label is k and
    conf(r, k) its mean probability for k.
    """
    p, y = check_probs_labels(probs, labels)
    return _classwise(p, y, _check_n_bins(n_bins), "equal_mass")
