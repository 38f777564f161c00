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

from calibprompt.demo.tissue import write_demo_dataset
from calibprompt.objective import PRESETS
from calibprompt.plots import plot_certified_accuracy
from calibprompt.runs import (
    CertifyRunConfig,
    PromptRunConfig,
    TPTRunConfig,
    build_report,
    execute_run,
    execute_runs,
)
from calibprompt.runs.tuning import TUNED_SUFFIX

__all__ = ["CERTIFY_DEMO", "DEMO_METHODS", "DemoReport", "run_demo"]

#: method -> display name
DEMO_METHODS: dict[str, str] = {"zeroshot": "zero-shot", "ce": "CE prompt tuning", "calibprompt": "CalibPrompt"}
#: ``--full``: every objective preset, and the TPT family (display names "test-time <method>").
FULL_METHODS: dict[str, str] = {**DEMO_METHODS, **{m: m for m in PRESETS if m not in DEMO_METHODS}}
TPT_METHODS = ("zeroshot", "tpt", "ctpt", "otpt", "soc")
#: The demo's small certification (PromptSmooth's zero-shot variant with and without AS): far
#: fewer images and draws than the published protocol (500 images, n = 10,000), stated as such.
CERTIFY_DEMO: dict[str, Any] = {"sigma": 0.25, "n0": 10, "n": 100, "alpha": 0.001, "subset": 16, "copies": 32}
CERTIFY_VARIANTS = {"entropy": "PromptSmooth (entropy)", "entropy+as": "PromptSmooth + AS"}
#: Methods also run with ``--tune auto`` (their hyperparameters chosen on the tuning split).
TUNED_METHODS = ("calibprompt",)
#: ``--full``: test-time methods also run with ``--tune auto`` (lambda, SoC's delta).
TUNED_TPT_METHODS = ("ctpt", "soc")
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
        write_demo_dataset(data_root, per_class={"train": 40, "test": 150})
    configs = [PromptRunConfig(backbone="demo", dataset="demo", root=str(data_root), method=method, shots=shots,
                               seed=seed, views=views, epochs=epochs, n_bins=n_bins, cache=str(out / "cache"),
                               workers=0, progress=progress)
               for seed in seeds for method in (FULL_METHODS if full else DEMO_METHODS)]
    configs += [PromptRunConfig(backbone="demo", dataset="demo", root=str(data_root), method=method, shots=shots,
                                seed=seed, views=views, epochs=epochs, n_bins=n_bins, cache=str(out / "cache"),
                                workers=0, progress=progress, tune="auto")
                for seed in seeds for method in TUNED_METHODS]
    if full:
        configs += [PromptRunConfig(backbone="demo", dataset="demo", root=str(data_root), method=method, shots=shots,
                                    seed=seed, regime="full", epochs=epochs, n_bins=n_bins, cache=str(out / "cache"),
                                    workers=0, progress=progress)
                    for seed in seeds for method in FINETUNE_METHODS]
        configs += [TPTRunConfig(backbone="demo", dataset="demo", root=str(data_root), method=method, seed=seed,
                                 cache=str(out / "cache"), workers=0, progress=progress)
                    for seed in seeds for method in TPT_METHODS]
        configs += [TPTRunConfig(backbone="demo", dataset="demo", root=str(data_root), method=method, seed=seed,
                                 cache=str(out / "cache"), workers=0, progress=progress, tune="auto")
                    for seed in seeds for method in TUNED_TPT_METHODS]
    certifications = [CertifyRunConfig(backbone="demo", dataset="demo", root=str(data_root), test_time=variant,
                                       n_bins=n_bins, cache=str(out / "cache"), workers=0, progress=progress,
                                       **CERTIFY_DEMO) for variant in CERTIFY_VARIANTS]
    for config in [*configs, *certifications]:  # every seed and option checked before the first run
        config.resolved() if isinstance(config, TPTRunConfig) else config.validate()
    runs = [result.directory for result in execute_runs(configs, out / "runs")]  # lockstep groups
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
             *(f"tpt-{m}" for m in TPT_METHODS), *(f"tpt-{m}{TUNED_SUFFIX}" for m in TUNED_TPT_METHODS)]
    rows = sorted(rows, key=lambda r: order.index(r.method))
    n_test = json.loads((runs[0] / "metrics.json").read_text())["uncalibrated"]["n_samples"]
    return DemoReport(rows, out, time.perf_counter() - start, written, n_test, certification)
