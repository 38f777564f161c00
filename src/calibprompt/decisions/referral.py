"""Referral with a guarantee: accept a case when the model's top-label confidence reaches a
threshold, refer it to a clinician otherwise -- the threshold chosen on a labelled calibration
split so that the error rate among accepted cases (the *selective risk*) is at most ``max_error``
with probability at least ``confidence`` = 1 − δ over the draw of the calibration split.

Method: Learn then Test (Angelopoulos, Bates, Candès, Jordan & Lei, "Learn then Test: Calibrating
Predictive Algorithms to Achieve Risk Control", Annals of Applied Statistics, 2025; arXiv
2110.01052). Each threshold λ of a fixed, data-independent grid Λ (:data:`THRESHOLDS`) is a null
hypothesis ``H_λ: R(λ) > α`` with ``R(λ) = P(Ŷ ≠ Y | max_c p_c ≥ λ)`` and α = ``max_error``. With
``n_λ`` calibration cases accepted at λ and ``k_λ`` of them wrong, the exact binomial p-value

    p_λ = P(Binomial(n_λ, α) ≤ k_λ)

is valid given ``n_λ`` (the accepted cases are an i.i.d. sample of the accepted population);
``n_λ = 0`` gives p = 1. The family-wise error rate over Λ is controlled at δ with the
Bonferroni–Holm procedure, so every rejected ``H_λ`` has ``R(λ) ≤ α`` simultaneously with
probability ≥ 1 − δ; the chosen threshold is the smallest rejected λ (the largest coverage). No
rejected λ: every case is referred (threshold ``None``) -- never a guess. The p-values are
computed with ``scipy.stats.binom``; the Holm step is MAPIE's ``control_fwer``
(``mapie.risk_control``). (MAPIE's own binary p-value evaluates the binomial tail at
``ceil(n · (k/n))``, which floating point turns into k + 1 for some (k, n): conservative, but it
refuses thresholds that are certified.)

This bounds the selective risk with high probability. Conformal risk control would bound only
its expectation over calibration draws; it is not what is offered here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from calibprompt.metrics._validation import ArrayLike, check_probs, check_probs_labels

__all__ = ["THRESHOLDS", "Referral", "fit_referral", "min_accepted", "referral_outcome"]

#: The thresholds tested: 0 (accept every case) and sigmoid(t) for t = -2, -1.5, ..., 10 (0.12 to
#: 0.99995; even on the log-odds scale of the confidence, dense where confident models sit).
#: Fixed before seeing data, as Learn then Test requires; 26 hypotheses.
THRESHOLDS: tuple[float, ...] = (0.0, *(float(1 / (1 + math.exp(-t))) for t in np.arange(-2.0, 10.25, 0.5)))
#: The multiple-testing procedure over :data:`THRESHOLDS` (valid under any dependence).
FWER_METHOD = "bonferroni_holm"


def min_accepted(max_error: float, confidence: float, n_thresholds: int = len(THRESHOLDS)) -> int:
    """The fewest accepted calibration cases that can meet the target at all: with zero errors
    among n accepted cases the p-value is (1 − α)^n, and Holm's first step tests at δ / |Λ|, so
    ``n ≥ log(δ / |Λ|) / log(1 − α)``. With errors among them, more are needed."""
    _check_targets(max_error, confidence)
    return math.ceil(math.log((1 - confidence) / n_thresholds) / math.log1p(-max_error))


@dataclass(frozen=True)
class Referral:
    """A fitted referral rule: accept a case when its top-label confidence ≥ ``threshold``
    (``None``: no threshold met the target, every case is referred). ``tests`` holds, per
    threshold of :data:`THRESHOLDS`, the calibration cases accepted and wrong, the p-value and
    whether the hypothesis was rejected (the threshold certified)."""

    threshold: float | None
    max_error: float
    confidence: float
    n_calibration: int
    calibration_accepted: int
    calibration_errors: int
    min_accepted: int
    tests: tuple[dict[str, Any], ...]
    n_classes: int = 0  # the rule applies to probabilities over this many classes (0: not recorded)
    method: str = "learn-then-test"

    @property
    def reachable(self) -> bool:
        return self.threshold is not None

    def accept(self, probs: ArrayLike) -> np.ndarray:
        """Boolean (N,): the cases accepted (not referred); ``probs`` are validated (N, C)."""
        p = check_probs(probs, n_classes=self.n_classes or None)
        if self.threshold is None:
            return np.zeros(p.shape[0], dtype=bool)
        return p.max(axis=1) >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tests"] = list(self.tests)
        out.update(reachable=self.reachable, delta=1 - self.confidence, fwer=FWER_METHOD,
                   p_value="exact binomial tail P(Binomial(n_accepted, max_error) <= errors)",
                   reference="Angelopoulos et al., Learn then Test, arXiv 2110.01052")
        return out


def _check_targets(max_error: float, confidence: float) -> None:
    for name, value in (("max_error", max_error), ("confidence", confidence)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
            raise ValueError(f"{name}: expected a number, got {value!r}")
    if not 0 < max_error < 1:
        raise ValueError(f"max_error: expected a fraction in (0, 1), got {max_error!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a probability in (0, 1), got {confidence!r}")


def fit_referral(probs: ArrayLike, labels: ArrayLike, max_error: float = 0.05, confidence: float = 0.9) -> Referral:
    """Choose the referral threshold on calibration ``probs`` (N, C) and ``labels`` (N,) by Learn
    then Test (see the module docstring): the lowest threshold of :data:`THRESHOLDS` whose
    selective risk is certified ≤ ``max_error`` at family-wise level 1 − ``confidence``."""
    from mapie.risk_control import control_fwer
    from scipy.stats import binom

    _check_targets(max_error, confidence)
    p, y = check_probs_labels(probs, labels)
    conf = p.max(axis=1)
    wrong = p.argmax(axis=1) != y
    grid = np.asarray(THRESHOLDS)
    accepted = np.array([(conf >= t).sum() for t in grid])
    errors = np.array([(wrong & (conf >= t)).sum() for t in grid])
    p_values = np.where(accepted > 0, binom.cdf(errors, accepted, max_error), 1.0)
    rejected = set(int(i) for i in control_fwer(p_values, 1 - confidence, fwer_method=FWER_METHOD))
    tests = tuple({"threshold": float(t), "accepted": int(a), "errors": int(e), "p_value": float(pv),
                   "certified": i in rejected}
                  for i, (t, a, e, pv) in enumerate(zip(grid, accepted, errors, p_values, strict=True)))
    chosen = min(rejected) if rejected else None
    threshold = None if chosen is None else float(grid[chosen])
    kept = conf >= threshold if threshold is not None else np.zeros(len(y), dtype=bool)
    return Referral(threshold, float(max_error), float(confidence), len(y), int(kept.sum()),
                    int((wrong & kept).sum()), min_accepted(max_error, confidence), tests, p.shape[1])


def referral_outcome(referral: Referral, probs: ArrayLike, labels: ArrayLike) -> dict[str, Any]:
    """What the rule does on labelled cases (e.g. the test split): ``coverage`` (fraction
    accepted), ``selective_error`` (error rate among accepted; None when none is), the numbers
    ``accepted``, ``referred`` and ``errors`` among accepted, and the accuracy of all cases."""
    p, y = check_probs_labels(probs, labels)
    if referral.n_classes and p.shape[1] != referral.n_classes:
        raise ValueError(f"probs: the rule was fitted on {referral.n_classes} classes, got {p.shape[1]}")
    kept = referral.accept(p)
    wrong = p.argmax(axis=1) != y
    n_kept = int(kept.sum())
    return {"n": len(y), "accepted": n_kept, "referred": int(len(y) - n_kept),
            "coverage": n_kept / len(y), "errors": int((wrong & kept).sum()),
            "selective_error": float((wrong & kept).sum() / n_kept) if n_kept else None,
            "accuracy_all": float(1 - wrong.mean())}
