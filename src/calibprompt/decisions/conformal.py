"""Conformal prediction sets: split conformal classification (Vovk et al. 2005; Angelopoulos &
Bates, "A Gentle Introduction to Conformal Prediction", 2021) on precomputed probabilities.

A score ``s(x, y)`` says how unusual label y is for x. On n calibration cases with true-label
scores s_1..s_n, the threshold is the k-th smallest score with ``k = ⌈(n + 1)(1 − α)⌉`` (+∞ when
k > n), and the set of a new case is ``C(x) = {y : s(x, y) ≤ q̂}``. For exchangeable data
``P(Y ∈ C(X)) ≥ 1 − α`` (marginal coverage). Scores:

* ``lac`` (least ambiguous set-valued classifier, Sadinle, Lei & Wasserman 2019):
  ``s(x, y) = 1 − p_y(x)`` -- the smallest sets on average.
* ``aps`` (adaptive prediction sets, Romano, Sesia & Candès 2020), non-randomised:
  ``s(x, y) = Σ_{j ranked at or above y} p_j(x)`` (classes in decreasing probability, ties by
  class index; rows renormalised and the last cumulative sum set to exactly 1, so that no label's
  fate depends on the rounding of a row sum) -- sets grow where the model is unsure. The top label
  is always in the set (a confident case whose top probability exceeds q̂ would otherwise get an
  empty set); this only adds labels, so the coverage guarantee holds.
* ``raps`` (regularised APS, Angelopoulos, Bates, Malik & Jordan 2021):
  ``s(x, y) = APS(x, y) + λ · max(0, rank(y) − k_reg)`` -- APS with a penalty on unlikely labels
  (λ and k_reg fixed options here, not tuned on a split of the calibration data); the top label
  is always in the set, as for APS.

Class-conditional (Mondrian) coverage: the threshold of class c comes from the calibration cases
of class c only (k_c = ⌈(n_c + 1)(1 − α)⌉ among n_c), so ``P(Y ∈ C(X) | Y = c) ≥ 1 − α`` for every
class -- rare classes are not sacrificed to the average. A class with ``n_c < (1 − α) / α``
calibration cases gets q̂_c = +∞: it is in every set, and the rule says how many it needs.

The sets are deterministic (no randomisation): coverage is at least 1 − α and, for scores without
ties, at most 1 − α + 1/(n + 1).

Why not a library's conformal classifier: MAPIE (1.x) takes precomputed probabilities through a
pass-through estimator, but refuses APS and RAPS for two-class tasks (most of the medical tasks
here), has no class-conditional classification, always randomises its APS calibration scores, and
its fitted objects can only be stored by pickling. TorchCP needs torch_geometric and a compiled
torchsort; crepes has Mondrian sets but only hinge and margin scores. The split-conformal rule is
the few lines above; the tests check it against MAPIE where both are defined (LAC: the same
sets) and against an independent loop.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from calibprompt.metrics._validation import (
    ArrayLike,
    check_labels,
    check_probs,
    check_probs_labels,
    to_numpy,
)

__all__ = ["SCORES", "ConformalSets", "conformal_scores", "fit_conformal", "min_per_class", "set_outcome"]

SCORES = ("lac", "aps", "raps")
#: RAPS penalty defaults (Angelopoulos et al. 2021 use λ = 0.01 among their choices; k_reg = 1
#: penalises every label below the top one -- a reasonable start for 2 to 10 classes).
RAPS_LAMBDA = 0.01
RAPS_K = 1


def min_per_class(coverage: float) -> int:
    """The fewest calibration cases for which the threshold is finite: ``⌈(n + 1)(1 − α)⌉ ≤ n``
    ⟺ ``n ≥ (1 − α) / α`` (coverage 0.9: 9 cases; 0.95: 19)."""
    alpha = 1 - coverage
    return math.ceil((1 - alpha) / alpha - 1e-12)


def conformal_scores(probs: np.ndarray, score: str, raps_lambda: float = RAPS_LAMBDA,
                     raps_k: int = RAPS_K) -> np.ndarray:
    """``s(x, y)`` for every case and label, (N, C) (see the module docstring)."""
    p = np.asarray(probs, dtype=np.float64)
    if score == "lac":
        return 1.0 - p
    if score not in SCORES:
        raise ValueError(f"score: expected one of {', '.join(SCORES)}, got {score!r}")
    p = p / p.sum(axis=1, keepdims=True)
    order = np.argsort(-p, axis=1, kind="stable")  # decreasing probability, ties by class index
    cumulative = np.minimum(np.cumsum(np.take_along_axis(p, order, axis=1), axis=1), 1.0)
    cumulative[:, -1] = 1.0  # the whole mass, exactly
    out = np.empty_like(p)
    np.put_along_axis(out, order, cumulative, axis=1)
    if score == "raps":
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(1, p.shape[1] + 1)[None].repeat(p.shape[0], 0), axis=1)
        out = out + raps_lambda * np.maximum(0, rank - raps_k)
    return out


def _threshold(scores: np.ndarray, coverage: float) -> float:
    n = len(scores)
    k = math.ceil((n + 1) * coverage - 1e-12)
    return float(np.sort(scores)[k - 1]) if k <= n else math.inf


@dataclass(frozen=True)
class ConformalSets:
    """A fitted split-conformal rule. ``thresholds``: one per class (Mondrian) or one for all;
    +∞ where the calibration cases were too few (the class, or every class, is always in the set).
    ``warnings`` say which classes had too few calibration cases and how many are needed."""

    score: str
    coverage: float
    mondrian: bool
    thresholds: tuple[float, ...]
    n_calibration: int
    class_counts: tuple[int, ...]
    min_per_class: int
    raps_lambda: float = RAPS_LAMBDA
    raps_k: int = RAPS_K
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def predict(self, probs: ArrayLike) -> np.ndarray:
        """Boolean (N, C): label c is in the set of case i (``probs`` validated, (N, C))."""
        p = check_probs(probs, n_classes=len(self.class_counts))
        q = np.asarray(self.thresholds, dtype=np.float64)
        sets = conformal_scores(p, self.score, self.raps_lambda, self.raps_k) <= (q[None, :] if self.mondrian else q[0])
        if self.score != "lac":  # APS / RAPS: the top label is always in the set
            sets[np.arange(len(p)), p.argmax(axis=1)] = True
        return sets

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["thresholds"] = [t if math.isfinite(t) else None for t in self.thresholds]  # JSON: null = +inf
        out.update(guarantee=("class-conditional" if self.mondrian else "marginal") + f" coverage >= {self.coverage:g}",
                   thresholds_note="null = +infinity: the label is in every set")
        return out

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> ConformalSets:
        fields = {k: record[k] for k in ("score", "coverage", "mondrian", "n_calibration", "min_per_class",
                                         "raps_lambda", "raps_k")}
        return cls(**fields, thresholds=tuple(math.inf if t is None else float(t) for t in record["thresholds"]),
                   class_counts=tuple(record["class_counts"]), warnings=tuple(record.get("warnings", ())))


def fit_conformal(probs: ArrayLike, labels: ArrayLike, coverage: float = 0.9, score: str = "aps",
                  mondrian: bool = False, classnames: list[str] | None = None, raps_lambda: float = RAPS_LAMBDA,
                  raps_k: int = RAPS_K) -> ConformalSets:
    """Fit split-conformal sets with ``coverage`` = 1 − α on calibration ``probs`` (N, C) and
    ``labels`` (N,); marginal, or class-conditional with ``mondrian``."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage: expected a probability in (0, 1), got {coverage!r}")
    if score not in SCORES:
        raise ValueError(f"score: expected one of {', '.join(SCORES)}, got {score!r}")
    if isinstance(raps_lambda, bool) or not isinstance(raps_lambda, (int, float)) or not (
            math.isfinite(raps_lambda) and raps_lambda >= 0):
        raise ValueError(f"raps_lambda: expected a finite number >= 0, got {raps_lambda!r}")
    if isinstance(raps_k, bool) or not isinstance(raps_k, (int, np.integer)) or raps_k < 0:
        raise ValueError(f"raps_k: expected an integer >= 0, got {raps_k!r}")
    p, y = check_probs_labels(probs, labels)
    c = p.shape[1]
    if classnames is not None and len(classnames) != c:
        raise ValueError(f"classnames: expected {c} names (one per class), got {len(classnames)}")
    names = classnames or [f"class {i}" for i in range(c)]
    true_scores = conformal_scores(p, score, raps_lambda, raps_k)[np.arange(len(y)), y]
    counts = np.bincount(y, minlength=c)
    need = min_per_class(coverage)
    if mondrian:
        thresholds = tuple(_threshold(true_scores[y == k], coverage) for k in range(c))
        warnings = tuple(f"class {names[k]!r} has {counts[k]} calibration case(s); coverage {coverage:g} per class "
                         f"needs at least {need}: it is in every set" for k in range(c) if counts[k] < need)
    else:
        thresholds = (_threshold(true_scores, coverage),)
        warnings = (() if len(y) >= need else
                    (f"{len(y)} calibration case(s); coverage {coverage:g} needs at least {need}: every set holds "
                     "every class",))
    return ConformalSets(score, float(coverage), bool(mondrian), thresholds, len(y), tuple(int(n) for n in counts),
                         need, float(raps_lambda), int(raps_k), warnings)


def set_outcome(sets: np.ndarray, labels: ArrayLike, classnames: list[str] | None = None) -> dict[str, Any]:
    """What prediction sets (N, C) do on labelled cases: empirical ``coverage``, ``mean_size``,
    the fraction of ``empty`` and ``singleton`` sets, coverage per set size (``by_size``: size ->
    cases, coverage) and per class (``by_class``: name -> cases, coverage, mean size)."""
    s = np.asarray(sets, dtype=bool)
    if s.ndim != 2 or s.shape[0] == 0:
        raise ValueError(f"sets: expected a non-empty boolean array (N, C), got shape {s.shape}")
    y = check_labels(to_numpy(labels), s.shape[1])
    if y.shape != (s.shape[0],):
        raise ValueError(f"labels: expected shape ({s.shape[0]},) to match sets, got {y.shape}")
    covered = s[np.arange(len(y)), y]
    size = s.sum(axis=1)
    names = classnames or [f"class {i}" for i in range(s.shape[1])]
    return {"n": len(y), "coverage": float(covered.mean()), "mean_size": float(size.mean()),
            "empty": float((size == 0).mean()), "singleton": float((size == 1).mean()),
            "by_size": {str(k): {"cases": int((size == k).sum()), "coverage": float(covered[size == k].mean())}
                        for k in range(s.shape[1] + 1) if (size == k).any()},
            "by_class": {names[k]: {"cases": int((y == k).sum()), "coverage": float(covered[y == k].mean()),
                                    "mean_size": float(size[y == k].mean())}
                         for k in range(s.shape[1]) if (y == k).any()}}
