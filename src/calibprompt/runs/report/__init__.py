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

Modules, each importing only those listed before it (no cycles):
:mod:`~calibprompt.runs.report.constants` (names and keys),
:mod:`~calibprompt.runs.report.collect` (finding and loading runs),
:mod:`~calibprompt.runs.report.stats` (per-class metrics, bootstrap intervals),
:mod:`~calibprompt.runs.report.rows` (:class:`Row`, grouping, varying keys, row statistics),
:mod:`~calibprompt.runs.report.baseline` (baseline matching, paired differences),
:mod:`~calibprompt.runs.report.summary` (the report computed once),
:mod:`~calibprompt.runs.report.render` (Markdown, CSV and LaTeX text); this module holds the
public functions and re-exports the public names.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from calibprompt.files import write_text
from calibprompt.plots import plot_reliability
from calibprompt.runs.identity import SCHEMA_VERSION
from calibprompt.runs.report.collect import collect_runs
from calibprompt.runs.report.constants import (
    _MISSING,
    CONFIDENCE,
    METHOD_KEYS,
    METRICS,
    VARIANTS,
)
from calibprompt.runs.report.decisions import decision_lines
from calibprompt.runs.report.published import published_lines, tuning_lines
from calibprompt.runs.report.render import (
    _csv_main,
    _csv_per_class,
    _decisions_csv,
    _latex,
    _markdown,
    _published_csv,
    _published_markdown,
    _tuning_csv,
)
from calibprompt.runs.report.rows import Row
from calibprompt.runs.report.stats import (
    _stream_seed as _stream_seed,  # private; the tests derive the resample seeds with it
)
from calibprompt.runs.report.stats import per_class_ece, per_class_recall
from calibprompt.runs.report.summary import _summary

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


def build_report(root: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 n_resamples: int = 1000, n_bins: int = 15, baseline: str | None = None,
                 seed: int = 0, *, runs: Iterable[str | os.PathLike[str]] | None = None,
                 published: bool = False) -> tuple[list[Row], dict[str, Path]]:
    """Write the report of the runs below ``root`` into ``out`` (default ``root``; created) and
    return its rows (as :func:`summarize` returns them) and the written files (as
    :func:`write_report` returns them): the report is computed once."""
    summary = _summary(root, n_resamples, n_bins, baseline, seed, runs)
    n_resamples, n_bins = int(n_resamples), int(n_bins)
    target = Path(out) if out is not None else Path(root)
    target.mkdir(parents=True, exist_ok=True)
    markdown = _markdown(summary, n_resamples, n_bins, baseline, int(seed))
    beside = published_lines(summary.rows, summary.groups) if published else None
    if beside is not None:
        markdown += _published_markdown(beside, n_bins)
    written: dict[str, Path] = {
        "markdown": write_text(target / "report.md", markdown),
        "csv": write_text(target / "report.csv", _csv_main(summary, n_resamples, n_bins, baseline)),
        "per_class_csv": write_text(target / "report_per_class.csv", _csv_per_class(summary, n_bins)),
        "latex": write_text(target / "report.tex", _latex(summary, n_resamples, n_bins, baseline)),
    }
    decided = decision_lines(summary.rows, summary.groups)
    if decided:
        written["decisions_csv"] = write_text(target / "report_decisions.csv", _decisions_csv(decided))
    tuned = tuning_lines(summary.rows, summary.groups)
    if tuned:
        written["tuning_csv"] = write_text(target / "report_tuning.csv", _tuning_csv(tuned))
    if beside is not None:
        written["published_csv"] = write_text(target / "report_published.csv", _published_csv(beside))
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
                 published: bool = False) -> dict[str, Path]:
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

    With ``published``, rows run with a published setting (:mod:`.published`: the protocol's
    defaults at the published shots) get the published value beside the measured seed mean, in a
    section of ``report.md`` and in ``report_published.csv`` (``"published_csv"``), each with its
    source; rows without a counterpart are listed as such.

    Rows of runs made with ``--tune auto`` get a section of ``report.md`` with the values each seed
    chose (and what they were scored on), beside the paper's value for that backbone x dataset
    where one exists, and ``report_tuning.csv`` (``"tuning_csv"``: one line per run and
    hyperparameter). Rows whose runs carry decision rules (``referral.json``, ``conformal.json``)
    get a *Decisions* section (test coverage, error among accepted, mean set size; mean ± std over
    seeds) and ``report_decisions.csv`` (``"decisions_csv"``).
    """
    return build_report(root, out, n_resamples, n_bins, baseline, seed, runs=runs, published=published)[1]
