"""``calibprompt demo``: the offline demo on the embedded model (or the calibrator demo on
simulated logits)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from calibprompt.cli.common import out_dir
from calibprompt.cli.options import default_of, help_with_default
from calibprompt.demo.calibration import run_calibration_demo
from calibprompt.demo.pipeline import (
    CALIBRATION_PER_CLASS,
    CERTIFY_VARIANTS,
    CONFORMAL,
    FULL_METHODS,
    REFERRAL,
    DemoReport,
    run_demo,
)
from calibprompt.runs.tuning import TUNED_SUFFIX

#: Short names of the full fine-tuning rows (the table stays within 80 columns).
FINETUNE_NAMES = {"ce": "CE", "calibprompt": "CalibPrompt"}

EXAMPLES = {
    "demo": """examples:
  calibprompt demo
  calibprompt demo --out demo_output --seeds 1 2 3
  calibprompt demo --full           # + every preset, full fine-tuning, the TPT family, tuned rows (~5 min)
  calibprompt demo --simulated      # post-hoc calibrators on simulated logits""",
}


def _simulated(args: argparse.Namespace, console: Console) -> int:
    result = run_calibration_demo(args.out, seed=args.seed)
    table = Table(title="simulated overconfident 9-class model (T_true = 3), calibrators fitted "
                        "on 50 samples, test N = 5000")
    for col in ("method", "acc %", "ECE %", "ECE CI", "MCE %", "ACE %", "Brier", "NLL"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for name, row in result.rows.items():
        lo, hi = row["ece_ci"]
        table.add_row(name, f"{100 * row['accuracy']:.2f}", f"{100 * row['ece']:.2f}",
                      f"{100 * lo:.1f}–{100 * hi:.1f}", f"{100 * row['mce']:.2f}",
                      f"{100 * row['ace']:.2f}", f"{row['brier']:.4f}", f"{row['nll']:.4f}")
    console.print(table)
    console.print(f"fitted temperature T = {result.temperature:.3f} (true 3.0)")
    console.print(f"results.json and reliability diagrams written to {result.out_dir}/")
    return 0


def _display(method: str) -> str:
    """How the demo's tables name a report row."""
    tuned = method.endswith(TUNED_SUFFIX)
    base = method.removesuffix(TUNED_SUFFIX)
    ensemble = base.endswith("-tpt4")  # the template ensemble: tpt-ctpt-tpt4
    base = base.removesuffix("-tpt4")
    name = FULL_METHODS.get(base) or (f"full-FT {FINETUNE_NAMES[base[5:]]}" if base.startswith("full-")
                                      else "test-time " + base.removeprefix("tpt-"))
    return name + (", 4 templates" if ensemble else "") + (", tuned" if tuned else "")


def _decisions_table(report: DemoReport) -> Table:
    """The decision rules of each prompt row on test, mean ± std over seeds (in %)."""
    def stat(values: list[float]) -> str:
        return "—" if not values else f"{100 * np.mean(values):.1f}±{100 * np.std(values):.1f}"

    table = Table(title=f"decisions fitted on each run's {4 * CALIBRATION_PER_CLASS}-image calibration split: referral "
                        f"with error ≤ {REFERRAL['max_error']:g} w.p. {REFERRAL['confidence']:g} (kept % of test, err % "
                        f"among kept, seeds with no threshold), {CONFORMAL['score'].upper()} sets at coverage "
                        f"{CONFORMAL['coverage']:g} (cov %, mean size)")
    table.add_column("method", no_wrap=True)
    for col in ("kept %", "err %", "none", "cov %", "size"):
        table.add_column(col, justify="right", no_wrap=True)
    for line in report.decisions:
        suffix = " + TS" if line["probabilities"] == "temperature" else ""
        table.add_row(_display(line["method"]) + suffix, stat(line["coverage"]), stat(line["selective_error"]),
                      f"{line['unreachable']}/{len(line['coverage'])}", stat(line["set_coverage"]),
                      f"{np.mean(line['set_size']):.2f}")
    return table


def cmd_demo(args: argparse.Namespace) -> int:
    console = Console()
    out_dir(args.out, "--out")
    if args.simulated:
        return _simulated(args, console)
    with console.status("demo: generating data, encoding once, tuning prompts over seeds ..."):
        report = run_demo(args.out, seeds=args.seeds, epochs=args.epochs, progress=False, full=args.full)
    table = Table(title=f"embedded demo model — {report.n_test} test patches, mean ± std over seeds "
                        f"{list(args.seeds)}, 8 shots/class, 15-bin ECE")
    table.add_column("method", no_wrap=True)
    for col in ("acc %", "conf %", "ECE %", "Brier", "NLL"):  # MCE, ACE, intervals: report.md
        table.add_column(col, justify="right", no_wrap=True)
    for row in report.rows:  # mean ± std of accuracy and ECE; means elsewhere (all in report.md)
        for variant, suffix in (("uncalibrated", ""), ("temperature_scaled", " + TS")):
            stats = {k.split(".", 1)[1]: v for k, v in row.stats.items() if k.startswith(variant + ".")}
            if not stats:
                continue
            cells = [f"{100 * stats['accuracy']['mean']:.1f}±{100 * stats['accuracy']['std']:.1f}",
                     f"{100 * stats['mean_confidence']['mean']:.1f}",  # above acc % = overconfident
                     f"{100 * stats['ece']['mean']:.1f}±{100 * stats['ece']['std']:.1f}"]
            cells += [f"{stats[k]['mean']:.3f}" for k in ("brier", "nll")]
            table.add_row(_display(row.method) + suffix, *cells)
    console.print(table)
    if report.decisions:
        console.print(_decisions_table(report))
    for variant, cert in report.certification.items():
        acc = cert["certified_accuracy"]
        console.print(f"certified ({CERTIFY_VARIANTS[variant]}, {cert['images']} images, n = {cert['n']}, "
                      f"σ = {cert['sigma']:g}): r=0 {100 * acc['0']:.0f}%, r=0.1 {100 * acc['0.1']:.0f}%, "
                      f"r=0.25 {100 * acc['0.25']:.0f}%; abstained {100 * cert['abstention_rate']:.0f}%", soft_wrap=True)
    console.print(f"runs in {report.out_dir / 'runs'}; report.md, report.csv, report_per_class.csv, report.tex and "
                  f"reliability diagrams, certified_accuracy.png in {report.out_dir}/ ({report.seconds:.0f} s)")
    return 0


def register(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = add("demo", "run the offline demo on the embedded model and write its report", EXAMPLES["demo"])
    p.add_argument("--out", default="demo_output", help=help_with_default("output directory", "demo_output"))
    seeds = list(default_of(run_demo, "seeds"))
    p.add_argument("--seeds", type=int, nargs="+", default=seeds,
                   help=help_with_default("seeds", " ".join(map(str, seeds))))
    p.add_argument("--epochs", type=int, default=default_of(run_demo, "epochs"),
                   help=help_with_default("prompt-tuning epochs", default_of(run_demo, "epochs")))
    p.add_argument("--full", action="store_true",
                   help="also every objective preset, full fine-tuning (CE, CalibPrompt) and the TPT family "
                        "(zero-shot, TPT, C-TPT, O-TPT, SoC, A-TPT, TCA; zero-shot, TPT and C-TPT also with the 4-template "
                        "ensemble; C-TPT and SoC also with --tune auto); about 5 minutes on 2 CPU cores")
    p.add_argument("--simulated", action="store_true",
                   help="instead: the calibrator demo on simulated overconfident logits")
    p.add_argument("--seed", type=int, default=default_of(run_calibration_demo, "seed"),
                   help=help_with_default("seed of the --simulated demo", default_of(run_calibration_demo, "seed")))
    p.set_defaults(func=cmd_demo)
