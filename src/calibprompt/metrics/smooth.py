"""Bin-free (kernel) estimators of top-label calibration error: smooth ECE and KDE ECE.

:func:`smooth_ece` (Błasiok & Nakkiran 2023) smooths the residuals ``correct - conf`` with a
Gaussian kernel reflected at 0 and 1, at its fixed-point bandwidth; :func:`kde_ece`
(Popordanoska et al. 2022, as their code computes it) estimates the conditional accuracy with
a leave-one-out Beta-kernel ratio, the kernel centred on each data point.
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln

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


#: The bandwidths ``get_bandwidth`` of Popordanoska et al.'s code searches: 15 log-spaced values
#: in [1e-5, 1e-1], then 5 linear values in [0.2, 1].
_KDE_BANDWIDTHS = np.concatenate([np.logspace(-5.0, -1.0, 15), np.linspace(0.2, 1.0, 5)])

#: Confidences are clipped to [_KDE_CLIP, 1 - _KDE_CLIP]: the Beta kernel needs log(c) and
#: log(1 - c), and the authors' code returns NaN for a confidence of exactly 0 or 1.
_KDE_CLIP = 1e-10

#: Rows of the (rows x N) kernel matrix processed at once: about this many float64 entries
#: (2 MiB, so that the several passes over a block run in cache).
_KDE_BLOCK_ENTRIES = 1 << 18


def _kde_pass(
    conf: np.ndarray, correct: np.ndarray, bandwidths: np.ndarray, chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For each bandwidth h: the authors' leave-one-out bandwidth score and the sum of the
    top-label ECE terms, in one pass over row blocks of the N x N kernel matrix.

    ``log K_h[i, j] = log Beta(conf_i; conf_j / h + 1, (1 - conf_j) / h + 1)`` is the kernel centred
    on the data point ``conf_j`` evaluated at ``conf_i``, and the diagonal (j = i) is left out.
    Returns ``score[h] = sum_i [log sum_{j != i} K_h[i, j] - log((N - 1) h)]`` and
    ``terms[h] = sum_i |sum_{j != i} K_h[i, j] correct_j / sum_{j != i} K_h[i, j] - conf_i|``.
    ``conf`` must already lie strictly inside (0, 1).
    """
    n = conf.shape[0]
    hs = np.asarray(bandwidths, dtype=np.float64)
    rows = min(n, chunk if chunk is not None else max(1, _KDE_BLOCK_ENTRIES // n))
    # log K_h[i, j] = (conf_j log conf_i + (1 - conf_j) log(1 - conf_i)) / h - log B(a_j, b_j)
    #              = conf_j * logit_i / h  -  log B(a_j, b_j)  +  log(1 - conf_i) / h,
    # a_j = conf_j / h + 1, b_j = (1 - conf_j) / h + 1; the last term is constant along a row.
    logit = np.log(conf) - np.log1p(-conf)
    row_term = np.log1p(-conf)
    a = conf[None, :] / hs[:, None] + 1.0  # (H, N)
    b = (1.0 - conf[None, :]) / hs[:, None] + 1.0
    log_beta_fn = gammaln(a) + gammaln(b) - gammaln(a + b)
    score = np.zeros(hs.size)
    terms = np.zeros(hs.size)
    buffer = np.empty((rows, n))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        r = np.arange(stop - start)
        block = buffer[: stop - start]
        for k, h in enumerate(hs):
            np.multiply.outer(logit[start:stop] / h, conf, out=block)
            block -= log_beta_fn[k][None, :]
            block[r, start + r] = -np.inf  # leave one out
            peak = block.max(axis=1)
            block -= peak[:, None]
            # exp is ~20x slower on arguments that underflow; below e^-700 (1e-304, relative to a
            # row's largest term of 1) an entry cannot change a float64 sum, so floor it there
            np.maximum(block, -700.0, out=block)
            np.exp(block, out=block)
            block[r, start + r] = 0.0
            den = block.sum(axis=1)
            num = np.einsum("ij,j->i", block, correct)  # no BLAS threads for a matvec
            log_density = np.log(den) + peak + row_term[start:stop] / h
            score[k] += float(np.sum(log_density)) - (stop - start) * np.log((n - 1) * h)
            terms[k] += float(np.sum(np.abs(num / den - conf[start:stop])))
    return score, terms


def _kde_bandwidth(conf: np.ndarray) -> float:
    """The authors' bandwidth rule on clipped confidences: the maximiser of the leave-one-out
    score over ``_KDE_BANDWIDTHS`` (the true maximum, first one on ties)."""
    score, _ = _kde_pass(conf, np.zeros_like(conf), _KDE_BANDWIDTHS)
    return float(_KDE_BANDWIDTHS[int(np.argmax(score))])


def kde_ece(
    probs: ArrayLike, labels: ArrayLike, bandwidth: float | None = None, *,
    chunk: int | None = None,
) -> float:
    """KDE estimator of the top-label L1 calibration error of Popordanoska et al. (NeurIPS 2022,
    "A consistent and differentiable Lp canonical calibration error estimator") as their code
    computes it: ``get_ece_kde(f, y, h, p=1, mc_type="top_label")`` of tpopordanoska/ece-kde.

    With ``c_i = max_k p_ik``, ``a_i = 1[argmax_k p_ik = y_i]`` and the Beta kernel of the
    *data point* ``c_j`` (mode ``c_j``) evaluated at ``c_i``,
    ``K_h(c_i; c_j) = Beta pdf at c_i with parameters (c_j / h + 1, (1 - c_j) / h + 1)``::

        ECE_KDE = (1/N) sum_i | sum_{j != i} K_h(c_i; c_j) a_j / sum_{j != i} K_h(c_i; c_j) - c_i |

    Leave-one-out: the sums skip j = i (a sample whose other samples are all wrong gets the
    estimate 0). The orientation matters: Chen's (1999) Beta-kernel regression, with the kernel
    of the evaluation point ``c_i`` evaluated at ``c_j``, is a different estimator.

    ``bandwidth=None`` applies the authors' rule (``get_bandwidth``) to the (N, 1) top-label
    confidences, where the ECE's Beta kernel lives (given the full (N, K) scores their function
    would use a Dirichlet kernel): ``h`` maximises their score
    ``sum_i [log sum_{j != i} K_h(c_i; c_j) - log((N - 1) h)]`` (``- log h`` included) over 20
    candidates: 15 log-spaced values in [1e-5, 1e-1] and 0.2, 0.4, ..., 1. Their search starts
    from a best score of 0, so it returns -1 -- and their ECE then fails -- when every candidate
    scores below 0 (a few widely spread confidences, e.g. 0.4, 0.7, 0.999); we take the true
    maximum (the first on ties), which is theirs whenever theirs is defined. The ``- log h``
    term favours small bandwidths (1e-5 for a few hundred samples), which biases the estimate
    upwards on well-calibrated data; pass ``bandwidth`` to fix ``h``. Their code returns NaN
    for a confidence of exactly 1; we clip confidences to [1e-10, 1 - 1e-10]. Otherwise the
    value is theirs up to rounding (float64 here; their code runs in the input's dtype).

    Cost: O(N^2) time per bandwidth -- the default search takes 20 of them, and the ECE of each
    candidate comes from the same pass -- and O(chunk * N) memory: the kernel matrix is
    processed ``chunk`` rows at a time (default: blocks of about 262,144 entries, 2 MiB), so
    N = 100,000 needs little memory but takes minutes. Use :func:`smooth_ece` for large N.
    """
    pr, y = check_probs_labels(probs, labels)
    conf, correct = top_label(pr, y)
    n = conf.shape[0]
    if n < 2:
        raise ValueError(f"kde_ece: needs at least 2 samples (leave-one-out), got N = {n}")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"chunk: expected a positive int or None, got {chunk!r}")
    conf = np.clip(conf, _KDE_CLIP, 1.0 - _KDE_CLIP)
    if bandwidth is None:
        score, terms = _kde_pass(conf, correct, _KDE_BANDWIDTHS, chunk)
        return float(terms[int(np.argmax(score))] / n)
    h = float(bandwidth)
    if not np.isfinite(h) or h <= 0:
        raise ValueError(f"bandwidth: expected a positive finite float or None, got {bandwidth!r}")
    return float(_kde_pass(conf, correct, np.array([h]), chunk)[1][0] / n)
