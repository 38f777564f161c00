"""Sweeps: a YAML grid of runs, executed resumably, then one report over exactly those runs.

::

    kind: prompt                 # or tpt (test-time methods); default prompt
    backbones: [quiltnet, {name: plip, weights: /models/plip}]
    datasets: [{name: kather, root: ~/data}]
    methods: [ce, ls, calibprompt, "ls(alpha=0.1) + smac(alpha=0.1) + 3*as"]
    seeds: [1, 2, 3]
    shots: 8                     # any other field of the run config applies to every run
    grid:                        # the product over any config fields
      shots: [4, 8, 16, 32]
      n_ctx: [2, 4, 8, 16, 32, 64]
    out: runs

Every run of the product backbones × datasets × methods × seeds × grid is validated before the
first one starts. Finished runs are skipped (their identity includes the data's content, so a
changed image re-runs what depends on it), interrupted ones resume. The report covers the runs
of this sweep only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from calibprompt.runs.apply import KINDS
from calibprompt.runs.execute import RunResult, execute_run
from calibprompt.runs.report import write_report

__all__ = ["load_sweep", "run_sweep"]

GRID_KEYS = ("backbones", "datasets", "methods", "seeds")
#: Fields that the named lists above set per run (not allowed as common fields or in grid:).
PER_RUN = ("backbone", "weights", "dataset", "root", "method", "seed")


def _entries(value: Any, key: str, name_key: str = "name") -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"sweep: '{key}' must be a non-empty list")
    out = []
    for item in value:
        if isinstance(item, str):
            out.append({name_key: item})
        elif isinstance(item, dict) and name_key in item:
            out.append(dict(item))
        else:
            raise ValueError(f"sweep: each entry of '{key}' must be a name or a mapping with '{name_key}', got {item!r}")
    return out


def load_sweep(path: str | Path) -> tuple[list[Any], Path]:
    """The run configs of a sweep file (validated) and its output directory."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        reason = getattr(exc, "problem", None) or getattr(exc, "strerror", None) or exc
        raise ValueError(f"{path}: not a readable YAML sweep file{where}: {reason}") from exc
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping with {', '.join(GRID_KEYS)}")
    missing = [k for k in GRID_KEYS if k not in spec]
    if missing:
        raise ValueError(f"{path}: missing {missing}; a sweep needs {', '.join(GRID_KEYS)}")
    kind = spec.get("kind", "prompt")
    if kind not in KINDS:
        raise ValueError(f"{path}: kind {kind!r} is unknown; expected one of {sorted(KINDS)}")
    config_class = KINDS[kind]
    allowed = {f.name for f in fields(config_class)} - set(PER_RUN)
    common = {k: v for k, v in spec.items() if k not in (*GRID_KEYS, "out", "grid", "kind")}
    unknown = set(common) - allowed
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed besides the lists: {sorted(allowed)}")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise ValueError(f"{path}: 'grid' must map config fields to lists of values")
    for key, values in grid.items():
        if key not in allowed:
            raise ValueError(f"{path}: grid field {key!r} is not a field of a {kind} run; allowed: {sorted(allowed)}")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid field {key!r} needs a non-empty list of values, got {values!r}")
        if key in common:
            raise ValueError(f"{path}: {key!r} is set both in grid: and as a common field")
    backbones = _entries(spec["backbones"], "backbones")
    datasets = _entries(spec["datasets"], "datasets")
    for d in datasets:
        if "root" not in d:
            raise ValueError(f"{path}: dataset {d['name']!r} needs a 'root'")
    methods, seeds = spec["methods"], spec["seeds"]
    if not isinstance(methods, list) or not methods or not isinstance(seeds, list) or not seeds:
        raise ValueError(f"{path}: 'methods' and 'seeds' must be non-empty lists")
    grid_keys = sorted(grid)
    configs = []
    for b, d, m, s, values in itertools.product(backbones, datasets, methods, seeds,
                                                itertools.product(*(grid[k] for k in grid_keys))):
        try:
            configs.append(config_class(
                backbone=b["name"], weights=b.get("weights"), dataset=d["name"],
                root=str(Path(d["root"]).expanduser()), method=str(m), seed=int(s),
                **common, **dict(zip(grid_keys, values, strict=True))))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc} (in backbone {b['name']!r}, dataset {d['name']!r}, method {m!r}, "
                             f"seed {s!r})") from exc
    for config in configs:  # fail on a bad value before the first run starts
        try:
            config.resolved() if hasattr(config, "resolved") else config.validate()
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    checked = set()
    for config in configs:  # and on a bad data root (each distinct data set-up read once)
        key = (config.dataset, config.root, config.test_fraction, config.needs_train)
        if key not in checked:
            checked.add(key)
            config.load_splits()
    return configs, Path(spec.get("out", "runs"))


def run_sweep(path: str | Path, out: str | Path | None = None, force: bool = False,
              on_run: Callable[[int, int, Any, RunResult], None] | None = None,
              n_resamples: int = 1000) -> list[RunResult]:
    """Execute every run of the sweep file (skipping finished ones) and write the report of these
    runs into the output directory."""
    configs, default_out = load_sweep(path)
    target = Path(out) if out is not None else default_out
    results = []
    for i, config in enumerate(configs):
        result = execute_run(config, target, force=force)
        results.append(result)
        if on_run is not None:
            on_run(i, len(configs), config, result)
    write_report(target, runs=[r.directory for r in results], n_resamples=n_resamples)
    return results
