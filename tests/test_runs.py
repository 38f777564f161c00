"""The run machinery end to end on the embedded demo model: run directories, identity, resume,
the train / zeroshot / sweep / report / evaluate / calibrate / predict / metrics commands."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from safetensors.torch import load_file

from calibprompt.cli import main
from calibprompt.demo.tissue import write_demo_dataset
from calibprompt.metrics import METRICS_VERSION
from calibprompt.runs import PromptRunConfig, RunConfig, execute_run


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_data")
    write_demo_dataset(root, per_class={"train": 12, "test": 20})
    return root


def config(root, cache, **kw):
    base = {"backbone": "demo", "dataset": "demo", "root": str(root), "method": "ce", "shots": 4,
            "seed": 1, "views": 2, "epochs": 3, "val_per_class": 3, "cache": str(cache), "workers": 0,
            "progress": False}
    return RunConfig(**{**base, **kw})


def test_run_directory_contents_and_skip(demo_root, tmp_path):
    cfg = config(demo_root, tmp_path / "cache")
    result = execute_run(cfg, tmp_path / "runs")
    d = result.directory
    assert d.parent.parent.parent.name == "demo" and d.name.startswith("4shot-seed1-calibperclass5-epochs3-")
    for name in ("config.json", "metrics.json", "predictions.npz", "prompt.safetensors", "log.json",
                 "classifier.safetensors", "reliability.png", "splits/few_shot.json", "splits/validation.json",
                 "splits/calibration.json"):
        assert (d / name).is_file(), name
    assert not (d / "checkpoint.json").exists() and not list(d.parent.glob(".*"))  # no leftovers
    record = json.loads((d / "config.json").read_text())
    identity = record["identity"]
    assert record["schema_version"] == 2 and record["run_id"].startswith(d.name[-10:])
    assert identity["config"]["epochs"] == 3 and identity["config"]["warmup_lr"] == 1e-5  # defaults resolved
    assert set(identity["data"]) == {"train", "test"} and identity["backbone"] and identity["metrics_version"] == METRICS_VERSION
    assert (identity["precision"], identity["device_kind"]) == ("fp32", "cpu") and "torch" in record["versions"]
    assert "root" not in identity["config"] and "cache" not in identity["config"]  # where files live: not identity
    assert record["objective"]["expression"] == "ce" and json.loads((d / "cache_tables.json").read_text())
    metrics = json.loads((d / "metrics.json").read_text())
    preds = np.load(d / "predictions.npz")
    assert preds["test_logits"].shape == (80, 4) and metrics["uncalibrated"]["n_samples"] == 80
    assert preds["test_files"].tolist() == sorted(preds["test_files"].tolist()) and preds["val_logits"].shape == (12, 4)
    # calibration: the default 16 per class, at most the 12 - 4 shots - 3 tuning = 5 left
    assert preds["calib_logits"].shape == (20, 4) and identity["config"]["calib_per_class"] == 5
    assert not set(preds["calib_files"]) & set(preds["val_files"])  # disjoint labelled splits
    assert metrics["calibrator"] == {"name": "temperature", "split": "calibration", "n_images": 20}
    assert metrics["temperature_scaled"]["accuracy"] == metrics["uncalibrated"]["accuracy"]
    assert len(json.loads((d / "log.json").read_text())) == 3
    again = execute_run(cfg, tmp_path / "runs")
    assert again.skipped and again.directory == d
    other = execute_run(config(demo_root, tmp_path / "cache", lr=0.01), tmp_path / "runs")
    assert other.directory != d  # a changed hyperparameter never resumes an old run


def test_same_seed_same_metrics_and_resume_equals_uninterrupted(demo_root, tmp_path, monkeypatch):
    cfg = config(demo_root, tmp_path / "cache", method="calibprompt", epochs=4)
    a = execute_run(cfg, tmp_path / "a")
    b = execute_run(cfg, tmp_path / "b")
    assert a.metrics["uncalibrated"] == b.metrics["uncalibrated"]

    import calibprompt.methods.coop as coop

    original = coop.train_prompts

    def interrupted(jobs):
        def hook(log, learner, optimizer, on_epoch=jobs[0].on_epoch):
            on_epoch(log, learner, optimizer)
            if log.epoch == 1:
                raise KeyboardInterrupt("killed after epoch 1")
        return original([dataclasses.replace(jobs[0], on_epoch=hook)])

    monkeypatch.setattr(coop, "train_prompts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        execute_run(cfg, tmp_path / "c")
    monkeypatch.setattr(coop, "train_prompts", original)
    partial = next((tmp_path / "c").rglob("checkpoint.json"))
    assert json.loads(partial.read_text())["epoch"] == 1 and not (partial.parent / "metrics.json").exists()
    assert partial.parent.name.startswith(".") and partial.parent.name.endswith(".partial")
    assert not [p for p in partial.parent.parent.iterdir() if not p.name.startswith(".")]  # nothing half-written
    resumed = execute_run(cfg, tmp_path / "c")
    assert not resumed.skipped
    assert resumed.metrics["uncalibrated"] == a.metrics["uncalibrated"]
    ctx_a = load_file(str(a.directory / "prompt.safetensors"))["ctx"]
    ctx_c = load_file(str(resumed.directory / "prompt.safetensors"))["ctx"]
    assert (ctx_a - ctx_c).abs().max() < 1e-6


def test_train_and_zeroshot_commands(demo_root, tmp_path, capsys):
    common = ["--backbone", "demo", "--dataset", "demo", "--root", str(demo_root), "--out", str(tmp_path / "runs"),
              "--cache", str(tmp_path / "cache"), "--workers", "0"]
    assert main(["zeroshot", *common, "--quiet"]) == 0
    assert "accuracy" in capsys.readouterr().out
    zs = next((tmp_path / "runs" / "demo" / "demo" / "zeroshot").iterdir())
    assert zs.name.startswith("seed1-") and "shot" not in zs.name  # no '8shot' on a zero-shot run
    assert "shots" not in json.loads((zs / "config.json").read_text())["identity"]["config"]
    assert main(["train", *common, "--shots", "4", "--epochs", "2", "--views", "2",
                 "--objective", "ls(alpha=0.1) + smac(alpha=0.1) + 3*as"]) == 0
    assert "run directory" in capsys.readouterr().out
    assert main(["train", *common, "--shots", "4", "--epochs", "2", "--views", "2",
                 "--objective", "ls(alpha=0.1) + smac(alpha=0.1) + 3*as"]) == 0
    assert "already finished" in capsys.readouterr().out


@pytest.mark.parametrize("preset", ["ce", "ls", "focal", "mdca", "dca", "mmce", "mbls", "logitnorm",
                                    "zsnorm", "penalty", "smac", "calibprompt"])
def test_every_preset_runs_end_to_end(demo_root, tmp_path_factory, preset):
    cache = tmp_path_factory.getbasetemp() / "preset_cache"  # shared: features encoded once
    result = execute_run(config(demo_root, cache, method=preset, epochs=2, views=1),
                         tmp_path_factory.mktemp(preset))
    metrics = result.metrics["uncalibrated"]
    assert 0.25 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["nll"])
    record = json.loads((result.directory / "config.json").read_text())
    assert record["objective"]["terms"]  # the resolved objective is recorded
    log = json.loads((result.directory / "log.json").read_text())
    assert len(log) == 2 and all(np.isfinite(e["loss"]) for e in log)


def test_training_shows_one_progress_bar_for_the_epochs(demo_root, tmp_path, progress_bars):
    import calibprompt.runs.execute as execute_module

    bars = progress_bars(execute_module)
    execute_run(config(demo_root, tmp_path / "cache", epochs=3, progress=True), tmp_path / "runs")
    assert len(bars) == 1
    (task,) = bars[0].tasks
    assert task.total == 3 and task.completed == 3 and task.description == "training ce"


def test_precision_auto_resolves_per_device_and_is_recorded(demo_root, tmp_path):
    from calibprompt.runs import CertifyRunConfig, TPTRunConfig

    for kind in (PromptRunConfig, TPTRunConfig, CertifyRunConfig):
        assert kind("demo", "demo", "x").precision == "fp32"
        assert kind("demo", "demo", "x", device="cuda:1").precision == "fp16"  # half on GPUs, fp32 masters
        assert kind("demo", "demo", "x", device="cuda", precision="bf16").precision == "bf16"
        assert kind("demo", "demo", "x", precision="fp32", device="cuda").precision == "fp32"
    with pytest.raises(ValueError, match="precision: expected auto"):
        PromptRunConfig("demo", "demo", str(demo_root), precision="fp8").validate()
    with pytest.raises(ValueError, match="on the CPU the encoder runs in fp32"):  # not a silent no-op
        PromptRunConfig("demo", "demo", str(demo_root), precision="bf16").validate()
    result = execute_run(config(demo_root, tmp_path / "cache", epochs=1), tmp_path / "runs")
    record = json.loads((result.directory / "config.json").read_text())
    assert record["config"]["precision"] == "fp32" and record["identity"]["precision"] == "fp32"
