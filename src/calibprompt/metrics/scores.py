"""Proper scores and classification metrics of (probs, labels): Brier score, negative log
likelihood, accuracy, macro-F1 and macro one-vs-rest AUROC.

Each public function validates its input and calls a private kernel on the validated arrays;
:func:`calibprompt.metrics.evaluate` and :func:`calibprompt.metrics.bootstrap` call the kernels
directly.
"""

from __future__ import annotations

import numpy as np

from calibprompt.metrics._validation import LOG_EPS, ArrayLike, check_probs_labels

__all__ = ["accuracy", "auroc", "brier", "macro_f1", "nll"]


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
    # Local import: scipy.stats takes ~0.5 s to import (6x this whole package) and only AUROC
    # needs it, so `import calibprompt.metrics` (calibrators, plots, the CLI) does not pay it.
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
