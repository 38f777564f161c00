"""Tables over finished run directories that compare like with like.

A *row* is one experiment: the runs whose identity (``config.json``) differs in the seed alone
(equal ``experiment_id``). Every number of a row is recomputed from the runs' ``predictions.npz``
at one bin count, never read from ``metrics.json``:

* mean ± std over seeds of accuracy, ECE, MCE, ACE, Brier and NLL, for the uncalibrated
  probabilities ``softmax(z)`` and, where every run of the row fitted a temperature T, for
  ``softmax(z / T)``;
* a 95 % stratified percentile-bootstrap interval of the seed mean of ECE: every resample is one
  stratified index set of the row's test set, shared by all seeds of the row (they share one
  test set);
* per class: recall and the classwise ECE of that class (and sensitivity / specificity for
  two-class tasks);
* optionally, the paired-bootstrap difference in accuracy and ECE to a baseline method run on the
  same test set, backbone and settings.

The keys of the identity that differ between rows are named in the report and shown as columns,
so that a table never silently mixes, say, two datasets with the same name or two epoch budgets;
every table shows the number of test images ``n`` of a row, and the header lists the keys that
only some rows have (such as the image limit of test-time runs). Outputs: ``report.md``,
``report.csv``, ``report_per_class.csv``, ``report.tex`` (booktabs: main and per-class table) and
one pooled reliability diagram per row; all deterministic (an unchanged rerun writes the same
bytes).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from calibprompt.files import slug, write_text
from calibprompt.metrics import (
    BINNING_CONVENTION,
    accuracy,
    ace,
    bin_index,
    brier,
    ece,
    mce,
    nll,
    stratified_bootstrap_indices,
)
from calibprompt.runs.identity import SCHEMA_VERSION

__all__ = [
    "CONFIDENCE",
    "METHOD_KEYS",
    "METRICS",
    "SCHEMA_VERSION",
    "VARIANTS",
    "Row",
    "build_report",
    "collect_runs",
    "per_class_ece",
    "per_class_recall",
    "summarize",
    "write_report",
]

#: Metrics of the main table, in column order.
METRICS = ("accuracy", "ece", "mce", "ace", "brier", "nll")
#: Metrics shown in percent in the Markdown and LaTeX tables (fractions in the CSV files).
PERCENT = frozenset({"accuracy", "ece", "mce", "ace"})
#: Probability variants: softmax of the logits, and of the logits divided by the run's temperature.
VARIANTS = ("uncalibrated", "temperature_scaled")
VARIANT_LABELS = {"uncalibrated": "uncalibrated", "temperature_scaled": "+ TS"}
#: Identity keys that belong to the method: ignored when a row is matched with its baseline, and
#: shown as columns only where the method name does not already determine them.
METHOD_KEYS = ("config.method", "config.objective", "config.alpha", "config.weight", "config.lam",
               "config.delta")
#: Keys the fixed backbone / dataset columns already show.
NAME_KEYS = ("config.backbone", "config.dataset")
#: Coverage of every bootstrap interval.
CONFIDENCE = 0.95
#: Resample indices are generated in blocks of at most this many entries (bounded memory).
_BLOCK = 2_000_000
_MISSING = "—"
#: Columns of the CSV files that precede the varying keys (a varying key of the same name is
#: labelled ``identity.<key>``, or left out where it repeats the fixed column).
_FIXED_CSV = ("backbone", "dataset", "method", "kind", "experiment_id")
#: Columns of the Markdown and LaTeX tables that precede the varying keys.
_FIXED_TABLE = ("backbone", "dataset", "method")
_OLD_SCHEMA = "written by an older calibprompt (re-run them)"


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


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


def _stream_seed(*parts: Any) -> int:
    """A 64-bit seed derived from ``parts`` (JSON scalars): independent streams per purpose."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _is_method_key(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in METHOD_KEYS)


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and population std (ddof = 0) of the finite values (NaN when there are none)."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(np.mean(arr)), "std": float(np.std(arr))}


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
                labels=labels.astype(np.int64), files=files.astype(str), temperature=temperature)


# --------------------------------------------------------------------------------------------
# Metrics of one run
# --------------------------------------------------------------------------------------------


def per_class_recall(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Accuracy on the images of each class (recall): ``r_k = #{i : y_i = k, argmax_j p_ij = k}
    / #{i : y_i = k}``, shape (K,); NaN for a class without images."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    k = p.shape[1]
    support = np.bincount(y, minlength=k)
    hits = np.bincount(y[p.argmax(axis=1) == y], minlength=k)
    out = np.full(k, np.nan)
    np.divide(hits, support, out=out, where=support > 0)
    return out


def per_class_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> np.ndarray:
    """Classwise ECE of every class, shape (K,).

    ``ECE_k = sum_b (n_bk / N) |acc_bk - conf_bk|`` where column k of ``probs`` is cut into
    ``n_bins`` equal-width bins (``bin = min(floor(p_ik * B), B - 1)``, the project's
    convention), ``n_bk`` is the number of images in bin b, ``acc_bk`` the fraction of them
    with ``y_i = k`` and ``conf_bk`` their mean ``p_ik``. The mean over k is the classwise ECE
    of Kull et al. (2019), :func:`calibprompt.metrics.classwise_ece`.
    """
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    n, k = p.shape
    bins = bin_index(p, n_bins) + n_bins * np.arange(k)[None, :]
    residual = (y[:, None] == np.arange(k)[None, :]) - p
    sums = np.bincount(bins.ravel(), weights=residual.ravel(), minlength=k * n_bins)
    return np.abs(sums.reshape(k, n_bins)).sum(axis=1) / n


_METRIC_FUNCTIONS: dict[str, Callable[..., float]] = {
    "accuracy": lambda p, y, b: accuracy(p, y),
    "ece": ece,
    "mce": mce,
    "ace": ace,
    "brier": lambda p, y, b: brier(p, y),
    "nll": lambda p, y, b: nll(p, y),
}


def _top_label(p: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(correct, ECE bin of each image, correct - confidence) for batched resampling."""
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    return correct, bin_index(conf, n_bins), correct - conf


def _resampled_ece(bins: np.ndarray, residual: np.ndarray, idx: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE of every row of resample indices ``idx`` (R, N): ``(1/N) sum_b |sum_{i in b} (correct_i
    - conf_i)|`` (an image keeps its bin when resampled)."""
    r, n = idx.shape
    keys = (bins[idx] + n_bins * np.arange(r)[:, None]).ravel()
    sums = np.bincount(keys, weights=residual[idx].ravel(), minlength=r * n_bins)
    return np.abs(sums.reshape(r, n_bins)).sum(axis=1) / n


def _blocks(n_resamples: int, n: int) -> Iterable[tuple[int, int, int]]:
    """``(block, start, size)`` of the resample blocks: at most :data:`_BLOCK` indices each."""
    chunk = max(1, min(n_resamples, _BLOCK // n))
    for block, start in enumerate(range(0, n_resamples, chunk)):
        yield block, start, min(chunk, n_resamples - start)


def _same_test_set(runs: Sequence[_Run]) -> bool:
    """Whether all runs have identical ``test_files`` and ``test_labels`` (in the same order)."""
    first = runs[0]
    return all(np.array_equal(r.files, first.files) and np.array_equal(r.labels, first.labels)
               for r in runs[1:])


def _test_key(run: _Run) -> str:
    """A digest of the run's test files and labels (equal digests: the same test set)."""
    h = hashlib.sha256()
    h.update("\0".join(run.files.tolist()).encode())
    h.update(np.ascontiguousarray(run.labels, dtype="<i8").tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One experiment (runs that differ in the seed alone) and its recomputed numbers.

    ``stats["<variant>.<metric>"]`` = ``{"mean", "std"}`` over seeds (fractions; std with
    ddof = 0); ``ece_ci[variant]`` = the 95 % percentile-bootstrap interval of the seed mean of
    ECE (see :func:`summarize`); ``n_test`` = the number of test images of each seed's run;
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


def _ece_interval(runs: list[_Run], variant: str, n_resamples: int, n_bins: int, seed: int,
                  shared: bool) -> tuple[float, float]:
    """Percentile interval of the seed mean of the resampled ECE.

    ``shared`` (the runs have one test set, as the seeds of one experiment do): resample b is one
    stratified index set ``idx_b`` drawn from the common labels with
    :func:`~calibprompt.metrics.stratified_bootstrap_indices` (seeded from ``seed`` and the block
    alone), the same for every run, and the interval is the percentiles of
    ``(1/S) sum_s ECE(run_s, idx_b)`` over b; one run: the percentiles of its resampled ECE.
    Otherwise every run is resampled independently (seeded from ``seed`` and the run's seed).
    """
    total = np.zeros(n_resamples)
    tops = [_top_label(r.probs(variant), r.labels, n_bins) for r in runs]
    if shared:
        labels = runs[0].labels
        for block, start, m in _blocks(n_resamples, labels.shape[0]):
            idx = stratified_bootstrap_indices(labels, m, seed=_stream_seed(seed, "ece-interval", block))
            for _, bins, residual in tops:
                total[start:start + m] += _resampled_ece(bins, residual, idx, n_bins)
    else:
        for run, (_, bins, residual) in zip(runs, tops, strict=True):
            for block, start, m in _blocks(n_resamples, run.labels.shape[0]):
                idx = stratified_bootstrap_indices(
                    run.labels, m, seed=_stream_seed(seed, "ece-interval", run.seed, block))
                total[start:start + m] += _resampled_ece(bins, residual, idx, n_bins)
    alpha = (1.0 - CONFIDENCE) / 2.0
    low, high = np.quantile(total / len(runs), [alpha, 1.0 - alpha])
    return float(low), float(high)


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


# --------------------------------------------------------------------------------------------
# Baseline differences
# --------------------------------------------------------------------------------------------


def _paired_difference(pairs: list[tuple[_Run, _Run]], variant: str, n_resamples: int, n_bins: int,
                       seed: int, shared: bool) -> dict[str, dict[str, float]]:
    """Point difference (method - baseline, mean over seeds) and paired percentile interval of
    accuracy and ECE.

    ``shared`` (all runs have one test set): resample b is one stratified index set ``idx_b``,
    the same for every seed and for method and baseline, and
    ``Δ_b = (1/S) sum_s [m(method_s, idx_b) - m(baseline_s, idx_b)]``. Otherwise every seed draws
    its own index sets (shared by its method and baseline runs, which have identical test sets).
    """
    sums = {"accuracy": np.zeros(n_resamples), "ece": np.zeros(n_resamples)}
    point = {"accuracy": 0.0, "ece": 0.0}
    tops = []
    for method_run, base_run in pairs:
        y = method_run.labels
        pm, pb = method_run.probs(variant), base_run.probs(variant)
        point["accuracy"] += accuracy(pm, y) - accuracy(pb, y)
        point["ece"] += ece(pm, y, n_bins) - ece(pb, y, n_bins)
        tops.append((_top_label(pm, y, n_bins), _top_label(pb, y, n_bins)))

    def add(idx: np.ndarray, start: int, which: list) -> None:
        m = idx.shape[0]
        for (cm, bm, rm), (cb, bb, rb) in which:
            sums["accuracy"][start:start + m] += cm[idx].mean(axis=1) - cb[idx].mean(axis=1)
            sums["ece"][start:start + m] += (_resampled_ece(bm, rm, idx, n_bins)
                                             - _resampled_ece(bb, rb, idx, n_bins))

    if shared:
        labels = pairs[0][0].labels
        for block, start, m in _blocks(n_resamples, labels.shape[0]):
            add(stratified_bootstrap_indices(labels, m, seed=_stream_seed(seed, "paired", block)), start, tops)
    else:
        for (method_run, _), top in zip(pairs, tops, strict=True):
            y = method_run.labels
            for block, start, m in _blocks(n_resamples, y.shape[0]):
                idx = stratified_bootstrap_indices(y, m, seed=_stream_seed(seed, "paired", method_run.seed, block))
                add(idx, start, [top])
    alpha = (1.0 - CONFIDENCE) / 2.0
    out = {}
    for name, values in sums.items():
        low, high = np.quantile(values / len(pairs), [alpha, 1.0 - alpha])
        out[name] = {"diff": point[name] / len(pairs), "low": float(low), "high": float(high)}
    return out


def _baseline_match(group: _Group, candidates: list[_Group]) -> tuple[_Group, list[tuple[_Run, _Run]]] | str:
    """The baseline experiment of ``group`` and its seed pairs, or why there is none."""
    base_reason = "no baseline run on the same test set and seeds"
    test, backbone = group.values.get("data.test"), group.values.get("backbone")
    same_test = [c for c in candidates
                 if test is not None and c.values.get("data.test") == test and c.values.get("backbone") == backbone]
    if not same_test:
        return f"{base_reason} (none on this test set with this backbone)"
    matches: list[tuple[_Group, list[tuple[_Run, _Run]]]] = []
    details: list[str] = []
    for cand in same_test:
        shared = set(group.values) & set(cand.values)
        differ = sorted(k for k in shared if not _is_method_key(k) and group.values[k] != cand.values[k])
        if differ:
            details.append("baseline runs there differ in " + ", ".join(f"`{k}`" for k in differ))
            continue
        by_seed = {r.seed: r for r in cand.runs}
        pairs = [(r, by_seed[r.seed]) for r in group.runs if r.seed in by_seed
                 and np.array_equal(r.files, by_seed[r.seed].files)
                 and np.array_equal(r.labels, by_seed[r.seed].labels)]
        if pairs:
            matches.append((cand, pairs))
        else:
            details.append(f"no seed with identical test files and labels (baseline seeds "
                           f"{sorted(by_seed)}, this row {[r.seed for r in group.runs]})")
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        ids = ", ".join(m[0].experiment_id[:8] for m in matches)
        return f"ambiguous: {len(matches)} baseline experiments match ({ids})"
    return f"{base_reason} ({'; '.join(sorted(set(details)))})"


def _baseline_diffs(rows: list[Row], groups: list[_Group], baseline: str, n_resamples: int,
                    n_bins: int, seed: int) -> None:
    candidates = [g for g in groups if g.first.method == baseline]
    if not candidates:
        methods = sorted({g.first.method for g in groups})
        raise ValueError(f"baseline: no run of method {baseline!r}; available methods: {methods}")
    for row, group in zip(rows, groups, strict=True):
        if group.first.method == baseline:
            row.baseline_diff = {"baseline": baseline, "status": "baseline"}
            continue
        match = _baseline_match(group, candidates)
        if isinstance(match, str):
            row.baseline_diff = {"baseline": baseline, "status": "no match", "reason": match}
            continue
        base, pairs = match
        base_row_variants = [v for v in VARIANTS if all(v in b.variants() for _, b in pairs)]
        variants = [v for v in row.variants if v in base_row_variants
                    and all(v in m.variants() for m, _ in pairs)]
        # a method run and its baseline run have identical test sets (_baseline_match)
        shared = _same_test_set([m for m, _ in pairs])
        row.baseline_diff = {
            "baseline": baseline, "status": "ok", "baseline_experiment_id": base.experiment_id,
            "baseline_directories": [b.directory for _, b in pairs],
            "seeds": [m.seed for m, _ in pairs],
            "variants": {v: _paired_difference(pairs, v, n_resamples, n_bins, seed, shared)
                         for v in variants},
        }
        if not shared:
            note = ("the seeds have different test files or labels: the baseline interval "
                    "resamples each seed independently")
            row.baseline_diff["note"] = note
            row.notes.append(note)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


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


def _order(path: Path, root: Path) -> tuple:
    try:
        return (0, path.relative_to(root).parts)
    except ValueError:
        return (1, path.parts)


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
                    across, notes, _partial_keys(groups, columns), _test_sets(groups))


def summarize(root: str | os.PathLike[str], n_resamples: int = 1000, n_bins: int = 15,
              baseline: str | None = None, seed: int = 0, *,
              runs: Iterable[str | os.PathLike[str]] | None = None) -> list[Row]:
    """One :class:`Row` per experiment below ``root``, sorted by backbone, dataset, method and
    the varying keys; every number recomputed from ``predictions.npz`` at ``n_bins`` bins.

    Per variant v and metric m, ``stats["v.m"]`` holds the mean and std (ddof = 0) over seeds;
    ``n_test`` the number of test images of each seed. ``ece_ci[v]`` is the 95 % stratified
    percentile-bootstrap interval of the seed mean of ECE with ``n_resamples`` resamples: the
    seeds of a row share one test set, so resample b is one stratified index set ``idx_b`` of it
    (:func:`~calibprompt.metrics.stratified_bootstrap_indices`, seeded from ``seed`` alone),
    shared by all S seeds, and the interval is the 2.5 / 97.5 percentiles of
    ``(1/S) sum_s ECE(run_s, idx_b)`` over b (S = 1: of the run's resampled ECE). Should the
    seeds of a row have different test files or labels, each is resampled independently and
    the row gets a note. With ``baseline``, ``baseline_diff`` holds the paired
    difference (see :func:`write_report`). ``runs`` restricts the report to these run
    directories (e.g. those of one sweep) instead of every run below ``root``; paths in the report
    stay relative to ``root``. Raises ``ValueError`` for invalid arguments, a root without runs or
    an unknown baseline.
    """
    return _summary(root, n_resamples, n_bins, baseline, seed, runs).rows


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def _pct(value: float, signed: bool = False) -> str:
    if not np.isfinite(value):
        return _MISSING
    return f"{100.0 * value:+.2f}" if signed else f"{100.0 * value:.2f}"


def _value(metric: str, value: float) -> str:
    if not np.isfinite(value):
        return _MISSING
    return _pct(value) if metric in PERCENT else f"{value:.4f}"


def _cell(row: Row, variant: str, metric: str, latex: bool = False) -> str:
    st = row.stats[f"{variant}.{metric}"]
    mean, std = _value(metric, st["mean"]), _value(metric, st["std"])
    if latex:
        return f"${mean}$" if len(row.seeds) == 1 else f"${mean} \\pm {std}$"
    return mean if len(row.seeds) == 1 else f"{mean} ± {std}"


def _class_cell(stat: dict[str, float], n_seeds: int, latex: bool = False) -> str:
    mean, std = _pct(stat["mean"]), _pct(stat["std"])
    if latex:
        if mean == _MISSING:
            return "---"
        return f"${mean}$" if n_seeds == 1 else f"${mean} \\pm {std}$"
    return mean if n_seeds == 1 or mean == _MISSING else f"{mean} ± {std}"


def _n_cell(row: Row, sep: str = "/") -> str:
    """Test images of the row: one number, or one per seed (in seed order) where they differ."""
    sizes = sorted(set(row.n_test))
    return str(sizes[0]) if len(sizes) == 1 else sep.join(map(str, row.n_test))


def _support(support: int | list[int], sep: str = "/") -> str | int:
    return support if isinstance(support, int) else sep.join(map(str, support))


def _table_label(key: str) -> str:
    """Column label of a varying key in the Markdown / LaTeX tables (never a fixed column's name)."""
    return f"identity.{key}" if key in _FIXED_TABLE else key


def _fixed_values(row: Row) -> dict[str, str]:
    return {"backbone": row.backbone, "dataset": row.dataset, "method": row.method, "kind": row.kind,
            "experiment_id": row.experiment_id}


def _csv_columns(s: _Summary) -> list[tuple[str, str]]:
    """``(key, label)`` of the varying keys in the CSV files. A key named like a fixed column is
    left out where it repeats that column in every row, and labelled ``identity.<key>``
    otherwise: no column name appears twice."""
    out = []
    for key in s.columns:
        if key not in _FIXED_CSV:
            out.append((key, key))
        elif not all(r.varying[key] == _fixed_values(r)[key]
                     or (r.varying[key] == _MISSING and not _fixed_values(r)[key]) for r in s.rows):
            out.append((key, f"identity.{key}"))
    return out


def _csv_value(value: str) -> str:
    """A varying key's CSV cell: empty where the key does not apply (never the table's dash)."""
    return "" if value == _MISSING else value


def _interval(low: float, high: float, signed: bool = False) -> str:
    return f"[{_pct(low, signed)}, {_pct(high, signed)}]"


def _md(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], lines: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md(c) for c in line) + " |" for line in lines]
    return out


def _keys(keys: Sequence[str]) -> str:
    return ", ".join(f"`{k}`" for k in keys)


def _float(value: float) -> str:
    return repr(float(value)) if np.isfinite(value) else ""


def _csv(header: Sequence[str], lines: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for line in lines:
        writer.writerow([_float(c) if isinstance(c, float) else c for c in line])
    return buffer.getvalue()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
                  "|": r"\textbar{}"}


def _tex(text: Any) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in str(text))


def _diff_cell(diff: dict[str, Any] | None, variant: str, metric: str, latex: bool = False) -> str:
    if diff is None:
        return ""
    if diff["status"] == "baseline":
        return "baseline"
    if diff["status"] != "ok":
        return "n/a" if latex else diff["reason"]
    if variant not in diff["variants"]:
        return "n/a" if latex else "baseline lacks this variant"
    d = diff["variants"][variant][metric]
    if latex:
        return f"${_pct(d['diff'], True)}$ $[{_pct(d['low'], True)}, {_pct(d['high'], True)}]$"
    return f"{_pct(d['diff'], True)} {_interval(d['low'], d['high'], True)}"


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _header_lines(s: _Summary, n_resamples: int, n_bins: int, baseline: str | None, seed: int) -> list[str]:
    old = [d for d, r in s.skipped if r == _OLD_SCHEMA]
    other = [(d, r) for d, r in s.skipped if r != _OLD_SCHEMA]
    lines = [
        "# calibprompt report", "",
        f"- **{s.n_runs} run(s) in {len(s.rows)} row(s).** A row is one experiment: runs whose "
        "identity (config.json) differs in the seed alone; anything else is a separate row.",
        f"- **Bins: n_bins = {n_bins}.** Every number is recomputed from the runs' predictions.npz "
        f"at this bin count (not read from metrics.json). Binning: {BINNING_CONVENTION}.",
        "- **Cells:** mean ± std over seeds (population std, ddof = 0; a single value where a row "
        "has one seed). Accuracy, ECE, MCE and ACE in %; Brier and NLL as they are. ECE: top-label; "
        "MCE: largest bin gap; ACE: classwise equal-mass adaptive calibration error (Nixon et al. "
        "2019). The CSV files hold fractions, not percent.",
        "- **Variants:** uncalibrated = softmax(test_logits); + TS = softmax(test_logits / T) with "
        "the temperature T each run fitted (reported only where every run of the row has one).",
        f"- **ECE 95 % CI:** stratified percentile bootstrap (every class keeps its count), "
        f"{n_resamples} resamples, seeded from report seed {seed}. The seeds of a row share one test "
        "set, so each resample is one index set of that test set, the same for every seed of the "
        "row; the interval is the 2.5 / 97.5 percentiles over resamples of the seed mean of the "
        "resampled ECE (one seed: of that run's resampled ECE). Binned ECE is biased upwards and "
        "resampling (duplicated images) adds to that bias, so the interval can lie above the point "
        "estimate, which then lies outside it.",
        "- **n:** test images of the row (one number per seed, in the order of the seeds column, "
        "where they differ). Rows with different n or data columns were measured on different "
        "test sets and are not comparable.",
    ]
    if s.columns:
        labelled = ", ".join(f"`{k}`" + (f" (column `{_table_label(k)}`)" if _table_label(k) != k else "")
                             for k in s.columns)
        lines.append(f"- **Keys that differ between rows** (shown as columns): {labelled}.")
    else:
        lines.append("- **Keys that differ between rows:** none besides backbone, dataset and method.")
    if s.partial:
        described = []
        for key, count, values in s.partial:
            shown = ", ".join(values[:4]) + (", …" if len(values) > 4 else "")
            described.append(f"`{key}` ({count} of {len(s.rows)} rows: {shown})")
        lines.append("- **Keys that only some rows have** (equal wherever present, so not columns; "
                     "the other rows lack them): " + "; ".join(described) + ".")
    for backbone, dataset, sizes, count in s.test_sets:
        lines.append(f"- **{backbone} / {dataset}: rows on {count} different test sets** "
                     f"(n = {', '.join(map(str, sizes))}): compare only rows with equal `n` and data "
                     "columns (a run limited to part of the test split has fewer images).")
    if s.by_method:
        lines.append(f"- Method settings that the method name determines: {_keys(s.by_method)}.")
    if s.across:
        lines.append(f"- Keys that differ only between backbones or datasets: {_keys(s.across)}.")
    lines.append("- Data columns show the dataset root and the first 8 hex digits of the content "
                 "fingerprint; the `backbone` key (column `identity.backbone`) the first 8 hex digits "
                 f"of the weights' fingerprint; {_MISSING} = the setting does not apply to that row's "
                 "method.")
    lines.append("- Reliability diagrams pool the uncalibrated predictions of all seeds of a row; their "
                 "ECE is that of the pooled predictions, not the seed mean of the table.")
    if old:
        lines.append(f"- skipped: {len(old)} run(s) {_OLD_SCHEMA}: "
                     + ", ".join(f"`{_rel(d, s.root)}`" for d in old))
    for d, reason in other:
        lines.append(f"- skipped `{_rel(d, s.root)}`: {reason}")
    lines += [f"- note: {note}" for note in s.notes]
    if baseline is not None:
        lines.append(f"- **Baseline:** `{baseline}` (differences below).")
    return lines


def _identifying(row: Row, columns: Sequence[str]) -> list[str]:
    return [row.backbone, row.dataset, row.method, *(row.varying[k] for k in columns)]


def _markdown(s: _Summary, n_resamples: int, n_bins: int, baseline: str | None, seed: int) -> str:
    lines = _header_lines(s, n_resamples, n_bins, baseline, seed)
    ident = [*_FIXED_TABLE, *map(_table_label, s.columns)]
    lines += ["", "## Results", ""]
    lines += _md_table(
        [*ident, "seeds", "n", "variant", "acc %", "ECE %", "ECE 95 % CI", "MCE %", "ACE %", "Brier",
         "NLL"],
        ([*_identifying(r, s.columns), ", ".join(map(str, r.seeds)), _n_cell(r), VARIANT_LABELS[v],
          _cell(r, v, "accuracy"), _cell(r, v, "ece"), _interval(*r.ece_ci[v]),
          *(_cell(r, v, m) for m in METRICS[2:])] for r in s.rows for v in r.variants))

    lines += ["", "## Per-class results", "",
              "Recall: accuracy on the test images of the class. Classwise ECE of class k: "
              "sum_b (n_bk / N) |acc_bk − conf_bk| over equal-width bins of the probability of k, "
              "against the outcome 1[y = k]. Mean ± std over seeds, in %; n = test images of the class.",
              ""]
    lines += _md_table(
        [*ident, "variant", "class", "n", "recall %", "classwise ECE %"],
        ([*_identifying(r, s.columns), VARIANT_LABELS[v], c["name"], _support(c["support"]),
          _class_cell(c["recall"], len(r.seeds)), _class_cell(c["classwise_ece"], len(r.seeds))]
         for r in s.rows for v in r.variants for c in r.per_class[v]))
    binary = [(r, r.two_class) for r in s.rows if r.two_class]
    if binary:
        lines += ["", "### Two-class tasks: sensitivity and specificity", "",
                  "Positive class: class index 1 (named in the table); sensitivity = recall of class 1, "
                  "specificity = recall of class 0. In %.", ""]
        lines += _md_table(
            [*ident, "variant", "positive class", "sensitivity %", "specificity %"],
            ([*_identifying(r, s.columns), VARIANT_LABELS[v], f"{r.classnames[1]} (index 1)",
              _class_cell(two[v]["sensitivity"], len(r.seeds)), _class_cell(two[v]["specificity"], len(r.seeds))]
             for r, two in binary for v in r.variants))
    if baseline is not None:
        lines += ["", f"## Difference to the baseline `{_md(baseline)}`", "",
                  "Method − baseline in percentage points, on the seeds both have, each matched to a "
                  "baseline run on the same test set (same data fingerprint, identical test files and "
                  "labels), the same backbone and identical settings apart from the method's own keys "
                  f"({_keys(METHOD_KEYS)}) and keys only one of them has. Point value: mean over shared "
                  "seeds of the difference on the full test set. Interval: paired stratified bootstrap, "
                  f"{n_resamples} resamples; each resample draws one index set of the common test set, "
                  "shared by all seeds and by method and baseline, and takes the mean over seeds of the "
                  "difference; 2.5 / 97.5 percentiles.",
                  ""]
        body = []
        for r in s.rows:
            d = r.baseline_diff or {}
            seeds = ", ".join(map(str, d.get("seeds", []))) or _MISSING
            variants = r.variants if d.get("status") == "ok" else [r.variants[0]]
            for v in variants:
                label = VARIANT_LABELS[v] if d.get("status") == "ok" else _MISSING
                ece_cell = _diff_cell(d, v, "ece") if d.get("status") != "no match" else _MISSING
                body.append([*_identifying(r, s.columns), label, seeds, _diff_cell(d, v, "accuracy"),
                             ece_cell])
        lines += _md_table([*ident, "variant", "shared seeds", "Δ acc (pp) [95 % CI]",
                            "Δ ECE (pp) [95 % CI]"], body)
    lines += ["", "## Runs", ""]
    lines += _md_table(["backbone", "dataset", "method", "experiment", "diagram", "run directories"],
                       ([r.backbone, r.dataset, r.method, r.experiment_id[:12], f"reliability_{r.slug}.png",
                         " ".join(f"`{_rel(d, s.root)}`" for d in r.directories)] for r in s.rows))
    return "\n".join(lines) + "\n"


def _csv_main(s: _Summary, n_resamples: int, n_bins: int, baseline: str | None) -> str:
    columns = _csv_columns(s)
    header = [*_FIXED_CSV, *(label for _, label in columns), "variant", "seeds", "n_runs", "n_test",
              "n_bins"]
    for m in METRICS:
        header += [f"{m}_mean", f"{m}_std"]
    header += ["ece_ci_low", "ece_ci_high", "n_resamples"]
    if baseline is not None:
        header += ["baseline", "baseline_experiment_id", "baseline_seeds", "diff_accuracy",
                   "diff_accuracy_low", "diff_accuracy_high", "diff_ece", "diff_ece_low", "diff_ece_high",
                   "baseline_note"]
    lines = []
    for r in s.rows:
        for v in r.variants:
            line: list[Any] = [r.backbone, r.dataset, r.method, r.kind, r.experiment_id,
                               *(_csv_value(r.varying[k]) for k, _ in columns), v,
                               " ".join(map(str, r.seeds)), len(r.seeds), _n_cell(r, " "), n_bins]
            for m in METRICS:
                line += [r.stats[f"{v}.{m}"]["mean"], r.stats[f"{v}.{m}"]["std"]]
            line += [r.ece_ci[v][0], r.ece_ci[v][1], n_resamples]
            if baseline is not None:
                d = r.baseline_diff or {}
                if d.get("status") == "ok" and v in d["variants"]:
                    dv = d["variants"][v]
                    line += [baseline, d["baseline_experiment_id"], " ".join(map(str, d["seeds"])),
                             dv["accuracy"]["diff"], dv["accuracy"]["low"], dv["accuracy"]["high"],
                             dv["ece"]["diff"], dv["ece"]["low"], dv["ece"]["high"], d.get("note", "")]
                else:
                    note = {"baseline": "this is the baseline", "ok": "baseline lacks this variant"}.get(
                        d.get("status", ""), d.get("reason", ""))
                    line += [baseline, "", "", "", "", "", "", "", "", note]
            lines.append(line)
    return _csv(header, lines)


def _csv_per_class(s: _Summary, n_bins: int) -> str:
    columns = _csv_columns(s)
    header = [*_FIXED_CSV, *(label for _, label in columns), "variant", "seeds", "n_runs", "n_test",
              "n_bins", "class_index", "class", "support", "recall_mean", "recall_std",
              "classwise_ece_mean", "classwise_ece_std", "positive_class", "sensitivity_mean",
              "sensitivity_std", "specificity_mean", "specificity_std"]
    lines = []
    for r in s.rows:
        for v in r.variants:
            for c in r.per_class[v]:
                line: list[Any] = [r.backbone, r.dataset, r.method, r.kind, r.experiment_id,
                                   *(_csv_value(r.varying[k]) for k, _ in columns), v,
                                   " ".join(map(str, r.seeds)), len(r.seeds), _n_cell(r, " "), n_bins,
                                   c["index"], c["name"], _support(c["support"], " "),
                                   c["recall"]["mean"], c["recall"]["std"],
                                   c["classwise_ece"]["mean"], c["classwise_ece"]["std"]]
                if r.two_class:
                    t = r.two_class[v]
                    line += [r.classnames[1], t["sensitivity"]["mean"], t["sensitivity"]["std"],
                             t["specificity"]["mean"], t["specificity"]["std"]]
                else:
                    line += ["", "", "", "", ""]
                lines.append(line)
    return _csv(header, lines)


def _latex_table(caption: str, label: str, spec: str, header: Sequence[str],
                 body: Iterable[Sequence[str]]) -> list[str]:
    """One booktabs table (cells already LaTeX)."""
    lines = ["\\begin{table}[htbp]", "\\centering", "\\small", f"\\caption{{{caption}}}",
             f"\\label{{{label}}}", f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
             " & ".join(header) + " \\\\", "\\midrule"]
    lines += [" & ".join(cells) + " \\\\" for cells in body]
    return [*lines, "\\bottomrule", "\\end{tabular}", "\\end{table}"]


def _latex(s: _Summary, n_resamples: int, n_bins: int, baseline: str | None) -> str:
    ident = [_tex(h) for h in ("Backbone", "Dataset", "Method", *map(_table_label, s.columns))]
    header = [*ident, "Seeds", "$n$", "Variant", r"Acc.\ (\%)", r"ECE (\%)", r"ECE 95\,\% CI",
              r"MCE (\%)", r"ACE (\%)", "Brier", "NLL"]
    if baseline is not None:
        header += [r"$\Delta$Acc.\ (pp)", r"$\Delta$ECE (pp)"]
    spec = "l" * (len(ident) + 1) + "rl" + "r" * (len(header) - len(ident) - 3)
    caption = (f"Mean $\\pm$ std over seeds, recomputed at {n_bins} equal-width bins; $n$: test images "
               "(per seed where they differ); ECE interval: 95\\,\\% stratified percentile bootstrap "
               f"({n_resamples} resamples; of the seed mean, one index set per resample shared by the "
               "seeds). TS: temperature scaling.")
    if baseline is not None:
        caption += (f" $\\Delta$: method $-$ {_tex(baseline)} in percentage points with a paired "
                    "bootstrap 95\\,\\% interval.")
    body = []
    for r in s.rows:
        for v in r.variants:
            low, high = r.ece_ci[v]
            cells = [_tex(c) for c in _identifying(r, s.columns)]
            cells += [", ".join(map(str, r.seeds)), _n_cell(r), _tex(VARIANT_LABELS[v]),
                      _cell(r, v, "accuracy", True), _cell(r, v, "ece", True),
                      f"$[{_pct(low)}, {_pct(high)}]$", *(_cell(r, v, m, True) for m in METRICS[2:])]
            if baseline is not None:
                cells += [_diff_cell(r.baseline_diff, v, "accuracy", True),
                          _diff_cell(r.baseline_diff, v, "ece", True)]
            body.append(cells)
    lines = ["% calibprompt report; requires \\usepackage{booktabs}",
             *_latex_table(caption, "tab:calibprompt-report", spec, header, body), ""]

    class_header = [*ident, "Variant", "Class", "$n$", r"Recall (\%)", r"Classwise ECE (\%)"]
    class_spec = "l" * (len(ident) + 2) + "rrr"
    class_caption = ("Per class: recall (accuracy on the test images of the class) and classwise ECE "
                     f"of the class at {n_bins} equal-width bins, in \\%, mean $\\pm$ std over seeds; "
                     "$n$: test images of the class (per seed where they differ).")
    class_body = [[*(_tex(c) for c in _identifying(r, s.columns)), _tex(VARIANT_LABELS[v]),
                   _tex(c["name"]), str(_support(c["support"])),
                   _class_cell(c["recall"], len(r.seeds), True),
                   _class_cell(c["classwise_ece"], len(r.seeds), True)]
                  for r in s.rows for v in r.variants for c in r.per_class[v]]
    lines += _latex_table(class_caption, "tab:calibprompt-report-per-class", class_spec, class_header,
                          class_body)
    return "\n".join(lines) + "\n"


def build_report(root: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 n_resamples: int = 1000, n_bins: int = 15, baseline: str | None = None,
                 seed: int = 0, *, runs: Iterable[str | os.PathLike[str]] | None = None,
                 ) -> tuple[list[Row], dict[str, Path]]:
    """Write the report of the runs below ``root`` into ``out`` (default ``root``; created) and
    return its rows (as :func:`summarize` returns them) and the written files (as
    :func:`write_report` returns them): the report is computed once."""
    from calibprompt.plots import plot_reliability

    summary = _summary(root, n_resamples, n_bins, baseline, seed, runs)
    n_resamples, n_bins = int(n_resamples), int(n_bins)
    target = Path(out) if out is not None else Path(root)
    target.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {
        "markdown": write_text(target / "report.md", _markdown(summary, n_resamples, n_bins, baseline, int(seed))),
        "csv": write_text(target / "report.csv", _csv_main(summary, n_resamples, n_bins, baseline)),
        "per_class_csv": write_text(target / "report_per_class.csv", _csv_per_class(summary, n_bins)),
        "latex": write_text(target / "report.tex", _latex(summary, n_resamples, n_bins, baseline)),
    }
    for row, group in zip(summary.rows, summary.groups, strict=True):
        probs = np.concatenate([r.probs("uncalibrated") for r in group.runs])
        labels = np.concatenate([r.labels for r in group.runs])
        path = target / f"reliability_{row.slug}.png"
        seeds = ", ".join(map(str, row.seeds))
        settings = "".join(f"\n{k} = {v}" for k, v in row.varying.items() if v != _MISSING)
        plot_reliability(probs, labels, n_bins=n_bins, path=path,  # saving closes the figure
                         title=f"{row.backbone} / {row.dataset} / {row.method}{settings}\n"
                               f"uncalibrated, pooled over seeds {seeds}")
        written[f"reliability_{row.slug}"] = path
    return summary.rows, written


def write_report(root: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 n_resamples: int = 1000, n_bins: int = 15, baseline: str | None = None,
                 seed: int = 0, *, runs: Iterable[str | os.PathLike[str]] | None = None,
                 ) -> dict[str, Path]:
    """Write the report of the runs below ``root`` into ``out`` (default ``root``; created).

    Files: ``report.md`` (header: counts, n_bins, bootstrap method, varying keys, skipped runs;
    main table, per-class table, baseline differences), ``report.csv`` (one line per row and
    variant), ``report_per_class.csv`` (one line per row, variant and class), ``report.tex``
    (booktabs: main table, then per-class table) and ``reliability_<slug>.png`` per row
    (uncalibrated probabilities of all seeds concatenated). Every table shows the number of test
    images of a row (``n``; ``n_test`` in the CSV files, one per seed where they differ); CSV
    cells of settings that do not apply to a row are empty. Numbers as in :func:`summarize`.

    With ``baseline`` (a method name), every other row is paired with the baseline experiment on
    the same test set (data fingerprint, identical ``test_files`` and ``test_labels``), backbone
    and settings (identities equal except :data:`METHOD_KEYS` and keys only one has), on the
    seeds S both have: ``Δ = (1/|S|) sum_s [m(method_s) - m(baseline_s)]`` for accuracy and ECE,
    with the 95 % percentile interval of ``Δ_b = (1/|S|) sum_s [m(method_s, idx_b) -
    m(baseline_s, idx_b)]`` over resamples b, each one stratified index set ``idx_b`` of the
    common test set shared by all seeds and by method and baseline (seeds with different test
    sets: one index set per seed, and a note). ``runs`` restricts the report to these run
    directories (see :func:`summarize`). Returns ``{"markdown", "csv", "per_class_csv", "latex",
    "reliability_<slug>"...}`` → path (the files of :func:`build_report`, which also returns the
    rows). Deterministic: an unchanged rerun writes identical bytes.
    """
    return build_report(root, out, n_resamples, n_bins, baseline, seed, runs=runs)[1]
