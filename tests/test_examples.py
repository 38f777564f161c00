"""The sweep files under examples/ reproduce the paper's experiments: each one has the paper's
structure, validates whole, and runs -- on random-weight backbones of each family (tiny models in
their real on-disk formats) and generated data in each dataset's layout, with a tiny epoch count.
And ``report --published`` puts the published values beside rows run with the published setting."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from calibprompt.cli import main
from calibprompt.data.synthetic import make_dataset_tree
from calibprompt.objective import PRESETS
from calibprompt.runs import execute_run
from calibprompt.runs.report.published import PUBLISHED, published_for
from calibprompt.runs.sweep import load_sweep

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PAPER_METHODS = ["ce", "ls", "focal", "mdca", "dca", "mmce", "mbls", "logitnorm", "zsnorm", "penalty", "smac",
                 "calibprompt"]
#: The paper's pairing of backbones and datasets.
PAIRS = {"plip": {"kather", "pannuke", "digestpath"}, "quiltnet": {"kather", "pannuke", "digestpath"},
         "medclip": {"covid", "rsna18"}, "biomedclip": {"covid", "rsna18"}}


def spec(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def names(entries: list) -> list[str]:
    return [e if isinstance(e, str) else e["name"] for e in entries]


def test_the_main_table_files_are_the_papers_table():
    pairs, runs = set(), 0
    for name in ("paper_main_pathology.yaml", "paper_main_radiology.yaml"):
        s = spec(name)
        assert s["methods"] == PAPER_METHODS and set(PAPER_METHODS) == set(PRESETS)
        assert s["seeds"] == [1, 2, 3] and s["shots"] == 8 and "grid" not in s
        for b in names(s["backbones"]):
            assert set(names(s["datasets"])) == PAIRS[b]
            pairs |= {(b, d) for d in names(s["datasets"])}
        runs += len(s["backbones"]) * len(s["datasets"]) * len(s["methods"]) * len(s["seeds"])
    assert pairs == {(b, d) for b, ds in PAIRS.items() for d in ds}  # 10 pairs, each once
    assert runs == 360
    assert {(p.backbone, p.dataset) for p in PUBLISHED} == pairs  # every pair has its published ECE
    assert spec("paper_shots_ablation.yaml")["grid"] == {"shots": [4, 8, 16, 32]}
    assert spec("paper_nctx_ablation.yaml")["grid"] == {"n_ctx": [2, 4, 8, 16, 32, 64]}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Generated data of every dataset the examples name, enough images for 32 shots + validation."""
    root = tmp_path_factory.mktemp("examples_data")
    for dataset in ("kather", "pannuke", "digestpath", "covid", "rsna18"):
        make_dataset_tree(root, dataset, per_class=[34] * 9 if dataset == "kather" else [5] * 3, seed=1)
    return root


def localized(name: str, checkpoints, data_root: Path, tmp_path: Path) -> Path:
    """The example with the user's edits made for this machine: tiny random-weight models as the
    backbones, generated data as the root, one seed, a tiny protocol."""
    s = spec(name)
    s["backbones"] = [{"name": checkpoints.name(b), "weights": str(checkpoints[b])} for b in names(s["backbones"])]
    s["datasets"] = [{"name": d, "root": str(data_root)} for d in names(s["datasets"])]
    s.update(seeds=[1], epochs=1, views=1, val_per_class=1, workers=0, progress=False,
             cache=str(tmp_path / "cache"), out=str(tmp_path / "runs"))
    if "grid" not in s:
        s["shots"] = 2
    path = tmp_path / name
    path.write_text(yaml.safe_dump(s))
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("paper_*.yaml")))
def test_each_example_validates_whole_and_runs(name, checkpoints, data_root, tmp_path):
    configs, out = load_sweep(localized(name, checkpoints, data_root, tmp_path))  # every run validated
    s = spec(name)
    grid = s.get("grid", {})
    expected = len(s["backbones"]) * len(s["datasets"]) * len(s["methods"])
    for values in grid.values():
        expected *= len(values)
    assert len(configs) == expected
    # run a cover: every method, backbone, dataset and grid value at least once
    chosen, seen = [], set()
    for c in configs:
        keys = {("method", c.method), ("backbone", c.weights), ("dataset", c.dataset),
                *((k, getattr(c, k)) for k in grid)}
        if keys - seen:
            chosen.append(c)
            seen |= keys
    for c in chosen:
        result = execute_run(c, out)
        assert result.metrics["uncalibrated"]["n_samples"] > 0
    assert len(list(out.rglob("metrics.json"))) == len(chosen)


def test_report_puts_published_values_beside_runs_of_the_published_setting(checkpoints, tmp_path):
    """A run with every protocol default at 8 shots (QuiltNet on PanNuke) gets the paper's value beside
    it; a run with another setting does not."""
    root = tmp_path / "data"
    make_dataset_tree(root, "pannuke", per_class=[12, 12], seed=2)
    common = ["--backbone", "quiltnet", "--weights", str(checkpoints["quiltnet"]), "--dataset", "pannuke",
              "--root", str(root), "--cache", str(tmp_path / "cache"), "--workers", "0", "--quiet",
              "--out", str(tmp_path / "runs"), "--method", "ce"]
    assert main(["train", *common, "--views", "2", "--epochs", "2"]) == 0  # not the published protocol
    config = json.loads(next((tmp_path / "runs").rglob("config.json")).read_text())["identity"]["config"]
    assert published_for("quiltnet", "pannuke", "ce", config) == []
    assert published_for("quiltnet", "pannuke", "ce", {**config, "views": 50, "epochs": 50})[0].value == 19.70
    assert main(["train", *common]) == 0  # the protocol's defaults: 8 shots, 50 epochs, 50 views
    assert main(["report", str(tmp_path / "runs"), "--published", "--bootstrap", "10"]) == 0
    report = (tmp_path / "runs" / "report.md").read_text()
    section = report[report.index("## Beside the published values"):]
    assert "19.70 (published)" in section and "arXiv 2509.15226" in section and section.count("| quiltnet |") == 1
    lines = list(csv.DictReader((tmp_path / "runs" / "report_published.csv").open()))
    assert [(r["method"], r["metric"], r["published"]) for r in lines] == [("ce", "ece", "19.7")]
    assert 0 <= float(lines[0]["measured_mean"]) <= 100 and lines[0]["seeds"] == "1"
