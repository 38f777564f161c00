"""The command line: metrics, losses and the demo, including bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from calibprompt import metrics as M
from calibprompt.cli import main
from calibprompt.demo.calibration import simulate


@pytest.fixture
def predictions(tmp_path):
    z, y = simulate(300, n_classes=4, seed=0)
    zf, yf = simulate(60, n_classes=4, seed=1)
    np.savez(tmp_path / "test.npz", logits=z, labels=y)
    np.savez(tmp_path / "fit.npz", logits=zf, labels=yf)
    return tmp_path, z, y


def test_metrics_command_writes_json_and_plot(predictions, capsys):
    tmp, z, y = predictions
    code = main(["metrics", str(tmp / "test.npz"), "--n-bins", "10", "--bootstrap", "50",
                 "--json", str(tmp / "m.json"), "--plot", str(tmp / "r.png")])
    assert code == 0
    out = json.loads((tmp / "m.json").read_text())
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert out["ece"] == pytest.approx(M.ece(probs, y, 10))
    assert out["ece_ci"][0] <= out["ece_ci"][1]
    assert (tmp / "r.png").stat().st_size > 1000
    assert "ece" in capsys.readouterr().out


def test_metrics_with_temperature_scaling(predictions):
    tmp, _, _ = predictions
    assert main(["metrics", str(tmp / "test.npz"), "--calibrate", "temperature",
                 "--fit-on", str(tmp / "fit.npz"), "--json", str(tmp / "c.json")]) == 0
    out = json.loads((tmp / "c.json").read_text())
    assert out["calibrator"]["calibrator"] == "temperature"
    assert out["calibrator"]["temperature"] > 1.0  # the simulated model is overconfident


def test_losses_and_help_list_examples(capsys):
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    assert "smac" in out and "calibprompt" in out
    with pytest.raises(SystemExit):
        main(["metrics", "--help"])
    assert "examples:" in capsys.readouterr().out


def test_console_script_runs_the_demo(tmp_path):
    result = subprocess.run([sys.executable, "-m", "calibprompt.cli", "demo", "--simulated", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["metrics"]
    # temperature scaling fitted on 50 samples removes most of the simulated overconfidence
    assert rows["temperature"]["ece"] < rows["uncalibrated"]["ece"] / 3
    assert rows["temperature"]["accuracy"] == rows["uncalibrated"]["accuracy"]
    assert (tmp_path / "reliability_temperature.png").exists()
    assert "fitted temperature" in result.stdout


def test_splits_and_extract_commands(tmp_path, capsys, tiny_backbone):
    from calibprompt.data.synthetic import make_dataset_tree

    make_dataset_tree(tmp_path / "data", "covid", per_class=[12, 12])
    out = tmp_path / "splits"
    args = ["splits", "--dataset", "covid", "--root", str(tmp_path / "data"), "--shots", "4",
            "--seeds", "1", "2", "--validation", "--val-per-class", "3", "--out", str(out)]
    assert main(args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["covid_4shot_seed1.json", "covid_4shot_seed1_validation.json",
                     "covid_4shot_seed2.json", "covid_4shot_seed2_validation.json"]
    first = (out / "covid_4shot_seed1.json").read_text()
    assert main(args) == 0 and (out / "covid_4shot_seed1.json").read_text() == first  # reused
    text = capsys.readouterr().out
    assert "few-shot" in text and "[4, 4]" in text
    # --calibration: the tuning and calibration splits a run draws (the same sizes and images)
    calib = ["splits", "--dataset", "covid", "--root", str(tmp_path / "data"), "--shots", "4", "--seeds", "1",
             "--calibration", "--out", str(tmp_path / "c")]
    assert main(calib) == 0
    from calibprompt.data import SplitManifest, load_dataset
    from calibprompt.runs.common import labelled_sizes

    train = load_dataset("covid", tmp_path / "data", "train")
    sizes = labelled_sizes(train, 4, None, None, "covid")
    tuning = SplitManifest.load(tmp_path / "c" / "covid_4shot_seed1_validation.json")
    calibration = SplitManifest.load(tmp_path / "c" / "covid_4shot_seed1_calibration.json")
    assert (tuning.shots, calibration.shots) == sizes == (4, 4)  # 8 left per class: half each
    shots = set(SplitManifest.load(tmp_path / "c" / "covid_4shot_seed1.json").files)
    assert not (shots & set(tuning.files) or shots & set(calibration.files) or set(tuning.files) & set(calibration.files))
    assert main(["splits", "--dataset", "covid", "--root", str(tmp_path / "data"), "--shots", "4",
                 "--calib-per-class", "3", "--out", str(tmp_path / "e")]) == 2
    assert "--calib-per-class applies to --calibration" in capsys.readouterr().err

    weights = str(tiny_backbone.source)
    cache = tmp_path / "cache"
    common = ["extract", "--backbone", "quiltnet", "--weights", weights, "--dataset", "covid",
              "--root", str(tmp_path / "data"), "--cache", str(cache), "--workers", "0"]
    assert main([*common, "--split", "test"]) == 0
    assert "24 encoded, 0 already cached" in capsys.readouterr().out
    assert main([*common, "--split", "test"]) == 0
    assert "0 encoded, 24 already cached" in capsys.readouterr().out
    assert main([*common, "--split", "train", "--manifest", str(out / "covid_4shot_seed1.json"),
                 "--views", "2"]) == 0
    text = capsys.readouterr().out
    assert "8 images — 8 encoded, 0 already cached" in text and "2 augmented views: 16 encoded" in text


