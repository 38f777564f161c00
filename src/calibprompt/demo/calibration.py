"""A calibration demo on simulated classifier outputs with a known miscalibration.

Latent logits ``u`` define a perfectly calibrated predictor: labels are drawn from
``softmax(u)``. The "model" reports ``z = T_true * u`` -- overconfident by a factor
``T_true``, as a CLIP-style logit scale that is too large would be. Post-hoc calibrators are
fitted on a small labelled set (50 samples, the size Tu et al. 2024 find sufficient) and
evaluated on a large test set; temperature scaling should recover ``T ≈ T_true``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from calibprompt.calibrators import CALIBRATORS, TemperatureScaling
from calibprompt.files import write_json
from calibprompt.metrics import bootstrap, evaluate
from calibprompt.plots import plot_reliability, plot_risk_coverage

__all__ = ["DemoResult", "run_calibration_demo", "simulate"]


def simulate(
    n: int, n_classes: int = 9, true_temperature: float = 3.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, labels)``: labels ~ softmax(u), logits = true_temperature * u."""
    rng = np.random.default_rng(seed)
    u = rng.normal(0.0, 1.2, size=(n, n_classes))
    u[np.arange(n), rng.integers(0, n_classes, n)] += 2.0  # a dominant class per sample
    p = softmax(u, axis=1)
    cumulative = p.cumsum(axis=1)
    labels = (rng.random(n)[:, None] > cumulative).sum(axis=1).clip(max=n_classes - 1)
    return true_temperature * u, labels


@dataclass
class DemoResult:
    rows: dict[str, dict[str, Any]]
    temperature: float
    out_dir: Path


def run_calibration_demo(
    out_dir: str | os.PathLike[str], seed: int = 0, n_fit: int = 50, n_test: int = 5000,
    n_bins: int = 15, true_temperature: float = 3.0, n_resamples: int = 1000,
) -> DemoResult:
    """Fit every calibrator on ``n_fit`` samples, evaluate on ``n_test``; write
    ``results.json``, a reliability diagram per method and a risk–coverage plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    z_fit, y_fit = simulate(n_fit, true_temperature=true_temperature, seed=seed)
    z_test, y_test = simulate(n_test, true_temperature=true_temperature, seed=seed + 1)

    probs = {"uncalibrated": softmax(z_test, axis=1)}
    fitted = {}
    for name, cls in CALIBRATORS.items():
        calibrator = cls().fit(z_fit, y_fit)
        fitted[name] = calibrator.to_dict()
        probs[name] = calibrator.transform(z_test)
    probs["oracle (T = T_true)"] = softmax(z_test / true_temperature, axis=1)

    rows: dict[str, dict[str, Any]] = {}
    for name, p in probs.items():
        row = evaluate(p, y_test, n_bins=n_bins)
        ci = bootstrap("ece", p, y_test, n_resamples=n_resamples, seed=seed, n_bins=n_bins)
        row["ece_ci"] = [ci.low, ci.high]
        rows[name] = row
        slug = name.split(" ")[0]
        plot_reliability(p, y_test, n_bins=n_bins, path=out / f"reliability_{slug}.png",
                         title=f"simulated test set — {name}")
    plot_risk_coverage({k: (v, y_test) for k, v in probs.items() if k != "oracle (T = T_true)"},
                       path=out / "risk_coverage.png", title="simulated test set")
    temperature = TemperatureScaling().fit(z_fit, y_fit).temperature
    write_json(out / "results.json", {
        "config": {"seed": seed, "n_fit": n_fit, "n_test": n_test, "n_bins": n_bins,
                   "true_temperature": true_temperature, "n_resamples": n_resamples},
        "calibrators": fitted,
        "metrics": rows,
    })
    return DemoResult(rows=rows, temperature=float(temperature), out_dir=out)
