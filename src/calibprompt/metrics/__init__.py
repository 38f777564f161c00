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

The package is split by concern; import from :mod:`calibprompt.metrics` itself, which
re-exports every public name:

- ``_validation``: :func:`to_numpy`, :func:`check_probs_labels`, :func:`check_labels`,
  :func:`top_label` and the shared constants (``METRICS_VERSION``, ``BINNING_CONVENTION``, the
  row-sum tolerances, ``LOG_EPS``);
- ``binned``: equal-width and equal-mass binning (:func:`bin_index`, :func:`reliability_bins`,
  :class:`ReliabilityBins`), :func:`ece`, :func:`mce`, :func:`top_label_equal_mass_ece`,
  :func:`classwise_ece`, :func:`ace`;
- ``smooth``: the bin-free estimators :func:`smooth_ece` and :func:`kde_ece`;
- ``scores``: :func:`brier`, :func:`nll`, :func:`accuracy`, :func:`macro_f1`, :func:`auroc`;
- ``selective``: :func:`risk_coverage`, :func:`aurc`;
- ``registry``: :data:`METRICS` (name -> function) and the kernels on validated arrays behind it;
- ``resampling``: :func:`bootstrap`, :func:`bootstrap_many` (several metrics from one shared draw),
  :class:`BootstrapResult`, :func:`stratified_bootstrap_indices`;
- this module: :func:`evaluate`, every metric of :data:`METRICS` in one pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Also importable from here though not in __all__ (as in the single-module version): ArrayLike
# (calibrators, plots), the tolerance constants and LOG_EPS, and the smooth-ECE kernels
# (tests/test_metrics.py); "X as X" marks a re-export that this module does not use itself.
from calibprompt.metrics._validation import (
    BINNING_CONVENTION,
    METRICS_VERSION,
    ArrayLike,
    _check_n_bins,
    check_labels,
    check_probs_labels,
    to_numpy,
    top_label,
)
from calibprompt.metrics._validation import LOG_EPS as LOG_EPS
from calibprompt.metrics._validation import (
    LOW_PRECISION_ROW_SUM_TOLERANCE as LOW_PRECISION_ROW_SUM_TOLERANCE,
)
from calibprompt.metrics._validation import ROW_SUM_TOLERANCE as ROW_SUM_TOLERANCE
from calibprompt.metrics.binned import (
    ReliabilityBins,
    ace,
    bin_index,
    classwise_ece,
    ece,
    mce,
    reliability_bins,
    top_label_equal_mass_ece,
)
from calibprompt.metrics.registry import _KERNELS, METRICS, _run_kernel
from calibprompt.metrics.resampling import (
    BootstrapResult,
    bootstrap,
    bootstrap_many,
    stratified_bootstrap_indices,
)
from calibprompt.metrics.scores import accuracy, auroc, brier, macro_f1, nll
from calibprompt.metrics.selective import aurc, risk_coverage
from calibprompt.metrics.smooth import _smooth_ece, kde_ece, smooth_ece
from calibprompt.metrics.smooth import _smooth_ece_at as _smooth_ece_at

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
    "bootstrap_many",
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


def evaluate(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> dict[str, Any]:
    """Every metric of :data:`METRICS` in one pass, plus the facts needed to read them.

    Returns a JSON-serialisable dict: each metric (fractions, not percent), the mean top-label
    confidence (above accuracy = overconfident), ``n_bins``,
    ``n_samples``, ``n_classes``, ``n_nonempty_bins`` (of the top-label equal-width
    histogram), ``binning`` (the convention string) and the smooth-ECE bandwidth.
    """
    p, y = check_probs_labels(probs, labels)  # validated and converted once
    n_bins = _check_n_bins(n_bins)
    conf, correct = top_label(p, y)  # shared by every top-label kernel
    out: dict[str, Any] = {}
    for name, kernel in _KERNELS.items():
        if name == "smooth_ece":
            value, sigma = _smooth_ece(conf, correct, 2000)
            out[name] = value
            out["smooth_ece_bandwidth"] = sigma
        elif name == "accuracy":  # the mean of the correctness already at hand (the same float)
            out[name] = float(np.mean(correct))
        else:
            out[name] = _run_kernel(kernel, p, y, conf, correct, n_bins)
    out.update(
        mean_confidence=float(conf.mean()),
        n_bins=n_bins,
        n_samples=int(p.shape[0]),
        n_classes=int(p.shape[1]),
        n_nonempty_bins=int(np.count_nonzero(np.bincount(bin_index(conf, n_bins), minlength=n_bins))),
        binning=BINNING_CONVENTION,
    )
    return out
