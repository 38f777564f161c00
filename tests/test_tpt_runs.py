"""Test-time views (cached, reproducible), TPT runs over a test set, the ``tpt`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from calibprompt.backbones.transforms import clip_transform, medclip_transform
from calibprompt.cli import main
from calibprompt.data import FeatureStore, load_dataset
from calibprompt.data.views import AugMix, tpt_view_transform, train_view_transform
from calibprompt.demo.tissue import write_demo_dataset
from calibprompt.runs import TPTRunConfig, summarize
from calibprompt.runs import execute_run as execute_tpt_run
from calibprompt.runs import tpt as tpt_runs


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpt_demo")
    write_demo_dataset(root, per_class={"train": 12, "test": 6})
    return root


@pytest.fixture(scope="module")
def demo_backbone():
    from calibprompt.backbones import load_backbone

    return load_backbone("demo")


def run_config(root, cache, **kw) -> TPTRunConfig:
    return TPTRunConfig(backbone="demo", dataset="demo", root=str(root), cache=str(cache), workers=0,
                        progress=False, views=16, **kw)


# -- views -----------------------------------------------------------------------------------------
def test_view_transforms_have_process_independent_reprs():
    """The transform's repr is part of the feature-cache key: a function address in it would make
    every new process miss the cache."""
    for transform in (clip_transform(224), train_view_transform(clip_transform(224)), medclip_transform(224),
                      tpt_view_transform(clip_transform(224)), tpt_view_transform(medclip_transform(224), False)):
        assert " at 0x" not in repr(transform)


def test_augmented_view_is_reproducible_and_has_the_eval_geometry():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    for augmix in (True, False):
        transform = tpt_view_transform(clip_transform(32), augmix=augmix)
        torch.manual_seed(5)
        a = transform(image)
        torch.manual_seed(5)
        b = transform(image)
        torch.manual_seed(6)
        c = transform(image)
        assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    gray = tpt_view_transform(medclip_transform(48), augmix=True)(image)
    assert gray.shape == (3, 48, 48) and torch.equal(gray[0], gray[2])  # MedCLIP: repeated channel


def test_augmix_mixes_the_clean_image_with_augmented_chains():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    preprocess = clip_transform(32).transforms[-3:]
    from torchvision import transforms as T

    augmix = AugMix(T.Compose(preprocess))
    clean = T.Compose(preprocess)(image)
    outs = []
    for seed in range(20):
        torch.manual_seed(seed)
        outs.append(augmix(image))
    assert all(o.shape == clean.shape for o in outs)
    assert not any(torch.equal(o, clean) for o in outs)
    for name in AugMix.OPERATIONS:  # every operation runs at severity 1 and keeps the size
        assert augmix._operate(name, image).size == image.size


def test_test_time_views_are_cached_and_shared(tmp_path, demo_root, demo_backbone):
    test = load_dataset("demo", demo_root, "test")
    paths = test.paths[:5]
    store = FeatureStore(tmp_path / "cache")
    first = store.views(demo_backbone, paths, 8, kind="test_time", aug_seed=3, num_workers=0, progress=False)
    assert first.features.shape == (5, 8, demo_backbone.embed_dim)
    assert first.encoded == 10  # 5 originals + the augmented views of 5 images
    # view 0 is the evaluation transform, the same table as the plain features
    plain = store.features(demo_backbone, paths, num_workers=0, progress=False)
    assert torch.equal(first.features[:, 0], plain.features)
    # a new store over the same cache (another process, another method) encodes nothing
    again = FeatureStore(tmp_path / "cache").views(demo_backbone, list(reversed(paths)), 8, kind="test_time",
                                                  aug_seed=3, num_workers=0, progress=False)
    assert again.encoded == 0 and torch.equal(again.features.flip(0), first.features)
    # identical when encoded afresh with workers and in another order; other seeds differ
    fresh = FeatureStore(tmp_path / "fresh").views(demo_backbone, list(reversed(paths)), 8, kind="test_time",
                                                  aug_seed=3, num_workers=2, progress=False)
    assert torch.allclose(fresh.features.flip(0), first.features, atol=1e-6)
    other = store.views(demo_backbone, paths, 8, kind="test_time", aug_seed=4, num_workers=0, progress=False)
    assert torch.equal(other.features[:, 0], first.features[:, 0])
    assert not torch.allclose(other.features[:, 1:], first.features[:, 1:])
    plain_crops = store.views(demo_backbone, paths, 8, kind="test_time", aug_seed=3, augmix=False, num_workers=0,
                              progress=False)
    assert not torch.allclose(plain_crops.features[:, 1:], first.features[:, 1:])


# -- runs ------------------------------------------------------------------------------------------
def test_config_resolves_protocol_and_method_defaults():
    c = TPTRunConfig(backbone="demo", dataset="demo", root=".", method="ctpt").resolved()
    assert (c.views, c.augmix, c.selection, c.steps, c.lr, c.n_bins, c.lam) == (64, True, 0.1, 1, 5e-3, 20, 50.0)
    assert TPTRunConfig(backbone="d", dataset="d", root=".", method="otpt").resolved().lam == 18.0
    assert TPTRunConfig(backbone="d", dataset="d", root=".", method="zeroshot").resolved().steps == 0
    assert not TPTRunConfig(backbone="d", dataset="d", root=".", protocol="published-noaugmix").resolved().augmix
    with pytest.raises(ValueError, match="method"):
        TPTRunConfig(backbone="d", dataset="d", root=".", method="ttt").resolved()
    with pytest.raises(ValueError, match="no regulariser"):
        TPTRunConfig(backbone="d", dataset="d", root=".", method="tpt", lam=5.0).resolved()
    with pytest.raises(ValueError, match="Huber"):
        TPTRunConfig(backbone="d", dataset="d", root=".", method="ctpt", delta=0.3).resolved()
    with pytest.raises(ValueError, match="selection"):
        TPTRunConfig(backbone="d", dataset="d", root=".", selection=0.0).resolved()


def test_run_equals_the_algorithm_and_resumes_exactly(tmp_path, demo_root, demo_backbone, monkeypatch):
    from calibprompt.methods.tpt import tpt_adapt
    from calibprompt.prompts import PromptLearner

    config = run_config(demo_root, tmp_path / "cache", method="ctpt", batch_size=4)
    result = execute_tpt_run(config, tmp_path / "runs")
    preds = np.load(result.directory / "predictions.npz")
    n = len(load_dataset("demo", demo_root, "test").paths)
    assert preds["test_logits"].shape == (n, 4) and result.metrics["adapted_images"] == n
    assert result.metrics["n_bins"] == 20
    recorded = json.loads((result.directory / "config.json").read_text())
    assert recorded["tpt"]["lam"] == 50.0 and recorded["identity"]["config"]["views"] == 16

    # the run's logits are the algorithm's on the cached views
    views = FeatureStore(tmp_path / "cache").views(demo_backbone, load_dataset("demo", demo_root, "test").paths,
                                                  16, kind="test_time", aug_seed=1, num_workers=0, progress=False)
    learner = PromptLearner(demo_backbone, load_dataset("demo", demo_root, "test").classnames, init="words",
                            init_words="a photo of a")
    direct, _ = tpt_adapt(learner, views.features[:3], config.resolved().tpt_config())
    assert np.allclose(preds["test_logits"][:3], direct.double().numpy(), atol=1e-5)

    # finished: skipped; interrupted after the first part: resumes with only the rest
    assert execute_tpt_run(config, tmp_path / "runs").skipped
    monkeypatch.setattr(tpt_runs, "PART_IMAGES", 10)
    calls = {"n": 0}
    import calibprompt.methods.tpt as tpt_module  # execute_tpt_run imports tpt_adapt when called

    original = tpt_module.tpt_adapt

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # 3 batches of 4 images = the first part of 10 (+2)
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(tpt_module, "tpt_adapt", interrupted)
    with pytest.raises(KeyboardInterrupt):
        execute_tpt_run(config, tmp_path / "fresh")
    partial = next((tmp_path / "fresh").rglob(".*.partial"))
    assert not (partial.parent / partial.name[1:-len(".partial")]).exists()  # no half-finished run directory
    assert len(list((partial / "parts").glob("test-*.npz"))) == 1 and not (partial / "metrics.json").exists()
    monkeypatch.setattr(tpt_module, "tpt_adapt", original)
    resumed = execute_tpt_run(config, tmp_path / "fresh")
    assert resumed.metrics["adapted_images"] == n - 10 and not partial.exists()
    assert resumed.directory.name == result.directory.name  # the same identity
    # images are adapted in other batches (parts of 10): equal up to the batched arithmetic's rounding
    resumed_logits = np.load(resumed.directory / "predictions.npz")["test_logits"]
    assert np.abs(resumed_logits - preds["test_logits"]).max() < 1e-5
    assert np.array_equal(resumed_logits.argmax(1), preds["test_logits"].argmax(1))
    assert resumed.metrics["uncalibrated"]["ece"] == pytest.approx(result.metrics["uncalibrated"]["ece"], abs=1e-6)


def test_methods_share_views_and_differ_only_by_the_regulariser(tmp_path, demo_root):
    results = {m: execute_tpt_run(run_config(demo_root, tmp_path / "cache", method=m), tmp_path / "runs")
               for m in ("zeroshot", "tpt", "ctpt", "soc")}
    tables = {m: json.loads((r.directory / "cache_tables.json").read_text()) for m, r in results.items()}
    assert len({tuple(t) for m, t in tables.items() if m != "zeroshot"}) == 1
    assert len(tables["zeroshot"]) == 1 and tables["zeroshot"][0] in tables["tpt"]  # the original view only
    logits = {m: np.load(r.directory / "predictions.npz")["test_logits"] for m, r in results.items()}
    assert not np.allclose(logits["tpt"], logits["zeroshot"])
    assert not np.allclose(logits["ctpt"], logits["tpt"])
    assert len({r.directory for r in results.values()}) == 4
    rows = {r.method: r for r in summarize(tmp_path / "runs", n_resamples=20)}
    assert set(rows) == {"tpt-zeroshot", "tpt-tpt", "tpt-ctpt", "tpt-soc"}
    assert rows["tpt-tpt"].stats["uncalibrated.accuracy"]["mean"] == pytest.approx(
        results["tpt"].metrics["uncalibrated"]["accuracy"])


def test_tpt_from_a_coop_context(tmp_path, demo_root):
    from calibprompt.runs import RunConfig, execute_run

    coop = execute_run(RunConfig(backbone="demo", dataset="demo", root=str(demo_root), method="ce", shots=2,
                                 epochs=1, views=2, n_ctx=4, val_per_class=4, cache=str(tmp_path / "cache"), workers=0,
                                 progress=False), tmp_path / "runs")
    plain = execute_tpt_run(run_config(demo_root, tmp_path / "cache"), tmp_path / "runs")
    from_coop = execute_tpt_run(run_config(demo_root, tmp_path / "cache", init_prompt=str(coop.directory)),
                                tmp_path / "runs")
    assert from_coop.directory != plain.directory
    assert json.loads((from_coop.directory / "config.json").read_text())["init_prompt_digest"]
    assert not np.allclose(np.load(from_coop.directory / "predictions.npz")["test_logits"],
                           np.load(plain.directory / "predictions.npz")["test_logits"])
    with pytest.raises(ValueError, match="init-prompt"):
        execute_tpt_run(run_config(demo_root, tmp_path / "cache", init_prompt=str(tmp_path)), tmp_path / "runs")


def test_cli_runs_several_methods_and_rejects_bad_input(tmp_path, demo_root, capsys):
    base = ["tpt", "--backbone", "demo", "--dataset", "demo", "--root", str(demo_root), "--out", str(tmp_path / "runs"),
            "--cache", str(tmp_path / "cache"), "--workers", "0", "--views", "8", "--limit", "10"]
    assert main([*base, "--method", "zeroshot", "tpt", "otpt"]) == 0
    out = capsys.readouterr().out
    assert out.count("run directory") == 3 and "ECE(20 bins)" in out
    dirs = list((tmp_path / "runs" / "demo" / "demo").glob("tpt-*/seed1-*"))
    assert sorted(d.parent.name for d in dirs) == ["tpt-otpt", "tpt-tpt", "tpt-zeroshot"]
    assert all(np.load(d / "predictions.npz")["test_logits"].shape == (10, 4) for d in dirs)
    assert main([*base, "--method", "tpt"]) == 0 and "already finished" in capsys.readouterr().out



# -- the template-ensemble setting -----------------------------------------------------------------
def test_template_sets():
    from calibprompt.prompts import TPT4_TEMPLATES, prefix_words, template_set

    assert template_set("tpt4") == list(TPT4_TEMPLATES)
    assert [prefix_words(t) for t in TPT4_TEMPLATES] == ["a photo of a", "a photo of the", "a picture of a",
                                                         "a picture of the"]
    imagenet = template_set("imagenet80")
    assert len(imagenet) == 78 and imagenet[0] == "a bad photo of a {}."  # 2 of CLIP's 80 put words after the class
    assert prefix_words("a {} in a video game.") is None and prefix_words("{}.") is None
    assert template_set("dataset", ["An H&E image of {}.", "{} tissue"]) == ["An H&E image of {}."]
    with pytest.raises(ValueError, match="ends with the class"):
        template_set("dataset", ["{} tissue"])
    with pytest.raises(ValueError, match="ensemble"):
        template_set("ten")


@pytest.mark.parametrize("method", ["ctpt", "zeroshot"])
def test_the_ensemble_equals_each_template_alone_averaged(tmp_path, demo_root, demo_backbone, method):
    """--ensemble tpt4: one context per template on the same cached views; the logits are the mean
    of the four single-template runs (--ctx-init each template's words). With zero-shot it is the
    ensemble baseline (no step)."""
    from calibprompt.prompts import TPT4_TEMPLATES, prefix_words
    from calibprompt.runs.apply import load_run

    ensemble = execute_tpt_run(run_config(demo_root, tmp_path / "cache", method=method, ensemble="tpt4", limit=8),
                               tmp_path / "runs")
    singles = [execute_tpt_run(run_config(demo_root, tmp_path / "cache", method=method, limit=8,
                                          ctx_init=prefix_words(t)), tmp_path / "runs") for t in TPT4_TEMPLATES]
    mean = np.mean([np.load(r.directory / "predictions.npz")["test_logits"] for r in singles], axis=0)
    got = np.load(ensemble.directory / "predictions.npz")["test_logits"]
    assert np.abs(got - mean).max() < 1e-5 and not np.allclose(got, np.load(
        singles[0].directory / "predictions.npz")["test_logits"])
    record = json.loads((ensemble.directory / "config.json").read_text())
    assert record["templates"] == list(TPT4_TEMPLATES) and record["identity"]["config"]["ensemble"] == "tpt4"
    assert "ctx_init" not in record["identity"]["config"] and "ensembletpt4" in ensemble.directory.name
    # applied to new images, the run adapts every template again (the same logits for its test images)
    preds = np.load(ensemble.directory / "predictions.npz")
    first = [demo_root / "demo" / "images" / "test" / f for f in preds["test_files"][:2]]
    new = load_run(ensemble.directory).predict(first, cache=tmp_path / "cache", progress=False, workers=0)
    assert np.abs(new.logits - preds["test_logits"][:2]).max() < 1e-5
    with pytest.raises(ValueError, match="--ensemble"):
        execute_tpt_run(run_config(demo_root, tmp_path / "cache", method=method, ensemble="tpt4",
                                   ctx_init="a photo of a"), tmp_path / "runs")


# -- TCA as a run ---------------------------------------------------------------------------------
DEMO_ATTRIBUTES = {"adipose tissue": ["stained", "histology"], "lymphocytes": ["stained", "microscopy", "section"],
                   "cancer-associated stroma": ["patch"], "colorectal adenocarcinoma epithelium": ["image", "histology"]}


def test_tca_run_equals_the_algorithm_and_validates_its_attribute_file(tmp_path, demo_root, demo_backbone):
    from calibprompt.methods.tpt import tca_learner, tpt_adapt
    from calibprompt.runs.apply import load_run

    attributes = tmp_path / "attributes.json"
    attributes.write_text(json.dumps(DEMO_ATTRIBUTES))
    result = execute_tpt_run(run_config(demo_root, tmp_path / "cache", method="tca", attributes=str(attributes),
                                        limit=6), tmp_path / "runs")
    record = json.loads((result.directory / "config.json").read_text())
    assert record["attributes"] == DEMO_ATTRIBUTES and "attributes_digest" in record["identity"]["config"]
    assert record["identity"]["config"]["lam"] == 50.0 and record["identity"]["config"]["beta"] == 50.0
    preds = np.load(result.directory / "predictions.npz")
    config = TPTRunConfig("demo", "demo", str(demo_root), method="tca", attributes=str(attributes), views=16).resolved()
    store = FeatureStore(tmp_path / "cache")
    files = [demo_root / "demo" / "images" / "test" / f for f in preds["test_files"]]
    views = store.views(demo_backbone, files, 16, kind="test_time", augmix=True, aug_seed=1, num_workers=0,
                        progress=False)
    learner = tca_learner(demo_backbone, list(record["classnames"]), DEMO_ATTRIBUTES)
    expected, _ = tpt_adapt(learner, views.features, config.tpt_config())
    assert preds["test_logits"].shape == (6, 4)
    np.testing.assert_allclose(preds["test_logits"], expected.double().numpy(), atol=1e-5)
    new = load_run(result.directory).predict(files[:2], cache=tmp_path / "cache", progress=False, workers=0)
    np.testing.assert_allclose(new.logits, preds["test_logits"][:2], atol=1e-5)
    # the same words under another file name: the same run; other words: another run
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(DEMO_ATTRIBUTES, indent=2))
    again = execute_tpt_run(run_config(demo_root, tmp_path / "cache", method="tca", attributes=str(moved), limit=6),
                            tmp_path / "runs")
    assert again.skipped and again.directory == result.directory
    for bad, match in (({**DEMO_ATTRIBUTES, "lymphocytes": []}, "non-empty list"),
                       ({k: v for k, v in DEMO_ATTRIBUTES.items() if k != "lymphocytes"}, "missing \\['lymphocytes'\\]"),
                       ({**DEMO_ATTRIBUTES, "lymphocyte": ["x"]}, "unknown \\['lymphocyte'\\]"),
                       (["stained"], "JSON object")):
        attributes.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            execute_tpt_run(run_config(demo_root, tmp_path / "cache", method="tca", attributes=str(attributes)),
                            tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="--beta/--attributes apply to --method tca"):
        run_config(demo_root, tmp_path / "cache", method="ctpt", beta=1.0).resolved()
    with pytest.raises(ValueError, match="--attributes"):
        run_config(demo_root, tmp_path / "cache", method="tca").resolved()
