"""Stratified bootstrap intervals of metrics: resample indices that keep every class's count,
one shared draw for several metrics (:func:`bootstrap_many`), vectorised evaluation of whole
blocks of resamples where the metric allows it, and :class:`BootstrapResult`.

The resamples are defined by the seed and the number of resamples alone: a
``numpy.random.default_rng(seed)`` draws them in blocks of ``max(1, min(R, 2_000_000 // N))``
resamples, and within a block one ``integers(0, n_c, size=(rows, n_c))`` per class ``c`` (in
the order of the class labels). :func:`stratified_bootstrap_indices`, :func:`bootstrap` and
:func:`bootstrap_many` all draw this way, so with the same seed and ``n_resamples`` they see the
same index sets.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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

__all__ = ["BootstrapResult", "bootstrap", "bootstrap_many", "stratified_bootstrap_indices"]

#: Indices drawn per block: a block holds ``max(1, min(R, _BLOCK // N))`` resamples. Part of the
#: definition of the resamples of a seed (the generator is called once per class and block).
_BLOCK = 2_000_000

#: Drawn samples evaluated together by default (``chunk = max(1, _CHUNK_SAMPLES // N)``
#: resamples): small enough for the buffers to stay in cache.
_CHUNK_SAMPLES = 1 << 17

#: Metrics evaluated on whole blocks of resamples: means of per-sample terms ...
_MEAN_METRICS = ("accuracy", "brier", "nll")
#: ... and sums over the fixed equal-width bin of each sample (top-label confidence).
_BINNED_METRICS = ("ece", "mce")


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


def _strata(y: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(y == c) for c in np.unique(y)]


def _block_rows(n_resamples: int, n: int) -> int:
    """Resamples per drawn block."""
    return max(1, min(n_resamples, _BLOCK // max(n, 1)))


def _draw(rng: np.random.Generator, strata: list[np.ndarray], rows: int) -> list[np.ndarray]:
    """One block: for every class, (rows, n_c) positions within the class, with replacement."""
    return [rng.integers(0, s.shape[0], size=(rows, s.shape[0])) for s in strata]


def stratified_bootstrap_indices(labels: ArrayLike, n_resamples: int, seed: int = 0) -> np.ndarray:
    """(n_resamples, N) resample indices that keep every class's count (drawn with
    replacement within each class; in each row the draws of the first class come first).

    Row r is exactly the r-th resample that :func:`bootstrap` and :func:`bootstrap_many` use with
    the same ``seed`` and ``n_resamples``, for every N and ``n_resamples`` (the indices are drawn
    in the same blocks, see the module docstring). A different ``n_resamples`` gives other index
    sets (the blocks differ). The array holds ``8 N n_resamples`` bytes; for many resamples of
    large N, :func:`bootstrap_many` evaluates metrics without materialising it. (Earlier
    versions drew all rows in one block, unlike :func:`bootstrap`: where
    ``N * n_resamples > 2,000,000`` the index sets of a seed differ from theirs.)
    """
    y = to_numpy(labels)
    r = int(n_resamples)
    strata = _strata(y)
    n = int(y.shape[0])
    out = np.empty((r, n), dtype=np.int64)
    rng = np.random.default_rng(seed)
    block = _block_rows(r, n)
    for start in range(0, r, block):
        rows = min(block, r - start)
        col = 0
        for s, local in zip(strata, _draw(rng, strata, rows), strict=True):
            out[start:start + rows, col:col + s.shape[0]] = s[local]
            col += s.shape[0]
    return out


def _per_sample_terms(name: str, p: np.ndarray, y: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """The per-sample terms whose mean is the metric (accuracy, Brier, NLL)."""
    if name == "accuracy":
        return correct
    rows = np.arange(p.shape[0])
    if name == "brier":
        return np.sum(p * p, axis=1) - 2.0 * p[rows, y] + 1.0
    return -np.log(np.maximum(p[rows, y], LOG_EPS))


def _default_workers() -> int:
    """Threads for :func:`bootstrap_many`: the CPUs this process may use, at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _resampled_values(
    p: np.ndarray, y: np.ndarray, conf: np.ndarray, correct: np.ndarray, n_bins: int,
    n_resamples: int, seed: int, vectorised: Sequence[str],
    per_resample: dict[str, Callable[[np.ndarray], float]], chunk: int | None = None,
    workers: int = 1,
) -> dict[str, np.ndarray]:
    """The value of every metric on each of the ``n_resamples`` stratified resamples of ``seed``,
    from one shared draw.

    ``vectorised`` names metrics of ``_MEAN_METRICS`` / ``_BINNED_METRICS``; ``per_resample``
    maps a name to a function of one resample's (original) indices. The resamples are drawn
    block by block as in :func:`stratified_bootstrap_indices` -- per class c, (rows, n_c)
    positions within the class -- and evaluated ``chunk`` resamples at a time (default: about
    ``_CHUNK_SAMPLES`` drawn samples, so the buffers stay in cache) without forming their indices
    into the data: the per-sample quantities (each sample's equal-width bin and residual
    ``correct - conf`` for ECE and MCE, its terms for accuracy, Brier and NLL) are laid out as
    records of 1, 2 or 4 float64 in per-class tables, and one ``take`` per class and record
    gathers them by the drawn positions into buffers reused across chunks.

    Every value is computed with the same floating-point operations in the same order as the
    row formulas on the index rows: ``terms[index].mean(axis=1)`` (NumPy's pairwise sum over one
    whole row), and for ECE / MCE one ``np.bincount`` of the residuals over (row, bin) keys
    (``sum |per-bin sum| / N`` and ``max |per-bin sum| / count``), whose sums take each row's
    samples in the row's order -- as ``np.add.at`` does here, row by row. So the values do not
    depend on ``chunk`` or ``workers``. With ``workers > 1`` the rows of a block are evaluated by
    that many threads (NumPy releases the GIL in ``take``, ``ufunc.at`` and reductions) while
    this thread draws the next block; the generator is only ever called here, in order.
    """
    n = int(y.shape[0])
    strata = _strata(y)
    cols = []
    first_col = 0
    for s in strata:
        cols.append(slice(first_col, first_col + s.shape[0]))
        first_col += s.shape[0]
    means = [name for name in _MEAN_METRICS if name in vectorised]
    binned = [name for name in _BINNED_METRICS if name in vectorised]
    # Per-sample fields in records of 1, 2 or 4 float64 (NumPy's fastest gathers), as few
    # records as possible. ECE and MCE need each sample's bin (stored as int64) and residual;
    # MCE also counts the samples per bin. When it fits in one record, the residual is followed
    # by 1.0, the two read as one complex number, so one ufunc.at accumulates each bin's residual
    # sum (real part, added exactly as in float64) and count (imaginary part); otherwise a second
    # ufunc.at counts.
    slot: dict[str, tuple[int, int]] = {}  # mean metric -> (record, field)
    layout: list[list[str]] = []
    rest = list(means)
    complex_counts = "mce" in binned and len(means) <= 1
    if complex_counts:
        layout.append(["bin", rest.pop(0) if rest else "", "residual", "one"])
    elif binned:
        layout.append(["bin", "residual", *rest[:2]])
        rest = rest[2:]
    for first_field in range(0, len(rest), 4):
        layout.append(rest[first_field:first_field + 4])
    records = []
    for r, fields in enumerate(layout):
        record = np.zeros((n, 1 << (len(fields) - 1).bit_length()))
        for i, field in enumerate(fields):
            if field == "bin":
                record.view(np.int64)[:, i] = bin_index(conf, n_bins)
            elif field == "residual":
                record[:, i] = correct - conf
            elif field == "one":
                record[:, i] = 1.0
            elif field:
                record[:, i] = _per_sample_terms(field, p, y, correct)
                slot[field] = (r, i)
        records.append([record[s] for s in strata])
    widths = [r[0].shape[1] for r in records]
    block = _block_rows(n_resamples, n)
    rows = max(1, min(block, _CHUNK_SAMPLES // n if chunk is None else int(chunk)))
    values = {name: np.empty(n_resamples) for name in [*vectorised, *per_resample]}

    def buffers() -> list[np.ndarray]:
        buf = [np.empty((rows, n, width)) for width in widths]
        if per_resample:
            buf.append(np.empty((rows, n), dtype=np.int64))
        return buf

    def run_rows(draws: list[np.ndarray], first: int, last: int, offset: int,
                 buf: list[np.ndarray]) -> None:
        """Rows [first, last) of a drawn block whose first resample is number ``offset``."""
        for a in range(first, last, rows):
            parts = [d[a:min(a + rows, last)] for d in draws]
            m = parts[0].shape[0]
            out = slice(offset + a, offset + a + m)
            gathered = [b[:m] for b in buf[:len(records)]]
            for g, class_tables in zip(gathered, records, strict=True):
                for part, col, table in zip(parts, cols, class_tables, strict=True):
                    np.take(table, part, axis=0, out=g[:, col], mode="clip")
            if binned:
                keys = gathered[0].view(np.int64)[:, :, 0]
                counts: np.ndarray | None = None
                if complex_counts:
                    weights = gathered[0][:, :, 2:4].view(np.complex128)[:, :, 0]
                    acc = np.zeros((m, n_bins), dtype=np.complex128)
                else:
                    weights = gathered[0][:, :, 1]
                    acc = np.zeros((m, n_bins))
                    if "mce" in binned:
                        counts = np.zeros((m, n_bins), dtype=np.int64)
                for row in range(m):  # 1-D ufunc.at: NumPy's fast indexed loop, in order
                    np.add.at(acc[row], keys[row], weights[row])
                    if counts is not None:
                        np.add.at(counts[row], keys[row], 1)
                sums = np.abs(acc.real)
                if complex_counts:
                    counts = acc.imag
                if "ece" in binned:
                    values["ece"][out] = sums.sum(axis=1) / n
                if counts is not None:
                    values["mce"][out] = (sums / np.maximum(counts, 1)).max(axis=1)
            for name in means:
                r, i = slot[name]
                values[name][out] = gathered[r][:, :, i].mean(axis=1)
            if per_resample:
                index = buf[-1][:m]
                for part, col, s in zip(parts, cols, strata, strict=True):
                    np.take(s, part, out=index[:, col], mode="clip")
                for name, fn in per_resample.items():
                    values[name][out] = [fn(row) for row in index]

    rng = np.random.default_rng(seed)
    block_starts = range(0, n_resamples, block)
    chunks_per_block = -(-block // rows)
    workers = max(1, min(int(workers), chunks_per_block * len(block_starts)))
    if workers == 1:
        buf = buffers()
        for start in block_starts:
            draws = _draw(rng, strata, min(block, n_resamples - start))
            run_rows(draws, 0, draws[0].shape[0], start, buf)
        return values

    per_task = -(-chunks_per_block // workers) * rows  # rows of a block per task
    free: queue.SimpleQueue[list[np.ndarray]] = queue.SimpleQueue()  # one buffer set per thread
    for _ in range(workers):
        free.put(buffers())

    def task(draws: list[np.ndarray], first: int, last: int, offset: int) -> None:
        buf = free.get()
        try:
            run_rows(draws, first, last, offset, buf)
        finally:
            free.put(buf)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        previous: list[Future[None]] = []
        for start in block_starts:
            draws = _draw(rng, strata, min(block, n_resamples - start))
            for done in previous:  # at most two blocks in flight: the draw runs one ahead
                done.result()
            m = draws[0].shape[0]
            previous = [pool.submit(task, draws, a, min(a + per_task, m), start)
                        for a in range(0, m, per_task)]
        for done in previous:
            done.result()
    return values


def _check_method(method: str) -> None:
    if method not in ("percentile", "basic"):
        raise ValueError(f"method: expected 'percentile' or 'basic', got {method!r}")


def _check_interval_args(confidence: float, n_resamples: int) -> int:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence!r}")
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples: expected a positive integer, got {n_resamples!r}")
    return int(n_resamples)


def _result(
    name: str, estimate: float, values: np.ndarray, confidence: float, seed: int, method: str
) -> BootstrapResult:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    if method == "basic":
        low, high = 2.0 * estimate - high, 2.0 * estimate - low
    return BootstrapResult(
        metric=name, estimate=estimate, low=float(low), high=float(high), method=method,
        confidence=float(confidence), n_resamples=int(values.shape[0]), seed=int(seed),
        samples=values,
    )


def _kernel_on_resample(
    name: str, p: np.ndarray, y: np.ndarray, conf: np.ndarray, correct: np.ndarray, n_bins: int
) -> Callable[[np.ndarray], float]:
    kernel = _KERNELS[name]
    if kernel.top_label:
        return lambda index: _run_kernel(kernel, p, y, conf[index], correct[index], n_bins)
    return lambda index: _run_kernel(kernel, p[index], y[index], conf, correct, n_bins)


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
    same result (and the resamples of :func:`stratified_bootstrap_indices`). ``n_bins``
    applies to binned metrics given by name or function. For several metrics use
    :func:`bootstrap_many`, which draws the resamples once for all of them; a metric of
    :data:`METRICS` (by name or function) is evaluated as there, with its default threads, and
    a caller's own function is called from the calling thread only.

    ``method="percentile"`` (default) reports the quantiles themselves; ``method="basic"``
    reflects them about the estimate, ``[2 t - q_hi, 2 t - q_lo]``, which corrects a shift of
    the resampling distribution. Binned ECE is biased upwards and resampling (duplicated
    samples) adds to that bias, so for a well-calibrated model the percentile interval can lie
    entirely above the estimate; report the method with the interval.
    """
    _check_method(method)
    p, y = check_probs_labels(probs, labels)
    r = _check_interval_args(confidence, n_resamples)
    n_bins = _check_n_bins(n_bins)
    if isinstance(metric, str):
        if metric not in _KERNELS:
            raise ValueError(f"metric: unknown name {metric!r}; available: {sorted(_KERNELS)}")
        name: str | None = metric
    else:
        name = next((k for k, f in METRICS.items() if f is metric), None)

    conf, correct = top_label(p, y)
    if name is not None:
        estimate = _run_kernel(_KERNELS[name], p, y, conf, correct, n_bins)
        fast = name in _MEAN_METRICS or name in _BINNED_METRICS
        per_resample = {} if fast else {name: _kernel_on_resample(name, p, y, conf, correct, n_bins)}
        values = _resampled_values(p, y, conf, correct, n_bins, r, seed, [name] if fast else [],
                                   per_resample, workers=_default_workers())[name]
        return _result(name, estimate, values, confidence, seed, method)
    fn: Callable[..., float] = metric  # type: ignore[assignment]
    label = getattr(metric, "__name__", "metric")
    values = _resampled_values(  # a caller's function: called from this thread only
        p, y, conf, correct, n_bins, r, seed, [],
        {label: lambda index: float(fn(p[index], y[index]))})[label]
    return _result(label, float(fn(p, y)), values, confidence, seed, method)


def bootstrap_many(
    metrics: Sequence[str],
    probs: ArrayLike,
    labels: ArrayLike,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    n_bins: int = 15,
    method: str = "percentile",
    chunk: int | None = None,
    workers: int | None = None,
) -> dict[str, BootstrapResult]:
    """Stratified bootstrap intervals of several metrics from one shared draw of the resamples.

    ``metrics`` are names of :data:`METRICS` (duplicates ignored); the result maps each, in the
    given order, to its :class:`BootstrapResult` -- exactly ``bootstrap(name, probs, labels,
    n_resamples, seed, confidence, n_bins, method)``: the same resamples (those of
    :func:`stratified_bootstrap_indices` with this ``seed`` and ``n_resamples``) and the same
    values, bit for bit, while the indices are drawn once for all metrics instead of once per
    metric. Accuracy, Brier, NLL, ECE and MCE are evaluated on several resamples at once from
    per-sample quantities gathered by the drawn indices (each sample's bin and residual, its
    mean terms) and ``bincount`` over (resample, bin) keys; the other metrics are computed
    resample by resample on the same indices.

    ``chunk``: resamples evaluated together (default ``max(1, 131072 // N)``, so that the
    buffers stay in cache; at most one drawn block, ``2_000_000 // N``); memory about
    ``48 N chunk`` bytes per thread. ``workers``: threads evaluating the resamples while the
    calling thread draws the next block (default: the usable CPUs, at most 4; ``1``: all in the
    calling thread). The results do not depend on ``chunk`` or ``workers``.
    """
    if isinstance(metrics, str):
        raise ValueError(f"metrics: expected a sequence of metric names, got the string {metrics!r}")
    names = list(dict.fromkeys(metrics))
    if not names:
        raise ValueError("metrics: expected at least one metric name, got none")
    unknown = [name for name in names if name not in _KERNELS]
    if unknown:
        raise ValueError(f"metrics: unknown name(s) {unknown}; available: {sorted(_KERNELS)}")
    for arg, value in (("chunk", chunk), ("workers", workers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                  or value < 1):
            raise ValueError(f"{arg}: expected a positive integer or None, got {value!r}")
    _check_method(method)
    p, y = check_probs_labels(probs, labels)
    r = _check_interval_args(confidence, n_resamples)
    n_bins = _check_n_bins(n_bins)
    conf, correct = top_label(p, y)
    fast = [name for name in names if name in _MEAN_METRICS or name in _BINNED_METRICS]
    slow = {name: _kernel_on_resample(name, p, y, conf, correct, n_bins)
            for name in names if name not in fast}
    values = _resampled_values(p, y, conf, correct, n_bins, r, seed, fast, slow, chunk,
                               _default_workers() if workers is None else int(workers))
    return {
        name: _result(name, _run_kernel(_KERNELS[name], p, y, conf, correct, n_bins),
                      values[name], confidence, seed, method)
        for name in names
    }
