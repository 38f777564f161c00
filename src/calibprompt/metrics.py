"""Calibration, classification and selective-prediction metrics.

Functional and NumPy-only: every metric takes probabilities ``probs`` of shape (N, K) (NumPy
array, torch tensor or nested sequence) and integer ``labels`` of shape (N,), computes in
float64 and returns a Python float. Inputs are validated once per call; a bad input raises
``ValueError`` naming what was wrong and what was expected.

Notation: ``conf_i = max_k p_ik`` (top-label confidence), ``pred_i = argmax_k p_ik``,
``correct_i = 1[pred_i = y_i]``. Calibration errors are fractions in [0, 1] (multiply by 100 for
tables, never in the API).

Binning convention (the textbook one of Guo et al. 2017, see ``BINNING_CONVENTION``): B
equal-width bins on [0, 1], bin index ``min(floor(conf * B), B - 1)`` -- bins are [lo, hi) and
the last bin is closed, so a confidence of exactly 1.0 lands in the last bin. Empty bins
contribute nothing. Every equal-width metric and the reliability diagram use
:func:`reliability_bins` (or the same private binning kernel for per-class columns).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BINNING_CONVENTION",
    "METRICS",
    "METRICS_VERSION",
    "BootstrapResult",
    "ReliabilityBins",
    "accuracy",
    "ace",
    "aurc",
    "auroc",
    "bin_index",
    "bootstrap",
    "brier",
    "check_labels",
    "check_probs_labels",
    "classwise_ece",
    "ece",
    "evaluate",
    "kde_ece",
    "macro_f1",
    "mce",
    "nll",
    "reliability_bins",
    "risk_coverage",
    "smooth_ece",
    "stratified_bootstrap_indices",
    "to_numpy",
    "top_label",
    "top_label_equal_mass_ece",
]

ArrayLike = np.ndarray | Sequence | Any  # torch.Tensor accepted without importing torch

#: Version of the metrics' semantics: bumped whenever a metric's definition changes, so that a
#: stored result is never compared with one computed under another definition (part of a run's
#: identity, see :mod:`calibprompt.runs.identity`).
METRICS_VERSION = 1

#: How equal-width bins are formed; stored beside every reported number.
BINNING_CONVENTION = (
    "top-label; equal-width bins on [0,1]; bin = min(floor(conf*B), B-1) "
    "([lo,hi) bins, last bin closed: conf=1.0 in the last bin); float64; "
    "empty bins contribute 0"
)

#: Largest allowed deviation of a row sum from 1 before the input is rejected as not a
#: probability vector (generous enough for float16 softmax over ~1000 classes).
ROW_SUM_TOLERANCE = 1e-3
#: The same for float16 / bfloat16 inputs (bfloat16 keeps ~3 significant digits); such rows
#: are renormalised in float64 after the check.
LOW_PRECISION_ROW_SUM_TOLERANCE = 2e-2
_LOW_PRECISION = ("torch.float16", "torch.bfloat16", "float16")
#: Probabilities are clamped to this floor inside ``log`` (NLL) so a zero stays finite.
LOG_EPS = 1e-12


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def to_numpy(x: ArrayLike, dtype: Any | None = None) -> np.ndarray:
    """A NumPy array from an array, a sequence or a torch tensor (detached, on the CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def check_probs_labels(
    probs: ArrayLike, labels: ArrayLike, *, name: str = "probs"
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``probs`` (N, K) and ``labels`` (N,) to float64 / int64 arrays.

    Raises ``ValueError`` for: empty input, wrong shapes, fewer than two classes, NaN/inf,
    values outside [0, 1] or rows that do not sum to 1 (likely logits), and labels that are not
    integers in [0, K).
    """
    low_precision = str(getattr(probs, "dtype", "")) in _LOW_PRECISION
    try:
        p = to_numpy(probs, np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: could not convert to a float array ({exc})") from exc
    try:
        y_raw = to_numpy(labels)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"labels: could not convert to an array ({exc})") from exc

    if p.ndim != 2:
        hint = (
            " For binary positive-class probabilities q of shape (N,), pass "
            "np.stack([1 - q, q], axis=1)."
            if p.ndim == 1
            else ""
        )
        raise ValueError(f"{name}: expected shape (N, K), got {p.shape}.{hint}")
    n, k = p.shape
    if n == 0:
        raise ValueError(f"{name}: empty input (N = 0); need at least one sample")
    if k < 2:
        raise ValueError(f"{name}: expected at least 2 classes (K >= 2), got K = {k}")
    if y_raw.ndim != 1 or y_raw.shape[0] != n:
        raise ValueError(f"labels: expected shape ({n},) to match {name}, got {y_raw.shape}")
    if not np.all(np.isfinite(p)):
        bad = int(np.size(p) - np.count_nonzero(np.isfinite(p)))
        raise ValueError(f"{name}: contains {bad} NaN or infinite value(s)")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(
            f"{name}: values must lie in [0, 1], found range [{p.min():.4g}, {p.max():.4g}]; "
            "this looks like logits — apply softmax first"
        )
    row_sums = p @ np.ones(k)  # BLAS: much faster than sum(axis=1) over short rows
    row_err = np.abs(row_sums - 1.0)
    tolerance = LOW_PRECISION_ROW_SUM_TOLERANCE if low_precision else ROW_SUM_TOLERANCE
    if row_err.max() > tolerance:
        i = int(row_err.argmax())
        raise ValueError(
            f"{name}: rows must sum to 1 (tolerance {tolerance}); row {i} sums to "
            f"{row_sums[i]:.6g}; this looks like logits or unnormalised scores — apply softmax first"
        )
    if low_precision:  # float16/bfloat16 rows are off by rounding: renormalise in float64
        p = p / row_sums[:, None]

    return p, check_labels(y_raw, k)


def check_labels(labels: ArrayLike, n_classes: int) -> np.ndarray:
    """Validate class indices: integers (or integral floats / bools) in [0, n_classes)."""
    y_raw = to_numpy(labels)
    if y_raw.ndim != 1 or y_raw.shape[0] == 0:
        raise ValueError(f"labels: expected a non-empty 1-D array, got shape {y_raw.shape}")
    if y_raw.dtype.kind == "b":
        y = y_raw.astype(np.int64)
    elif y_raw.dtype.kind in "iu":
        y = y_raw.astype(np.int64)
    elif y_raw.dtype.kind == "f":
        if not np.all(np.isfinite(y_raw)) or not np.all(y_raw == np.round(y_raw)):
            raise ValueError("labels: expected integer class indices, got non-integer floats")
        y = y_raw.astype(np.int64)
    else:
        raise ValueError(f"labels: expected integer class indices, got dtype {y_raw.dtype}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(
            f"labels: must be class indices in [0, {n_classes - 1}] for K = {n_classes} classes, "
            f"found range [{y.min()}, {y.max()}]"
        )
    return y


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins: expected a positive integer, got {n_bins!r}")
    return int(n_bins)


def top_label(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence ``max_k p_ik`` and correctness ``1[argmax_k p_ik = y_i]`` (float) of
    validated arrays (ties in argmax resolve to the lowest index)."""
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)


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


# --------------------------------------------------------------------------------------------
# Kernel estimators of calibration error
# --------------------------------------------------------------------------------------------


def _smooth_ece_at(residual_hist: np.ndarray, sigma: float, n: int) -> float:
    """smECE_sigma from residuals deposited on G cell centres of [0, 1].

    The reflected Gaussian kernel on [0, 1] is a wrapped Gaussian on the circle of length 2
    applied to the mirror-extended histogram, evaluated exactly in Fourier space.
    """
    g = residual_hist.shape[0]
    extended = np.concatenate([residual_hist, residual_hist[::-1]])
    freqs = np.arange(g + 1) * (2.0 * np.pi / 2.0)  # angular frequency on a period of length 2
    smoothed = np.fft.irfft(np.fft.rfft(extended) * np.exp(-0.5 * (sigma * freqs) ** 2), n=2 * g)
    return float(np.abs(smoothed[:g]).sum() / n)


def _smooth_ece(conf: np.ndarray, correct: np.ndarray, grid: int) -> tuple[float, float]:
    n = conf.shape[0]
    cell = bin_index(conf, grid)
    hist = np.bincount(cell, weights=correct - conf, minlength=grid)
    lo, hi = 0.0, 1.0
    for _ in range(60):  # smECE_sigma is non-increasing in sigma: bisect smECE_sigma = sigma
        mid = 0.5 * (lo + hi)
        if _smooth_ece_at(hist, mid, n) > mid:
            lo = mid
        else:
            hi = mid
    sigma = 0.5 * (lo + hi)
    return _smooth_ece_at(hist, sigma, n), sigma


def smooth_ece(probs: ArrayLike, labels: ArrayLike, grid: int = 2000) -> float:
    """Smooth ECE (Błasiok & Nakkiran 2023), top-label.

    ``smECE_s = ∫_0^1 |(1/N) sum_i K_s(t, conf_i) (correct_i - conf_i)| dt`` with the Gaussian
    kernel of width s reflected at 0 and 1; the reported value is smECE at the fixed point
    ``s* = smECE_{s*}`` (found by bisection). Confidences are deposited on ``grid`` cells
    (resolution 1/grid); the smoothing itself is exact (Fourier space). Bin-free and
    consistent, so well suited to small test sets.
    """
    p, y = check_probs_labels(probs, labels)
    return _smooth_ece(*top_label(p, y), grid)[0]


_KDE_BANDWIDTHS = np.concatenate([np.logspace(-5, -1, 50), np.linspace(0.2, 1.0, 5)])


def _beta_log_kernel(eval_pts: np.ndarray, data: np.ndarray, h: float) -> np.ndarray:
    """log of the Beta kernel density Beta(data; x/h + 1, (1 - x)/h + 1) for every x in
    ``eval_pts`` (rows) and every data point (columns) -- Chen's (1999) boundary-free kernel."""
    from scipy.special import gammaln

    a = eval_pts[:, None] / h + 1.0
    b = (1.0 - eval_pts[:, None]) / h + 1.0
    log_norm = gammaln(a + b) - gammaln(a) - gammaln(b)
    return log_norm + (a - 1.0) * np.log(data)[None, :] + (b - 1.0) * np.log1p(-data)[None, :]


def _kde_bandwidth(conf: np.ndarray) -> float:
    """Bandwidth maximising the leave-one-out log likelihood of the Beta KDE of ``conf``."""
    from scipy.special import logsumexp

    n = conf.shape[0]
    best_h, best_ll = float(_KDE_BANDWIDTHS[-1]), -np.inf
    for h in _KDE_BANDWIDTHS:
        log_k = _beta_log_kernel(conf, conf, float(h))
        np.fill_diagonal(log_k, -np.inf)
        ll = float(np.sum(logsumexp(log_k, axis=1) - np.log(n - 1)))
        if ll > best_ll:
            best_ll, best_h = ll, float(h)
    return best_h


def kde_ece(
    probs: ArrayLike, labels: ArrayLike, bandwidth: float | None = None, p: int = 1,
    chunk: int = 2048,
) -> float:
    """KDE estimator of the top-label Lp calibration error (Popordanoska et al., NeurIPS 2022).

    ``ECE_KDE^p = (1/N) sum_i |E_hat[correct | conf_i] - conf_i|^p`` where the conditional
    accuracy is a leave-one-out Nadaraya–Watson estimate with Chen's Beta kernel
    ``Beta(conf_j; conf_i/h + 1, (1 - conf_i)/h + 1)``; the returned value is ``ECE_KDE``
    (the p-th root). ``h`` defaults to the maximiser of the leave-one-out likelihood of the
    Beta KDE of the confidences over the authors' grid (50 log-spaced values in [1e-5, 0.1]
    and 0.2, 0.4, ..., 1). Cost O(N^2) (bandwidth search O(55 N^2)); use :func:`smooth_ece`
    for large N.
    """
    from scipy.special import logsumexp

    pr, y = check_probs_labels(probs, labels)
    conf, correct = top_label(pr, y)
    n = conf.shape[0]
    if n < 3:
        raise ValueError(f"kde_ece: needs at least 3 samples, got N = {n}")
    conf = np.clip(conf, 1e-10, 1.0 - 1e-10)
    h = _kde_bandwidth(conf) if bandwidth is None else float(bandwidth)
    if h <= 0:
        raise ValueError(f"bandwidth: expected a positive float, got {bandwidth!r}")
    total = 0.0
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        log_k = _beta_log_kernel(conf[rows], conf, h)
        log_k[np.arange(rows.size), rows] = -np.inf  # leave one out
        log_den = logsumexp(log_k, axis=1)
        log_num = logsumexp(log_k, axis=1, b=correct[None, :])
        with np.errstate(divide="ignore"):
            cond_acc = np.exp(log_num - log_den)
        total += float(np.sum(np.abs(cond_acc - conf[rows]) ** p))
    return (total / n) ** (1.0 / p)


# --------------------------------------------------------------------------------------------
# Proper scores and classification metrics
# --------------------------------------------------------------------------------------------


def _brier(p: np.ndarray, y: np.ndarray) -> float:
    sq = np.sum(p * p, axis=1) - 2.0 * p[np.arange(p.shape[0]), y] + 1.0
    return float(np.mean(sq))


def brier(probs: ArrayLike, labels: ArrayLike) -> float:
    """Multiclass Brier score: ``mean_i sum_k (p_ik - 1[y_i = k])^2`` (range [0, 2])."""
    return _brier(*check_probs_labels(probs, labels))


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.maximum(p[np.arange(p.shape[0]), y], LOG_EPS))))


def nll(probs: ArrayLike, labels: ArrayLike) -> float:
    """Negative log likelihood ``mean_i -log max(p_{i, y_i}, 1e-12)``."""
    return _nll(*check_probs_labels(probs, labels))


def _accuracy(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(p.argmax(axis=1) == y))


def accuracy(probs: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy ``mean_i 1[argmax_k p_ik = y_i]`` (argmax ties -> lowest index)."""
    return _accuracy(*check_probs_labels(probs, labels))


def _macro_f1(p: np.ndarray, y: np.ndarray) -> float:
    k = p.shape[1]
    pred = p.argmax(axis=1)
    tp = np.bincount(y[pred == y], minlength=k).astype(np.float64)
    support = np.bincount(y, minlength=k).astype(np.float64)
    predicted = np.bincount(pred, minlength=k).astype(np.float64)
    denom = support + predicted
    present = denom > 0
    f1 = np.where(present, 2.0 * tp / np.where(present, denom, 1.0), 0.0)
    return float(f1[present].mean())


def macro_f1(probs: ArrayLike, labels: ArrayLike) -> float:
    """Macro-averaged F1 ``mean_k 2 TP_k / (2 TP_k + FP_k + FN_k)`` over the classes that occur
    in the labels or the predictions (scikit-learn's convention; absent classes are ignored)."""
    return _macro_f1(*check_probs_labels(probs, labels))


def _auroc(p: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import rankdata

    k = p.shape[1]
    scores = []
    for c in range(k):  # K one-vs-rest Mann–Whitney statistics; each is vectorised over N
        pos = y == c
        n_pos = int(pos.sum())
        n_neg = pos.shape[0] - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = rankdata(p[:, c])
        scores.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
    return float(np.mean(scores)) if scores else float("nan")


def auroc(probs: ArrayLike, labels: ArrayLike) -> float:
    """Macro one-vs-rest AUROC (Mann–Whitney with mid-ranks for ties), averaged over classes
    that have both positives and negatives; NaN if there are none."""
    return _auroc(*check_probs_labels(probs, labels))


# --------------------------------------------------------------------------------------------
# Selective prediction
# --------------------------------------------------------------------------------------------


def _risk_coverage(conf: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = conf.shape[0]
    order = np.argsort(-conf, kind="stable")
    c_sorted = conf[order]
    errors = 1.0 - correct[order]
    cum_err = np.cumsum(errors)
    # Tie groups of equal confidence: a threshold cannot split them, so inside a group the
    # expected number of errors over random tie orders grows linearly (order-invariant).
    new_group = np.r_[True, c_sorted[1:] != c_sorted[:-1]]
    group_id = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], n]
    err_before = np.r_[0.0, cum_err[ends[:-1] - 1]]
    group_rate = (cum_err[ends - 1] - err_before) / (ends - starts)
    k = np.arange(1, n + 1)
    expected_err = err_before[group_id] + (k - starts[group_id]) * group_rate[group_id]
    return k / n, expected_err / k


def risk_coverage(probs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Risk–coverage curve of selective prediction by top-label confidence.

    Returns ``(coverage, risk)``, both of length N: keeping the k most confident samples gives
    coverage k/N and risk = error rate among them. Samples with equal confidence are treated
    as one group (expected risk over their orderings), so the curve does not depend on the
    order of the input.
    """
    p, y = check_probs_labels(probs, labels)
    return _risk_coverage(*top_label(p, y))


def _aurc(conf: np.ndarray, correct: np.ndarray) -> float:
    return float(np.mean(_risk_coverage(conf, correct)[1]))


def aurc(probs: ArrayLike, labels: ArrayLike) -> float:
    """Area under the risk–coverage curve (Geifman & El-Yaniv): ``(1/N) sum_k risk(k/N)``."""
    p, y = check_probs_labels(probs, labels)
    return _aurc(*top_label(p, y))


# --------------------------------------------------------------------------------------------
# Registry, evaluate, bootstrap
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MetricKernel:
    """An already-validated computation: on top-label (conf, correct) or on (probs, labels)."""

    fn: Callable[..., float]
    top_label: bool
    binned: bool = False


_KERNELS: dict[str, _MetricKernel] = {
    "accuracy": _MetricKernel(_accuracy, top_label=False),
    "macro_f1": _MetricKernel(_macro_f1, top_label=False),
    "ece": _MetricKernel(_ece_top, top_label=True, binned=True),
    "mce": _MetricKernel(_mce_top, top_label=True, binned=True),
    "ace": _MetricKernel(lambda p, y, b: _classwise(p, y, b, "equal_mass"), False, binned=True),
    "classwise_ece": _MetricKernel(
        lambda p, y, b: _classwise(p, y, b, "equal_width"), False, binned=True
    ),
    "top_label_equal_mass_ece": _MetricKernel(_top_label_equal_mass, True, binned=True),
    "smooth_ece": _MetricKernel(lambda c, k: _smooth_ece(c, k, 2000)[0], top_label=True),
    "brier": _MetricKernel(_brier, top_label=False),
    "nll": _MetricKernel(_nll, top_label=False),
    "aurc": _MetricKernel(_aurc, top_label=True),
    "auroc": _MetricKernel(_auroc, top_label=False),
}

#: Public metric functions by name (those ``evaluate`` reports and ``bootstrap`` accepts by name).
METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "macro_f1": macro_f1,
    "ece": ece,
    "mce": mce,
    "ace": ace,
    "classwise_ece": classwise_ece,
    "top_label_equal_mass_ece": top_label_equal_mass_ece,
    "smooth_ece": smooth_ece,
    "brier": brier,
    "nll": nll,
    "aurc": aurc,
    "auroc": auroc,
}


def _run_kernel(
    kernel: _MetricKernel, p: np.ndarray, y: np.ndarray, conf: np.ndarray, correct: np.ndarray,
    n_bins: int,
) -> float:
    args: tuple = (conf, correct) if kernel.top_label else (p, y)
    return kernel.fn(*args, n_bins) if kernel.binned else kernel.fn(*args)


def evaluate(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> dict[str, Any]:
    """Every metric of :data:`METRICS` in one pass, plus the facts needed to read them.

    Returns a JSON-serialisable dict: each metric (fractions, not percent), the mean top-label
    confidence (above accuracy = overconfident), ``n_bins``,
    ``n_samples``, ``n_classes``, ``n_nonempty_bins`` (of the top-label equal-width
    histogram), ``binning`` (the convention string) and the smooth-ECE bandwidth.
    """
    p, y = check_probs_labels(probs, labels)
    n_bins = _check_n_bins(n_bins)
    conf, correct = top_label(p, y)
    out: dict[str, Any] = {}
    for name, kernel in _KERNELS.items():
        if name == "smooth_ece":
            value, sigma = _smooth_ece(conf, correct, 2000)
            out[name] = value
            out["smooth_ece_bandwidth"] = sigma
            continue
        out[name] = _run_kernel(kernel, p, y, conf, correct, n_bins)
    idx = bin_index(conf, n_bins)
    out.update(
        mean_confidence=float(conf.mean()),
        n_bins=n_bins,
        n_samples=int(p.shape[0]),
        n_classes=int(p.shape[1]),
        n_nonempty_bins=int(np.unique(idx).size),
        binning=BINNING_CONVENTION,
    )
    return out


@dataclass(frozen=True)
class BootstrapResult:
    """A metric on the full data and its stratified-bootstrap percentile interval."""

    metric: str
    estimate: float
    low: float
    high: float
    confidence: float
    n_resamples: int
    seed: int
    samples: np.ndarray
    method: str = "percentile"

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "estimate": self.estimate, "low": self.low,
            "high": self.high, "confidence": self.confidence,
            "n_resamples": self.n_resamples, "seed": self.seed, "method": self.method,
        }


def _stratified_indices(
    rng: np.random.Generator, strata: list[np.ndarray], n_resamples: int
) -> np.ndarray:
    """(n_resamples, N) indices: every class keeps its count, drawn with replacement."""
    parts = [s[rng.integers(0, s.shape[0], size=(n_resamples, s.shape[0]))] for s in strata]
    return np.concatenate(parts, axis=1)


def _strata(y: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(y == c) for c in np.unique(y)]


def stratified_bootstrap_indices(labels: ArrayLike, n_resamples: int, seed: int = 0) -> np.ndarray:
    """(n_resamples, N) resample indices that keep every class's count (drawn with
    replacement within each class); the same seed gives the same indices as :func:`bootstrap`."""
    y = to_numpy(labels)
    return _stratified_indices(np.random.default_rng(seed), _strata(y), int(n_resamples))


def _batched_metric(
    name: str, p: np.ndarray, y: np.ndarray, conf: np.ndarray, correct: np.ndarray,
    n_bins: int,
) -> Callable[[np.ndarray], np.ndarray] | None:
    """Vectorised evaluation over a (R, N) block of resample indices, for metrics that are
    means of per-sample terms or sums over fixed per-sample bins; None for the others."""
    rows = np.arange(p.shape[0])
    per_sample = {
        "accuracy": lambda: correct,
        "brier": lambda: np.sum(p * p, axis=1) - 2.0 * p[rows, y] + 1.0,
        "nll": lambda: -np.log(np.maximum(p[rows, y], LOG_EPS)),
    }
    if name in per_sample:
        terms = per_sample[name]()
        return lambda idx: terms[idx].mean(axis=1)
    if name not in ("ece", "mce"):
        return None
    bin_of = bin_index(conf, n_bins)  # a sample's bin does not change when resampled
    residual = correct - conf

    def binned(idx: np.ndarray) -> np.ndarray:
        r, n = idx.shape
        keys = (bin_of[idx] + n_bins * np.arange(r)[:, None]).ravel()
        sums = np.bincount(keys, weights=residual[idx].ravel(), minlength=r * n_bins)
        sums = np.abs(sums.reshape(r, n_bins))
        if name == "ece":
            return sums.sum(axis=1) / n
        counts = np.bincount(keys, minlength=r * n_bins).reshape(r, n_bins)
        return (sums / np.maximum(counts, 1)).max(axis=1)

    return binned


def bootstrap(
    metric: str | Callable[..., float],
    probs: ArrayLike,
    labels: ArrayLike,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    n_bins: int = 15,
    method: str = "percentile",
) -> BootstrapResult:
    """Percentile bootstrap interval of a metric, stratified by label.

    Each resample draws, for every class, as many samples as the class has (with replacement),
    so class proportions stay fixed. ``metric`` is a name of :data:`METRICS`, one of those
    functions, or any ``f(probs, labels) -> float``. The interval is the
    ``[(1-c)/2, (1+c)/2]`` quantile range of the resampled values; the same seed gives the
    same result. ``n_bins`` applies to binned metrics given by name or function.

    ``method="percentile"`` (default) reports the quantiles themselves; ``method="basic"``
    reflects them about the estimate, ``[2 t - q_hi, 2 t - q_lo]``, which corrects a shift of
    the resampling distribution. Binned ECE is biased upwards and resampling (duplicated
    samples) adds to that bias, so for a well-calibrated model the percentile interval can lie
    entirely above the estimate; report the method with the interval.
    """
    if method not in ("percentile", "basic"):
        raise ValueError(f"method: expected 'percentile' or 'basic', got {method!r}")
    p, y = check_probs_labels(probs, labels)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence!r}")
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples: expected a positive integer, got {n_resamples!r}")
    n_bins = _check_n_bins(n_bins)
    if isinstance(metric, str):
        if metric not in _KERNELS:
            raise ValueError(f"metric: unknown name {metric!r}; available: {sorted(_KERNELS)}")
        name: str | None = metric
    else:
        name = next((k for k, f in METRICS.items() if f is metric), None)
    kernel = _KERNELS[name] if name is not None else None
    name = name or getattr(metric, "__name__", "metric")

    conf, correct = top_label(p, y)
    if kernel is not None:
        def compute(index: np.ndarray | None) -> float:
            if index is None:
                return _run_kernel(kernel, p, y, conf, correct, n_bins)
            if kernel.top_label:
                return _run_kernel(kernel, p, y, conf[index], correct[index], n_bins)
            return _run_kernel(kernel, p[index], y[index], conf, correct, n_bins)
    else:
        def compute(index: np.ndarray | None) -> float:
            return float(metric(p, y) if index is None else metric(p[index], y[index]))
    batched = _batched_metric(name, p, y, conf, correct, n_bins) if kernel else None

    rng = np.random.default_rng(seed)
    strata = _strata(y)
    n = y.shape[0]
    chunk = max(1, min(int(n_resamples), 2_000_000 // n))
    values = np.empty(int(n_resamples))
    done = 0
    while done < n_resamples:
        m = min(chunk, int(n_resamples) - done)
        indices = _stratified_indices(rng, strata, m)
        if batched is not None:
            values[done : done + m] = batched(indices)
        else:
            values[done : done + m] = [compute(row) for row in indices]
        done += m
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    estimate = compute(None)
    if method == "basic":
        low, high = 2.0 * estimate - high, 2.0 * estimate - low
    return BootstrapResult(
        metric=name, estimate=estimate, low=float(low), high=float(high), method=method,
        confidence=float(confidence), n_resamples=int(n_resamples), seed=int(seed),
        samples=values,
    )

