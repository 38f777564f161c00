"""Sweeps: a YAML grid of backbones x datasets x methods x seeds, run resumably.

::

    backbones: [quiltnet, {name: plip, weights: /models/plip}]
    datasets: [{name: kather, root: ~/data}]
    methods: [ce, ls, calibprompt, "ls(alpha=0.1) + smac(alpha=0.1) + 3*as"]
    seeds: [1, 2, 3]
    shots: 8            # any other RunConfig field applies to every run
    out: runs

Finished runs are skipped, interrupted ones resume, so re-running the same command after a crash
continues where it stopped. The report is written at the end.
"""

from __future__ import annotations

import itertools
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from calibprompt.runs import RunConfig, RunResult, execute_run

__all__ = ["load_sweep", "run_sweep"]

GRID_KEYS = ("backbones", "datasets", "methods", "seeds")


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


def load_sweep(path: str | Path) -> tuple[list[RunConfig], Path]:
    """The run configs of a sweep file and its output directory."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not a readable YAML sweep file ({exc})") from exc
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping with {', '.join(GRID_KEYS)}")
    missing = [k for k in GRID_KEYS if k not in spec]
    if missing:
        raise ValueError(f"{path}: missing {missing}; a sweep needs {', '.join(GRID_KEYS)}")
    allowed = {f.name for f in fields(RunConfig)} - {"backbone", "weights", "dataset", "root", "method", "seed"}
    common = {k: v for k, v in spec.items() if k not in (*GRID_KEYS, "out")}
    unknown = set(common) - allowed
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed besides the grid: {sorted(allowed)}")
    backbones = _entries(spec["backbones"], "backbones")
    datasets = _entries(spec["datasets"], "datasets")
    for d in datasets:
        if "root" not in d:
            raise ValueError(f"{path}: dataset {d['name']!r} needs a 'root'")
    methods = spec["methods"]
    seeds = spec["seeds"]
    if not isinstance(methods, list) or not methods or not isinstance(seeds, list) or not seeds:
        raise ValueError(f"{path}: 'methods' and 'seeds' must be non-empty lists")
    configs = [
        RunConfig(backbone=b["name"], weights=b.get("weights"), dataset=d["name"], root=str(Path(d["root"]).expanduser()),
                  method=str(m), seed=int(s), **common)
        for b, d, m, s in itertools.product(backbones, datasets, methods, seeds)
    ]
    return configs, Path(spec.get("out", "runs"))


def run_sweep(path: str | Path, out: str | Path | None = None, force: bool = False,
              on_run: Any = None) -> list[RunResult]:
    """Execute every run of the sweep file (skipping finished ones) and write the report."""
    from calibprompt.report import write_report

    configs, default_out = load_sweep(path)
    target = Path(out) if out is not None else default_out
    results = []
    for i, config in enumerate(configs):
        result = execute_run(config, target, force=force)
        results.append(result)
        if on_run is not None:
            on_run(i, len(configs), config, result)
    write_report(target)
    return results
