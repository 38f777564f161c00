"""Aggregate run directories into tables: mean ± std over seeds, bootstrap intervals, diagrams.

Runs are grouped by (backbone, dataset, method). For every group the report gives, for the
uncalibrated and the temperature-scaled predictions, the mean ± std across seeds of accuracy,
ECE, MCE, ACE, Brier and NLL, and the seed-averaged 95 % stratified-bootstrap interval of ECE
(the mean of the per-run interval bounds). Written as Markdown and CSV, with one pooled
reliability diagram per group.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from calibprompt.io import write_text
from calibprompt.metrics import bootstrap

__all__ = ["GroupSummary", "collect_runs", "write_report"]

METRICS = ("accuracy", "ece", "mce", "ace", "brier", "nll")
PERCENT = {"accuracy", "ece", "mce", "ace"}
VARIANTS = {"uncalibrated": "—", "temperature_scaled": "+ TS"}  # variant -> table label


@dataclass
class GroupSummary:
    backbone: str
    dataset: str
    method: str
    seeds: list[int]
    stats: dict[str, dict[str, float]]  # "<variant>.<metric>" -> {"mean", "std"}
    ece_ci: dict[str, tuple[float, float]]  # variant -> averaged interval
    directories: list[Path]


def collect_runs(root: str | Path) -> list[Path]:
    """Finished run directories (those with metrics.json and config.json) below ``root``."""
    root = Path(root)
    if not root.exists():
        raise ValueError(f"{root}: no such directory of runs")
    return sorted(p.parent for p in root.rglob("metrics.json") if (p.parent / "config.json").is_file())


def _summaries(runs: list[Path], n_resamples: int, n_bins: int) -> list[GroupSummary]:
    groups: dict[tuple[str, str, str], list[Path]] = defaultdict(list)
    for run in runs:
        record = json.loads((run / "config.json").read_text())
        cfg = record["config"]
        method = f"test-time {cfg['method']}" if "tpt" in record else cfg["method"]
        groups[(cfg["backbone"], cfg["dataset"], method)].append(run)
    out = []
    for (backbone, dataset, method), dirs in sorted(groups.items()):
        values: dict[str, list[float]] = defaultdict(list)
        cis: dict[str, list[tuple[float, float]]] = defaultdict(list)
        seeds = []
        for d in dirs:
            seeds.append(json.loads((d / "config.json").read_text())["config"]["seed"])
            metrics = json.loads((d / "metrics.json").read_text())
            for variant in VARIANTS:
                for m in METRICS:
                    if variant in metrics:
                        values[f"{variant}.{m}"].append(metrics[variant][m])
            preds = np.load(d / "predictions.npz")
            probs = {"uncalibrated": softmax(preds["test_logits"], axis=1)}
            if "temperature" in metrics:  # as fitted by the run (test-time tuning runs have none)
                probs["temperature_scaled"] = softmax(preds["test_logits"] / metrics["temperature"], axis=1)
            for variant, p in probs.items():
                ci = bootstrap("ece", p, preds["test_labels"], n_resamples=n_resamples, n_bins=n_bins)
                cis[variant].append((ci.low, ci.high))
        stats = {k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in values.items()}
        ece_ci = {k: (float(np.mean([c[0] for c in v])), float(np.mean([c[1] for c in v]))) for k, v in cis.items()}
        out.append(GroupSummary(backbone, dataset, method, sorted(seeds), stats, ece_ci, dirs))
    return out


def _cell(stats: dict[str, dict[str, float]], key: str) -> str:
    scale = 100.0 if key.split(".")[1] in PERCENT else 1.0
    fmt = ".2f" if scale == 100.0 else ".4f"
    return f"{scale * stats[key]['mean']:{fmt}} ± {scale * stats[key]['std']:{fmt}}"


def write_report(root: str | Path, out: str | Path | None = None, n_resamples: int = 1000,
                 n_bins: int = 15) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and ``reliability_<group>.png`` for the runs below
    ``root`` into ``out`` (default: ``root``). Returns the written paths."""
    from calibprompt.plots import plot_reliability

    runs = collect_runs(root)
    if not runs:
        raise ValueError(f"{root}: no finished runs (directories with metrics.json) found")
    out = Path(out) if out is not None else Path(root)
    out.mkdir(parents=True, exist_ok=True)
    groups = _summaries(runs, n_resamples, n_bins)
    header = ["backbone", "dataset", "method", "seeds", "variant", *METRICS, "ece_ci_low", "ece_ci_high"]
    lines = ["# calibprompt report", "",
             f"{len(runs)} runs in {len(groups)} groups; mean ± std over seeds; accuracy and calibration "
             f"errors in %; ECE CI: seed-averaged 95 % stratified bootstrap ({n_resamples} resamples, "
             f"{n_bins} bins).", "",
             "| backbone | dataset | method | seeds | variant | acc % | ECE % | MCE % | ACE % | Brier | NLL | ECE 95% CI |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    written: dict[str, Path] = {}
    for g in groups:
        for variant, label in VARIANTS.items():
            if variant not in g.ece_ci:
                continue
            low, high = g.ece_ci[variant]
            cells = [_cell(g.stats, f"{variant}.{m}") for m in METRICS]
            lines.append(f"| {g.backbone} | {g.dataset} | {g.method} | {len(g.seeds)} | {label} | "
                         + " | ".join(cells) + f" | [{100 * low:.2f}, {100 * high:.2f}] |")
            writer.writerow([g.backbone, g.dataset, g.method, " ".join(map(str, g.seeds)), variant,
                             *(g.stats[f"{variant}.{m}"]["mean"] for m in METRICS), low, high])
        pooled = [np.load(d / "predictions.npz") for d in g.directories]
        probs = np.concatenate([softmax(p["test_logits"], axis=1) for p in pooled])
        labels = np.concatenate([p["test_labels"] for p in pooled])
        slug = "".join(c if c.isalnum() else "_" for c in f"{g.backbone}_{g.dataset}_{g.method}")[:80]
        path = out / f"reliability_{slug}.png"
        plot_reliability(probs, labels, n_bins=n_bins, path=path,
                         title=f"{g.backbone} / {g.dataset} / {g.method} (pooled over {len(g.seeds)} seeds)")
        written[f"reliability_{slug}"] = path
    written["markdown"] = write_text(out / "report.md", "\n".join(lines) + "\n")
    written["csv"] = write_text(out / "report.csv", buffer.getvalue())
    return written


def group_rows(root: str | Path, n_resamples: int = 200, n_bins: int = 15) -> list[dict[str, Any]]:
    """The report's numbers as dictionaries (for programmatic use and tests)."""
    return [{"backbone": g.backbone, "dataset": g.dataset, "method": g.method, "seeds": g.seeds,
             "stats": g.stats, "ece_ci": g.ece_ci} for g in _summaries(collect_runs(root), n_resamples, n_bins)]
