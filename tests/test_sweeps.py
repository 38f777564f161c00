"""Runs as a user meets them through the CLI: sweeps over several data roots and a grid, reports
that average only seeds of one experiment, and finished runs applied to new images (predict,
external evaluate, calibrate, metrics) -- for every kind of run."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import yaml
from scipy.special import softmax

from calibprompt.cli import main
from calibprompt.demo.tissue import write_demo_dataset
from calibprompt.runs import load_run, summarize


def imagefolder(root, seed, train=6, test=5):
    """The demo classes as a user's image folder (train/ and test/ splits, classnames.txt)."""
    base = write_demo_dataset(root / "gen", per_class={"train": train, "test": test}, seed=seed)
    shutil.copytree(base / "images", root / "data")
    shutil.copy(base / "classnames.txt", root / "data" / "classnames.txt")
    shutil.rmtree(root / "gen")
    return root / "data"


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return [imagefolder(tmp_path_factory.mktemp(f"site{s}"), seed=s) for s in (0, 1)]


def sweep_file(tmp_path, roots, **extra):
    spec = {"backbones": ["demo"], "datasets": [{"name": "imagefolder", "root": str(r)} for r in roots],
            "methods": ["zeroshot", "ce"], "seeds": [1, 2], "shots": 2, "epochs": 1, "views": 1,
            "val_per_class": 2, "cache": str(tmp_path / "cache"), "workers": 0, "progress": False,
            "out": str(tmp_path / "runs"), **extra}
    for key in extra.get("grid", {}):
        spec.pop(key, None)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_files(directory):
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_sweep_over_two_roots_reports_two_rows_and_reruns_what_changed(tmp_path, roots, capsys):
    local = [shutil.copytree(r, tmp_path / f"root{i}") for i, r in enumerate(roots)]
    path = sweep_file(tmp_path, local)
    assert main(["sweep", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("done") == 8 and "[8/8]" in out
    rows = summarize(tmp_path / "runs", n_resamples=20)
    assert len(rows) == 4  # 2 roots x 2 methods, each the mean of seeds 1 and 2
    assert all(r.seeds == [1, 2] for r in rows)
    by_root = {}
    for r in rows:
        roots_of_row = {json.loads((d / "config.json").read_text())["config"]["root"] for d in r.directories}
        assert len(roots_of_row) == 1  # a row never mixes data roots
        by_root.setdefault(roots_of_row.pop(), []).append(r.method)
    assert sorted(by_root) == sorted(str(r) for r in local)
    report = (tmp_path / "runs" / "report.md").read_text()
    assert "data.test" in report or "data.train" in report  # the report names what varies between rows

    # an unchanged rerun skips everything and leaves every file byte-identical
    before = run_files(tmp_path / "runs")
    assert main(["sweep", str(path)]) == 0
    assert capsys.readouterr().out.count("skipped (finished)") == 8
    assert run_files(tmp_path / "runs") == before

    # one changed test image under the first root re-runs exactly the runs on that root
    image = sorted((local[0] / "test").rglob("*.png"))[0]
    image.write_bytes(sorted((local[0] / "test").rglob("*.png"))[-1].read_bytes())
    assert main(["sweep", str(path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert sum("done" in line for line in lines) == 4 and sum("skipped" in line for line in lines) == 4
    # the sweep's report covers the sweep's runs only: still 4 rows, not the stale ones
    csv_rows = list(csv.DictReader((tmp_path / "runs" / "report.csv").open()))
    assert len({r["experiment_id"] if "experiment_id" in r else tuple(r.values())[:6] for r in csv_rows
                if r.get("variant", "uncalibrated") == "uncalibrated"}) == 4


def test_grid_runs_separate_rows_and_names_what_varies(tmp_path, roots, capsys):
    path = sweep_file(tmp_path, roots[:1], methods=["ce"], seeds=[1], grid={"epochs": [1, 2], "n_ctx": [2, 4]})
    assert main(["sweep", str(path)]) == 0
    capsys.readouterr()
    rows = summarize(tmp_path / "runs", n_resamples=20)
    assert len(rows) == 4 and all(len(r.seeds) == 1 for r in rows)
    assert {k.split(".")[-1] for r in rows for k in r.varying} >= {"epochs", "n_ctx"}
    combos = {(json.loads((r.directories[0] / "config.json").read_text())["identity"]["config"]["epochs"],
               json.loads((r.directories[0] / "config.json").read_text())["identity"]["config"]["n_ctx"]) for r in rows}
    assert combos == {(1, 2), (1, 4), (2, 2), (2, 4)}
    names = sorted(d.name for r in rows for d in r.directories)
    assert any("epochs2" in n for n in names) and any("nctx4" in n for n in names)  # names say what varies
    assert main(["report", str(tmp_path / "runs"), "--bootstrap", "20", "--n-bins", "10",
                 "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "10" in text and "epochs" in text
    assert "\\toprule" in (tmp_path / "rep" / "report.tex").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "grid": {"epochs": [1, -2]}}))
    assert main(["sweep", str(bad), "--out", str(tmp_path / "bad_runs")]) == 2
    assert "epochs" in capsys.readouterr().err and not (tmp_path / "bad_runs").exists()
    bad.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "grid": {"nonsense": [1]}}))
    assert main(["sweep", str(bad)]) == 2 and "nonsense" in capsys.readouterr().err


@pytest.fixture(scope="module")
def finished(roots, tmp_path_factory):
    """A prompt-tuning run and a test-time run (with tuning and calibration splits) on the first root."""
    tmp = tmp_path_factory.mktemp("finished")
    common = ["--backbone", "demo", "--dataset", "imagefolder", "--root", str(roots[0]), "--out", str(tmp / "runs"),
              "--cache", str(tmp / "cache"), "--workers", "0", "--quiet"]
    assert main(["train", *common, "--method", "ce", "--shots", "2", "--epochs", "1", "--views", "1",
                 "--val-per-class", "2"]) == 0
    assert main(["tpt", *common, "--method", "ctpt", "zeroshot", "--views", "4"]) == 0
    assert main(["tpt", *common, "--method", "tpt", "--views", "4", "--val-per-class", "2",
                 "--calib-per-class", "2"]) == 0
    runs = {d.parent.name: d for d in (tmp / "runs").glob("imagefolder/demo/*/*")}
    return tmp, runs


def test_predict_applies_every_kind_of_run_to_new_images(finished, roots, tmp_path, capsys):
    tmp, runs = finished
    folder = roots[0] / "test"
    for name in ("ce", "tpt-ctpt", "tpt-tpt"):
        run = runs[name]
        out = tmp_path / name
        assert main(["predict", str(run), str(folder), "--out", str(out), "--cache", str(tmp / "cache"),
                     "--workers", "0", "--quiet"]) == 0
        assert "image(s) classified" in capsys.readouterr().out
        table = list(csv.DictReader((out / "predictions.csv").open()))
        classnames = json.loads((run / "config.json").read_text())["classnames"]
        preds = np.load(run / "predictions.npz")
        assert len(table) == len(preds["test_files"])
        # the run applied to its own test images gives its own test probabilities
        own = dict(zip(preds["test_files"].tolist(), softmax(preds["test_logits"], axis=1), strict=True))
        for row in table:
            rel = str(__import__("pathlib").Path(row["path"]).relative_to(folder))
            probs = np.array([float(row[f"p_uncalibrated[{c}]"]) for c in classnames])
            assert np.allclose(probs, own[rel], atol=1e-5)
            assert row["predicted_class"] == classnames[int(own[rel].argmax())]
        info = json.loads((out / "predict.json").read_text())
        has_ts = "temperature" in json.loads((run / "metrics.json").read_text())
        assert (f"p_temperature_scaled[{classnames[0]}]" in table[0]) == has_ts == (info["calibrator"] is not None)
        if has_ts:
            assert info["calibrator"]["split"] == "calibration"
    # the same from Python
    result = load_run(runs["ce"]).predict([sorted(folder.rglob("*.png"))[0]], cache=str(tmp / "cache"),
                                          workers=0, progress=False)
    assert result.probs.shape == (1, 4) and np.allclose(result.probs.sum(1), 1.0)
    assert main(["predict", str(runs["ce"]), str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "no such file or folder" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_external_evaluation_calibrate_and_metrics_on_every_kind(finished, roots, tmp_path, capsys):
    _tmp, runs = finished
    for name in ("ce", "tpt-ctpt"):
        run = runs[name]
        own = json.loads((run / "metrics.json").read_text())
        args = ["evaluate", str(run), "--dataset", "imagefolder", "--root", str(roots[1]), "--workers", "0", "--quiet"]
        assert main(args) == 0
        ext = next((run / "external").iterdir())
        record = json.loads((ext / "config.json").read_text())
        assert record["root"] == str(roots[1]) and record["identity"]["run_id"] == json.loads((run / "config.json").read_text())["run_id"]
        metrics = json.loads((ext / "metrics.json").read_text())
        assert metrics["uncalibrated"]["n_samples"] == 20
        assert ("temperature_scaled" in metrics) == ("temperature" in own)
        assert main(args) == 0 and "already finished" in capsys.readouterr().out
        # external evaluation on the run's own test split reproduces its own test metrics
        assert main([*args[:3], "imagefolder", "--root", str(roots[0]), "--workers", "0", "--quiet"]) == 0
        same = next(json.loads((d / "metrics.json").read_text()) for d in (run / "external").iterdir()
                if json.loads((d / "config.json").read_text())["root"] == str(roots[0]))
        assert same["uncalibrated"]["accuracy"] == own["uncalibrated"]["accuracy"]
        assert same["uncalibrated"]["ece"] == pytest.approx(own["uncalibrated"]["ece"], abs=1e-9)
    wrong = tmp_path / "wrong"
    shutil.copytree(roots[1], wrong)
    (wrong / "classnames.txt").unlink()
    assert main(["evaluate", str(runs["ce"]), "--dataset", "imagefolder", "--root", str(wrong)]) == 2
    assert "not the run's classes" in capsys.readouterr().err

    assert "valperclass2" in runs["tpt-tpt"].name and "calibperclass2" in runs["tpt-tpt"].name  # named: not defaults
    # calibrate: a test-time run without a calibration split refuses in one line, saying how
    assert main(["calibrate", str(runs["tpt-ctpt"])]) == 2
    err = capsys.readouterr().err
    assert "--calib-per-class" in err and len(err.strip().splitlines()) == 1
    for name in ("ce", "tpt-tpt"):
        assert main(["calibrate", str(runs[name]), "--calibrator", "isotonic"]) == 0
        assert json.loads((runs[name] / "calibration_isotonic.json").read_text())["fitted_on"].startswith("calibration")
        # metrics reads a run's own predictions file (and directory), fitting on its calibration arrays
        own = json.loads((runs[name] / "metrics.json").read_text())
        bins = ["--n-bins", str(own["n_bins"])]  # 20 for test-time runs, as their papers
        assert main(["metrics", str(runs[name] / "predictions.npz"), *bins, "--json", str(tmp_path / f"{name}.json")]) == 0
        assert json.loads((tmp_path / f"{name}.json").read_text())["ece"] == pytest.approx(own["uncalibrated"]["ece"])
        assert main(["metrics", str(runs[name]), *bins, "--calibrate", "temperature", "--json", str(tmp_path / "t.json")]) == 0
        assert json.loads((tmp_path / "t.json").read_text())["ece"] == pytest.approx(own["temperature_scaled"]["ece"],
                                                                                    abs=1e-6)


def test_other_bins_remeasure_and_test_time_baselines_pair(finished, roots, tmp_path, capsys):
    tmp, runs = finished
    common = ["--backbone", "demo", "--dataset", "imagefolder", "--root", str(roots[0]), "--out", str(tmp / "runs"),
              "--cache", str(tmp / "cache"), "--workers", "0", "--quiet"]
    # other bins measure the finished run again instead of retraining it
    before = (runs["ce"] / "predictions.npz").read_bytes()
    assert main(["train", *common, "--method", "ce", "--shots", "2", "--epochs", "1", "--views", "1",
                 "--val-per-class", "2", "--n-bins", "7"]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "ECE(7 bins)" in out
    rebinned = json.loads((runs["ce"] / "metrics_7bins.json").read_text())
    assert rebinned["uncalibrated"]["n_bins"] == 7 and rebinned["temperature_scaled"]["n_bins"] == 7
    assert (runs["ce"] / "predictions.npz").read_bytes() == before
    assert json.loads((runs["ce"] / "metrics.json").read_text())["n_bins"] == 15
    # test-time zero-shot is the natural baseline of the TPT family: the rows pair
    rows = {r.method: r for r in summarize(tmp / "runs", n_resamples=20, baseline="tpt-zeroshot")}
    assert rows["tpt-ctpt"].baseline_diff["status"] == "ok"
    # --fit-on with a run's predictions fits on its validation arrays, never its test arrays
    fit = ["metrics", str(runs["ce"]), "--calibrate", "temperature", "--json", str(tmp_path / "a.json")]
    assert main(fit) == 0 and main([*fit[:-1], str(tmp_path / "b.json"), "--fit-on", str(runs["ce"])]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["calibrator"] == b["calibrator"]


def test_undefined_metrics_are_stored_as_null_and_limits_are_stratified(roots, tmp_path, capsys):
    from calibprompt.files import write_json
    from calibprompt.runs.execute import score
    from calibprompt.runs.tpt import stratified_subset

    # one class present: AUROC is undefined -- stored as null, not a crash writing metrics.json
    metrics = score(np.array([[3.0, 1.0, 0.0], [2.0, 0.5, 0.1]]), np.array([0, 0]), 10)
    assert metrics["uncalibrated"]["auroc"] is None
    write_json(tmp_path / "m.json", metrics)
    # --limit takes every class in proportion, the same subset for every seed and method
    labels = np.repeat([0, 1, 2, 3], [150, 150, 150, 150])
    chosen = stratified_subset(labels, 160)
    assert len(chosen) == 160 and np.bincount(labels[chosen]).tolist() == [40, 40, 40, 40]
    assert np.array_equal(chosen, stratified_subset(labels, 160)) and np.all(np.diff(chosen) > 0)
    assert np.bincount(np.repeat([0, 1], [90, 10])[stratified_subset(np.repeat([0, 1], [90, 10]), 20)]).tolist() == [18, 2]
    assert main(["tpt", "--backbone", "demo", "--dataset", "imagefolder", "--root", str(roots[0]), "--out",
                 str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"), "--workers", "0", "--quiet",
                 "--method", "zeroshot", "--limit", "8"]) == 0
    preds = np.load(next((tmp_path / "runs").rglob("predictions.npz")))
    assert np.bincount(preds["test_labels"]).tolist() == [2, 2, 2, 2]
    assert not list((tmp_path / "runs").rglob(".*.partial"))


def test_a_runs_predictions_file_stands_for_the_run(finished, capsys):
    _, runs = finished
    # a run's own predictions file stands for the run in calibrate and evaluate
    assert main(["calibrate", str(runs["ce"] / "predictions.npz")]) == 0
    assert main(["evaluate", str(runs["ce"] / "predictions.npz"), "--n-bins", "5"]) == 0
    assert (runs["ce"] / "metrics_5bins.json").is_file()
