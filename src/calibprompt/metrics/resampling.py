"""Stratified bootstrap intervals of a metric: resample indices that keep every class's count,
vectorised evaluation of whole blocks of resamples where the metric allows it, and
:class:`BootstrapResult`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibprompt.metrics._validation import (
    LOG_EPS,
    ArrayLike,
    _check_n_bins,
    check_probs_labels,
    to_numpy,
    top_label,
)
from calibprompt.metrics.binned import bin_index
from calibprompt.metrics.registry import _KERNELS, METRICS, _run_kernel

__all__ = ["BootstrapResult", "bootstrap", "stratified_bootstrap_indices"]


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
