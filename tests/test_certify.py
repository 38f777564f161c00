"""Certification runs (``calibprompt certify``): the run's files and numbers recomputed from its
own table, resumption, independence of the batch size, and the base classifier from a prompt run."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from calibprompt.cli import main
from calibprompt.demo.tissue import write_demo_dataset
from calibprompt.methods.smoothing import certified_accuracy, clopper_pearson_lower
from calibprompt.runs import CertifyRunConfig, PromptRunConfig, execute_run
from calibprompt.runs.certify import RADII

TINY = {"n0": 10, "n": 40, "alpha": 0.05, "subset": 6, "workers": 0, "progress": False}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cert_data")
    write_demo_dataset(root, per_class={"train": 6, "test": 3})
    return root


def config(root, cache, **kw):
    return CertifyRunConfig(**{"backbone": "demo", "dataset": "demo", "root": str(root), "cache": str(cache),
                               "sigma": 0.1, **TINY, **kw})


def rows(directory):
    with (directory / "certification.csv").open() as f:
        return list(csv.DictReader(f))


def same_certificates(a, b):
    """Equal counts, bounds, radii and predictions; mean softmax equal up to float32 batch rounding."""
    exact = ("image", "label", "sigma", "prediction", "n_a", "n", "p_lower", "radius")
    assert [[r[k] for k in exact] for r in rows(a)] == [[r[k] for k in exact] for r in rows(b)]
    probs = [[[float(v) for k, v in r.items() if k not in exact] for r in rows(d)] for d in (a, b)]
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-6)


def test_a_certification_run_reports_what_its_table_says(demo_root, tmp_path):
    result = execute_run(config(demo_root, tmp_path / "cache"), tmp_path / "runs")
    table = rows(result.directory)
    assert list(table[0])[:8] == ["image", "label", "sigma", "prediction", "n_a", "n", "p_lower", "radius"]
    assert len(table) == 6 and {r["n"] for r in table} == {"40"}
    cert = result.metrics["certification"]
    prediction = np.array([int(r["prediction"]) for r in table])
    labels = np.array([int(r["label"]) for r in table])
    radius = np.array([float(r["radius"]) for r in table])
    for r in table:  # every bound and radius follows from its counts
        p = clopper_pearson_lower(int(r["n_a"]), 40, 0.05)
        assert float(r["p_lower"]) == pytest.approx(p)
        assert (int(r["prediction"]) == -1) == (p < 0.5)
    expected = certified_accuracy(radius, prediction == labels, RADII)
    assert [cert["certified_accuracy"][f"{r:g}"] for r in RADII] == pytest.approx(list(expected))
    assert cert["abstention_rate"] == pytest.approx(np.mean(prediction == -1))
    assert cert["smoothed_accuracy"] == pytest.approx(np.mean(prediction == labels))
    assert cert["resolution"] == [3, 32, 32] and cert["vote_share"]["coverage"] == pytest.approx(np.mean(prediction != -1))
    probs = np.array([[float(v) for k, v in r.items() if k.startswith("p_") and k != "p_lower"] for r in table])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)  # the mean softmax over the noise
    preds = np.load(result.directory / "predictions.npz")
    np.testing.assert_allclose(np.exp(preds["test_logits"]), probs, rtol=1e-9)  # metrics are those of p̄
    assert (result.directory / "certified_accuracy.png").is_file()
    record = json.loads((result.directory / "config.json").read_text())
    assert record["kind"] == "certify" and record["base_classifier"] == "zeroshot"


def test_batch_size_is_not_part_of_the_result_and_an_interrupted_run_resumes(demo_root, tmp_path, monkeypatch):
    whole = execute_run(config(demo_root, tmp_path / "cache", batch_size=7), tmp_path / "a")
    again = execute_run(config(demo_root, tmp_path / "cache", batch_size=40), tmp_path / "a")
    assert again.skipped and again.directory == whole.directory  # same identity
    redo = execute_run(config(demo_root, tmp_path / "cache", batch_size=40), tmp_path / "b")
    same_certificates(redo.directory, whole.directory)  # the noise does not depend on the batch size
    import calibprompt.runs.certify as certify_module

    calls = []
    original = certify_module.write_npz

    def interrupt(path, **arrays):
        original(path, **arrays)
        calls.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(certify_module, "PART_IMAGES", 2)
    monkeypatch.setattr(certify_module, "write_npz", interrupt)
    with pytest.raises(KeyboardInterrupt):
        execute_run(config(demo_root, tmp_path / "cache"), tmp_path / "c")
    monkeypatch.setattr(certify_module, "write_npz", original)
    resumed = execute_run(config(demo_root, tmp_path / "cache"), tmp_path / "c")
    assert len(calls) == 1
    same_certificates(resumed.directory, whole.directory)


def test_the_base_classifier_can_be_a_prompt_run_but_not_a_full_fine_tuning_run(demo_root, tmp_path):
    common = {"backbone": "demo", "dataset": "demo", "root": str(demo_root), "cache": str(tmp_path / "cache"),
              "workers": 0, "progress": False, "shots": 2, "epochs": 1, "views": 1, "val_per_class": 1}
    tuned = execute_run(PromptRunConfig(**common, method="ce"), tmp_path / "runs")
    result = execute_run(config(demo_root, tmp_path / "cache", prompt=str(tuned.directory)), tmp_path / "runs")
    assert result.directory.parent.name == "certify-ce"
    assert json.loads((result.directory / "config.json").read_text())["prompt_digest"]
    full = execute_run(PromptRunConfig(**common, method="ce", regime="full", lr=0.0), tmp_path / "runs")
    with pytest.raises(ValueError, match="certification takes a prompt-tuning"):
        execute_run(config(demo_root, tmp_path / "cache", prompt=str(full.directory)), tmp_path / "runs")
    with pytest.raises(ValueError, match="expected a finished prompt-tuning run"):
        execute_run(config(demo_root, tmp_path / "cache", prompt=str(tmp_path)), tmp_path / "runs")


def test_certify_command_runs_one_certification_per_sigma(demo_root, tmp_path, capsys):
    argv = ["certify", "--backbone", "demo", "--dataset", "demo", "--root", str(demo_root), "--sigma", "0.1", "0.5",
            "--n0", "5", "--n", "20", "--subset", "4", "--cache", str(tmp_path / "cache"), "--workers", "0",
            "--quiet", "--out", str(tmp_path / "runs")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "sigma 0.1" in out and "sigma 0.5" in out and "certified accuracy r=0:" in out
    assert len(list((tmp_path / "runs").rglob("certification.csv"))) == 2


def test_the_test_time_step_lowers_the_entropy_of_the_mean_softmax_and_resets_per_image():
    import torch

    from calibprompt.backbones import load_backbone
    from calibprompt.losses import angular_separation
    from calibprompt.methods.promptsmooth import TestTimeConfig, adapt_to_noisy_copies
    from calibprompt.prompts import PromptLearner

    backbone = load_backbone("demo")
    names = ["adipose tissue", "lymphocytes", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"]
    learner = PromptLearner(backbone, names, init="words", init_words="An H&E image of")
    initial = learner.ctx.detach().clone()
    feats = torch.nn.functional.normalize(torch.randn(100, backbone.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)

    def entropy(text):
        mean = torch.softmax(backbone.logit_scale * feats @ text.T, -1).mean(0)
        return float(-(mean * mean.log()).sum())

    with torch.no_grad():
        before = learner()
    after = adapt_to_noisy_copies(learner, initial, feats, backbone.logit_scale, TestTimeConfig(lr=1e-3))
    assert entropy(after) < entropy(before)
    moved = (learner.ctx.detach() - initial).abs()
    # one AdamW step from a fresh state moves each coordinate by about lr (plus lr·wd·ctx of decay)
    assert float(moved.median()) == pytest.approx(1e-3, rel=0.05)
    assert float(moved.max()) <= 1e-3 * 1.001 + 1e-3 * 0.01 * float(initial.abs().max())
    again = adapt_to_noisy_copies(learner, initial, feats, backbone.logit_scale, TestTimeConfig(lr=1e-3))
    assert torch.equal(after, again)  # the prompt starts afresh for every image
    separated = adapt_to_noisy_copies(learner, initial, feats, backbone.logit_scale,
                                      TestTimeConfig(lr=1e-2, as_weight=1e4))
    assert float(angular_separation(separated)) < float(angular_separation(before))


def test_a_test_time_certification_is_its_own_run_and_says_what_it_covers(demo_root, tmp_path):
    plain = execute_run(config(demo_root, tmp_path / "cache"), tmp_path / "runs")
    tuned = execute_run(config(demo_root, tmp_path / "cache", test_time="entropy+as", as_weight=2.0, copies=8),
                        tmp_path / "runs")
    assert tuned.directory != plain.directory and tuned.directory.parent.name == "certify-zeroshot_entropy_as"
    record = json.loads((tuned.directory / "config.json").read_text())
    assert record["identity"]["config"]["as_weight"] == 2.0 and record["identity"]["config"]["ctx_init"] == "An H&E image of"
    assert "as_weight" not in json.loads((plain.directory / "config.json").read_text())["identity"]["config"]
    assert "tuned on x itself" in tuned.metrics["certification"]["covers"]
    again = execute_run(config(demo_root, tmp_path / "cache", test_time="entropy+as", as_weight=2.0, copies=8),
                        tmp_path / "again")
    same_certificates(again.directory, tuned.directory)  # reproducible
    with pytest.raises(ValueError, match="--as-weight applies to --test-time entropy\\+as only"):
        config(demo_root, tmp_path / "cache", test_time="entropy", as_weight=3.0).validate()


def test_noisy_training_views_at_sigma_0_are_the_cached_training_views(demo_root, tmp_path):
    """PromptSmooth's few-shot prompt trains on fresh noisy views; at noise 0 a view is exactly the
    cached view bank's view of the same epoch, so the two procedures differ only by the noise."""
    import torch

    from calibprompt.backbones import load_backbone
    from calibprompt.data import FeatureStore, load_dataset
    from calibprompt.runs.prompt import NoisyViews

    backbone = load_backbone("demo")
    train = load_dataset("demo", demo_root, "train")
    paths = train.paths[:3]
    bank = FeatureStore(tmp_path / "cache").views(backbone, paths, 3, kind="train", aug_seed=1, num_workers=0,
                                                   progress=False)
    clean = NoisyViews(backbone, paths, (0.0,), seed=1)
    for epoch in range(3):
        assert torch.allclose(clean([0, 1, 2], epoch), bank.features[:, epoch], atol=1e-5)
    noisy = NoisyViews(backbone, paths, (0.0, 0.5), seed=1)
    levels = {noisy.level(i, e) for i in range(3) for e in range(20)}
    assert levels == {0.0, 0.5}  # a level drawn per image and epoch
    assert torch.equal(noisy([0, 1, 2], 4), noisy([0, 1, 2], 4))  # seeded
    i, e = next((i, e) for i in range(3) for e in range(20) if noisy.level(i, e) == 0.5)
    assert not torch.allclose(noisy([i], e), clean([i], e), atol=1e-3)


def test_a_prompt_trained_on_noisy_views_is_its_own_run(demo_root, tmp_path):
    common = {"backbone": "demo", "dataset": "demo", "root": str(demo_root), "cache": str(tmp_path / "cache"),
              "workers": 0, "progress": False, "shots": 2, "epochs": 2, "val_per_class": 1, "method": "ce"}
    plain = execute_run(PromptRunConfig(**common, views=2), tmp_path / "runs")
    noisy = execute_run(PromptRunConfig(**common, noise_sigmas=(0.0, 0.25)), tmp_path / "runs")
    identity = json.loads((noisy.directory / "config.json").read_text())["identity"]["config"]
    assert identity["noise_sigmas"] == [0.0, 0.25] and "views" not in identity
    assert noisy.directory != plain.directory and "noise0-0.25" in noisy.directory.name
    tables = [json.loads((r.directory / "cache_tables.json").read_text()) for r in (plain, noisy)]
    assert len(tables[0]) == len(tables[1]) + 2  # the plain run's 2 training-view tables; none for noisy views
    with pytest.raises(ValueError, match="not zero-shot or full"):
        PromptRunConfig(**{**common, "noise_sigmas": (0.1,), "regime": "full"}).validate()
    with pytest.raises(ValueError, match="noise levels >= 0"):
        PromptRunConfig(**{**common, "noise_sigmas": (-0.1,)}).validate()


def test_report_shows_certification_rows_with_their_columns(demo_root, tmp_path):
    from calibprompt.runs import write_report

    results = [execute_run(config(demo_root, tmp_path / "cache", sigma=s), tmp_path / "runs") for s in (0.1, 0.5)]
    written = write_report(tmp_path / "runs", n_resamples=10)
    text = written["markdown"].read_text()
    section = text[text.index("## Certification"):]
    for result in results:
        cert = result.metrics["certification"]
        line = next(li for li in section.splitlines() if li.startswith("| demo | demo |") and f"| {cert['sigma']:g} |" in li)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[6] == f"{100 * cert['certified_accuracy']['0']:.1f}"
        assert cells[10] == f"{100 * cert['abstention_rate']:.1f}"
        assert cells[13] == f"{100 * cert['clean_base_classifier']['ece']:.1f}"


def test_certify_runs_on_a_random_weight_plip_architecture_model(checkpoints, tmp_path):
    """The PLIP path (a transformers CLIPModel on disk, random weights) on generated Kather data."""
    from calibprompt.data.synthetic import make_dataset_tree

    make_dataset_tree(tmp_path / "data", "kather", per_class=[2] * 9, seed=3)
    argv = ["certify", "--backbone", checkpoints.name("plip"), "--weights", str(checkpoints["plip"]), "--dataset",
            "kather", "--root", str(tmp_path / "data"), "--sigma", "0.25", "--n0", "5", "--n", "20", "--subset", "9",
            "--test-time", "entropy+as", "--copies", "4", "--cache", str(tmp_path / "cache"), "--workers", "0",
            "--quiet", "--out", str(tmp_path / "runs")]
    assert main(argv) == 0
    table = rows(next((tmp_path / "runs").rglob("certification.csv")).parent)
    assert len(table) == 9 and all(int(r["n"]) == 20 for r in table)
    assert {int(r["label"]) for r in table} == set(range(9))  # the stratified subset covers every class


def test_split_calibration_certifies_the_calibration_images_a_run_fits_decisions_on(demo_root, tmp_path):
    """--split calibration: the smoothed probabilities of the calibration split -- the zero-shot
    run's own split for this seed (or a prompt run's, with --prompt) -- stored as calib_* so that
    referral and conformal can be fitted on PromptSmooth's classifier. An image's probabilities do
    not depend on the split it is certified in (noise seeded by its content); the test-only run
    keeps its identity."""
    from calibprompt.decisions import fit_conformal

    test_only = execute_run(config(demo_root, tmp_path / "cache"), tmp_path / "runs")
    both = execute_run(config(demo_root, tmp_path / "cache", split="calibration", calib_per_class=2), tmp_path / "runs")
    assert both.directory != test_only.directory and "split" not in json.loads(
        (test_only.directory / "config.json").read_text())["identity"]["config"]
    zs = execute_run(PromptRunConfig("demo", "demo", str(demo_root), method="zeroshot", cache=str(tmp_path / "cache"),
                                     workers=0, progress=False, calib_per_class=2), tmp_path / "zs")
    manifest = json.loads((both.directory / "splits" / "calibration.json").read_text())
    assert manifest["files"] == json.loads((zs.directory / "splits" / "calibration.json").read_text())["files"]
    preds = np.load(both.directory / "predictions.npz")
    assert list(preds["calib_files"]) == manifest["files"] and len(manifest["files"]) == 8
    np.testing.assert_allclose(np.exp(preds["calib_logits"]).sum(1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(preds["test_logits"], np.load(test_only.directory / "predictions.npz")["test_logits"])
    # the calibration images certified as the test split of another root: the same smoothed probabilities
    other = tmp_path / "other" / "demo"
    shutil.copytree(demo_root / "demo" / "images" / "train", other / "images" / "train")
    shutil.copy(demo_root / "demo" / "classnames.txt", other / "classnames.txt")
    for file in manifest["files"]:
        target = other / "images" / "test" / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_root / "demo" / "images" / "train" / file, target)
    alone = execute_run(config(tmp_path / "other", tmp_path / "cache", subset=None), tmp_path / "runs")
    again = np.load(alone.directory / "predictions.npz")
    order = [list(again["test_files"]).index(f) for f in preds["calib_files"]]
    np.testing.assert_allclose(again["test_logits"][order], preds["calib_logits"], atol=1e-6)
    assert both.metrics["calibrator"]["split"] == "calibration"
    fit_conformal(np.exp(preds["calib_logits"]), preds["calib_labels"], 0.5, "lac")  # decisions take them
