"""Selective prediction by top-label confidence: the risk–coverage curve and the area under it
(AURC)."""

from __future__ import annotations

import numpy as np

from calibprompt.metrics._validation import ArrayLike, check_probs_labels, top_label

__all__ = ["aurc", "risk_coverage"]


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
