"""Rows: the runs of one experiment (equal ``experiment_id``) grouped into a :class:`Row`, the
identity keys that vary between rows (the table's columns), and each row's statistics --
mean ± std over seeds per variant and metric, the ECE interval, per class and two-class."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibprompt.runs.report.collect import _order, _rel, _Run
from calibprompt.runs.report.constants import _MISSING, NAME_KEYS, VARIANTS, _is_method_key
from calibprompt.runs.report.stats import (
    _METRIC_FUNCTIONS,
    _ece_interval,
    _mean_std,
    _same_test_set,
    _test_key,
    per_class_ece,
    per_class_recall,
)


@dataclass
class Row:
    """One experiment (runs that differ in the seed alone) and its recomputed numbers.

    ``stats["<variant>.<metric>"]`` = ``{"mean", "std"}`` over seeds (fractions; std with
    ddof = 0); ``ece_ci[variant]`` = the 95 % percentile-bootstrap interval of the seed mean of
    ECE (see :func:`~calibprompt.runs.report.summarize`); ``n_test`` = the number of test images of each seed's run;
    ``per_class[variant]`` = one dict per class (index, name, support, recall / classwise ECE
    mean and std); ``two_class[variant]`` = sensitivity and specificity with class 1 positive
    (two-class tasks only); ``baseline_diff`` = the paired difference to the baseline (None
    without a baseline); ``varying`` = display value of each key that varies between rows.
    """

    backbone: str
    dataset: str
    method: str
    kind: str
    experiment_id: str
    seeds: list[int]
    directories: list[Path]
    varying: dict[str, str]
    stats: dict[str, dict[str, float]]
    ece_ci: dict[str, tuple[float, float]]
    per_class: dict[str, list[dict[str, Any]]]
    baseline_diff: dict[str, Any] | None = None
    two_class: dict[str, dict[str, dict[str, float]]] | None = None
    classnames: list[str] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    slug: str = ""
    n_test: list[int] = field(default_factory=list)


@dataclass
class _Group:
    experiment_id: str
    runs: list[_Run]
    values: dict[str, str]  # key -> canonical value ("per-seed" lists where runs disagree)
    display: dict[str, str]
    notes: list[str]

    @property
    def first(self) -> _Run:
        return self.runs[0]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _display(key: str, value: Any, root: str | None) -> str:
    if key.startswith("data.") and isinstance(value, str):
        return f"{root} ({value[:8]})" if root else value[:8]
    if key == "backbone" and isinstance(value, str):
        return value[:8]
    return value if isinstance(value, str) else _canonical(value)


def _make_group(experiment_id: str, runs: list[_Run], root: Path) -> _Group:
    runs = sorted(runs, key=lambda r: (r.seed, _order(r.directory, root)))
    kept: list[_Run] = []
    notes: list[str] = []
    for run in runs:
        twin = next((k for k in kept if k.seed == run.seed), None)
        if twin is None:
            kept.append(run)
        else:
            same = "the same run_id" if twin.run_id == run.run_id else "another run_id"
            notes.append(f"`{_rel(run.directory, root)}` repeats seed {run.seed} of "
                         f"`{_rel(twin.directory, root)}` ({same}); counted once")
    values: dict[str, str] = {}
    display: dict[str, str] = {}
    for key in sorted(set().union(*(r.flat for r in kept))):
        per_run = [(r.seed, r.flat.get(key), r.data_root) for r in kept]
        canon = {_canonical(v) for _, v, _ in per_run}
        if len(canon) == 1 and per_run[0][1] is not None:
            roots = sorted({str(d) for _, _, d in per_run if d is not None})
            values[key] = canon.pop()
            display[key] = _display(key, per_run[0][1], " | ".join(roots) or None)
        elif len(canon) > 1:  # seed-dependent (or absent in some seeds)
            values[key] = _canonical([[s, v] for s, v, _ in per_run])
            display[key] = "; ".join(
                f"seed {s}: {_MISSING if v is None else _display(key, v, d)}" for s, v, d in per_run)
            notes.append(f"`{key}` differs between the seeds of this experiment")
    shapes = {r.logits.shape[1] for r in kept}
    if len(shapes) > 1:
        raise ValueError(f"experiment {experiment_id[:8]}: runs have different numbers of classes "
                         f"{sorted(shapes)}: " + ", ".join(str(r.directory) for r in kept))
    if len({tuple(r.classnames) for r in kept}) > 1:
        notes.append("class names differ between seeds; the first run's are shown")
    return _Group(experiment_id, kept, values, display, notes)


def _differs(groups: list[_Group], key: str, block: Callable[[_Group], tuple]) -> bool:
    """Whether two groups of one block both have ``key`` with different values."""
    seen: dict[tuple, set[str]] = defaultdict(set)
    for g in groups:
        if key in g.values:
            seen[block(g)].add(g.values[key])
    return any(len(v) > 1 for v in seen.values())


def _varying(groups: list[_Group]) -> tuple[list[str], list[str], list[str]]:
    """(columns, method keys determined by the method name, keys differing only across
    backbones / datasets)."""
    keys = sorted(set().union(*(g.values for g in groups))) if groups else []

    def cell(g: _Group) -> tuple:
        return (g.first.backbone, g.first.dataset)

    def cell_method(g: _Group) -> tuple:
        return (g.first.backbone, g.first.dataset, g.first.method)

    columns, by_method, across = [], [], []
    for key in keys:
        named = _is_method_key(key) or key in NAME_KEYS
        if _differs(groups, key, cell_method if named else cell):
            columns.append(key)
        elif key not in NAME_KEYS and _differs(groups, key, lambda g: ()):
            (by_method if _is_method_key(key) else across).append(key)
    # Rows still indistinguishable (they differ only in keys one of them lacks): show those keys.
    while True:
        seen: dict[tuple, _Group] = {}
        extra: set[str] = set()
        for g in groups:
            label = (g.first.backbone, g.first.dataset, g.first.method, g.first.kind,
                     *(g.values.get(k) for k in columns))
            other = seen.setdefault(label, g)
            if other is not g:
                extra |= {k for k in set(g.values) | set(other.values)
                          if g.values.get(k) != other.values.get(k)} - set(columns)
        if not extra:
            break
        columns = sorted({*columns, *extra})
    return columns, by_method, [k for k in across if k not in columns]


def _partial_keys(groups: list[_Group], columns: Sequence[str]) -> list[tuple[str, int, list[str]]]:
    """Keys that only some rows have and that are not columns: ``(key, number of rows that have
    it, their distinct display values)``."""
    out = []
    for key in sorted(set().union(*(g.values for g in groups))) if groups else []:
        having = [g for g in groups if key in g.values]
        if key not in columns and len(having) < len(groups):
            out.append((key, len(having), sorted({g.display[key] for g in having})))
    return out


def _test_sets(groups: list[_Group]) -> list[tuple[str, str, list[int], int]]:
    """Per backbone and dataset whose rows are not all measured on one test set:
    ``(backbone, dataset, sorted test-set sizes, number of distinct test sets)``."""
    blocks: dict[tuple[str, str], list[_Run]] = defaultdict(list)
    for g in groups:
        blocks[(g.first.backbone, g.first.dataset)].extend(g.runs)
    out = []
    for (backbone, dataset), runs in sorted(blocks.items()):
        keys = {_test_key(r) for r in runs}
        if len(keys) > 1:
            out.append((backbone, dataset, sorted({int(r.labels.shape[0]) for r in runs}), len(keys)))
    return out


def _row(group: _Group, columns: list[str], n_resamples: int, n_bins: int,
         seed: int) -> Row:
    runs = group.runs
    first = group.first
    notes = list(group.notes)
    variants = [v for v in VARIANTS if all(v in r.variants() for r in runs)]
    if any("temperature_scaled" in r.variants() for r in runs) and "temperature_scaled" not in variants:
        with_t = [r.seed for r in runs if r.temperature is not None]
        notes.append(f"only seeds {with_t} have a temperature: temperature-scaled results omitted")
    stats: dict[str, dict[str, float]] = {}
    ece_ci: dict[str, tuple[float, float]] = {}
    per_class: dict[str, list[dict[str, Any]]] = {}
    two_class: dict[str, dict[str, dict[str, float]]] = {}
    k = first.logits.shape[1]
    shared = _same_test_set(runs)
    if not shared:
        notes.append("the seeds of this experiment have different test files or labels "
                     f"(n = {'/'.join(str(r.labels.shape[0]) for r in runs)}): its ECE interval "
                     "resamples each seed independently")
    for variant in variants:
        for name, fn in _METRIC_FUNCTIONS.items():
            stats[f"{variant}.{name}"] = _mean_std([fn(r.probs(variant), r.labels, n_bins) for r in runs])
        ece_ci[variant] = _ece_interval(runs, variant, n_resamples, n_bins, seed, shared)
        recalls = np.stack([per_class_recall(r.probs(variant), r.labels) for r in runs])
        eces = np.stack([per_class_ece(r.probs(variant), r.labels, n_bins) for r in runs])
        supports = np.stack([np.bincount(r.labels, minlength=k) for r in runs])
        classes = []
        for c in range(k):
            counts = sorted({int(s) for s in supports[:, c]})
            classes.append({
                "index": c, "name": first.classnames[c],
                "support": counts[0] if len(counts) == 1 else [int(s) for s in supports[:, c]],
                "recall": _mean_std(recalls[:, c]), "classwise_ece": _mean_std(eces[:, c]),
            })
        per_class[variant] = classes
        if k == 2:
            two_class[variant] = {"sensitivity": _mean_std(recalls[:, 1]),
                                  "specificity": _mean_std(recalls[:, 0])}
    return Row(
        backbone=first.backbone, dataset=first.dataset, method=first.method, kind=first.kind,
        experiment_id=group.experiment_id, seeds=[r.seed for r in runs],
        directories=[r.directory for r in runs],
        varying={key: group.display.get(key, _MISSING) for key in columns},
        stats=stats, ece_ci=ece_ci, per_class=per_class, two_class=two_class or None,
        classnames=list(first.classnames), variants=variants, notes=notes,
        n_test=[int(r.labels.shape[0]) for r in runs],
    )
