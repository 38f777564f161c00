"""Decisions fitted on a finished run's calibration split and measured on its test split:
``referral.json`` (a referral threshold with a Learn-then-Test guarantee) and ``conformal.json``
(split-conformal prediction sets), each beside the run's own files, which they never change.

The decision rules are fitted on the run's **calibration** predictions (``calib_*`` in
``predictions.npz``): disjoint from the few-shot images that trained the run and from the tuning
split that chose its hyperparameters, so the guarantees hold. Runs made before the calibration
split existed have none and are refused. Probabilities are the model's ``softmax(z)`` by default;
``probabilities="temperature"`` uses the run's temperature-scaled ``softmax(z / T)`` -- T was
fitted on the same calibration images, so the guarantee then holds only approximately (one
parameter fitted on the data); the record says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from calibprompt import __version__
from calibprompt.decisions import fit_conformal, fit_referral, referral_outcome, set_outcome
from calibprompt.files import write_json
from calibprompt.plots import plot_risk_coverage
from calibprompt.runs.apply import Run

__all__ = [
    "CONFORMAL_FILE",
    "PROBABILITIES",
    "REFERRAL_FILE",
    "decision_probabilities",
    "run_conformal",
    "run_referral",
]

REFERRAL_FILE = "referral.json"
CONFORMAL_FILE = "conformal.json"
#: Which probabilities a decision is fitted on.
PROBABILITIES = ("model", "temperature")
_TEMPERATURE_NOTE = ("probabilities scaled by the run's temperature, which was fitted on the same calibration "
                     "images: the guarantee holds only approximately (one parameter fitted on the data)")


def decision_probabilities(run: Run, probabilities: str = "model") -> dict[str, np.ndarray]:
    """Calibration and test probabilities and labels of a finished run (``calib_probs``,
    ``calib_labels``, ``test_probs``, ``test_labels``); errors name the run and the way out."""
    if probabilities not in PROBABILITIES:
        raise ValueError(f"probabilities: expected one of {', '.join(PROBABILITIES)}, got {probabilities!r}")
    preds = run.predictions()
    if "calib_logits" not in preds:
        how = ("rerun it with --calib-per-class N (a test-time run adapts a calibration split only when asked)"
               if run.kind == "tpt" else "rerun it with this version of calibprompt, which draws a calibration split")
        raise ValueError(f"{run.directory}: the run has no calibration-split predictions to fit a decision rule on; "
                         f"{how}")
    scale = 1.0
    if probabilities == "temperature":
        if run.temperature is None:
            raise ValueError(f"{run.directory}: --probabilities temperature, but the run has no fitted temperature")
        scale = run.temperature
    return {"calib_probs": softmax(preds["calib_logits"] / scale, axis=1), "calib_labels": preds["calib_labels"],
            "test_probs": softmax(preds["test_logits"] / scale, axis=1), "test_labels": preds["test_labels"]}


def _record(run: Run, arrays: dict[str, np.ndarray], probabilities: str) -> dict[str, Any]:
    return {"run_id": run.record["run_id"], "method": run.method, "split": "calibration",
            "sizes": {"calibration": len(arrays["calib_labels"]), "test": len(arrays["test_labels"])},
            "probabilities": probabilities, **({"note": _TEMPERATURE_NOTE} if probabilities == "temperature" else {}),
            "calibprompt": __version__}


def run_referral(run: Run, max_error: float = 0.05, confidence: float = 0.9,
                 probabilities: str = "model") -> dict[str, Any]:
    """Fit a referral threshold on the run's calibration split (:func:`calibprompt.decisions.fit_referral`),
    measure it on the test split, and write ``referral.json`` and ``referral_risk_coverage.png``
    (the test risk–coverage curve, the target and the operating point) into the run directory.
    Returns the record written."""
    arrays = decision_probabilities(run, probabilities)
    referral = fit_referral(arrays["calib_probs"], arrays["calib_labels"], max_error, confidence)
    test = referral_outcome(referral, arrays["test_probs"], arrays["test_labels"])
    record = {**_record(run, arrays, probabilities), "max_error": referral.max_error,
              "confidence": referral.confidence,
              "guarantee": f"P(error rate among accepted cases <= {referral.max_error:g}) >= {referral.confidence:g} "
                           "over the draw of the calibration split (Learn then Test)",
              "threshold": referral.threshold, "reachable": referral.reachable,
              "min_accepted": referral.min_accepted, "fitted": referral.to_dict(), "test": test}
    if not referral.reachable:
        record["message"] = (f"no threshold met the target on {referral.n_calibration} calibration images: every case "
                             f"is referred. Reaching an error rate of {referral.max_error:g} at confidence "
                             f"{referral.confidence:g} needs at least {referral.min_accepted} accepted calibration "
                             "images (with no errors among them; more with errors)")
    point = None if test["selective_error"] is None else (test["coverage"], test["selective_error"])
    plot_risk_coverage({f"{run.method} (test)": (arrays["test_probs"], arrays["test_labels"])},
                       Path(run.directory) / "referral_risk_coverage.png", target=referral.max_error,
                       points={"operating point (test)": point} if point else None,
                       title=f"referral: error <= {referral.max_error:g} with confidence {referral.confidence:g}, "
                             f"threshold {'none' if referral.threshold is None else f'{referral.threshold:.4f}'}")
    write_json(Path(run.directory) / REFERRAL_FILE, record)
    return record


def run_conformal(run: Run, coverage: float = 0.9, score: str = "aps", mondrian: bool = False,
                  probabilities: str = "model", raps_lambda: float | None = None,
                  raps_k: int | None = None) -> dict[str, Any]:
    """Fit split-conformal sets on the run's calibration split (:func:`calibprompt.decisions.fit_conformal`),
    measure them on the test split (coverage, mean size, by size and by class) and write
    ``conformal.json``. Returns the record written."""
    arrays = decision_probabilities(run, probabilities)
    extra = {k: v for k, v in (("raps_lambda", raps_lambda), ("raps_k", raps_k)) if v is not None}
    if extra and score != "raps":
        raise ValueError("raps_lambda/raps_k apply to --score raps only")
    sets = fit_conformal(arrays["calib_probs"], arrays["calib_labels"], coverage, score, mondrian,
                         classnames=run.classnames, **extra)
    test = set_outcome(sets.predict(arrays["test_probs"]), arrays["test_labels"], run.classnames)
    record = {**_record(run, arrays, probabilities), "coverage": sets.coverage, "score": sets.score,
              "mondrian": sets.mondrian,
              "guarantee": ("class-conditional" if sets.mondrian else "marginal") +
                           f" coverage P(Y in set) >= {sets.coverage:g} (split conformal)",
              "fitted": sets.to_dict(), "warnings": list(sets.warnings), "test": test}
    write_json(Path(run.directory) / CONFORMAL_FILE, record)
    return record
