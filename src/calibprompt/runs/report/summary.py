"""The report computed once: check the arguments, load the runs, group them into sorted rows
with unique diagram names, add the baseline differences, and collect the notes -- the
:class:`_Summary` that the renderers and the public functions share."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibprompt.files import slug
from calibprompt.runs.report.baseline import _baseline_diffs
from calibprompt.runs.report.collect import _load_run, _Run, _select_runs, collect_runs
from calibprompt.runs.report.rows import (
    Row,
    _Group,
    _make_group,
    _partial_keys,
    _row,
    _test_sets,
    _varying,
)


@dataclass
class _Summary:
    root: Path
    rows: list[Row]
    groups: list[_Group]
    n_runs: int
    skipped: list[tuple[Path, str]]
    columns: list[str]
    by_method: list[str]
    across: list[str]
    notes: list[str]
    partial: list[tuple[str, int, list[str]]] = field(default_factory=list)
    test_sets: list[tuple[str, str, list[int], int]] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _check_arguments(n_resamples: Any, n_bins: Any, baseline: Any, seed: Any) -> tuple[int, int]:
    n_resamples = _check_positive("n_resamples", n_resamples)
    n_bins = _check_positive("n_bins", n_bins)
    if baseline is not None and (not isinstance(baseline, str) or not baseline):
        raise ValueError(f"baseline: expected a method name or None, got {baseline!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    return n_resamples, n_bins


def _summary(root: str | os.PathLike[str], n_resamples: int, n_bins: int, baseline: str | None,
             seed: int, runs: Iterable[str | os.PathLike[str]] | None = None) -> _Summary:
    n_resamples, n_bins = _check_arguments(n_resamples, n_bins, baseline, seed)
    base = Path(root)
    directories, skipped = collect_runs(base) if runs is None else _select_runs(base, runs)
    loaded = [_load_run(d) for d in directories]
    by_experiment: dict[str, list[_Run]] = defaultdict(list)
    for run in loaded:
        by_experiment[run.experiment_id].append(run)
    groups = [_make_group(eid, members, base) for eid, members in sorted(by_experiment.items())]
    columns, by_method, across = _varying(groups)

    def order(g: _Group) -> tuple:
        return (g.first.backbone, g.first.dataset, g.first.method, g.first.kind,
                *(g.display.get(k, "") for k in columns), g.experiment_id)

    groups.sort(key=order)
    rows = [_row(g, columns, n_resamples, n_bins, int(seed)) for g in groups]
    length = 8
    while True:  # file names of the diagrams: unique, however similar the rows
        names = [slug(r.backbone, r.dataset, r.method)[:80] + "_" + r.experiment_id[:length] for r in rows]
        if len(set(names)) == len(names) or length >= 64:
            break
        length *= 2
    for row, name in zip(rows, names, strict=True):
        row.slug = name
    if baseline is not None:
        _baseline_diffs(rows, groups, baseline, n_resamples, n_bins, int(seed))
    notes = [f"{r.backbone} / {r.dataset} / {r.method} ({r.experiment_id[:8]}): {n}"
             for r in rows for n in r.notes]
    return _Summary(base, rows, groups, sum(len(g.runs) for g in groups), skipped, columns, by_method,
                    across, notes, _partial_keys(groups, columns), _test_sets(groups), _held_out(groups))


def _held_out(groups: list[_Group]) -> list[str]:
    """One sentence per data set-up whose test set was held out of a folder without a split."""
    seen: dict[tuple, str] = {}
    for run in (r for g in groups for r in g.runs if r.held_out):
        h = run.held_out
        key = (run.dataset, run.data_root, h.get("held_out_fraction"))
        seen.setdefault(key, f"{run.dataset} (`{run.data_root}`): {100 * float(h.get('held_out_fraction', 0)):g}% "
                             f"of each class held out as the test set ({h.get('images')} of {h.get('of')} images, "
                             f"split seed {h.get('seed')}, the same for every seed and method)")
    return list(seen.values())
