"""Reliability diagrams and risk–coverage curves as PNG files (matplotlib, Agg backend).

Both plots take probabilities and labels and use the binning of :mod:`calibprompt.metrics`,
so a diagram always shows the numbers the metrics report.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibprompt.files import atomic_path
from calibprompt.metrics import (
    ArrayLike,
    bin_index,
    check_probs_labels,
    reliability_bins,
    risk_coverage,
    stratified_bootstrap_indices,
    top_label,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_certified_accuracy", "plot_reliability", "plot_risk_coverage", "save_figure"]


def _pyplot():
    # imported here, not at the top: choosing the non-interactive backend belongs to the moment a
    # figure is saved, not to `import calibprompt.plots` (which must not change a user's backend)
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 150) -> Path:
    """Save ``fig`` as PNG atomically and close it."""
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def _bin_accuracy_intervals(
    conf: np.ndarray, correct: np.ndarray, labels: np.ndarray, n_bins: int,
    n_resamples: int, seed: int, confidence: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of each bin's accuracy under the stratified bootstrap."""
    bins = bin_index(conf, n_bins)
    idx = stratified_bootstrap_indices(labels, n_resamples, seed)
    keys = (bins[idx] + n_bins * np.arange(n_resamples)[:, None]).ravel()
    counts = np.bincount(keys, minlength=n_resamples * n_bins).reshape(n_resamples, n_bins)
    hits = np.bincount(keys, weights=correct[idx].ravel(),
                       minlength=n_resamples * n_bins).reshape(n_resamples, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(counts > 0, hits / counts, np.nan)
    alpha = (1.0 - confidence) / 2.0
    with warnings.catch_warnings():  # bins empty in every resample stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanquantile(acc, [alpha, 1.0 - alpha], axis=0)
    return low, high


def plot_reliability(
    probs: ArrayLike,
    labels: ArrayLike,
    n_bins: int = 15,
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
) -> Figure:
    """Reliability diagram of top-label confidence.

    Top panel: per-bin accuracy bars, the gap to the diagonal (red), the per-bin sample count
    above each bar and, with ``bootstrap > 0``, percentile whiskers of each bin's accuracy from
    that many stratified resamples. Bottom panel: the confidence histogram with mean accuracy
    and mean confidence marked. The title carries ECE (%), MCE (%), N and the bin count.
    Saved as PNG when ``path`` is given (atomically).
    """
    plt = _pyplot()
    p, y = check_probs_labels(probs, labels)
    conf, correct = top_label(p, y)
    bins = reliability_bins(p, y, n_bins)
    centres = (bins.lower + bins.upper) / 2.0
    width = 1.0 / bins.n_bins
    nonempty = bins.counts > 0

    fig, (ax, ax_hist) = plt.subplots(
        2, 1, figsize=(5.0, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08}
    )
    acc = np.where(nonempty, bins.accuracy, 0.0)
    mean_conf = np.where(nonempty, bins.confidence, centres)
    ax.bar(centres, acc, width=width, edgecolor="#1f3b73", color="#4c72b0", label="accuracy")
    ax.bar(centres[nonempty], (mean_conf - acc)[nonempty], bottom=acc[nonempty], width=width,
           color="#d62728", alpha=0.35, edgecolor="#d62728", hatch="//", label="gap to confidence")
    if bootstrap > 0:
        low, high = _bin_accuracy_intervals(conf, correct, y, bins.n_bins, int(bootstrap), seed, confidence)
        ax.errorbar(centres[nonempty], acc[nonempty],
                    yerr=[np.maximum(acc - low, 0)[nonempty], np.maximum(high - acc, 0)[nonempty]],
                    fmt="none", ecolor="black", elinewidth=1, capsize=2,
                    label=f"{int(confidence * 100)}% bootstrap CI")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect calibration")
    for x, top, count in zip(centres[nonempty], np.maximum(acc, mean_conf)[nonempty],
                             bins.counts[nonempty], strict=True):
        ax.text(x, min(top + 0.015, 1.02), str(int(count)), ha="center", va="bottom", fontsize=6)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=7, frameon=False)
    heading = f"ECE {100 * bins.ece:.2f}%  MCE {100 * bins.mce:.2f}%  N={bins.n_samples}  bins={bins.n_bins}"
    ax.set_title(f"{title}\n{heading}" if title else heading, fontsize=9)

    ax_hist.bar(centres, bins.counts / bins.n_samples, width=width, color="#8c8c8c", edgecolor="#4d4d4d")
    ax_hist.axvline(float(correct.mean()), color="#1f3b73", linestyle="-", linewidth=1.2,
                    label=f"accuracy {100 * correct.mean():.1f}%")
    ax_hist.axvline(float(conf.mean()), color="#d62728", linestyle="--", linewidth=1.2,
                    label=f"mean confidence {100 * conf.mean():.1f}%")
    ax_hist.set_xlabel("confidence")
    ax_hist.set_ylabel("fraction")
    ax_hist.legend(loc="upper left", fontsize=7, frameon=False)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_risk_coverage(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]],
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
    target: float | None = None,
    points: Mapping[str, tuple[float, float]] | None = None,
) -> Figure:
    """Risk–coverage curves of several predictors, ``{"name": (probs, labels)}``, with the
    AURC (%) of each in the legend; ``target`` draws a horizontal line at that risk and ``points``
    marks operating points ``{"name": (coverage, risk)}``. Saved as PNG when ``path`` is given
    (atomically)."""
    plt = _pyplot()
    if not curves:
        raise ValueError("curves: expected at least one (probs, labels) pair")
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    for name, (probs, labels) in curves.items():
        coverage, risk = risk_coverage(probs, labels)
        ax.plot(coverage, risk, linewidth=1.4, label=f"{name} (AURC {100 * risk.mean():.2f}%)")
    if target is not None:
        ax.axhline(target, color="0.4", linestyle="--", linewidth=1.0, label=f"target risk {target:g}")
    for name, (cov, risk_at) in (points or {}).items():
        ax.plot([cov], [risk_at], marker="o", markersize=6, linestyle="none",
                label=f"{name}: coverage {100 * cov:.1f}%, risk {100 * risk_at:.1f}%")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    return _finish_curves(fig, ax, "coverage", "risk (error rate among kept)", title, path)


def plot_certified_accuracy(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]],
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Certified accuracy against the L2 radius, ``{"name": (radii, certified accuracy)}`` (a
    step curve: the accuracy at r counts the images certified at radius ≥ r). Saved as PNG when
    ``path`` is given (atomically)."""
    plt = _pyplot()
    if not curves:
        raise ValueError("curves: expected at least one (radii, accuracy) pair")
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    for name, (radii, accuracy) in curves.items():
        ax.step(np.asarray(radii), 100 * np.asarray(accuracy), where="post", linewidth=1.4, label=name)
    ax.set_ylim(0, 100)
    return _finish_curves(fig, ax, "L2 radius (pixel space [0, 1])", "certified accuracy (%)", title, path)


def _finish_curves(fig: Figure, ax: Any, xlabel: str, ylabel: str, title: str | None,
                   path: str | os.PathLike[str] | None) -> Figure:
    """Labels, grid, legend and title of a figure of named curves; saved when ``path`` is given."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    if path is not None:
        save_figure(fig, path)
    return fig
