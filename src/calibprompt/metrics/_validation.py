"""Input validation and the constants shared by every metric family.

Converts ``probs`` (N, K) and ``labels`` (N,) from NumPy arrays, nested sequences or torch
tensors to validated float64 / int64 arrays (a bad input raises ``ValueError`` naming what was
wrong and what was expected), reduces them to top-label (confidence, correctness), and holds the
constants every family shares: ``METRICS_VERSION``, ``BINNING_CONVENTION``, the row-sum
tolerances and ``LOG_EPS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "BINNING_CONVENTION",
    "LOG_EPS",
    "LOW_PRECISION_ROW_SUM_TOLERANCE",
    "METRICS_VERSION",
    "ROW_SUM_TOLERANCE",
    "ArrayLike",
    "check_labels",
    "check_probs_labels",
    "to_numpy",
    "top_label",
]

ArrayLike = np.ndarray | Sequence | Any  # torch.Tensor accepted without importing torch

#: Version of the metrics' semantics: bumped whenever a metric's definition changes, so that a
#: stored result is never compared with one computed under another definition (part of a run's
#: identity, see :mod:`calibprompt.runs.identity`). 2: equal-mass bins keep tied scores together
#: (ACE, top-label equal-mass ECE); KDE-ECE is Popordanoska et al.'s estimator as their code computes it.
METRICS_VERSION = 2

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


def to_numpy(x: ArrayLike, dtype: Any | None = None) -> np.ndarray:
    """A NumPy array from an array, a sequence or a torch tensor (detached, on the CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def check_probs(probs: ArrayLike, *, name: str = "probs", allow_float32: bool = False,
                n_classes: int | None = None) -> np.ndarray:
    """Validate and convert probabilities ``probs`` (N, K) to a float64 array (float32 kept with
    ``allow_float32``, see :func:`check_probs_labels`); ``n_classes`` also requires K to equal it.

    Raises ``ValueError`` for: empty input, wrong shapes, fewer than two classes, NaN/inf,
    values outside [0, 1] or rows that do not sum to 1 (likely logits)."""
    low_precision = str(getattr(probs, "dtype", "")) in _LOW_PRECISION
    try:
        p = to_numpy(probs)
        if not (allow_float32 and p.dtype == np.float32 and not low_precision):
            p = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: could not convert to a float array ({exc})") from exc
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
    if n_classes is not None and k != n_classes:
        raise ValueError(f"{name}: expected {n_classes} classes (columns), got {k}")
    lo, hi = p.min(), p.max()  # NaN propagates and an infinity is an extreme: finite iff both are
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = int(np.size(p) - np.count_nonzero(np.isfinite(p)))
        raise ValueError(f"{name}: contains {bad} NaN or infinite value(s)")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name}: values must lie in [0, 1], found range [{lo:.4g}, {hi:.4g}]; "
            "this looks like logits — apply softmax first"
        )
    row_sums = _row_sums(p)
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
    return p


def check_probs_labels(
    probs: ArrayLike, labels: ArrayLike, *, name: str = "probs", allow_float32: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``probs`` (N, K) and ``labels`` (N,) to float64 / int64 arrays.

    Raises ``ValueError`` for: empty input, wrong shapes, fewer than two classes, NaN/inf,
    values outside [0, 1] or rows that do not sum to 1 (likely logits), and labels that are not
    integers in [0, K).

    ``allow_float32=True`` returns float32 probabilities as they are, without a float64 copy of
    the matrix, for kernels that do their arithmetic in float64 on what they extract (every
    float32 value is exact in float64, so their results equal those on the float64 copy); the
    checks are the same (row sums are computed in float64).
    """
    try:
        y_raw = to_numpy(labels)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"labels: could not convert to an array ({exc})") from exc
    p = check_probs(probs, name=name, allow_float32=allow_float32)
    if y_raw.ndim != 1 or y_raw.shape[0] != p.shape[0]:
        raise ValueError(f"labels: expected shape ({p.shape[0]},) to match {name}, got {y_raw.shape}")
    return p, check_labels(y_raw, p.shape[1])


def _row_sums(p: np.ndarray) -> np.ndarray:
    """Row sums in float64 without a float64 copy of a float32 matrix. ``einsum`` runs in this
    thread: much faster than ``sum(axis=1)`` over short rows, and unlike BLAS ``p @ 1`` it wakes
    no thread pool (which on a busy 2-core machine turned a 0.3 ms check into ~8 ms medians)."""
    return np.einsum("ij->i", p, dtype=np.float64)


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


#: The largest bin count accepted (beyond it a histogram only costs memory: 1e8 bins took ~10 GB).
MAX_BINS = 100_000


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or not 1 <= n_bins <= MAX_BINS:
        raise ValueError(f"n_bins: expected an integer from 1 to {MAX_BINS:,}, got {n_bins!r}")
    return int(n_bins)


#: Up to this many classes :func:`top_label` runs over the columns; beyond, over the rows.
_COLUMN_PASS_MAX_CLASSES = 64


def top_label(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence ``max_k p_ik`` and correctness ``1[argmax_k p_ik = y_i]`` (float64)
    of validated arrays (ties in argmax resolve to the lowest index).

    For K <= 64 classes this runs over the K columns (NumPy's reductions over short rows cost
    about 25 ns a row): with the running maxima ``m_0 = -1`` (below every probability) and
    ``m_{j+1} = max(m_j, p_ij)``, the confidence is ``m_K``, and ``argmax_k p_ik = y_i`` exactly
    when ``p_{i,y_i} = m_K`` and no earlier column reaches it, ``m_{y_i} < m_K`` -- the lowest
    index rule, by comparisons only, so exact.
    """
    n, k = p.shape
    if k > _COLUMN_PASS_MAX_CLASSES:
        pred = p.argmax(axis=1)
        conf = np.take_along_axis(p, pred[:, None], axis=1)[:, 0]
        return conf.astype(np.float64, copy=False), (pred == y).astype(np.float64)
    running = np.empty((k + 1, n), dtype=p.dtype)
    running[0] = -1.0
    running[1] = p[:, 0]
    for j in range(1, k):
        np.maximum(running[j], p[:, j], out=running[j + 1])
    conf = running[k]
    rows = np.arange(n)
    own = p.reshape(-1)[rows * k + y] if p.flags.c_contiguous else p[rows, y]
    before = running.reshape(-1)[y * n + rows]  # m_{y_i}: the maximum of the columns before y_i
    correct = (own == conf) & (before < conf)
    return conf.astype(np.float64), correct.astype(np.float64)
