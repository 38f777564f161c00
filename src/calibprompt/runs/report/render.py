"""The report's text: the Markdown report (header, main, per-class, two-class, baseline and run
tables), the two CSV files and the booktabs LaTeX tables, from a :class:`_Summary`. Cells are
mean ± std over seeds (percent for accuracy, ECE, MCE and ACE; fractions in the CSV files)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from calibprompt.metrics import BINNING_CONVENTION
from calibprompt.runs.report.collect import _rel
from calibprompt.runs.report.constants import (
    _FIXED_CSV,
    _FIXED_TABLE,
    _MISSING,
    _OLD_SCHEMA,
    METHOD_KEYS,
    METRICS,
    PERCENT,
    VARIANT_LABELS,
)
from calibprompt.runs.report.decisions import decision_lines
from calibprompt.runs.report.published import tuning_lines
from calibprompt.runs.report.rows import Row
from calibprompt.runs.report.summary import _Summary

# --------------------------------------------------------------------------------------------
# Cells and escaping
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
# The documents
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
    for sentence in s.held_out:
        lines.append(f"- **Held-out test set:** {sentence}; not a separate test split.")
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
    lines += _certification_lines(s)
    lines += _tuning_markdown(tuning_lines(s.rows, s.groups))
    lines += _decisions_markdown(decision_lines(s.rows, s.groups))
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


_PUBLISHED_COLUMNS = ["backbone", "dataset", "method", "metric", "measured_mean", "measured_std", "seeds",
                      "published", "source"]


def _published_markdown(lines: list[dict[str, Any]], n_bins: int) -> str:
    """The section of report.md with published values beside the measured ones."""
    out = ["", "## Beside the published values", ""]
    if not lines:
        out.append("No row was run with a published setting (the published protocol's defaults at the published "
                   "shots on a published backbone and dataset), so there is nothing to put beside.")
        return "\n".join(out) + "\n"
    out.append(f"Measured: mean ± std over seeds, uncalibrated, ECE with {n_bins} bins (the published ECE's bins "
               "are not stated). **Published** values are copied from the source named in each row, never "
               "measured here.")
    out.append("")
    table = [(r["backbone"], r["dataset"], r["method"], r["metric"] + " %",
              f"{r['measured_mean']:.2f} ± {r['measured_std']:.2f} ({r['seeds']} seeds)",
              f"{r['published']:.2f} (published)", r["source"]) for r in lines]
    out += _md_table(["backbone", "dataset", "method", "metric", "measured", "published", "source"], table)
    return "\n".join(out) + "\n"


def _published_csv(lines: list[dict[str, Any]]) -> str:
    return _csv(_PUBLISHED_COLUMNS, ([r[k] for k in _PUBLISHED_COLUMNS] for r in lines))


#: Radii of the certification table (a subset of those in metrics.json).
_CERT_RADII = ("0", "0.25", "0.5", "1")


def _certification_rows(s: _Summary) -> list[list[Any]]:
    """One line per certification row: σ, images, n, certified accuracy at :data:`_CERT_RADII`,
    abstention, smoothed accuracy, ECE of the vote share and of the clean base classifier (mean
    over the row's seeds, in %)."""
    out = []
    for row, group in zip(s.rows, s.groups, strict=True):
        certs = [r.certification for r in group.runs if r.certification]
        if not certs:
            continue

        def mean(get: Any, certs: list[dict[str, Any]] = certs) -> float:
            values = [v for v in (get(c) for c in certs) if v is not None]
            return 100 * float(np.mean(values)) if values else float("nan")

        out.append([row.backbone, row.dataset, row.method, f"{certs[0]['sigma']:g}", certs[0]["images"], certs[0]["n"],
                    *(mean(lambda c, r=r: c["certified_accuracy"].get(r)) for r in _CERT_RADII),
                    mean(lambda c: c["abstention_rate"]), mean(lambda c: c["smoothed_accuracy"]),
                    mean(lambda c: c["vote_share"]["all"]["ece"]), mean(lambda c: c["clean_base_classifier"]["ece"])])
    return out


def _certification_lines(s: _Summary) -> list[str]:
    rows = _certification_rows(s)
    if not rows:
        return []
    header = ["backbone", "dataset", "method", "σ", "images", "n", *(f"cert. acc. r={r} %" for r in _CERT_RADII),
              "abstained %", "smoothed acc %", "vote-share ECE %", "clean ECE %"]
    lines = ["", "## Certification (randomized smoothing)", "",
             "Certified accuracy at L2 radius r in the [0, 1] pixel space (correct and certified radius ≥ r; "
             "abstentions count as wrong), mean over seeds. The results table above measures these rows' smoothed "
             "probabilities (the mean softmax over the noise). Every radius is in `metrics.json` and each image "
             "in `certification.csv`.", ""]
    lines += _md_table(header, ([*r[:6], *(f"{v:.1f}" for v in r[6:])] for r in rows))
    return lines


def _tuning_markdown(lines: list[dict[str, Any]]) -> list[str]:
    """The section of report.md with the hyperparameters that ``--tune auto`` chose."""
    if not lines:
        return []
    out = ["", "## Hyperparameters chosen without the test set (--tune auto)", "",
           "Each seed's run chose its own values on labelled train-pool images (the tuning split, or "
           "cross-validation over the few-shot and tuning images); every candidate is in the run's `tuning.json`. "
           "Paper: the value published for this backbone and dataset, where there is one -- chosen there against "
           "test results, so not a value a new dataset could have.", ""]
    table = [(r["backbone"], r["dataset"], r["method"], r["experiment"], r["hyperparameter"],
              f"{r['search']} ({r['trials']} trials)", ", ".join(f"{v:.4g}" for v in r["chosen"]),
              ", ".join(map(str, r["seeds"])), f"{r['scored_on']} ({r['metric']})",
              "—" if r["paper"] is None else f"{r['paper']:g}") for r in lines]
    out += _md_table(["backbone", "dataset", "method", "experiment", "hyperparameter", "searched", "chosen", "seeds",
                      "chosen on", "paper"], table)
    return out


_TUNING_COLUMNS = ["backbone", "dataset", "method", "experiment", "hyperparameter", "search", "trials", "seed",
                   "chosen", "scored_on", "metric", "paper", "paper_source"]


def _tuning_csv(lines: list[dict[str, Any]]) -> str:
    """One line per tuned run and hyperparameter (``report_tuning.csv``)."""
    return _csv(_TUNING_COLUMNS, ([r["backbone"], r["dataset"], r["method"], r["experiment"], r["hyperparameter"],
                                   r["search"], r["trials"], seed, value, r["scored_on"], r["metric"],
                                   "" if r["paper"] is None else r["paper"], r["paper_source"]]
                                  for r in lines for seed, value in zip(r["seeds"], r["chosen"], strict=True)))


def _pct_stat(stat: dict[str, float] | None) -> str:
    return "—" if stat is None else f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _decisions_markdown(lines: list[dict[str, Any]]) -> list[str]:
    """The section of report.md with the rows' decision rules (``calibprompt referral`` /
    ``conformal``), measured on test."""
    if not lines:
        return []
    out = ["", "## Decisions (fitted on each run's calibration split, measured on test)", "",
           "Referral: accept a case when its confidence reaches the run's certified threshold (Learn then Test: error "
           "among accepted ≤ target with the stated probability); coverage = accepted cases, error = among accepted; "
           "seeds where no threshold was certified refer everything (coverage 0). Conformal: prediction sets with "
           "the stated coverage (marginal, or per class for Mondrian). Mean ± std over seeds, in % (set size: "
           "classes).", ""]
    referral = [r for r in lines if r["rule"] == "referral"]
    if referral:
        out += _md_table(["backbone", "dataset", "method", "seeds", "target", "coverage %", "error among accepted %",
                          "seeds without a threshold"],
                         [(r["backbone"], r["dataset"], r["method"], ", ".join(map(str, r["seeds"])),
                           *((f"error ≤ {r['settings']['max_error']:g} w.p. {r['settings']['confidence']:g}"
                              + (" (T-scaled)" if r["settings"]["probabilities"] == "temperature" else ""),
                              _pct_stat(r["coverage"]), _pct_stat(r["selective_error"]), str(r["unreachable"]))
                             if "note" not in r else (r["note"], "", "", ""))) for r in referral])
        out.append("")
    conformal = [r for r in lines if r["rule"] == "conformal"]
    if conformal:
        out += _md_table(["backbone", "dataset", "method", "seeds", "sets", "coverage %", "mean set size"],
                         [(r["backbone"], r["dataset"], r["method"], ", ".join(map(str, r["seeds"])),
                           *((f"{r['settings']['score']}, {r['settings']['coverage']:g}"
                              + (f" (λ {r['settings']['raps'][0]:g}, k {r['settings']['raps'][1]})"
                                 if r["settings"].get("raps") else "")
                              + (" per class" if r["settings"]["mondrian"] else "")
                              + (" (T-scaled)" if r["settings"]["probabilities"] == "temperature" else ""),
                              _pct_stat(r["coverage"]),
                              f"{r['mean_size']['mean']:.2f} ± {r['mean_size']['std']:.2f}")
                             if "note" not in r else (r["note"], "", ""))) for r in conformal])
    return out


_DECISION_COLUMNS = ["backbone", "dataset", "method", "rule", "seeds", "settings", "coverage_mean", "coverage_std",
                     "selective_error_mean", "selective_error_std", "unreachable", "mean_size_mean", "mean_size_std",
                     "note"]


def _decisions_csv(lines: list[dict[str, Any]]) -> str:
    """One line per row and rule (``report_decisions.csv``); fractions, not percent."""
    def cells(r: dict[str, Any]) -> list[Any]:
        def stat(key: str, part: str) -> Any:
            value = r.get(key)
            return "" if value is None else value[part]
        return [r["backbone"], r["dataset"], r["method"], r["rule"], " ".join(map(str, r["seeds"])),
                json.dumps(r.get("settings", {}), sort_keys=True), stat("coverage", "mean"), stat("coverage", "std"),
                stat("selective_error", "mean"), stat("selective_error", "std"), r.get("unreachable", ""),
                stat("mean_size", "mean"), stat("mean_size", "std"), r.get("note", "")]
    return _csv(_DECISION_COLUMNS, (cells(r) for r in lines))
