"""``calibprompt referral`` and ``calibprompt conformal``: decision rules fitted on finished runs'
calibration splits (:mod:`calibprompt.runs.decide`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from rich.console import Console

from calibprompt.cli.common import CLIError, load_run_or_fail
from calibprompt.cli.options import help_with_default
from calibprompt.decisions import SCORES
from calibprompt.decisions.conformal import RAPS_K, RAPS_LAMBDA
from calibprompt.runs.decide import (
    PROBABILITIES,
    decision_probabilities,
    run_conformal,
    run_referral,
)

EXAMPLES = {
    "referral": """examples:
  calibprompt referral runs/kather/quiltnet/calibprompt/8shot-seed1-0123456789 --max-error 0.05 --confidence 0.9
  calibprompt referral runs/kather/quiltnet/*/8shot-seed1-* --max-error 0.1

Learn then Test (Angelopoulos et al. 2021): the lowest confidence threshold whose error rate among
accepted cases is certified <= --max-error with probability >= --confidence over the draw of the
run's calibration split (exact binomial p-values, Bonferroni-Holm over 26 fixed thresholds). No
threshold certified: every case is referred, and the smallest calibration size that could reach
the target is stated. Writes RUN/referral.json and RUN/referral_risk_coverage.png.""",
    "conformal": """examples:
  calibprompt conformal runs/kather/quiltnet/calibprompt/8shot-seed1-0123456789 --coverage 0.9 --score aps
  calibprompt conformal RUN --coverage 0.95 --score lac --mondrian    # every class covered at 95%

Split conformal prediction sets fitted on the run's calibration split: marginal coverage
P(Y in set) >= --coverage, or per class with --mondrian. Writes RUN/conformal.json with the fitted
thresholds and the test coverage, mean set size, coverage by set size and by class.""",
}


def _runs(paths: list[str], probabilities: str) -> list:
    """Every run loaded and checked for calibration predictions before anything is fitted."""
    runs = list({run.directory.resolve(): run for run in (load_run_or_fail(p) for p in paths)}.values())  # once each
    for run in runs:
        try:
            decision_probabilities(run, probabilities)
        except ValueError as exc:
            raise CLIError(str(exc)) from exc
    return runs


def _fraction(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise CLIError(f"{name}: expected a number strictly between 0 and 1, got {value:g}")


def cmd_referral(args: argparse.Namespace) -> int:
    _fraction("--max-error", args.max_error)
    _fraction("--confidence", args.confidence)
    console = Console()
    for run in _runs(args.runs, args.probabilities):
        record = run_referral(run, args.max_error, args.confidence, args.probabilities)
        test = record["test"]
        head = f"{run.method} ({run.directory.name}):"
        if record["reachable"]:
            error = "n/a" if test["selective_error"] is None else f"{100 * test['selective_error']:.1f}%"
            console.print(f"{head} threshold {record['threshold']:.4f} (calibration: {record['fitted']['calibration_accepted']}"
                          f" of {record['sizes']['calibration']} accepted); test: coverage {100 * test['coverage']:.1f}%, "
                          f"error among accepted {error}, {test['referred']} of {test['n']} referred", soft_wrap=True)
        else:
            console.print(f"{head} [yellow]{record['message']}[/]", soft_wrap=True)
    console.print("written: referral.json and referral_risk_coverage.png in each run directory")
    return 0


def cmd_conformal(args: argparse.Namespace) -> int:
    _fraction("--coverage", args.coverage)
    if args.score != "raps" and (args.raps_lambda is not None or args.raps_k is not None):
        raise CLIError("--raps-lambda/--raps-k apply to --score raps only")
    console = Console()
    for run in _runs(args.runs, args.probabilities):
        record = run_conformal(run, args.coverage, args.score, args.mondrian, args.probabilities,
                               args.raps_lambda, args.raps_k)
        test = record["test"]
        kind = "per class" if args.mondrian else "marginal"
        console.print(f"{run.method} ({run.directory.name}): {args.score}, {kind} coverage {args.coverage:g}; test: "
                      f"coverage {100 * test['coverage']:.1f}%, mean set size {test['mean_size']:.2f}, singletons "
                      f"{100 * test['singleton']:.0f}%", soft_wrap=True)
        for warning in record["warnings"]:
            console.print(f"[yellow]warning[/] {warning}", soft_wrap=True)
    console.print("written: conformal.json in each run directory")
    return 0


def register(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = add("referral", "a referral threshold with a guarantee on the error among accepted cases, fitted on runs' "
                        "calibration splits", EXAMPLES["referral"])
    p.add_argument("runs", nargs="+", metavar="RUN", help="finished run directories with a calibration split")
    p.add_argument("--max-error", type=float, default=0.05,
                   help=help_with_default("largest error rate allowed among accepted cases", 0.05))
    p.add_argument("--confidence", type=float, default=0.9,
                   help=help_with_default("probability (1 - delta) that the bound holds", 0.9))
    p.add_argument("--probabilities", choices=PROBABILITIES, default="model",
                   help=help_with_default("model: softmax of the logits; temperature: the run's temperature-scaled "
                                          "probabilities (T was fitted on the same calibration images: the guarantee "
                                          "then holds only approximately)", "model"))
    p.set_defaults(func=cmd_referral)

    p = add("conformal", "conformal prediction sets with guaranteed coverage, fitted on runs' calibration splits",
            EXAMPLES["conformal"])
    p.add_argument("runs", nargs="+", metavar="RUN", help="finished run directories with a calibration split")
    p.add_argument("--coverage", type=float, default=0.9, help=help_with_default("coverage 1 - alpha", 0.9))
    p.add_argument("--score", choices=SCORES, default="aps",
                   help=help_with_default("score function: lac (smallest sets), aps (adaptive), raps (regularised "
                                          "adaptive)", "aps"))
    p.add_argument("--mondrian", action="store_true",
                   help="class-conditional coverage: every class covered at --coverage (thresholds per class)")
    p.add_argument("--raps-lambda", type=float, default=None,
                   help=help_with_default("RAPS penalty weight", RAPS_LAMBDA))
    p.add_argument("--raps-k", type=int, default=None,
                   help=help_with_default("RAPS: labels ranked beyond k are penalised", RAPS_K))
    p.add_argument("--probabilities", choices=PROBABILITIES, default="model",
                   help=help_with_default("model or temperature (as for referral)", "model"))
    p.set_defaults(func=cmd_conformal)
