"""Executors: the same sweep and the same certification on a local Ray with two workers as in
this process -- equal results, finished work skipped on restart, a dead worker's unit retried,
a unit's own error reported after the others finish."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import yaml

from calibprompt.cli import main
from calibprompt.demo.tissue import write_demo_dataset
from calibprompt.runs.directory import read_predictions
from calibprompt.runs.executors import chunks, map_units

ray = pytest.importorskip("ray")  # in the test extras: CI runs these


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with two workers for the module (map_units reuses a running Ray)."""
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_data")
    write_demo_dataset(root, per_class={"train": 6, "test": 6})
    return root


def test_map_units_serial_and_chunks():
    seen = []
    assert map_units(lambda a, b: a * b, [(1, 2), (3, 4)], on_done=lambda i, r: seen.append((i, r)),
                     progress=False) == [2, 12]
    assert seen == [(0, 2), (1, 12)]
    assert chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunks([1], 4) == [[1]] and chunks([], 2) == []
    with pytest.raises(ValueError, match="executor"):
        map_units(print, [], "dask")
    with pytest.raises(ValueError, match="--executor ray"):
        map_units(print, [], "serial", workers=2)


def test_a_dead_worker_loses_only_its_unit_which_is_retried(local_ray, tmp_path):
    marker = tmp_path / "died"

    def unit(i):
        if i == 1 and not marker.exists():
            marker.write_text("once")
            os._exit(1)  # the worker process dies mid-unit
        return i * 10

    seen = []
    assert map_units(unit, [(0,), (1,), (2,)], "ray", on_done=lambda i, r: seen.append(i), progress=False) == [0, 10, 20]
    assert marker.exists() and sorted(seen) == [0, 1, 2]


def test_a_units_own_error_is_raised_after_the_others_finish(local_ray, tmp_path):
    def unit(i):
        (tmp_path / f"attempt-{i}-{os.getpid()}-{len(list(tmp_path.glob(f'attempt-{i}-*')))}").write_text("")
        if i == 0:
            raise FileNotFoundError("unit 0: no such image")
        return i

    seen = []
    with pytest.raises(FileNotFoundError, match="no such image"):
        map_units(unit, [(0,), (1,), (2,)], "ray", on_done=lambda i, r: seen.append(i), progress=False)
    assert sorted(seen) == [1, 2]  # the others finished
    assert len(list(tmp_path.glob("attempt-0-*"))) == 1  # an error of the unit itself is not retried


def _sweep(tmp_path, root):
    spec = {"backbones": ["demo"], "datasets": [{"name": "demo", "root": str(root)}],
            "methods": ["zeroshot", "ce", "calibprompt"], "seeds": [1, 2], "shots": 2, "epochs": 2, "views": 2,
            "cache": str(tmp_path / "cache"), "workers": 0, "progress": False, "grid": {"n_ctx": [4, 8]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _compare(a_root, b_root):
    runs = sorted(p.parent.relative_to(a_root) for p in a_root.rglob("metrics.json"))
    assert runs == sorted(p.parent.relative_to(b_root) for p in b_root.rglob("metrics.json"))
    for run in runs:
        a, b = (json.loads((r / run / "metrics.json").read_text()) for r in (a_root, b_root))
        pa, pb = read_predictions(a_root / run), read_predictions(b_root / run)
        assert np.array_equal(pa["test_logits"].argmax(1), pb["test_logits"].argmax(1))
        assert np.abs(pa["test_logits"] - pb["test_logits"]).max() < 1e-4
        for key in ("accuracy", "ece", "nll", "brier"):
            assert abs(a["uncalibrated"][key] - b["uncalibrated"][key]) < 1e-6, (run, key)
    return runs


def test_sweep_on_ray_equals_serial_and_restarts_skip_finished_runs(local_ray, demo_root, tmp_path, capsys,
                                                                     monkeypatch):
    path = _sweep(tmp_path, demo_root)
    assert main(["sweep", str(path), "--out", str(tmp_path / "serial")]) == 0
    assert main(["sweep", str(path), "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    out = capsys.readouterr().out
    assert "[12/12]" in out
    runs = _compare(tmp_path / "serial", tmp_path / "ray")
    assert len(runs) == 10  # 8 trained + 2 zero-shot (the n_ctx grid does not apply to zero-shot: run once)
    assert (tmp_path / "ray" / "report.md").is_file()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("metrics.json")}
    import calibprompt.runs.sweep as sweep_module

    def no_units(*args, **kwargs):
        raise AssertionError("a finished sweep dispatched units (and started Ray)")

    monkeypatch.setattr(sweep_module, "map_units", no_units)  # every run is finished: no unit, no Ray
    assert main(["sweep", str(path), "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped (finished)") == 12 and " done," not in out
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("metrics.json")}


def test_certify_on_ray_equals_serial(local_ray, demo_root, tmp_path):
    common = ["certify", "--backbone", "demo", "--dataset", "demo", "--root", str(demo_root), "--subset", "4",
              "--n0", "8", "--n", "32", "--batch-size", "16", "--cache", str(tmp_path / "cache"), "--workers", "0",
              "--quiet"]
    assert main([*common, "--out", str(tmp_path / "serial")]) == 0
    assert main([*common, "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    (a,) = (tmp_path / "serial").rglob("certification.csv")
    (b,) = (tmp_path / "ray").rglob("certification.csv")
    assert a.relative_to(tmp_path / "serial") == b.relative_to(tmp_path / "ray")  # the same identity
    rows_a, rows_b = (list(csv.DictReader(f.open())) for f in (a, b))
    assert len(rows_a) == len(rows_b) == 4
    for x, y in zip(rows_a, rows_b, strict=True):  # noise seeded per image, not per worker:
        for key in ("image", "label", "sigma", "prediction", "n_a", "n", "p_lower", "radius"):
            assert x[key] == y[key]  # the same counts, bounds and radii, digit for digit
        for key in (k for k in x if k.startswith("p_") and k != "p_lower"):
            assert abs(float(x[key]) - float(y[key])) < 1e-6  # mean softmax: float32 rounding (threads)
