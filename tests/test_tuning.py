"""--tune auto: hyperparameters chosen on the tuning split only -- recorded candidate by candidate,
the same whatever the test labels or the calibration split, deterministic for a seed, and the
chosen candidate equal to a run of the chosen objective."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from calibprompt.cli import main
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


def tune(root, out, cache, *extra):
    argv = ["train", "--backbone", "demo", "--dataset", "imagefolder", "--root", str(root), "--cache", str(cache),
            "--workers", "0", "--quiet", "--shots", "2", "--epochs", "2", "--views", "2", "--val-per-class", "3",
            "--objective", "ls(alpha=?a) + ?w*as", "--tune", "auto", "--search", "a=0.02,0.2", "--search", "w=0.1,3",
            "--out", str(out), *extra]
    assert main(argv) == 0
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
