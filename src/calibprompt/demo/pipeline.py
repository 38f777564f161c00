"""The end-to-end demo on the embedded model: zero-shot, CE prompt tuning and CalibPrompt (with the
library's default hyperparameters, and with them chosen on the tuning split by ``--tune auto``), each
with and without temperature scaling, over several seeds (``calibprompt demo``); with ``full``,
every objective preset and the TPT family too (``calibprompt demo --full``).

It is an ordinary sweep through the run machinery: generate the demo dataset in the BAPLe layout
-> one run per (method, seed) with :func:`calibprompt.runs.execute_run` (features encoded once
into ``OUT/cache``; runs in ``OUT/runs``; a finished run is reused) -> the report over those runs
(``OUT/report.md``, ``report.csv``, ``report_per_class.csv``, ``report.tex``, reliability
diagrams). Nothing is tuned on the test set:
the CalibPrompt weights are the library's defaults for a backbone/dataset pair the paper did not
tune (alpha 0.1, AS weight 1), or chosen on the tuning split (``CalibPrompt, tuned``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibprompt.decisions import fit_conformal, fit_referral, referral_outcome, set_outcome
from calibprompt.demo.tissue import write_demo_dataset
from calibprompt.files import write_json
from calibprompt.objective import PRESETS
from calibprompt.plots import plot_certified_accuracy
from calibprompt.runs import (
    CertifyRunConfig,
    PromptRunConfig,
    TPTRunConfig,
    build_report,
    execute_run,
    execute_runs,
    load_run,
)
from calibprompt.runs.decide import (
    CONFORMAL_FILE,
    PROBABILITIES,
    REFERRAL_FILE,
    decision_probabilities,
    run_conformal,
    run_referral,
)
from calibprompt.runs.tuning import TUNED_SUFFIX

__all__ = ["CERTIFY_DEMO", "DEMO_METHODS", "DemoReport", "run_demo"]

#: method -> display name
DEMO_METHODS: dict[str, str] = {"zeroshot": "zero-shot", "ce": "CE prompt tuning", "calibprompt": "CalibPrompt"}
#: ``--full``: every objective preset, and the TPT family (display names "test-time <method>").
FULL_METHODS: dict[str, str] = {**DEMO_METHODS, **{m: m for m in PRESETS if m not in DEMO_METHODS}}
TPT_METHODS = ("zeroshot", "tpt", "ctpt", "otpt", "soc", "atpt", "tca")
#: ``--full``: the template-ensemble setting (the 4 templates of C-TPT's ensemble tables) for these.
ENSEMBLE_METHODS = ("zeroshot", "tpt", "ctpt")
#: TCA's attribute words for the demo classes. The embedded model knows 26 words, so they come from
#: its vocabulary (staining and imaging words), not from the tissues' morphology: words it does not
#: know would all become its unknown token.
DEMO_ATTRIBUTES = {"adipose tissue": ["stained", "histology"], "lymphocytes": ["stained", "microscopy"],
                   "cancer-associated stroma": ["section", "histology"],
                   "colorectal adenocarcinoma epithelium": ["patch", "microscopy"]}
#: The demo's small certification (PromptSmooth's zero-shot variant with and without AS): far
#: fewer images and draws than the published protocol (500 images, n = 10,000), stated as such.
CERTIFY_DEMO: dict[str, Any] = {"sigma": 0.25, "n0": 10, "n": 100, "alpha": 0.001, "subset": 16, "copies": 32}
CERTIFY_VARIANTS = {"entropy": "PromptSmooth (entropy)", "entropy+as": "PromptSmooth + AS"}
#: Methods also run with ``--tune auto`` (their hyperparameters chosen on the tuning split).
TUNED_METHODS = ("calibprompt",)
#: ``--full``: test-time methods also run with ``--tune auto`` (lambda, SoC's delta).
TUNED_TPT_METHODS = ("ctpt", "soc")
#: Generated images per class: the train pool holds the 8 shots, a 16-image tuning split and an
#: 80-image calibration split per class (320 calibration images: enough for referral thresholds
#: with a guarantee, which need at least 53 accepted images at error 0.1, confidence 0.9).
DATA_PER_CLASS = {"train": 104, "test": 150}
TUNING_PER_CLASS, CALIBRATION_PER_CLASS = 16, 80
#: The demo's decision rules, fitted on each prompt run's calibration split.
REFERRAL = {"max_error": 0.1, "confidence": 0.9}
CONFORMAL = {"coverage": 0.9, "score": "aps"}
#: ``--full``: full fine-tuning (the paper's lr 2e-7) with CE and with CalibPrompt's objective.
FINETUNE_METHODS = ("ce", "calibprompt")


@dataclass
class DemoReport:
    rows: list[Any]  # calibprompt.runs.report rows, in DEMO_METHODS order
    out_dir: Path
    seconds: float
    written: dict[str, Path]
    n_test: int
    #: test-time step -> the certification entry of its run's metrics (see :data:`CERTIFY_DEMO`)
    certification: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: one line per (row, probabilities): the decision rules' test outcome over seeds (:func:`_decisions`)
    decisions: list[dict[str, Any]] = field(default_factory=list)


def run_demo(
    out_dir: str | Path, seeds: Sequence[int] = (1, 2, 3), shots: int = 8, views: int = 8,
    epochs: int = 50, n_bins: int = 15, progress: bool = True, n_resamples: int = 1000, full: bool = False,
) -> DemoReport:
    """Generate the demo data (``OUT/data``), run every (method, seed) and write the report. Rows in
    display order: :data:`DEMO_METHODS` (``full``: :data:`FULL_METHODS`, full fine-tuning of
    :data:`FINETUNE_METHODS` at the paper's lr 2e-7, then the TPT family of :data:`TPT_METHODS`
    with the published TPT protocol)."""
    start = time.perf_counter()
    out = Path(out_dir)
    data_root = out / "data"
    if not (data_root / "demo" / "classnames.txt").is_file():
        write_demo_dataset(data_root, per_class=DATA_PER_CLASS)
    sizes = {"val_per_class": TUNING_PER_CLASS, "calib_per_class": CALIBRATION_PER_CLASS}
    configs = [PromptRunConfig(backbone="demo", dataset="demo", root=str(data_root), method=method, shots=shots,
                               seed=seed, views=views, epochs=epochs, n_bins=n_bins, cache=str(out / "cache"),
                               workers=0, progress=progress, **sizes)
               for seed in seeds for method in (FULL_METHODS if full else DEMO_METHODS)]
    configs += [PromptRunConfig(backbone="demo", dataset="demo", root=str(data_root), method=method, shots=shots,
                                seed=seed, views=views, epochs=epochs, n_bins=n_bins, cache=str(out / "cache"),
                                workers=0, progress=progress, tune="auto", **sizes)
                for seed in seeds for method in TUNED_METHODS]
    if full:
        configs += [PromptRunConfig(backbone="demo", dataset="demo", root=str(data_root), method=method, shots=shots,
                                    seed=seed, regime="full", epochs=epochs, n_bins=n_bins, cache=str(out / "cache"),
                                    workers=0, progress=progress, **sizes)
                    for seed in seeds for method in FINETUNE_METHODS]
        attributes = out / "data" / "demo_attributes.json"
        write_json(attributes, DEMO_ATTRIBUTES)
        configs += [TPTRunConfig(backbone="demo", dataset="demo", root=str(data_root), method=method, seed=seed,
                                 cache=str(out / "cache"), workers=0, progress=progress,
                                 attributes=str(attributes) if method == "tca" else None)
                    for seed in seeds for method in TPT_METHODS]
        configs += [TPTRunConfig(backbone="demo", dataset="demo", root=str(data_root), method=method, seed=seed,
                                 cache=str(out / "cache"), workers=0, progress=progress, ensemble="tpt4")
                    for seed in seeds for method in ENSEMBLE_METHODS]
        configs += [TPTRunConfig(backbone="demo", dataset="demo", root=str(data_root), method=method, seed=seed,
                                 cache=str(out / "cache"), workers=0, progress=progress, tune="auto")
                    for seed in seeds for method in TUNED_TPT_METHODS]
    certifications = [CertifyRunConfig(backbone="demo", dataset="demo", root=str(data_root), test_time=variant,
                                       n_bins=n_bins, cache=str(out / "cache"), workers=0, progress=progress,
                                       **CERTIFY_DEMO) for variant in CERTIFY_VARIANTS]
    for config in [*configs, *certifications]:  # every seed and option checked before the first run
        config.resolved() if isinstance(config, TPTRunConfig) else config.validate()
    runs = [result.directory for result in execute_runs(configs, out / "runs")]  # lockstep groups
    prompt_runs = [load_run(d) for d, c in zip(runs, configs, strict=True) if isinstance(c, PromptRunConfig)]
    for run in prompt_runs:  # the decision rules, stored in each run (the report's Decisions section)
        run_referral(run, **REFERRAL)
        run_conformal(run, **CONFORMAL)
    rows, written = build_report(out / "runs", out=out, runs=runs, n_bins=n_bins, n_resamples=n_resamples)
    certification = {variant: execute_run(config, out / "runs").metrics["certification"]
                      for variant, config in zip(CERTIFY_VARIANTS, certifications, strict=True)}
    curves = {}
    for variant, cert in certification.items():
        radii = sorted(float(r) for r in cert["certified_accuracy"])
        curves[CERTIFY_VARIANTS[variant]] = (radii, [cert["certified_accuracy"][f"{r:g}"] for r in radii])
    written["certified_accuracy"] = out / "certified_accuracy.png"
    plot_certified_accuracy(curves, written["certified_accuracy"],
                            title=f"demo: {CERTIFY_DEMO['subset']} test images, n = {CERTIFY_DEMO['n']}, "
                                  f"σ = {CERTIFY_DEMO['sigma']} (a small check, not the published protocol)")
    order = [*FULL_METHODS, *(f"{m}{TUNED_SUFFIX}" for m in TUNED_METHODS), *(f"full-{m}" for m in FINETUNE_METHODS),
             *(f"tpt-{m}" for m in TPT_METHODS), *(f"tpt-{m}-tpt4" for m in ENSEMBLE_METHODS),
             *(f"tpt-{m}{TUNED_SUFFIX}" for m in TUNED_TPT_METHODS)]
    rows = sorted(rows, key=lambda r: order.index(r.method))
    n_test = json.loads((runs[0] / "metrics.json").read_text())["uncalibrated"]["n_samples"]
    return DemoReport(rows, out, time.perf_counter() - start, written, n_test, certification,
                      _decisions(rows, prompt_runs))


def _decisions(rows: list[Any], runs: list[Any]) -> list[dict[str, Any]]:
    """Per report row of prompt runs and per probabilities (the model's, and temperature-scaled
    -- T fitted on the same calibration split, so that row's guarantee is approximate): the
    referral rule's test coverage, error among accepted and the seeds without a certified
    threshold; the conformal sets' test coverage and mean size. Mean and std over seeds."""
    by_directory = {Path(run.directory): run for run in runs}
    out = []
    for row in rows:
        seeds = [by_directory[Path(d)] for d in row.directories if Path(d) in by_directory]
        if not seeds:
            continue
        for probabilities in PROBABILITIES:
            referral, sets = [], []
            for run in seeds:
                if probabilities == "model":  # the rules run_demo stored in the run: their test outcome
                    referral.append(json.loads((Path(run.directory) / REFERRAL_FILE).read_text())["test"])
                    sets.append(json.loads((Path(run.directory) / CONFORMAL_FILE).read_text())["test"])
                    continue
                arrays = decision_probabilities(run, probabilities)
                rule = fit_referral(arrays["calib_probs"], arrays["calib_labels"], **REFERRAL)
                referral.append(referral_outcome(rule, arrays["test_probs"], arrays["test_labels"]))
                fitted = fit_conformal(arrays["calib_probs"], arrays["calib_labels"], **CONFORMAL)
                sets.append(set_outcome(fitted.predict(arrays["test_probs"]), arrays["test_labels"]))
            errors = [r["selective_error"] for r in referral if r["selective_error"] is not None]
            out.append({"method": row.method, "probabilities": probabilities,
                        "coverage": [r["coverage"] for r in referral], "selective_error": errors,
                        "unreachable": sum(r["selective_error"] is None for r in referral),
                        "set_coverage": [s["coverage"] for s in sets], "set_size": [s["mean_size"] for s in sets]})
    return out
