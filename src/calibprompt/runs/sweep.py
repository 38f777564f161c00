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
import json
import os
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import yaml

from calibprompt.runs.apply import KINDS
from calibprompt.runs.execute import RunResult, execute_group, finished_result
from calibprompt.runs.executors import ExecutorOptions, check_executor, chunks, gpu_share, map_units
from calibprompt.runs.report import write_report

__all__ = ["execute_runs", "load_sweep", "lockstep_groups", "run_sweep"]

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


def lockstep_groups(configs: list[Any]) -> list[list[int]]:
    """Indices of ``configs`` in groups that train in lockstep (equal ``lockstep_key``), in the
    order of each group's first run; a run without a key (zero-shot, TPT, full fine-tuning, ...)
    is a group of its own."""
    groups: list[list[int]] = []
    by_key: dict[Any, list[int]] = {}
    for i, config in enumerate(configs):
        key = config.lockstep_key() if hasattr(config, "lockstep_key") else None
        if key is None:
            groups.append([i])
        elif key in by_key:
            by_key[key].append(i)
        else:
            by_key[key] = [i]
            groups.append(by_key[key])
    return groups


def _same_run(config: Any) -> str:
    """Configs with equal keys are the same run (a grid field that does not apply to a method, e.g.
    n_ctx for zero-shot): executed once."""
    effective = config.effective() if hasattr(config, "effective") else asdict(config)
    where = {k: getattr(config, k, None) for k in ("weights", "root", "precision", "device", "n_bins", "cache")}
    return json.dumps([config.kind, effective, where], sort_keys=True, default=str)


def _parallel_units(address: str | None, ray_workers: int | None, devices: list[str]) -> int:
    """How many units a local Ray runs at once: ``ray_workers``, else one per GPU for CUDA runs
    (each task asks for a GPU) or per CPU. On a cluster (``address``) the count is not known here:
    groups are not cut (each group is one unit, trained in lockstep)."""
    if ray_workers:
        return ray_workers
    if address is not None:
        return 1
    if any(gpu_share(d) for d in devices):
        import torch

        return max(1, torch.cuda.device_count())
    return os.cpu_count() or 1


def _sweep_unit(configs: list[Any], out: Path, force: bool, lockstep: int | None) -> list[RunResult]:
    """One unit of a sweep: a lockstep group of runs (or one run), executed to the end."""
    return execute_group(configs, out, force=force, group_size=lockstep)


def _check_options(lockstep: Any, executor: str, address: str | None, ray_workers: Any) -> None:
    if lockstep is not None and (isinstance(lockstep, bool) or not isinstance(lockstep, int) or lockstep < 1):
        raise ValueError(f"lockstep: expected a positive number of runs per group, got {lockstep!r}")
    check_executor(executor, address, ray_workers)


def execute_runs(configs: list[Any], out: str | Path, force: bool = False,
                 on_run: Callable[[int, int, Any, RunResult], None] | None = None, lockstep: int | None = None,
                 executor: str = ExecutorOptions.executor, address: str | None = ExecutorOptions.address,
                 ray_workers: int | None = ExecutorOptions.ray_workers) -> list[RunResult]:
    """Execute ``configs`` (skipping finished runs, resuming interrupted ones): prompt-tuning
    runs that share a backbone, data, prompt shape and step schedule train in lockstep
    (:func:`~calibprompt.runs.execute.execute_group`), at most ``lockstep`` runs per group
    (default: as many as fit the memory; 1 trains every run alone) -- each run's results equal
    its results alone up to floating-point rounding (tested: metrics within 1e-6). A config that
    repeats an earlier one's run is executed once.

    ``executor="ray"`` runs the groups as Ray tasks (:func:`~calibprompt.runs.executors.map_units`;
    a group is cut into as many pieces as there are workers, so that one group also spreads over
    them): every run's result equals the serial executor's, finished runs are skipped on restart.
    ``on_run(i, total, config, result)`` is called as runs finish."""
    _check_options(lockstep, executor, address, ray_workers)
    target = Path(out)
    first: dict[str, int] = {}
    same = [first.setdefault(_same_run(config), i) for i, config in enumerate(configs)]
    unique = sorted(set(same))
    results: list[RunResult | None] = [None] * len(configs)
    if executor == "ray" and not force:  # finished runs are read here: Ray starts only for work left
        finished_now = {i: finished_result(configs[i].plan(), target) for i in unique}
        for i, result in finished_now.items():
            if result is not None:
                results[i] = result
        unique = [i for i in unique if finished_now[i] is None]
    groups = lockstep_groups([configs[i] for i in unique]) if lockstep != 1 else [[k] for k in range(len(unique))]
    groups = [[unique[k] for k in group] for group in groups]
    if executor == "ray":  # a group is cut into as many pieces as units can run at once
        pieces = _parallel_units(address, ray_workers, [c.device for c in configs])
        groups = [piece for group in groups for piece in chunks(group, min(len(group), pieces))]
    quiet = executor == "ray"  # workers' own progress bars would garble the display of units
    units = [([replace(configs[i], progress=False) if quiet else configs[i] for i in group], target, force, lockstep)
             for group in groups]
    copies: dict[int, list[int]] = {}
    for j, i in enumerate(same):
        copies.setdefault(i, []).append(j)
    done = 0

    def finished(u: int, unit_results: list[RunResult]) -> None:
        nonlocal done
        for i, result in zip(groups[u], unit_results, strict=True):
            for j in copies[i]:
                results[j] = result if j == i else RunResult(result.directory, result.metrics, skipped=True)
                if on_run is not None:
                    on_run(done, len(configs), configs[j], results[j])
                done += 1

    for i in copies:  # runs found finished before any unit started
        if results[i] is not None:
            for j in copies[i]:
                results[j] = results[i] if j == i else RunResult(results[i].directory, results[i].metrics, skipped=True)
                if on_run is not None:
                    on_run(done, len(configs), configs[j], results[j])
                done += 1
    if units:
        map_units(_sweep_unit, units, executor, address=address, workers=ray_workers, on_done=finished,
                  description="sweep: run groups", progress=quiet and any(c.progress for c in configs),
                  gpus=max((gpu_share(c.device) for c in configs), default=0.0))
    return results  # type: ignore[return-value]


def run_sweep(path: str | Path, out: str | Path | None = None, force: bool = False,
              on_run: Callable[[int, int, Any, RunResult], None] | None = None,
              n_resamples: int = 1000, lockstep: int | None = None, executor: str = ExecutorOptions.executor,
              address: str | None = ExecutorOptions.address,
              ray_workers: int | None = ExecutorOptions.ray_workers) -> list[RunResult]:
    """Execute every run of the sweep file -- :func:`execute_runs`: lockstep groups (at most
    ``lockstep`` runs each), on ``executor`` -- and write the report of these runs into the
    output directory."""
    _check_options(lockstep, executor, address, ray_workers)  # the options first, then the file
    configs, default_out = load_sweep(path)
    target = Path(out) if out is not None else default_out
    results = execute_runs(configs, target, force, on_run, lockstep, executor, address, ray_workers)
    write_report(target, runs=[r.directory for r in results], n_resamples=n_resamples)
    return results
