"""The run report: rows compare like with like, numbers recomputed at one bin count, paired
baseline differences, deterministic output files -- on hand-made run directories."""

from __future__ import annotations

import ast
import csv
import hashlib
import inspect
import json

import numpy as np
import pytest
from scipy.special import softmax

from calibprompt.files import slug
from calibprompt.metrics import accuracy, classwise_ece, ece, nll, stratified_bootstrap_indices
from calibprompt.runs import report as report_module
from calibprompt.runs.report import (
    _stream_seed,
    build_report,
    collect_runs,
    per_class_ece,
    per_class_recall,
    summarize,
    write_report,
)

N, K = 40, 3
CLASSES = ["adipose tissue", "lymphocytes", "tumor"]


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def random_logits(seed: int, labels: np.ndarray, k: int = K, strength: float = 1.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(labels.shape[0], k)) * 2.0 + strength * np.eye(k)[labels]


def make_run(root, name, *, method="ce", seed=1, config=None, test="t" * 32, train="r" * 32,
             data_root="/data/demo", backbone_fp="b" * 32, dataset="demo", kind="prompt",
             logits=None, labels=None, files=None, temperature=None, classnames=None,
             schema_version=2):
    """A finished run directory: config.json (schema 2), metrics.json, predictions.npz."""
    labels = np.arange(N) % K if labels is None else np.asarray(labels)
    logits = random_logits(seed, labels) if logits is None else np.asarray(logits, dtype=np.float64)
    k = logits.shape[1]
    files = np.array([f"img{i:03d}.png" for i in range(labels.shape[0])]) if files is None else files
    cfg = {"method": method, "backbone": "demo", "dataset": dataset, "seed": seed, "n_bins": 15}
    cfg.update({"shots": 8, "epochs": 50, "lr": 0.002} if config is None else config)
    identity = {"kind": kind, "config": cfg, "data": {"train": train, "test": test},
                "backbone": backbone_fp, "protocol_version": 1, "metrics_version": 1,
                "precision": "fp32", "device_kind": "cpu"}
    no_seed = {**identity, "config": {k_: v for k_, v in cfg.items() if k_ != "seed"}}
    record = {"schema_version": schema_version, "kind": kind, "method": method, "backbone": "demo",
              "dataset": dataset, "seed": seed,
              "classnames": classnames or (CLASSES if k == 3 else [f"c{i}" for i in range(k)]),
              "run_id": _digest(identity), "experiment_id": _digest(no_seed), "identity": identity,
              "config": {**cfg, "root": data_root, "device": "cpu"}}
    if schema_version is None:
        del record["schema_version"]
    metrics = {"n_bins": 10, "uncalibrated": {"accuracy": 0.123, "ece": 0.456}}  # decoys
    if temperature is not None:
        metrics.update(temperature_scaled={"ece": 0.789}, temperature=temperature)
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(record))
    (d / "metrics.json").write_text(json.dumps(metrics))
    np.savez(d / "predictions.npz", test_logits=logits, test_labels=labels, test_files=files)
    return d


def probs_of(directory, temperature=1.0):
    with np.load(directory / "predictions.npz") as data:
        return softmax(data["test_logits"] / temperature, axis=1), data["test_labels"]


def resampled(fn, directory, idx, **kw):
    """``fn`` (a metric) of the run in ``directory`` on every resample (row) of ``idx``."""
    p, y = probs_of(directory)
    return np.array([fn(p[i], y[i], **kw) for i in idx])


def percentiles(values):
    return tuple(np.quantile(values, [0.025, 0.975]))


def test_rows_split_by_test_fingerprint_and_show_it(tmp_path):
    labels = np.arange(N) % K
    make_run(tmp_path, "a", dataset="imagefolder", test="a" * 32, data_root="/data/site_a",
             logits=5.0 * np.eye(K)[labels])
    make_run(tmp_path, "b", dataset="imagefolder", test="b" * 32, data_root="/data/site_b",
             logits=5.0 * np.eye(K)[(labels + 1) % K])
    rows = summarize(tmp_path, n_resamples=20)
    assert len(rows) == 2
    by_test = {r.varying["data.test"]: r.stats["uncalibrated.accuracy"]["mean"] for r in rows}
    assert by_test == {"/data/site_a (aaaaaaaa)": 1.0, "/data/site_b (bbbbbbbb)": 0.0}
    assert all(list(r.varying) == ["data.test"] for r in rows)  # nothing else differs


def test_epochs_are_separate_rows_named_in_the_table(tmp_path):
    make_run(tmp_path, "e10", config={"shots": 8, "epochs": 10, "lr": 0.002})
    make_run(tmp_path, "e50", config={"shots": 8, "epochs": 50, "lr": 0.002})
    make_run(tmp_path, "zs", method="zeroshot", config={}, train=None)
    rows = summarize(tmp_path, n_resamples=10)
    assert len(rows) == 3
    assert {r.varying["config.epochs"] for r in rows} == {"10", "50", "—"}  # zero-shot has none
    assert all("config.shots" not in r.varying for r in rows)  # equal where it applies
    text = write_report(tmp_path, out=tmp_path / "out", n_resamples=10)["markdown"].read_text()
    header = next(line for line in text.splitlines() if line.startswith("| backbone"))
    assert "config.epochs" in header and "config.shots" not in header
    assert "Keys that differ between rows** (shown as columns): `config.epochs`" in text


def test_seeds_of_one_experiment_are_averaged(tmp_path):
    dirs = [make_run(tmp_path, f"s{s}", seed=s) for s in (1, 2, 3)]
    make_run(tmp_path, "lr", seed=1, config={"shots": 8, "epochs": 50, "lr": 0.01})
    rows = summarize(tmp_path, n_resamples=10, n_bins=7)
    assert len(rows) == 2
    row = next(r for r in rows if r.varying["config.lr"] == "0.002")
    assert row.seeds == [1, 2, 3] and row.directories == dirs
    acc = [accuracy(*probs_of(d)) for d in dirs]
    eces = [ece(*probs_of(d), n_bins=7) for d in dirs]
    nlls = [nll(*probs_of(d)) for d in dirs]
    assert len(set(acc)) > 1  # the seeds really differ
    assert row.stats["uncalibrated.accuracy"] == pytest.approx({"mean": np.mean(acc), "std": np.std(acc)})
    assert row.stats["uncalibrated.ece"] == pytest.approx({"mean": np.mean(eces), "std": np.std(eces)})
    assert row.stats["uncalibrated.nll"]["mean"] == pytest.approx(np.mean(nlls))
    assert row.variants == ["uncalibrated"]


def test_ece_and_interval_are_at_the_reports_n_bins(tmp_path):
    d = make_run(tmp_path, "one", seed=4)
    p, y = probs_of(d)
    results = {}
    for n_bins in (3, 15):
        (row,) = summarize(tmp_path, n_resamples=50, n_bins=n_bins, seed=5)
        assert row.stats["uncalibrated.ece"]["mean"] == pytest.approx(ece(p, y, n_bins=n_bins))
        idx = stratified_bootstrap_indices(y, 50, seed=_stream_seed(5, "ece-interval", 0))
        expected = percentiles(resampled(ece, d, idx, n_bins=n_bins))
        assert row.ece_ci["uncalibrated"] == pytest.approx(expected)  # percentiles of its resampled ECE
        results[n_bins] = (row.stats["uncalibrated.ece"]["mean"], row.ece_ci["uncalibrated"])
    assert results[3][0] != results[15][0] and results[3][1] != results[15][1]
    assert ece(p, y, n_bins=15) != 0.456  # never the decoy of metrics.json


def test_ece_interval_of_several_seeds_bootstraps_the_seed_mean_on_shared_indices(tmp_path):
    dirs = [make_run(tmp_path, f"s{s}", seed=s) for s in (1, 2)]
    (row,) = summarize(tmp_path, n_resamples=40, n_bins=10, seed=3)
    idx = stratified_bootstrap_indices(np.arange(N) % K, 40, seed=_stream_seed(3, "ece-interval", 0))
    expected = percentiles(np.mean([resampled(ece, d, idx, n_bins=10) for d in dirs], axis=0))
    assert row.ece_ci["uncalibrated"] == pytest.approx(expected)
    assert not row.notes


def test_identical_seeds_give_exactly_the_one_seed_ece_interval(tmp_path):
    logits = random_logits(7, np.arange(N) % K)
    make_run(tmp_path / "one", "s1", seed=1, logits=logits)
    for s in (1, 2, 3):
        make_run(tmp_path / "three", f"s{s}", seed=s, logits=logits)
    (one,) = summarize(tmp_path / "one", n_resamples=200, seed=4)
    (three,) = summarize(tmp_path / "three", n_resamples=200, seed=4)
    assert three.seeds == [1, 2, 3]
    # one test set: copies of a seed add no information, the interval must not shrink
    assert three.ece_ci["uncalibrated"] == pytest.approx(one.ece_ci["uncalibrated"], rel=1e-12, abs=1e-15)
    assert one.ece_ci["uncalibrated"][0] < one.ece_ci["uncalibrated"][1]


def test_seeds_with_different_test_sets_are_resampled_independently_with_a_note(tmp_path):
    labels = np.arange(N) % K
    dirs = [make_run(tmp_path, "s1", seed=1),
            make_run(tmp_path, "s2", seed=2, files=np.array([f"x{i:03d}.png" for i in range(N)]))]
    (row,) = summarize(tmp_path, n_resamples=30, n_bins=10, seed=2)
    assert any("different test files or labels" in n for n in row.notes)
    samples = [resampled(ece, d, stratified_bootstrap_indices(labels, 30, seed=_stream_seed(2, "ece-interval", s, 0)),
                         n_bins=10) for d, s in zip(dirs, (1, 2), strict=True)]
    assert row.ece_ci["uncalibrated"] == pytest.approx(percentiles(np.mean(samples, axis=0)))


def test_temperature_scaled_variant_only_where_every_seed_has_one(tmp_path):
    a = make_run(tmp_path / "x", "s1", seed=1, temperature=2.0)
    make_run(tmp_path / "x", "s2", seed=2, temperature=1.5)
    make_run(tmp_path / "y", "s1", seed=1, temperature=2.0, test="c" * 32)
    make_run(tmp_path / "y", "s2", seed=2, test="c" * 32)
    rows = {r.varying["data.test"][-9:-1]: r for r in summarize(tmp_path, n_resamples=10)}
    both, mixed = rows["tttttttt"], rows["cccccccc"]
    assert both.variants == ["uncalibrated", "temperature_scaled"]
    assert mixed.variants == ["uncalibrated"] and "temperature_scaled.ece" not in mixed.stats
    assert any("temperature" in n for n in mixed.notes)
    b = tmp_path / "x" / "s2"
    expected = np.mean([ece(*probs_of(a, 2.0)), ece(*probs_of(b, 1.5))])
    assert both.stats["temperature_scaled.ece"]["mean"] == pytest.approx(expected)


def test_per_class_recall_and_ece_by_hand(tmp_path):
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 0, 2])
    make_run(tmp_path, "r", labels=labels, logits=3.0 * np.eye(3)[pred])
    (row,) = summarize(tmp_path, n_resamples=10, n_bins=4)
    recall = [c["recall"]["mean"] for c in row.per_class["uncalibrated"]]
    assert recall == pytest.approx([0.5, 1.0, 0.5])
    assert [c["support"] for c in row.per_class["uncalibrated"]] == [2, 2, 2]
    assert [c["name"] for c in row.per_class["uncalibrated"]] == CLASSES
    p = softmax(3.0 * np.eye(3)[pred], axis=1)
    cw = [c["classwise_ece"]["mean"] for c in row.per_class["uncalibrated"]]
    assert np.mean(cw) == pytest.approx(classwise_ece(p, labels, n_bins=4))

    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    # class 0: bin [.5,1] holds .8 and .6 (outcomes 1, 0): 2/3 * |0.5 - 0.7|; bin [0,.5) holds .3 (0): 1/3 * 0.3
    assert per_class_ece(probs, np.array([0, 1, 1]), n_bins=2) == pytest.approx([7 / 30, 7 / 30])
    assert per_class_recall(probs, np.array([0, 1, 1])) == pytest.approx([1.0, 0.5])


def test_sensitivity_specificity_of_a_two_class_task(tmp_path):
    labels = np.array([0, 0, 0, 1, 1])
    pred = np.array([0, 1, 0, 1, 0])
    make_run(tmp_path, "bin", labels=labels, logits=2.0 * np.eye(2)[pred], classnames=["normal", "tumor"])
    (row,) = summarize(tmp_path, n_resamples=10)
    two = row.two_class["uncalibrated"]
    assert two["sensitivity"]["mean"] == pytest.approx(1 / 2)  # tumor: 1 of 2 found
    assert two["specificity"]["mean"] == pytest.approx(2 / 3)  # normal: 2 of 3 kept
    written = write_report(tmp_path, out=tmp_path / "out", n_resamples=10)
    assert "tumor (index 1)" in written["markdown"].read_text()
    lines = list(csv.DictReader(written["per_class_csv"].open()))
    assert [line["class"] for line in lines] == ["normal", "tumor"]
    assert all(line["positive_class"] == "tumor" for line in lines)
    assert float(lines[0]["sensitivity_mean"]) == pytest.approx(0.5)
    assert float(lines[1]["recall_mean"]) == pytest.approx(0.5)


def test_paired_difference_to_an_identical_baseline_is_exactly_zero(tmp_path):
    for s in (1, 2, 3):
        logits = random_logits(s, np.arange(N) % K)
        make_run(tmp_path, f"zs{s}", method="zeroshot", seed=s, config={}, train=None, logits=logits)
        make_run(tmp_path, f"ce{s}", method="ce", seed=s, logits=logits)
    rows = {r.method: r for r in summarize(tmp_path, n_resamples=30, baseline="zeroshot")}
    assert rows["zeroshot"].baseline_diff["status"] == "baseline"
    diff = rows["ce"].baseline_diff
    assert diff["status"] == "ok" and diff["seeds"] == [1, 2, 3]
    for metric in ("accuracy", "ece"):
        assert diff["variants"]["uncalibrated"][metric] == {"diff": 0.0, "low": 0.0, "high": 0.0}


def test_paired_interval_of_identical_seed_copies_is_the_one_seed_interval(tmp_path):
    labels = np.arange(N) % K
    base, method = random_logits(1, labels, strength=0.5), random_logits(2, labels, strength=2.5)
    for root, seeds in ((tmp_path / "one", (1,)), (tmp_path / "three", (1, 2, 3))):
        for s in seeds:
            make_run(root, f"zs{s}", method="zeroshot", seed=s, config={}, train=None, logits=base)
            make_run(root, f"ce{s}", seed=s, logits=method)
    diffs = {}
    for name in ("one", "three"):
        rows = summarize(tmp_path / name, n_resamples=200, baseline="zeroshot", seed=9)
        diffs[name] = next(r for r in rows if r.method == "ce").baseline_diff
    assert diffs["three"]["seeds"] == [1, 2, 3] and "note" not in diffs["three"]
    one, three = diffs["one"]["variants"]["uncalibrated"], diffs["three"]["variants"]["uncalibrated"]
    for metric in ("accuracy", "ece"):
        assert three[metric]["low"] < three[metric]["high"]
        for key in ("diff", "low", "high"):
            assert three[metric][key] == pytest.approx(one[metric][key], rel=1e-12, abs=1e-15)
    # and the one-seed interval is the paired bootstrap on one shared index set per resample
    idx = stratified_bootstrap_indices(labels, 200, seed=_stream_seed(9, "paired", 0))
    run = tmp_path / "one"
    expected = percentiles(resampled(ece, run / "ce1", idx) - resampled(ece, run / "zs1", idx))
    assert (one["ece"]["low"], one["ece"]["high"]) == pytest.approx(expected)


def test_paired_difference_point_is_the_difference_of_means_on_shared_seeds(tmp_path):
    labels = np.arange(N) % K
    base, method = {}, {}
    for s in (1, 2, 3):
        base[s] = make_run(tmp_path, f"zs{s}", method="zeroshot", seed=s, config={}, train=None,
                           logits=random_logits(s, labels, strength=0.5))
    for s in (1, 2):
        method[s] = make_run(tmp_path, f"ce{s}", seed=s, logits=random_logits(10 + s, labels, strength=3.0))
    make_run(tmp_path, "other_test", seed=1, test="o" * 32, config={"shots": 4})
    rows = summarize(tmp_path, n_resamples=200, baseline="zeroshot")
    (ce_row,) = [r for r in rows if r.method == "ce" and r.seeds == [1, 2]]
    d = ce_row.baseline_diff["variants"]["uncalibrated"]
    for metric, fn in (("accuracy", accuracy), ("ece", ece)):
        expected = np.mean([fn(*probs_of(method[s])) for s in (1, 2)]) - np.mean(
            [fn(*probs_of(base[s])) for s in (1, 2)])
        assert d[metric]["diff"] == pytest.approx(expected)
        assert d[metric]["low"] <= d[metric]["high"]
    assert d["accuracy"]["low"] > 0  # the method is clearly better
    (other,) = [r for r in rows if r.method == "ce" and r.seeds == [1] and r is not ce_row]
    assert other.baseline_diff["status"] == "no match"
    assert "no baseline run on the same test set and seeds" in other.baseline_diff["reason"]
    with pytest.raises(ValueError, match=r"available methods: \['ce', 'zeroshot'\]"):
        summarize(tmp_path, n_resamples=10, baseline="tpt")


def test_baseline_needs_identical_test_files(tmp_path):
    make_run(tmp_path, "zs", method="zeroshot", config={}, train=None,
             files=np.array([f"other{i}.png" for i in range(N)]))
    make_run(tmp_path, "ce")
    (ce_row,) = [r for r in summarize(tmp_path, n_resamples=10, baseline="zeroshot") if r.method == "ce"]
    assert ce_row.baseline_diff["status"] == "no match"
    assert "identical test files" in ce_row.baseline_diff["reason"]


def test_outputs_latex_csv_and_byte_identical_rerun(tmp_path):
    runs = tmp_path / "runs"
    for s in (1, 2):
        make_run(runs, f"zs{s}", method="zeroshot", seed=s, config={}, train=None, temperature=1.3)
        make_run(runs, f"m{s}", method="ls_smac 50% & #1", seed=s, temperature=0.9)
    first = write_report(runs, out=tmp_path / "a", n_resamples=20, baseline="zeroshot")
    assert set(first) == {"markdown", "csv", "per_class_csv", "latex"} | {
        k for k in first if k.startswith("reliability_")}
    assert len([k for k in first if k.startswith("reliability_")]) == 2
    assert all(p.is_file() for p in first.values())
    tex = first["latex"].read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 2  # main and per-class table
    assert r"ls\_smac 50\% \& \#1" in tex and r"\pm" in tex
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0]
    assert "_" not in body.replace(r"\_", "")
    lines = list(csv.DictReader(first["csv"].open()))
    assert len(lines) == 4 and {line["variant"] for line in lines} == {"uncalibrated", "temperature_scaled"}
    assert {"accuracy_mean", "ece_std", "ece_ci_low", "ece_ci_high", "diff_ece_low"} <= set(lines[0])
    md = first["markdown"].read_text()
    assert "n_bins = 15" in md and "20 resamples" in md and "Difference to the baseline" in md
    assert "the same for every seed" in md and "resampled independently" not in md
    assert "shared by all seeds and by method and baseline" in md
    again = write_report(runs, out=tmp_path / "a", n_resamples=20, baseline="zeroshot")
    assert again == first
    contents = {k: p.read_bytes() for k, p in first.items()}
    third = write_report(runs, out=tmp_path / "b", n_resamples=20, baseline="zeroshot")
    assert {k: p.read_bytes() for k, p in third.items()} == contents  # no output path inside


def test_skipped_hidden_external_and_duplicate_runs(tmp_path):
    good = make_run(tmp_path / "demo", "run1")
    make_run(tmp_path / "demo", "old", schema_version=1)
    make_run(tmp_path / "demo", "older", schema_version=None)
    make_run(tmp_path / "demo", ".run2.partial", seed=2)
    make_run(tmp_path / "external" / "site", "run3", seed=3)
    runs, skipped = collect_runs(tmp_path)
    assert runs == [good]
    assert [d.name for d, _ in skipped] == ["old", "older"]
    # a copied directory: same experiment, same seed
    import shutil

    shutil.copytree(good, tmp_path / "demo" / "run1_copy")
    (row,) = summarize(tmp_path, n_resamples=10)
    assert row.seeds == [1] and len(row.directories) == 1
    assert any("counted once" in n for n in row.notes)
    md = write_report(tmp_path, out=tmp_path / "out", n_resamples=10)["markdown"].read_text()
    assert "skipped: 2 run(s) written by an older calibprompt (re-run them)" in md
    assert "counted once" in md


def test_runs_argument_restricts_the_report(tmp_path):
    a = make_run(tmp_path, "a", seed=1)
    make_run(tmp_path, "b", seed=2)
    (row,) = summarize(tmp_path, n_resamples=10, runs=[a])
    assert row.seeds == [1]
    with pytest.raises(ValueError, match="not a finished run directory"):
        summarize(tmp_path, runs=[tmp_path / "nothing"])


def test_no_runs_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="no finished runs"):
        collect_runs(tmp_path)
    make_run(tmp_path / "external", "x")
    make_run(tmp_path, "old", schema_version=1)
    with pytest.raises(ValueError, match=r"no finished runs.*older calibprompt"):
        write_report(tmp_path)
    with pytest.raises(ValueError, match="no such directory"):
        summarize(tmp_path / "missing")
    make_run(tmp_path, "ok")
    with pytest.raises(ValueError, match="n_bins"):
        summarize(tmp_path, n_bins=0)
    with pytest.raises(ValueError, match="n_resamples"):
        write_report(tmp_path, n_resamples=0)


def test_slug_is_file_name_safe():
    assert slug("quilt net", "kather/2016", "ls(alpha=0.1) + smac(alpha=0.1)", "ab12cd34") == (
        "quilt_net_kather_2016_ls_alpha_0.1____smac_alpha_0.1__ab12cd34")
    assert slug("", "///", None) == "___"


def test_test_set_size_is_shown_and_keys_of_some_rows_are_listed(tmp_path):
    make_run(tmp_path, "full", seed=1)
    labels = np.arange(20) % K  # a test-time run on the first 20 images of the same split
    make_run(tmp_path, "limited", method="tpt", kind="tpt", seed=1, config={"limit": 20}, train=None,
             labels=labels, files=np.array([f"img{i:03d}.png" for i in range(20)]))
    rows, written = build_report(tmp_path, out=tmp_path / "out", n_resamples=10)
    assert {r.method: r.n_test for r in rows} == {"ce": [40], "tpt": [20]}
    md = written["markdown"].read_text()
    table = md.split("## Results")[1].split("## Per-class")[0].strip().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    n = header.index("n")
    assert sorted(line.strip("|").split("|")[n].strip() for line in table[2:]) == ["20", "40"]
    assert "Keys that only some rows have" in md and "`config.limit` (1 of 2 rows: 20)" in md
    assert "rows on 2 different test sets** (n = 20, 40)" in md
    lines = list(csv.DictReader(written["csv"].open()))
    assert {line["method"]: line["n_test"] for line in lines} == {"ce": "40", "tpt": "20"}
    assert {line["n_test"] for line in csv.DictReader(written["per_class_csv"].open())} == {"20", "40"}
    tex = written["latex"].read_text()
    main = tex.split(r"\bottomrule")[0]
    assert "$n$" in main and " & 20 & " in main and " & 40 & " in main


def test_n_per_seed_where_seeds_differ(tmp_path):
    make_run(tmp_path, "s1", seed=1)
    make_run(tmp_path, "s2", seed=2, labels=np.arange(30) % K)
    rows, written = build_report(tmp_path, out=tmp_path / "out", n_resamples=10)
    assert rows[0].n_test == [40, 30]
    assert "| 1, 2 | 40/30 |" in written["markdown"].read_text()
    assert {line["n_test"] for line in csv.DictReader(written["csv"].open())} == {"40 30"}


def test_csv_never_repeats_a_column_and_leaves_not_applicable_cells_empty(tmp_path):
    make_run(tmp_path, "e50")
    make_run(tmp_path, "zs", method="zeroshot", config={}, train=None)
    make_run(tmp_path, "tpt", method="tpt", kind="tpt", config={"limit": 40}, train=None)
    make_run(tmp_path, "other_weights", config={"shots": 8, "epochs": 10, "lr": 0.002}, backbone_fp="c" * 32)
    summary_columns = list(summarize(tmp_path, n_resamples=10)[0].varying)
    assert "kind" in summary_columns and "backbone" in summary_columns and "config.epochs" in summary_columns
    written = write_report(tmp_path, out=tmp_path / "out", n_resamples=10)
    for key in ("csv", "per_class_csv"):
        with written[key].open() as handle:
            header = next(csv.reader(handle))
        assert len(header) == len(set(header)), header
        assert header.count("kind") == 1 and "identity.backbone" in header
        lines = list(csv.DictReader(written[key].open()))
        assert {line["config.epochs"] for line in lines if line["method"] == "zeroshot"} == {""}
        assert {line["identity.backbone"] for line in lines} == {"bbbbbbbb", "cccccccc"}
        assert not any("—" in value for line in lines for value in line.values())
    md_header = next(line for line in written["markdown"].read_text().splitlines()
                     if line.startswith("| backbone"))
    cells = [c.strip() for c in md_header.strip("|").split("|")]
    assert len(cells) == len(set(cells)) and "identity.backbone" in cells


def test_latex_has_an_escaped_per_class_table(tmp_path):
    make_run(tmp_path, "r", classnames=["adipose_tissue", "B & T cells", "tumor 100%"])
    tex = write_report(tmp_path, out=tmp_path / "out", n_resamples=10)["latex"].read_text()
    assert tex.count(r"\begin{table}") == 2 and tex.count(r"\end{tabular}") == 2
    per_class = tex.split(r"\label{tab:calibprompt-report-per-class}")[1]
    body = per_class.split(r"\midrule")[1].split(r"\bottomrule")[0]
    assert r"adipose\_tissue" in body and r"B \& T cells" in body and r"tumor 100\%" in body
    assert len(body.strip().splitlines()) == 3  # one line per class
    assert r"Recall (\%)" in per_class and r"Classwise ECE (\%)" in per_class
    assert tex.index(r"\label{tab:calibprompt-report}") < tex.index(r"\label{tab:calibprompt-report-per-class}")


def test_schema_version_comes_from_the_identity_module():
    from calibprompt.runs import identity

    tree = ast.parse(inspect.getsource(report_module))
    assigned = [t.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Name)]
    assert "SCHEMA_VERSION" not in assigned
    assert any(isinstance(node, ast.ImportFrom) and node.module == "calibprompt.runs.identity"
               and "SCHEMA_VERSION" in [a.name for a in node.names] for node in tree.body)
    assert report_module.SCHEMA_VERSION == identity.SCHEMA_VERSION


def test_build_report_returns_rows_and_files_computed_once(tmp_path):
    for s in (1, 2):
        make_run(tmp_path / "runs", f"s{s}", seed=s, temperature=1.2)
    assert "build_report" in report_module.__all__
    rows, written = build_report(tmp_path / "runs", out=tmp_path / "a", n_resamples=20, seed=3)
    again = summarize(tmp_path / "runs", n_resamples=20, seed=3)
    assert [(r.experiment_id, r.stats, r.ece_ci, r.n_test) for r in rows] == [
        (r.experiment_id, r.stats, r.ece_ci, r.n_test) for r in again]
    paths = write_report(tmp_path / "runs", out=tmp_path / "b", n_resamples=20, seed=3)
    assert set(paths) == set(written)
    assert {k: p.read_bytes() for k, p in paths.items()} == {k: p.read_bytes() for k, p in written.items()}
