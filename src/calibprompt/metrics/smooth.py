"""Bin-free (kernel) estimators of top-label calibration error: smooth ECE and KDE ECE.

:func:`smooth_ece` (Błasiok & Nakkiran 2023) smooths the residuals ``correct - conf`` with a
Gaussian kernel reflected at 0 and 1, at its fixed-point bandwidth; :func:`kde_ece`
(Popordanoska et al. 2022) estimates the conditional accuracy with a leave-one-out Beta-kernel
regression.
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln, logsumexp

from calibprompt.metrics._validation import ArrayLike, check_probs_labels, top_label
from calibprompt.metrics.binned import bin_index

__all__ = ["kde_ece", "smooth_ece"]


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
    a = eval_pts[:, None] / h + 1.0
    b = (1.0 - eval_pts[:, None]) / h + 1.0
    log_norm = gammaln(a + b) - gammaln(a) - gammaln(b)
    return log_norm + (a - 1.0) * np.log(data)[None, :] + (b - 1.0) * np.log1p(-data)[None, :]


def _kde_bandwidth(conf: np.ndarray) -> float:
    """Bandwidth maximising the leave-one-out log likelihood of the Beta KDE of ``conf``."""
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
