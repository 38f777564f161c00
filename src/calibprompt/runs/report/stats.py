"""The numbers: metrics of one run (per-class recall and classwise ECE), mean ± std over seeds,
and the stratified percentile-bootstrap interval of the seed mean of ECE, with its seeded,
block-wise resampling (``ECE(idx) = (1/N) sum_b |sum_{i in b} (correct_i - conf_i)|``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from calibprompt.metrics import (
    accuracy,
    ace,
    bin_index,
    brier,
    ece,
    mce,
    nll,
    stratified_bootstrap_indices,
)
from calibprompt.runs.report.collect import _Run
from calibprompt.runs.report.constants import _BLOCK, CONFIDENCE


def _stream_seed(*parts: Any) -> int:
    """A 64-bit seed derived from ``parts`` (JSON scalars): independent streams per purpose."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and population std (ddof = 0) of the finite values (NaN when there are none)."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(np.mean(arr)), "std": float(np.std(arr))}


# --------------------------------------------------------------------------------------------
# Metrics of one run
# --------------------------------------------------------------------------------------------


def per_class_recall(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Accuracy on the images of each class (recall): ``r_k = #{i : y_i = k, argmax_j p_ij = k}
    / #{i : y_i = k}``, shape (K,); NaN for a class without images."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    k = p.shape[1]
    support = np.bincount(y, minlength=k)
    hits = np.bincount(y[p.argmax(axis=1) == y], minlength=k)
    out = np.full(k, np.nan)
    np.divide(hits, support, out=out, where=support > 0)
    return out


def per_class_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> np.ndarray:
    """Classwise ECE of every class, shape (K,).

    ``ECE_k = sum_b (n_bk / N) |acc_bk - conf_bk|`` where column k of ``probs`` is cut into
    ``n_bins`` equal-width bins (``bin = min(floor(p_ik * B), B - 1)``, the project's
    convention), ``n_bk`` is the number of images in bin b, ``acc_bk`` the fraction of them
    with ``y_i = k`` and ``conf_bk`` their mean ``p_ik``. The mean over k is the classwise ECE
    of Kull et al. (2019), :func:`calibprompt.metrics.classwise_ece`.
    """
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    n, k = p.shape
    bins = bin_index(p, n_bins) + n_bins * np.arange(k)[None, :]
    residual = (y[:, None] == np.arange(k)[None, :]) - p
    sums = np.bincount(bins.ravel(), weights=residual.ravel(), minlength=k * n_bins)
    return np.abs(sums.reshape(k, n_bins)).sum(axis=1) / n


_METRIC_FUNCTIONS: dict[str, Callable[..., float]] = {
    "accuracy": lambda p, y, b: accuracy(p, y),
    "ece": ece,
    "mce": mce,
    "ace": ace,
    "brier": lambda p, y, b: brier(p, y),
    "nll": lambda p, y, b: nll(p, y),
    # not a table column: its position relative to accuracy says over- or underconfident
    "mean_confidence": lambda p, y, b: float(np.max(p, axis=1).mean()),
}


# --------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------


def _top_label(p: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(correct, ECE bin of each image, correct - confidence) for batched resampling."""
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    return correct, bin_index(conf, n_bins), correct - conf


def _resampled_ece(bins: np.ndarray, residual: np.ndarray, idx: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE of every row of resample indices ``idx`` (R, N): ``(1/N) sum_b |sum_{i in b} (correct_i
    - conf_i)|`` (an image keeps its bin when resampled)."""
    r, n = idx.shape
    keys = (bins[idx] + n_bins * np.arange(r)[:, None]).ravel()
    sums = np.bincount(keys, weights=residual[idx].ravel(), minlength=r * n_bins)
    return np.abs(sums.reshape(r, n_bins)).sum(axis=1) / n


def _blocks(n_resamples: int, n: int) -> Iterable[tuple[int, int, int]]:
    """``(block, start, size)`` of the resample blocks: at most :data:`~calibprompt.runs.report.constants._BLOCK` indices each."""
    chunk = max(1, min(n_resamples, _BLOCK // n))
    for block, start in enumerate(range(0, n_resamples, chunk)):
        yield block, start, min(chunk, n_resamples - start)


def _same_test_set(runs: Sequence[_Run]) -> bool:
    """Whether all runs have identical ``test_files`` and ``test_labels`` (in the same order)."""
    first = runs[0]
    return all(np.array_equal(r.files, first.files) and np.array_equal(r.labels, first.labels)
               for r in runs[1:])


def _test_key(run: _Run) -> str:
    """A digest of the run's test files and labels (equal digests: the same test set)."""
    h = hashlib.sha256()
    h.update("\0".join(run.files.tolist()).encode())
    h.update(np.ascontiguousarray(run.labels, dtype="<i8").tobytes())
    return h.hexdigest()


def _ece_interval(runs: list[_Run], variant: str, n_resamples: int, n_bins: int, seed: int,
                  shared: bool) -> tuple[float, float]:
    """Percentile interval of the seed mean of the resampled ECE.

    ``shared`` (the runs have one test set, as the seeds of one experiment do): resample b is one
    stratified index set ``idx_b`` drawn from the common labels with
    :func:`~calibprompt.metrics.stratified_bootstrap_indices` (seeded from ``seed`` and the block
    alone), the same for every run, and the interval is the percentiles of
    ``(1/S) sum_s ECE(run_s, idx_b)`` over b; one run: the percentiles of its resampled ECE.
    Otherwise every run is resampled independently (seeded from ``seed`` and the run's seed).
    """
    total = np.zeros(n_resamples)
    tops = [_top_label(r.probs(variant), r.labels, n_bins) for r in runs]
    if shared:
        labels = runs[0].labels
        for block, start, m in _blocks(n_resamples, labels.shape[0]):
            idx = stratified_bootstrap_indices(labels, m, seed=_stream_seed(seed, "ece-interval", block))
            for _, bins, residual in tops:
                total[start:start + m] += _resampled_ece(bins, residual, idx, n_bins)
    else:
        for run, (_, bins, residual) in zip(runs, tops, strict=True):
            for block, start, m in _blocks(n_resamples, run.labels.shape[0]):
                idx = stratified_bootstrap_indices(
                    run.labels, m, seed=_stream_seed(seed, "ece-interval", run.seed, block))
                total[start:start + m] += _resampled_ece(bins, residual, idx, n_bins)
    alpha = (1.0 - CONFIDENCE) / 2.0
    low, high = np.quantile(total / len(runs), [alpha, 1.0 - alpha])
    return float(low), float(high)
