"""What the commands share: the user-error exception, output-directory checks, loading runs and
saved predictions, and printing metrics and run summaries."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from calibprompt.metrics import bootstrap_many
from calibprompt.runs import Run, load_run
from calibprompt.runs.directory import calibration_prefix

__all__ = ["CLIError", "add_intervals", "add_run_output_options", "is_run_predictions", "load_predictions",
           "load_run_or_fail",
           "out_dir", "print_metrics", "print_run", "summary_line"]

#: Metrics shown in percent.
PERCENT = {"accuracy", "macro_f1", "ece", "mce", "ace", "classwise_ece", "top_label_equal_mass_ece",
           "smooth_ece", "aurc", "auroc"}


class CLIError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def out_dir(path: str | None, flag: str) -> None:
    """An output directory must be a directory (or not exist yet): checked before any work."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise CLIError(f"{flag} {path}: exists and is not a directory; expected an output directory")


def add_run_output_options(parser: argparse.ArgumentParser) -> None:
    """``--out``, ``--force`` and ``--quiet`` of the commands that write run directories."""
    parser.add_argument("--out", default="runs", help="runs directory (default: runs)")
    parser.add_argument("--force", action="store_true", help="redo a finished run")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def load_run_or_fail(path: str) -> Run:
    try:
        return load_run(path)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def is_run_predictions(path: str) -> bool:
    """Whether ``path`` is a run's ``predictions.npz`` (or a run directory holding one)."""
    file = Path(path)
    file = file / "predictions.npz" if file.is_dir() else file
    try:
        with np.load(file, allow_pickle=False) as data:
            return "test_logits" in data.files
    except (OSError, ValueError):
        return False


def load_predictions(path: str, what: str, prefix: str = "") -> tuple[np.ndarray, np.ndarray, bool]:
    """(scores, labels, are_logits) from an .npz file with labels and logits or probs -- or a run's
    own ``predictions.npz`` (or its directory), whose arrays are ``test_logits`` / ``test_labels``
    (``prefix="fit"``: the arrays a calibrator is fitted on -- its calibration split, or the
    validation split of a run made before the calibration split existed)."""
    file = Path(path)
    if file.is_dir() and (file / "predictions.npz").is_file():
        file = file / "predictions.npz"
    if not file.is_file():
        raise CLIError(f"{what} {path}: file not found")
    try:
        with np.load(file, allow_pickle=False) as data:
            keys = set(data.files)
            if "test_logits" in keys or prefix:
                split = (calibration_prefix(keys) or "calib_") if prefix == "fit" else (prefix or "test_")
                if f"{split}logits" not in keys:
                    raise CLIError(f"{what} {path}: this run's predictions have no {split[:-1]} split "
                                   f"(arrays: {sorted(keys)}); test-time runs have one when run with "
                                   "--calib-per-class N")
                return data[f"{split}logits"], data[f"{split}labels"], True
            if "labels" not in keys or not ({"logits", "probs"} & keys):
                raise CLIError(
                    f"{what} {path}: expected arrays 'labels' and 'logits' or 'probs' (or a run's "
                    f"'test_logits' and 'test_labels'), found {sorted(keys) or 'none'}"
                )
            labels = data["labels"]
            if "logits" in keys:
                return data["logits"], labels, True
            return data["probs"], labels, False
    except (OSError, ValueError) as exc:
        raise CLIError(f"{what} {path}: not a readable .npz file ({exc})") from exc


def add_intervals(result: dict, probs: Any, labels: Any, n_resamples: int, n_bins: int, seed: int = 0) -> None:
    """95% stratified-bootstrap intervals of the headline metrics, as ``<name>_ci``, from one shared draw."""
    intervals = bootstrap_many(("ece", "accuracy", "nll", "brier"), probs, labels,
                               n_resamples=n_resamples, seed=seed, n_bins=n_bins)
    for name, ci in intervals.items():
        result[f"{name}_ci"] = [ci.low, ci.high]


def print_metrics(result: dict) -> None:
    table = Table(title=f"N = {result['n_samples']}, K = {result['n_classes']}, {result['n_bins']} bins")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI", justify="right")
    for name, value in result.items():
        if not isinstance(value, float) or name.endswith("_bandwidth"):
            continue
        scale, unit = (100.0, " %") if name in PERCENT else (1.0, "")
        ci = result.get(f"{name}_ci")
        ci_text = f"[{scale * ci[0]:.2f}, {scale * ci[1]:.2f}]" if ci else ""
        table.add_row(name + unit, f"{scale * value:.4f}" if scale == 1 else f"{scale * value:.2f}", ci_text)
    Console().print(table)


def summary_line(metrics: dict) -> str:
    """Accuracy, ECE, MCE, NLL of a run's metrics (and after temperature scaling, if fitted)."""
    u = metrics["uncalibrated"]
    line = (f"accuracy {100 * u['accuracy']:.2f}%  ECE({u['n_bins']} bins) {100 * u['ece']:.2f}%  "
            f"MCE {100 * u['mce']:.2f}%  NLL {u['nll']:.4f}")
    if "temperature_scaled" in metrics:
        t = metrics["temperature_scaled"]
        line += f"  |  after TS (T={metrics['temperature']:.3f}): ECE {100 * t['ece']:.2f}%  NLL {t['nll']:.4f}"
    return line


def print_run(result: Any, label: str = "") -> None:
    console = Console()
    state = "[yellow]already finished[/] (use --force to redo) " if result.skipped else ""
    rate = result.metrics.get("images_per_second")
    speed = f"  ({rate:.1f} img/s)" if rate and not result.skipped else ""
    console.print(f"{state}{label}{summary_line(result.metrics)}{speed}")
    for warning in result.metrics.get("temperature_warnings") or []:  # e.g. T on its bound: a tiny split
        console.print(f"[yellow]temperature scaling:[/] {escape(warning)}", soft_wrap=True)
    tuning = result.metrics.get("tuning")
    if tuning:
        chosen = ", ".join(f"{k}={v:.4g}" for k, v in tuning["chosen"].items())
        where = (f"by {tuning['folds']}-fold cross-validation" if tuning.get("split") == "cross-validation"
                 else "on the tuning split")
        console.print(f"chosen {where} ({tuning['metric']} {tuning['score']:.4f}, {tuning['candidates']} "
                      f"candidates; all in tuning.json): {chosen}", soft_wrap=True)
    left_out = [*result.metrics.get("excluded_test_images", []), *result.metrics.get("excluded_train_images", [])]
    if left_out:
        console.print(f"[yellow]{len(left_out)} unreadable image(s) left out[/] (--skip-unreadable; all listed in "
                      "metrics.json):", soft_wrap=True)
        for path, reason in left_out[:10]:
            console.print(f"  {path}: {reason}", soft_wrap=True, markup=False)
    console.print(f"run directory: {result.directory}", soft_wrap=True)
