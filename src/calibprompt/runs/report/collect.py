"""Finding and loading run directories: which directories below a root are finished runs
(:func:`collect_runs`, or an explicit list), why the others are skipped, and the internal record
of one loaded run (:class:`_Run`: identity flattened to dotted keys, test logits, labels, files,
temperature; ``probs(v)`` = ``softmax(z)`` or ``softmax(z / T)``)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from calibprompt.runs.identity import SCHEMA_VERSION
from calibprompt.runs.report.constants import _OLD_SCHEMA

# --------------------------------------------------------------------------------------------
# Finding runs
# --------------------------------------------------------------------------------------------


def collect_runs(root: str | os.PathLike[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Finished run directories below ``root`` (``root`` included) and the skipped ones.

    A run directory holds ``config.json`` with ``"schema_version": 2`` and a ``run_id``,
    ``metrics.json`` and ``predictions.npz``. Directories whose name starts with ``.`` (work in
    progress) and everything below a directory named ``external`` (external evaluations) are not
    searched. Directories with ``config.json`` and ``metrics.json`` that are not such runs (older
    schema, unreadable config, no predictions) are returned as ``(directory, reason)``. Both
    lists are sorted by path. Raises ``ValueError`` when ``root`` holds no run.
    """
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"{root}: no such directory (expected a directory of run directories)")
    runs: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for current, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "external")
        if "config.json" not in filenames or "metrics.json" not in filenames:
            continue
        directory = Path(current)
        reason = _skip_reason(directory, filenames)
        if reason is None:
            runs.append(directory)
        else:
            skipped.append((directory, reason))

    runs.sort(key=lambda p: _order(p, base))
    skipped.sort(key=lambda item: _order(item[0], base))
    if not runs:
        found = ("; skipped " + "; ".join(f"{_rel(d, base)} ({r})" for d, r in skipped)) if skipped else ""
        raise ValueError(
            f"{root}: no finished runs found (expected directories holding config.json with "
            f"schema_version {SCHEMA_VERSION} and a run_id, metrics.json and predictions.npz; "
            f"hidden directories and external/ are not searched){found}")
    return runs, skipped


def _select_runs(root: Path, runs: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The given run directories (deduplicated, sorted) split into runs and skipped ones."""
    chosen: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for directory in sorted({Path(d) for d in runs}, key=lambda p: _order(p, root)):
        if not (directory / "config.json").is_file() or not (directory / "metrics.json").is_file():
            raise ValueError(f"runs: {directory} is not a finished run directory "
                             "(expected config.json and metrics.json)")
        reason = _skip_reason(directory, os.listdir(directory))
        if reason is None:
            chosen.append(directory)
        else:
            skipped.append((directory, reason))
    if not chosen:
        raise ValueError(f"runs: none of the {len(skipped)} given directories is a finished run with "
                         f"schema_version {SCHEMA_VERSION} (" + "; ".join(f"{d}: {r}" for d, r in skipped) + ")")
    return chosen, skipped


def _skip_reason(directory: Path, filenames: Iterable[str]) -> str | None:
    try:
        record = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"config.json is not readable JSON ({exc})"
    if not isinstance(record, dict):
        return "config.json is not a JSON object"
    version = record.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < SCHEMA_VERSION:
        return _OLD_SCHEMA
    if version > SCHEMA_VERSION:
        return f"written by a newer calibprompt (schema_version {version}); update calibprompt"
    if "run_id" not in record:
        return "config.json has no run_id"
    if "predictions.npz" not in filenames:
        return "no predictions.npz"
    return None


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _order(path: Path, root: Path) -> tuple:
    try:
        return (0, path.relative_to(root).parts)
    except ValueError:
        return (1, path.parts)


# --------------------------------------------------------------------------------------------
# Loading runs
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
    directory: Path
    run_id: str
    experiment_id: str
    seed: int
    method: str
    backbone: str
    dataset: str
    kind: str
    classnames: list[str]
    flat: dict[str, Any]
    data_root: str | None
    logits: np.ndarray
    labels: np.ndarray
    files: np.ndarray
    temperature: float | None
    held_out: dict[str, Any] | None = None  # config.json's test_split: a test set held out of the data
    certification: dict[str, Any] | None = None  # metrics.json's certification (certify runs)
    tuning: dict[str, Any] | None = None  # metrics.json's tuning (runs made with --tune auto)
    decisions: dict[str, Any] = field(default_factory=dict)  # referral.json / conformal.json of this run
    _probs: dict[str, np.ndarray] = field(default_factory=dict)

    def variants(self) -> list[str]:
        return ["uncalibrated"] + (["temperature_scaled"] if self.temperature is not None else [])

    def probs(self, variant: str) -> np.ndarray:
        if variant not in self._probs:
            scale = 1.0
            if variant == "temperature_scaled":
                if self.temperature is None:
                    raise ValueError(f"{self.directory}: no temperature, no temperature-scaled variant")
                scale = self.temperature
            self._probs[variant] = softmax(self.logits / scale, axis=1)
        return self._probs[variant]


def _load_run(directory: Path) -> _Run:
    where = directory / "config.json"
    record = json.loads(where.read_text(encoding="utf-8"))
    identity = record.get("identity")
    if not isinstance(identity, dict):
        raise ValueError(f"{where}: expected an 'identity' object")
    config = identity.get("config") if isinstance(identity.get("config"), dict) else {}

    def field_(name: str, kind: type) -> Any:
        value = record.get(name, config.get(name))
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: expected {name!r} of type {kind.__name__}, got {value!r}")
        return value

    seed = field_("seed", int)
    experiment_id = field_("experiment_id", str)
    method, backbone, dataset = field_("method", str), field_("backbone", str), field_("dataset", str)
    kind = str(record.get("kind", identity.get("kind", "")))
    given = record.get("config") if isinstance(record.get("config"), dict) else {}
    root = given.get("root")

    metrics_path = directory / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    temperature = metrics.get("temperature") if isinstance(metrics, dict) else None
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"{metrics_path}: temperature must be a positive number, got {temperature!r}")
        temperature = float(temperature)

    npz = directory / "predictions.npz"
    try:
        with np.load(npz, allow_pickle=False) as data:
            arrays = {k: np.array(data[k]) for k in ("test_logits", "test_labels", "test_files")
                      if k in data.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{npz}: not a readable predictions file ({exc})") from exc
    missing = [k for k in ("test_logits", "test_labels", "test_files") if k not in arrays]
    if missing:
        raise ValueError(f"{npz}: missing array(s) {missing}")
    logits = arrays["test_logits"].astype(np.float64)
    labels, files = arrays["test_labels"], arrays["test_files"]
    if logits.ndim != 2 or logits.shape[1] < 2 or logits.shape[0] == 0:
        raise ValueError(f"{npz}: test_logits must have shape (N, K) with N >= 1, K >= 2, got {logits.shape}")
    n, k = logits.shape
    if labels.shape != (n,) or files.shape != (n,):
        raise ValueError(f"{npz}: test_labels and test_files must have shape ({n},), got "
                         f"{labels.shape} and {files.shape}")
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"{npz}: test_labels must be integers in [0, {k - 1}]")
    if not np.all(np.isfinite(logits)):
        raise ValueError(f"{npz}: test_logits contain NaN or infinite values")
    classnames = record.get("classnames")
    if not isinstance(classnames, list) or len(classnames) != k:
        classnames = [f"class {i}" for i in range(k)]
    return _Run(directory=directory, run_id=str(record["run_id"]), experiment_id=experiment_id, seed=seed,
                method=method, backbone=backbone, dataset=dataset, kind=kind,
                classnames=[str(c) for c in classnames], flat=_flatten(identity),
                data_root=str(root) if root is not None else None, logits=logits,
                labels=labels.astype(np.int64), files=files.astype(str), temperature=temperature,
                held_out=record["test_split"] if isinstance(record.get("test_split"), dict) else None,
                certification=metrics.get("certification") if isinstance(metrics, dict) else None,
                tuning=metrics.get("tuning") if isinstance(metrics, dict) else None,
                decisions=_decisions(directory, str(record["run_id"])))


def _decisions(directory: Path, run_id: str) -> dict[str, Any]:
    """The decision rules fitted on the run (``referral.json``, ``conformal.json``), when they
    belong to this run (its run_id)."""
    out = {}
    for name in ("referral", "conformal"):
        path = directory / f"{name}.json"
        if path.is_file():
            record = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(record, dict) and record.get("run_id") == run_id:
                out[name] = record
    return out


def _flatten(identity: Mapping[str, Any]) -> dict[str, Any]:
    """Identity as ``{"config.epochs": 50, "data.test": "…", "backbone": "…", …}``: nested dicts
    joined with ``.``, ``None`` values left out (not applicable), the seed left out."""
    out: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key in sorted(value, key=str):
                visit(f"{prefix}.{key}" if prefix else str(key), value[key])
        elif value is not None:
            out[prefix] = value

    visit("", identity)
    out.pop("config.seed", None)
    return out
