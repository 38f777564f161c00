"""Baseline differences: match every row with the baseline method's experiment on the same test
set, backbone and settings, and compute the paired-bootstrap difference
``Δ = (1/|S|) sum_s [m(method_s) - m(baseline_s)]`` in accuracy and ECE with its interval."""

from __future__ import annotations

import numpy as np

from calibprompt.metrics import accuracy, ece, stratified_bootstrap_indices
from calibprompt.runs.report.collect import _Run
from calibprompt.runs.report.constants import CONFIDENCE, VARIANTS, _is_method_key
from calibprompt.runs.report.rows import Row, _Group
from calibprompt.runs.report.stats import (
    _blocks,
    _resampled_ece,
    _same_test_set,
    _stream_seed,
    _top_label,
)


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
