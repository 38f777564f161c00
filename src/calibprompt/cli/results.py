"""The commands that read finished runs: ``report``, ``evaluate`` (other bins, or external
validation on another dataset), ``calibrate`` and ``predict``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from rich.console import Console
from scipy.special import softmax

from calibprompt.calibrators import CALIBRATORS
from calibprompt.cli.common import (
    CLIError,
    add_intervals,
    load_run_or_fail,
    out_dir,
    print_metrics,
    print_run,
)
from calibprompt.cli.options import default_of, help_with_default
from calibprompt.files import write_json
from calibprompt.metrics import evaluate
from calibprompt.runs import Run, collect_images, write_report
from calibprompt.runs.apply import write_prediction_files
from calibprompt.runs.directory import calibration_prefix

EXAMPLES = {
    "report": """examples:
  calibprompt report runs/
  calibprompt report runs/ --out reports/ --bootstrap 1000
  calibprompt report runs/ --baseline ce --n-bins 10
  calibprompt report runs/paper_main --published      # the paper's numbers beside yours

Runs are averaged only when they differ in their seed alone; rows name the settings that vary.""",
    "evaluate": """examples:
  calibprompt evaluate runs/kather/quiltnet/calibprompt/8shot-seed1-0123456789 --n-bins 20
  calibprompt evaluate RUN_DIR --bootstrap 1000
  calibprompt evaluate RUN_DIR --dataset imagefolder --root ~/site_b      # external validation

External results go to RUN_DIR/external/<dataset>-<split>-<id>/ (predictions, metrics with and
without the run's temperature, reliability diagram).""",
    "predict": """examples:
  calibprompt predict runs/kather/quiltnet/calibprompt/8shot-seed1-0123456789 new_patches/ --out preds
  calibprompt predict RUN_DIR a.png b.png --out preds --device cuda

Writes OUT/predictions.csv (path, predicted_class, p_uncalibrated[<class>]..., and
p_temperature_scaled[<class>]... when the run has a fitted temperature) and OUT/predict.json.""",
    "calibrate": """examples:
  calibprompt calibrate RUN_DIR --calibrator temperature
  calibprompt calibrate RUN_DIR --calibrator isotonic

Fits on the run's calibration logits (never test; runs made before the calibration split existed:
their validation logits) and writes calibration_<name>.json. Test-time (tpt) runs have
calibration logits only when run with --calib-per-class N.""",
}


def cmd_report(args: argparse.Namespace) -> int:
    out_dir(args.out or args.runs, "--out" if args.out else "RUNS")
    written = write_report(args.runs, out=args.out, n_resamples=args.bootstrap, n_bins=args.n_bins,
                           baseline=args.baseline, published=args.published)
    console = Console()
    console.print(written["markdown"].read_text())
    figures = [k for k in written if k.startswith("reliability_")]
    extra = "".join(f", {written[k]}" for k in ("per_class_csv", "published_csv", "tuning_csv", "decisions_csv")
                    if k in written)
    console.print(f"written: {written['markdown']}, {written['csv']}, {written['latex']}{extra} and "
                  f"{len(figures)} reliability diagram(s)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    run = load_run_or_fail(args.run)
    if args.n_bins is not None and args.n_bins < 1:
        raise CLIError(f"--n-bins {args.n_bins}: expected a positive integer")
    if args.dataset or args.root:
        if not (args.dataset and args.root):
            raise CLIError("external evaluation needs both --dataset and --root")
        result = run.evaluate(args.dataset, args.root, split=args.split, n_bins=args.n_bins, device=args.device,
                              cache=args.cache, workers=args.workers, progress=not args.quiet, force=args.force,
                              weights=args.weights)
        print_run(result, label=f"{run.method} on {args.dataset} ({args.split}): ")
        return 0
    preds = run.predictions()
    n_bins = args.n_bins or run.metrics.get("n_bins", 15)
    probs = softmax(preds["test_logits"], axis=1)
    result = evaluate(probs, preds["test_labels"], n_bins=n_bins)
    if args.bootstrap:
        add_intervals(result, probs, preds["test_labels"], args.bootstrap, n_bins)
    print_metrics(result)
    write_json(run.directory / f"metrics_{n_bins}bins.json", result)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    run = load_run_or_fail(args.run)
    preds = run.predictions()
    prefix = calibration_prefix(preds)
    if prefix is None:
        how = ("rerun it with --calib-per-class N to adapt a calibration split of the train pool too"
               if run.kind == "tpt" else "rerun it with this version of calibprompt")
        raise CLIError(f"{run.directory}: the run has no calibration predictions to fit a calibrator on; {how}")
    calibrator = CALIBRATORS[args.calibrator]().fit(preds[f"{prefix}logits"], preds[f"{prefix}labels"])
    result = evaluate(calibrator.transform(preds["test_logits"]), preds["test_labels"], n_bins=args.n_bins)
    result["calibrator"] = calibrator.to_dict()
    split = "calibration" if prefix == "calib_" else "validation"
    result["fitted_on"] = f"{split} split ({len(preds[f'{prefix}labels'])} images)"
    print_metrics(result)
    write_json(run.directory / f"calibration_{args.calibrator}.json", result)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    run = load_run_or_fail(args.run)
    out_dir(args.out, "--out")
    collect_images(args.images)  # bad paths fail before the backbone is loaded
    result = run.predict(args.images, device=args.device, cache=args.cache, workers=args.workers,
                         progress=not args.quiet, weights=args.weights)
    written = write_prediction_files(result, run, args.out)
    console = Console()
    calibrated = ("with temperature-scaled probabilities (T fitted on the run's "
                  f"{result.calibrator.get('split', 'validation')} split)" if result.calibrator else
                  "uncalibrated probabilities only (the run has no fitted calibrator)")
    console.print(f"{len(result.paths)} image(s) classified, {calibrated}: {written['csv']}")
    for name, column in (("referral", "decision (accept/refer)"), ("conformal", "prediction_set")):
        if name in result.decisions:
            rule = result.decisions[name]
            if name == "referral" and rule.get("threshold") is None:
                console.print("the run's referral rule certified no threshold: every image is referred (column "
                              "decision)", soft_wrap=True)
            else:
                console.print(f"the run's {name} rule applied: column {column}; {rule['guarantee']}", soft_wrap=True)
    for path, reason in result.excluded:
        console.print(f"[yellow]excluded[/] {path}: {reason}")
    return 0


def _apply_options(p: argparse.ArgumentParser) -> None:
    """Where and how a finished run is applied to images."""
    p.add_argument("--device", default=None, help=help_with_default("torch device", "the run's"))
    p.add_argument("--weights", help=help_with_default("the run's backbone weights, if they moved",
                                                       "the path the run recorded"))
    p.add_argument("--cache", help=help_with_default("feature cache directory", "the run's"))
    p.add_argument("--workers", type=int, default=None,
                   help=help_with_default("image-decoding worker processes", "cores - 1, at most 4"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = add("report", "tables over run directories: mean ± std across seeds, bootstrap CIs, diagrams",
            EXAMPLES["report"])
    p.add_argument("runs", help="directory containing run directories")
    p.add_argument("--out", help=help_with_default("where to write the report files", "RUNS"))
    p.add_argument("--bootstrap", type=int, default=default_of(write_report, "n_resamples"), metavar="N",
                   help=help_with_default("bootstrap resamples", default_of(write_report, "n_resamples")))
    p.add_argument("--n-bins", type=int, default=default_of(write_report, "n_bins"),
                   help=help_with_default("bins of every number in the report", default_of(write_report, "n_bins")))
    p.add_argument("--baseline", metavar="METHOD",
                   help="add each row's difference to this method (paired bootstrap over the same test set and seeds)")
    p.add_argument("--published", action="store_true",
                   help="put the published values (CalibPrompt paper, 8 shots: ECE of CE and CalibPrompt per backbone "
                        "and dataset) beside rows run with the published setting, marked as published; also "
                        "report_published.csv")
    p.set_defaults(func=cmd_report)

    p = add("evaluate", "recompute a run's test metrics (e.g. other bins), or evaluate it on another dataset",
            EXAMPLES["evaluate"])
    p.add_argument("run", help="a run directory (any method) or its predictions.npz")
    p.add_argument("--n-bins", type=int, default=None, help=help_with_default("bins of ECE/MCE/ACE", "the run's"))
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help=help_with_default("bootstrap resamples for 95% intervals", "none"))
    p.add_argument("--dataset", help="external validation: the dataset to apply the run to (same classes)")
    p.add_argument("--root", help="external validation: that dataset's root")
    p.add_argument("--split", default=default_of(Run.evaluate, "split"),
                   help=help_with_default("external validation: the split to use", default_of(Run.evaluate, "split")))
    p.add_argument("--force", action="store_true", help="redo a finished external evaluation")
    _apply_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = add("predict", "apply a finished run to new images; writes OUT/predictions.csv (with the columns decision "
                       "and prediction_set when the run has referral / conformal rules)", EXAMPLES["predict"])
    p.add_argument("run", help="a run directory (any method)")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="directory for predictions.csv and predict.json")
    _apply_options(p)
    p.set_defaults(func=cmd_predict)

    p = add("calibrate", "fit a post-hoc calibrator on a run's calibration logits, evaluate on test",
            EXAMPLES["calibrate"])
    p.add_argument("run", help="a run directory (any method) or its predictions.npz")
    p.add_argument("--calibrator", default="temperature", choices=list(CALIBRATORS),
                   help=help_with_default("post-hoc calibrator", "temperature"))
    p.add_argument("--n-bins", type=int, default=default_of(evaluate, "n_bins"),
                   help=help_with_default("bins of ECE/MCE/ACE", default_of(evaluate, "n_bins")))
    p.set_defaults(func=cmd_calibrate)
