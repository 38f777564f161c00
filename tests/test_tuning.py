"""--tune auto: hyperparameters chosen on the tuning split only -- recorded candidate by candidate,
the same whatever the test labels or the calibration split, deterministic for a seed, and the
chosen candidate equal to a run of the chosen objective."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from calibprompt.cli import main
from calibprompt.data import cv_folds
from calibprompt.methods import coop
from calibprompt.runs.directory import read_predictions
from tests.test_sweeps import imagefolder


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """The data, and a copy whose test labels are shuffled (images moved between class folders)."""
    tmp = tmp_path_factory.mktemp("tune")
    data = imagefolder(tmp, seed=0, train=12, test=10)
    shuffled = shutil.copytree(data, tmp / "shuffled")
    classes = sorted(p.name for p in (shuffled / "test").iterdir())
    moves = []
    for i, c in enumerate(classes):
        for j, image in enumerate(sorted((shuffled / "test" / c).iterdir())):
            if j % 2 == 0:  # half of each class to the next class's folder
                moves.append((image, shuffled / "test" / classes[(i + 1) % len(classes)] / f"moved_{c}_{image.name}"))
    for src, dst in moves:
        src.rename(dst)
    return data, shuffled


def tune(root, out, cache, *extra, search=("--search", "a=0.02,0.2", "--search", "w=0.1,3"), status=0):
    argv = ["train", "--backbone", "demo", "--dataset", "imagefolder", "--root", str(root), "--cache", str(cache),
            "--workers", "0", "--quiet", "--shots", "2", "--epochs", "2", "--views", "2", "--val-per-class", "3",
            "--objective", "ls(alpha=?a) + ?w*as", "--tune", "auto", *search, "--out", str(out), *extra]
    assert main(argv) == status
    if status:
        return None
    (run,) = [p.parent for p in out.rglob("metrics.json")]
    return run


def test_the_choice_never_looks_at_test_or_calibration_data(roots, tmp_path, capsys):
    data, shuffled = roots
    a = tune(data, tmp_path / "a", tmp_path / "cache")
    assert "chosen on the tuning split" in capsys.readouterr().out
    record = json.loads((a / "tuning.json").read_text())
    assert record["sampler"] == "grid" and len(record["candidates"]) == 4 and record["split"] == "tuning"
    assert {(c["values"]["a"], c["values"]["w"]) for c in record["candidates"]} == {
        (0.02, 0.1), (0.02, 3.0), (0.2, 0.1), (0.2, 3.0)}
    nll = [c["scores"]["nll"] for c in record["candidates"]]
    assert record["chosen"]["index"] == int(np.argmin(nll)) and record["chosen"]["scores"]["nll"] == min(nll)
    metrics = json.loads((a / "metrics.json").read_text())
    assert metrics["tuning"]["chosen"] == record["chosen"]["values"]
    assert metrics["calibrator"]["split"] == "calibration"  # temperature scaling: its own split
    assert json.loads((a / "config.json").read_text())["identity"]["config"]["objective"] == "ls(alpha=?a) + ?w*as"
    # test labels shuffled: every candidate scores the same, the same choice; the test metrics differ
    b = tune(shuffled, tmp_path / "b", tmp_path / "cache")
    assert json.loads((b / "tuning.json").read_text()) == record
    assert json.loads((b / "metrics.json").read_text())["uncalibrated"]["accuracy"] != metrics["uncalibrated"]["accuracy"]
    # another calibration split (size): the tuning data and the choice are the same
    c = tune(data, tmp_path / "c", tmp_path / "cache", "--calib-per-class", "2")
    assert json.loads((c / "tuning.json").read_text()) == record
    assert json.loads((c / "metrics.json").read_text())["calibrator"]["n_images"] == 8
    # deterministic for a seed: a second search from scratch gives the same record
    d = tune(data, tmp_path / "d", tmp_path / "cache2")
    assert json.loads((d / "tuning.json").read_text()) == record


def test_the_chosen_candidate_equals_a_run_of_the_chosen_objective(roots, tmp_path):
    data, _ = roots
    tuned = tune(data, tmp_path / "tuned", tmp_path / "cache")
    chosen = json.loads((tuned / "tuning.json").read_text())["chosen_objective"]
    argv = ["train", "--backbone", "demo", "--dataset", "imagefolder", "--root", str(data), "--cache",
            str(tmp_path / "cache"), "--workers", "0", "--quiet", "--shots", "2", "--epochs", "2", "--views", "2",
            "--val-per-class", "3", "--objective", chosen, "--out", str(tmp_path / "plain")]
    assert main(argv) == 0
    (plain,) = [p.parent for p in (tmp_path / "plain").rglob("metrics.json")]
    a, b = read_predictions(tuned), read_predictions(plain)
    assert np.array_equal(a["test_logits"].argmax(1), b["test_logits"].argmax(1))
    assert np.abs(a["test_logits"] - b["test_logits"]).max() < 1e-4  # trained in a lockstep group vs alone
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (tuned, plain))
    for key in ("accuracy", "ece", "nll"):
        assert abs(ma["uncalibrated"][key] - mb["uncalibrated"][key]) < 1e-6
    assert ma["temperature"] == pytest.approx(mb["temperature"], rel=1e-4)


def test_cv_folds_are_stratified_deterministic_and_per_class():
    labels = np.repeat([0, 1, 2], [7, 5, 3])
    folds = cv_folds(labels, 3, seed=4)
    for c in range(3):  # each class dealt to the folds in turn: sizes differ by at most one
        sizes = np.bincount(folds[labels == c], minlength=3)
        assert sizes.max() - sizes.min() <= 1 and sizes.sum() == (labels == c).sum()
    assert np.array_equal(folds, cv_folds(labels, 3, seed=4)) and not np.array_equal(folds, cv_folds(labels, 3, 5))
    # a class's folds do not depend on the other classes
    assert np.array_equal(folds[labels == 1], cv_folds(np.r_[labels[labels == 1], [0] * 11], 3, seed=4)[:5])
    with pytest.raises(ValueError, match="folds"):
        cv_folds(labels, 1, seed=0)


def test_cross_validated_search(roots, tmp_path, capsys):
    """--tune-folds K: candidates scored on out-of-fold predictions over the few-shot + tuning
    images (never test or calibration images); the run trains the chosen objective on the shots."""
    data, shuffled = roots
    a = tune(data, tmp_path / "a", tmp_path / "cache", "--tune-folds", "2")
    assert "chosen by 2-fold cross-validation" in capsys.readouterr().out
    record = json.loads((a / "tuning.json").read_text())
    assert record["split"] == "cross-validation" and record["folds"] == 2
    assert record["images"] == 4 * (2 + 3) and len(record["candidates"]) == 4  # 4 classes x (2 shots + 3 tuning)
    assert json.loads((a / "metrics.json").read_text())["tuning"]["split"] == "cross-validation"
    b = tune(shuffled, tmp_path / "b", tmp_path / "cache", "--tune-folds", "2", "--calib-per-class", "2")
    assert json.loads((b / "tuning.json").read_text()) == record
    holdout = json.loads((tune(data, tmp_path / "h", tmp_path / "cache") / "tuning.json").read_text())
    assert [c["scores"] for c in holdout["candidates"]] != [c["scores"] for c in record["candidates"]]
    # the run is the chosen objective trained on the few-shot split, as a plain run of it
    argv = ["train", "--backbone", "demo", "--dataset", "imagefolder", "--root", str(data), "--cache",
            str(tmp_path / "cache"), "--workers", "0", "--quiet", "--shots", "2", "--epochs", "2", "--views", "2",
            "--val-per-class", "3", "--objective", record["chosen_objective"], "--out", str(tmp_path / "plain")]
    assert main(argv) == 0
    (plain,) = [p.parent for p in (tmp_path / "plain").rglob("metrics.json")]
    assert np.abs(read_predictions(a)["test_logits"] - read_predictions(plain)["test_logits"]).max() < 1e-6


def test_an_interrupted_search_trains_only_the_missing_candidates(roots, tmp_path, monkeypatch):
    data, _ = roots
    six = ("--search", "a=0.02,0.1,0.2", "--search", "w=0.1,3")  # 6 candidates: batches of 4 and 2
    calls = []
    real = coop.train_prompts

    def failing(jobs):
        calls.append(len(jobs))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the second batch
        return real(jobs)

    monkeypatch.setattr(coop, "train_prompts", failing)
    tune(data, tmp_path / "runs", tmp_path / "cache", search=six, status=130)  # "interrupted; ... resumes"
    (partial,) = (tmp_path / "runs").rglob("*.partial")
    assert sorted(p.name for p in (partial / "parts" / "tuning").iterdir()) == [f"{i:04d}.safetensors" for i in range(4)]
    calls.clear()
    monkeypatch.setattr(coop, "train_prompts", lambda jobs: (calls.append(len(jobs)), real(jobs))[1])
    resumed = tune(data, tmp_path / "runs", tmp_path / "cache", search=six)
    assert calls == [2]  # only the last two candidates were trained
    assert not (resumed / "parts").exists()
    whole = tune(data, tmp_path / "whole", tmp_path / "cache", search=six)
    assert json.loads((resumed / "tuning.json").read_text()) == json.loads((whole / "tuning.json").read_text())
    assert np.array_equal(read_predictions(resumed)["test_logits"], read_predictions(whole)["test_logits"])


def tpt_tune(root, out, cache, *extra):
    argv = ["tpt", "--backbone", "demo", "--dataset", "imagefolder", "--root", str(root), "--cache", str(cache),
            "--workers", "0", "--quiet", "--views", "4", "--method", "soc", "--tune", "auto", "--search",
            "lam=1,30", "--search", "delta=0.1,1", "--val-per-class", "3", "--out", str(out), *extra]
    assert main(argv) == 0
    (run,) = [p.parent for p in out.rglob("metrics.json")]
    return run


def test_tpt_search_chooses_on_the_tuning_split_and_runs_with_the_choice(roots, tmp_path):
    data, shuffled = roots
    a = tpt_tune(data, tmp_path / "a", tmp_path / "cache")
    record = json.loads((a / "tuning.json").read_text())
    assert record["sampler"] == "grid" and record["objective"] == "soc(lam=?lam, delta=?delta)"
    assert len(record["candidates"]) == 4 and record["tuning_images"] == 12
    nll = [c["scores"]["nll"] for c in record["candidates"]]
    assert record["chosen"]["index"] == int(np.argmin(nll))
    identity = json.loads((a / "config.json").read_text())["identity"]["config"]
    assert "lam" not in identity and "delta" not in identity and identity["tune_objective"] == record["objective"]
    # neither the test labels nor the calibration split change the choice
    b = tpt_tune(shuffled, tmp_path / "b", tmp_path / "cache", "--calib-per-class", "2")
    assert json.loads((b / "tuning.json").read_text()) == record
    # the run adapts with the chosen values: the same predictions as a run given them
    values = record["chosen"]["values"]
    argv = ["tpt", "--backbone", "demo", "--dataset", "imagefolder", "--root", str(data), "--cache",
            str(tmp_path / "cache"), "--workers", "0", "--quiet", "--views", "4", "--method", "soc", "--lam",
            repr(values["lam"]), "--delta", repr(values["delta"]), "--val-per-class", "3", "--out", str(tmp_path / "p")]
    assert main(argv) == 0
    (plain,) = [p.parent for p in (tmp_path / "p").rglob("metrics.json")]
    ta, tb = read_predictions(a), read_predictions(plain)
    for key in ("test_logits", "val_logits"):
        assert np.abs(ta[key] - tb[key]).max() < 1e-9
    # and applied to new images (predict) with the chosen values, not the method's defaults
    from calibprompt.runs.apply import load_run

    files = sorted((data / "test").rglob("*.png"))[:3]
    new_a = load_run(a).predict(files, cache=tmp_path / "cache", progress=False, workers=0)
    new_b = load_run(plain).predict(files, cache=tmp_path / "cache", progress=False, workers=0)
    assert np.abs(new_a.logits - new_b.logits).max() < 1e-9


def test_report_shows_each_seeds_choice_beside_the_papers_value(roots, tmp_path, monkeypatch):
    from calibprompt.objective import CALIBPROMPT_HYPERPARAMETERS
    from calibprompt.runs import write_report
    from calibprompt.runs.report.published import paper_hyperparameters

    assert paper_hyperparameters("quiltnet", "kather", "calibprompt") == {"alpha": 0.01, "weight": 1.0}
    assert paper_hyperparameters("quiltnet", "kather", "ce") == {} == paper_hyperparameters("demo", "x", "calibprompt")
    data, _ = roots
    chosen = {}
    for seed in ("1", "2"):
        argv = ["train", "--backbone", "demo", "--dataset", "imagefolder", "--root", str(data), "--cache",
                str(tmp_path / "cache"), "--workers", "0", "--quiet", "--shots", "2", "--epochs", "1", "--views", "2",
                "--val-per-class", "3", "--method", "calibprompt", "--tune", "auto", "--search", "alpha=0.02,0.2",
                "--search", "weight=0.1,3", "--seed", seed, "--out", str(tmp_path / "runs")]
        assert main(argv) == 0
        (run,) = [p.parent for p in (tmp_path / "runs").rglob("tuning.json") if f"seed{seed}" in p.parent.name]
        chosen[int(seed)] = json.loads((run / "tuning.json").read_text())["chosen"]["values"]
    monkeypatch.setitem(CALIBPROMPT_HYPERPARAMETERS, ("demo", "imagefolder"), (0.05, 0.5))
    written = write_report(tmp_path / "runs", n_resamples=10)
    text = written["markdown"].read_text()
    section = text[text.index("## Hyperparameters chosen"):]
    row = next(line for line in section.splitlines() if "| alpha |" in line)
    assert f"| alpha=0.02,0.2 (16 trials) | {chosen[1]['alpha']:.4g}, {chosen[2]['alpha']:.4g} | 1, 2 | tuning split (nll) "\
           "| 0.05 |" in row
    lines = written["tuning_csv"].read_text().splitlines()
    assert lines[0] == ("backbone,dataset,method,experiment,hyperparameter,search,trials,seed,chosen,scored_on,metric,"
                        "paper,paper_source")
    weights = [row for row in csv.reader(lines[1:]) if row[4] == "weight"]
    assert [(w[5], int(w[7]), float(w[8]), float(w[11])) for w in weights] == [
        ("weight=0.1,3", 1, chosen[1]["weight"], 0.5), ("weight=0.1,3", 2, chosen[2]["weight"], 0.5)]
