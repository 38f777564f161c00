"""``calibprompt metrics`` (calibration metrics of saved predictions) and ``calibprompt losses``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy.special import softmax

from calibprompt.calibrators import CALIBRATORS
from calibprompt.cli.common import (
    CLIError,
    add_intervals,
    is_run_predictions,
    load_predictions,
    print_metrics,
)
from calibprompt.cli.options import default_of, help_with_default
from calibprompt.files import write_json
from calibprompt.metrics import bootstrap, evaluate
from calibprompt.objective import PRESETS, describe_losses
from calibprompt.plots import plot_reliability

EXAMPLES = {
    "metrics": """examples:
  calibprompt metrics predictions.npz
  calibprompt metrics predictions.npz --n-bins 10 --bootstrap 1000 --plot reliability.png
  calibprompt metrics predictions.npz --calibrate temperature --fit-on validation.npz
  calibprompt metrics RUN_DIR --calibrate isotonic     # a run's test predictions, fitted on its calibration split

The .npz file holds `labels` (N,) and either `logits` or `probs` (N, K), or is a run's own
predictions.npz (test_logits / test_labels; given as the file or the run directory).""",
    "losses": """examples:
  calibprompt losses""",
}


def cmd_metrics(args: argparse.Namespace) -> int:
    scores, labels, are_logits = load_predictions(args.predictions, "predictions")
    calibrator = None
    if args.calibrate:
        if not are_logits:
            raise CLIError(f"--calibrate needs logits, but {args.predictions} holds probs")
        if args.fit_on:  # a run's predictions file is fitted on its calibration arrays, never its test arrays
            fit_scores, fit_labels, fit_logits = load_predictions(
                args.fit_on, "--fit-on", "fit" if is_run_predictions(args.fit_on) else "")
        elif is_run_predictions(args.predictions):
            fit_scores, fit_labels, fit_logits = load_predictions(args.predictions, "--calibrate", "fit")
        else:
            raise CLIError("--calibrate needs --fit-on FILE.npz (a labelled set other than the test set)")
        if not fit_logits:
            raise CLIError(f"--fit-on {args.fit_on}: must hold logits")
        calibrator = CALIBRATORS[args.calibrate]().fit(fit_scores, fit_labels)
        probs = calibrator.transform(scores)
    else:
        probs = softmax(np.asarray(scores, dtype=np.float64), axis=1) if are_logits else scores
    result = evaluate(probs, labels, n_bins=args.n_bins)
    if calibrator is not None:
        result["calibrator"] = calibrator.to_dict()
    if args.bootstrap:
        add_intervals(result, probs, labels, args.bootstrap, args.n_bins, args.seed)
    print_metrics(result)
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot_reliability(probs, labels, n_bins=args.n_bins, path=args.plot, bootstrap=args.bootstrap, seed=args.seed)
    return 0


def cmd_losses(args: argparse.Namespace) -> int:
    table = Table(title="registered loss terms (use in --objective, e.g. 'ls(alpha=0.1) + smac(alpha=0.1) + 3*as')")
    for col in ("name", "inputs", "keywords", "summary"):
        table.add_column(col)
    for row in describe_losses():
        keywords = ", ".join(f"{k}={v!r}" for k, v in row["keywords"].items())
        table.add_row(row["name"], ", ".join(row["inputs"]), keywords, row["summary"])
    console = Console()
    console.print(table)
    presets = Table(title="presets")
    presets.add_column("name")
    presets.add_column("objective")
    for name, expr in PRESETS.items():
        presets.add_row(name, expr)
    console.print(presets)
    return 0


def register(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = add("metrics", "calibration metrics of saved predictions (optionally post-hoc calibrated)", EXAMPLES["metrics"])
    p.add_argument("predictions", help=".npz with 'labels' and 'logits' or 'probs', or a run's predictions.npz / directory")
    p.add_argument("--n-bins", type=int, default=default_of(evaluate, "n_bins"),
                   help=help_with_default("bins of ECE/MCE/ACE", default_of(evaluate, "n_bins")))
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help=help_with_default("stratified bootstrap resamples for 95% intervals", "none"))
    p.add_argument("--seed", type=int, default=default_of(bootstrap, "seed"),
                   help=help_with_default("bootstrap seed", default_of(bootstrap, "seed")))
    p.add_argument("--calibrate", choices=list(CALIBRATORS),
                   help="fit this post-hoc calibrator on --fit-on (a run: its calibration split), apply it before measuring")
    p.add_argument("--fit-on", metavar="FILE", help=".npz of labelled logits to fit the calibrator on")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a reliability diagram (PNG)")
    p.set_defaults(func=cmd_metrics)

    p = add("losses", "list the registered loss terms and objective presets", EXAMPLES["losses"])
    p.set_defaults(func=cmd_losses)
