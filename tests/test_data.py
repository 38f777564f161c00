"""Datasets, splits and the feature cache on generated image trees."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from calibprompt.data import (
    DataError,
    FeatureStore,
    SplitManifest,
    calibration_split,
    few_shot,
    load_dataset,
    validation_split,
)
from calibprompt.data.datasets import DATASETS
from calibprompt.data.synthetic import make_dataset_tree, write_image

# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_registered_layouts_labels_and_templates(tmp_path, name):
    spec = DATASETS[name]
    counts = {folder: 2 + i for i, folder in enumerate(spec.classes)}
    base = make_dataset_tree(tmp_path, name, per_class=counts)
    for root in (tmp_path, base):  # ROOT or ROOT/<dir>
        ds = load_dataset(name, root, "test")
        folders = sorted(spec.classes)
        assert list(ds.class_folders) == folders
        assert list(ds.classnames) == [spec.classes[f] for f in folders]
        assert ds.class_counts().tolist() == [counts[f] for f in folders]
        assert list(ds.files) == sorted(ds.files)
        for f, y in zip(ds.files, ds.labels, strict=True):
            assert f.split("/")[0] == folders[y]
        assert ds.templates == spec.templates
    assert ds.prompts()[0] == spec.templates[0].format(ds.classnames[0])


def test_kather_and_rsna_label_order(tmp_path):
    make_dataset_tree(tmp_path, "kather", per_class=[1] * 9)
    kather = load_dataset("kather", tmp_path, "train")
    assert kather.class_folders == ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
    assert kather.prompts()[-1] == "An H&E image of colorectal adenocarcinoma epithelium."
    make_dataset_tree(tmp_path, "rsna18", per_class=[1, 1, 1])
    rsna = load_dataset("rsna18", tmp_path, "test")
    assert rsna.classnames == ("lung opacity", "no lung opacity, not normal", "normal")
    assert rsna.prompts()[1] == "A chest X-ray image of no lung opacity, not normal patient"


def test_non_images_are_reported_and_errors_name_the_file(tmp_path):
    base = make_dataset_tree(tmp_path, "covid", per_class=[3, 3])
    (base / "images" / "test" / "covid" / "notes.txt").write_text("not an image")
    (base / "images" / "test" / "covid" / ".DS_Store").write_text("hidden")
    ds = load_dataset("covid", tmp_path, "test")
    assert len(ds) == 6
    assert ds.excluded == (("covid/notes.txt", "not an image (extension '.txt')"),)
    # mismatched classnames.txt
    (base / "classnames.txt").write_text("covid covid\nnormall normal\n")
    with pytest.raises(DataError, match=r"classnames.txt:2: class folder 'normall' is not a class"):
        load_dataset("covid", tmp_path, "test")
    (base / "classnames.txt").write_text("covid covid\n")
    with pytest.raises(DataError, match=r"classnames.txt: no line for class folder\(s\) normal"):
        load_dataset("covid", tmp_path, "test")
    (base / "classnames.txt").write_text("covid\nnormal normal\n")
    with pytest.raises(DataError, match=r"classnames.txt:1: expected '<class_folder> <class name>'"):
        load_dataset("covid", tmp_path, "test")
    (base / "classnames.txt").write_text("covid covid\nnormal normal\n")
    for f in (base / "images" / "test" / "normal").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"normal: empty class folder"):
        load_dataset("covid", tmp_path, "test")
    with pytest.raises(DataError, match=r"split 'val' not found \(available: test, train\)"):
        load_dataset("covid", tmp_path, "val")
    with pytest.raises(DataError, match="expected the layout ROOT/kather/images"):
        load_dataset("kather", tmp_path, "test")
    with pytest.raises(DataError, match="dataset 'mnist' is unknown"):
        load_dataset("mnist", tmp_path)


def test_imagefolder_and_csv(tmp_path):
    for cls, n in (("cat_type", 2), ("dog", 3)):
        for i in range(n):
            write_image(tmp_path / "folder" / cls / f"{i}.png", i)
    ds = load_dataset("imagefolder", tmp_path / "folder")
    assert ds.classnames == ("cat type", "dog") and ds.class_counts().tolist() == [2, 3]
    (tmp_path / "folder" / "classnames.txt").write_text("cat_type tabby cat\ndog good dog\n")
    assert load_dataset("imagefolder", tmp_path / "folder").classnames == ("tabby cat", "good dog")

    rows = ["path,label", "folder/dog/0.png,dog", "folder/cat_type/1.png,cat", "folder/dog/2.png,dog"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    csv_ds = load_dataset("csv", tmp_path / "m.csv")
    assert csv_ds.classnames == ("cat", "dog")
    assert list(csv_ds.files) == ["folder/cat_type/1.png", "folder/dog/0.png", "folder/dog/2.png"]
    assert csv_ds.labels.tolist() == [0, 1, 1]
    (tmp_path / "bad.csv").write_text("folder/dog/0.png,dog\nfolder/dog/9.png,dog\n")
    with pytest.raises(DataError, match=r"bad.csv:2: file .*9.png' not found"):
        load_dataset("csv", tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("folder/dog/0.png,7\n")
    with pytest.raises(DataError, match=r"bad2.csv:1: label 7 outside \[0, 1\]"):
        load_dataset("csv", tmp_path / "bad2.csv", classnames=["cat", "dog"])


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def test_few_shot_is_independent_of_creation_order(tmp_path):
    a = make_dataset_tree(tmp_path / "a", "kather", per_class=[12] * 9, splits=["train"], seed=1)
    b = make_dataset_tree(tmp_path / "b", "kather", per_class=[12] * 9, splits=["train"], seed=2)

    def creation_order(base):
        files = [p for p in (base / "images/train").rglob("*.png")]
        return [p.relative_to(base).as_posix() for p in sorted(files, key=lambda p: p.stat().st_mtime_ns)]

    assert creation_order(a) != creation_order(b)  # the trees were written in different orders
    ma = few_shot(load_dataset("kather", a.parent, "train"), shots=4, seed=3)
    mb = few_shot(load_dataset("kather", b.parent, "train"), shots=4, seed=3)
    assert ma.files == mb.files and ma.labels == mb.labels
    assert np.bincount(ma.labels).tolist() == [4] * 9
    mc = few_shot(load_dataset("kather", a.parent, "train"), shots=4, seed=4)
    assert mc.files != ma.files


def test_manifest_roundtrip_reuse_and_validation(tmp_path):
    make_dataset_tree(tmp_path, "covid", per_class=[10, 10])
    train = load_dataset("covid", tmp_path, "train")
    path = tmp_path / "splits" / "covid_k4_s1.json"
    m = few_shot(train, 4, seed=1, manifest_path=path)
    assert path.is_file() and json.loads(path.read_text())["files"] == m.files
    again = few_shot(train, 4, seed=1, manifest_path=path)
    assert again == m
    with pytest.raises(DataError, match="asked for 4 shots, seed 2"):
        few_shot(train, 4, seed=2, manifest_path=path)
    subset = m.subset_of(train)
    assert list(subset.files) == m.files and subset.labels.tolist() == m.labels
    victim = train.root / m.files[0]
    write_image(victim, seed=999)
    with pytest.raises(DataError, match="content changed since the manifest was written"):
        few_shot(train, 4, seed=1, manifest_path=path)
    victim.unlink()
    with pytest.raises(DataError, match="missing"):
        SplitManifest.load(path).validate(train)


def test_validation_never_overlaps_few_shot_or_test(tmp_path):
    make_dataset_tree(tmp_path, "rsna18", per_class=[20, 20, 20])
    train = load_dataset("rsna18", tmp_path, "train")
    shots = few_shot(train, 8, seed=0)
    val = validation_split(train, exclude=shots, per_class=5, seed=0)
    assert not set(val.files) & set(shots.files)
    assert np.bincount(val.labels).tolist() == [5, 5, 5]
    with pytest.warns(UserWarning, match="has 12 usable image"):  # default ~64 images: 22 per class
        big = validation_split(train, exclude=shots, seed=0)
    assert np.bincount(big.labels).tolist() == [12, 12, 12] and not set(big.files) & set(shots.files)
    test = load_dataset("rsna18", tmp_path, "test")
    with pytest.raises(DataError, match="refusing to carve validation data from the test split"):
        validation_split(test, exclude=shots)


def test_calibration_split_is_disjoint_seeded_and_leaves_the_tuning_split_as_it_was(tmp_path):
    make_dataset_tree(tmp_path, "rsna18", per_class=[20, 20, 20])
    train = load_dataset("rsna18", tmp_path, "train")
    shots = few_shot(train, 4, seed=3)
    tuning = validation_split(train, exclude=shots, per_class=5, seed=3)
    calib = calibration_split(train, exclude=[shots, tuning], per_class=6, seed=3, manifest_path=tmp_path / "c.json")
    assert calib.kind == "calibration" and np.bincount(calib.labels).tolist() == [6, 6, 6]
    assert not set(calib.files) & (set(shots.files) | set(tuning.files))
    # its own stream: the same seed draws the same calibration images, and the tuning split does not
    # depend on whether a calibration split is drawn after it
    again = calibration_split(train, exclude=[shots, tuning], per_class=6, seed=3)
    assert again.files == calib.files and validation_split(train, exclude=shots, per_class=5, seed=3).files == tuning.files
    assert calibration_split(train, exclude=[shots, tuning], per_class=6, seed=4).files != calib.files
    assert calibration_split(train, exclude=[shots, tuning], per_class=6, seed=3,
                             manifest_path=tmp_path / "c.json").files == calib.files  # the manifest is reused
    with pytest.raises(DataError, match="holds a different split"):
        validation_split(train, exclude=shots, per_class=6, seed=3, manifest_path=tmp_path / "c.json")
    with pytest.raises(DataError, match="refusing to carve calibration data from the test split"):
        calibration_split(load_dataset("rsna18", tmp_path, "test"), exclude=[shots])


@pytest.mark.parametrize(("val", "calib", "left", "expected"), [
    (None, None, 20, (8, 8)),     # both defaults fit (C = 9: max(4, ceil(64 / 9)) = 8)
    (None, None, 10, (5, 5)),     # too few: half each
    (None, None, 5, (2, 3)),
    (3, None, 8, (3, 5)),         # a set size is kept, the other gets what is left (up to its default)
    (None, 2, 20, (8, 2)),
    (4, 4, 8, (4, 4)),
])
def test_labelled_sizes(tmp_path, val, calib, left, expected):
    from calibprompt.runs.common import labelled_sizes

    make_dataset_tree(tmp_path, "kather", per_class=[left + 2] * 9, splits=["train"])
    train = load_dataset("kather", tmp_path, "train")
    assert labelled_sizes(train, 2, val, calib, "kather") == expected


@pytest.mark.parametrize(("val", "calib", "left"), [(None, None, 1), (8, None, 8), (5, 5, 8), (None, 3, 3)])
def test_labelled_sizes_refuses_a_pool_too_small(tmp_path, val, calib, left):
    from calibprompt.runs.common import labelled_sizes

    make_dataset_tree(tmp_path, "kather", per_class=[left + 2] * 9, splits=["train"])
    train = load_dataset("kather", tmp_path, "train")
    with pytest.raises(DataError, match="--val-per-class .* / --calib-per-class .*left after the few-shot split"):
        labelled_sizes(train, 2, val, calib, "kather")


def test_small_classes_and_corrupt_images(tmp_path):
    base = make_dataset_tree(tmp_path, "pannuke", per_class={"benign": 6, "malignant": 2}, splits=["train"])
    ds = load_dataset("pannuke", tmp_path, "train")
    with pytest.raises(DataError, match="fewer than 4.*strict"):
        few_shot(ds, 4, seed=0, strict=True)
    corrupt = [base / f"images/train/benign/img_00{i}.png" for i in range(3)]
    for path in corrupt:
        path.write_bytes(path.read_bytes()[:60])  # truncated files
    with pytest.warns(UserWarning, match="class 'malignant' has 2 usable image"):
        m = few_shot(ds, 4, seed=0)
    assert np.bincount(m.labels).tolist() == [3, 2]  # only 3 benign images decode
    reasons = {e["file"]: e["reason"] for e in m.excluded}
    assert sorted(reasons) == [f"benign/img_00{i}.png" for i in range(3)]
    assert all("unreadable image" in r for r in reasons.values())
    with pytest.raises(DataError, match="img_00.\\.png: unreadable image"):
        few_shot(ds, 4, seed=0, strict=True)


# ---------------------------------------------------------------------------------------------
# Feature cache
# ---------------------------------------------------------------------------------------------


class CountingBackbone:
    """Wraps a backbone and counts the images it encodes."""

    def __init__(self, inner):
        self.inner, self.calls, self.images = inner, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_images(self, pixels):
        self.calls += 1
        self.images += pixels.shape[0]
        return self.inner.encode_images(pixels)


@pytest.fixture
def image_paths(tmp_path):
    base = make_dataset_tree(tmp_path / "data", "covid", per_class=[7, 6], splits=["test"])
    return load_dataset("covid", base, "test").paths


def test_second_run_encodes_nothing_and_matches(tmp_path, tiny_backbone, image_paths):
    counting = CountingBackbone(tiny_backbone)
    store = FeatureStore(tmp_path / "cache", shard_size=4)
    first = store.features(counting, image_paths, batch_size=5, num_workers=0, progress=False)
    assert counting.images == 13 and first.encoded == 13 and first.features.shape == (13, 16)
    direct = tiny_backbone.encode_images(torch.stack([tiny_backbone.image_transform()(
        __import__("PIL.Image").Image.open(p).convert("RGB")) for p in image_paths]))
    assert torch.allclose(first.features, direct, atol=1e-6)
    again = FeatureStore(tmp_path / "cache").features(counting, image_paths, num_workers=0, progress=False)
    assert counting.images == 13 and again.encoded == 0 and again.reused == 13
    assert torch.equal(again.features, first.features)
    shards = sorted((tmp_path / "cache").rglob("shard-*.json"))
    sizes = sorted(json.loads(p.read_text())["shape"][0] for p in shards)
    assert sizes == [3, 5, 5]  # shards flush at batch boundaries once they hold >= 4 rows


def test_interrupted_extraction_resumes_without_corrupt_entries(tmp_path, tiny_backbone, image_paths):
    class Exploding(CountingBackbone):
        def encode_images(self, pixels):
            if self.calls == 2:
                raise KeyboardInterrupt("killed")
            return super().encode_images(pixels)

    store = FeatureStore(tmp_path / "cache", shard_size=4)
    with pytest.raises(KeyboardInterrupt):
        store.features(Exploding(tiny_backbone), image_paths, batch_size=4, num_workers=0, progress=False)
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    complete = list((tmp_path / "cache").rglob("shard-*.json"))
    assert len(complete) == 2  # 8 images in two complete shards survived
    counting = CountingBackbone(tiny_backbone)
    resumed = FeatureStore(tmp_path / "cache", shard_size=4).features(
        counting, image_paths, batch_size=4, num_workers=0, progress=False)
    assert counting.images == 5 and resumed.features.shape[0] == 13
    fresh = FeatureStore(tmp_path / "fresh").features(tiny_backbone, image_paths, num_workers=0, progress=False)
    assert torch.allclose(resumed.features, fresh.features, atol=1e-6)


def test_cache_misses_on_changed_file_or_backbone(tmp_path, tiny_backbone, image_paths):
    store = FeatureStore(tmp_path / "cache")
    store.features(tiny_backbone, image_paths, num_workers=0, progress=False)
    write_image(image_paths[0], seed=4242)
    counting = CountingBackbone(tiny_backbone)
    store.features(counting, image_paths, num_workers=0, progress=False)
    assert counting.images == 1
    other = CountingBackbone(tiny_backbone)
    other.__dict__["fingerprint"] = "0" * 32
    store.features(other, image_paths, num_workers=0, progress=False)
    assert other.images == 13


def test_corrupt_images_are_reported_or_abort(tmp_path, tiny_backbone, image_paths):
    image_paths[3].write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    result = FeatureStore(tmp_path / "cache").features(tiny_backbone, image_paths, num_workers=0, progress=False)
    assert result.features.shape[0] == 12 and 3 not in result.index
    assert result.excluded[0][0] == str(image_paths[3]) and "unreadable image" in result.excluded[0][1]
    with pytest.raises(DataError, match="unreadable image.*strict=True"):
        FeatureStore(tmp_path / "cache2").features(tiny_backbone, image_paths, num_workers=0,
                                                   progress=False, strict=True)


def test_tampered_shard_is_detected_and_reencoded(tmp_path, tiny_backbone, image_paths):
    store = FeatureStore(tmp_path / "cache", shard_size=100)
    first = store.features(tiny_backbone, image_paths, num_workers=0, progress=False)
    sidecar = next((tmp_path / "cache").rglob("shard-*.json"))
    info = json.loads(sidecar.read_text())
    info["shape"] = [99, 16]
    sidecar.write_text(json.dumps(info))
    counting = CountingBackbone(tiny_backbone)
    with pytest.warns(RuntimeWarning, match="is invalid"):
        again = FeatureStore(tmp_path / "cache").features(counting, image_paths, num_workers=0, progress=False)
    assert counting.images == 13 and torch.allclose(again.features, first.features, atol=1e-6)


def test_view_bank_is_seeded_per_image_and_view(tmp_path, tiny_backbone, image_paths):
    store = FeatureStore(tmp_path / "cache")
    bank = store.views(tiny_backbone, image_paths, views=3, kind="train", num_workers=0, progress=False)
    assert bank.features.shape == (13, 3, 16)
    assert not torch.allclose(bank.features[:, 0], bank.features[:, 1])
    # the same views whatever the order, batching or worker count
    reordered = FeatureStore(tmp_path / "other").views(
        tiny_backbone, image_paths[::-1], views=3, kind="train", batch_size=2, num_workers=2, progress=False)
    assert torch.allclose(reordered.features.flip(0), bank.features, atol=1e-6)
    eval_feats = store.features(tiny_backbone, image_paths, num_workers=0, progress=False).features
    assert not torch.allclose(eval_feats, bank.features[:, 0])


def test_holdout_split_is_stratified_disjoint_and_depends_only_on_the_listing(tmp_path):
    from calibprompt.data import holdout_split, load_train_test
    from calibprompt.runs import PromptRunConfig, TPTRunConfig

    for c, n in (("a", 10), ("b", 3), ("c", 7)):
        (tmp_path / "flat" / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "flat" / c / f"{i:02d}.png")
    whole = load_dataset("imagefolder", tmp_path / "flat", "all")
    train, test = holdout_split(whole, 0.3)
    assert np.bincount(test.labels).tolist() == [3, 1, 2]  # round(0.3 n), at least 1
    assert set(train.files).isdisjoint(test.files) and set(train.files) | set(test.files) == set(whole.files)
    assert list(test.files) == sorted(test.files) and (train.split, test.split) == ("train", "test")
    # the listing's order does not matter; the same fraction gives the same split
    shuffled = whole.subset(np.random.default_rng(3).permutation(len(whole)))
    assert holdout_split(shuffled, 0.3)[1].files == test.files
    assert load_train_test("imagefolder", tmp_path / "flat", 0.3)[1].files == test.files
    # prompt runs and TPT runs on the same folder and fraction are measured on the same images
    common = {"backbone": "demo", "dataset": "imagefolder", "root": str(tmp_path / "flat"), "test_fraction": 0.3}
    assert PromptRunConfig(**common).load_splits()[1].files == test.files
    no_train, tpt_test = TPTRunConfig(**common, method="tpt").load_splits()
    assert no_train is None and tpt_test.files == test.files
    # a class of one image cannot be split; fractions outside (0, 1) are refused
    (tmp_path / "flat" / "d").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "d" / "0.png")
    with pytest.raises(DataError, match=r"\['d'\] have fewer than 2 images"):
        load_train_test("imagefolder", tmp_path / "flat", 0.3)
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(DataError, match="strictly between 0 and 1"):
            holdout_split(whole, bad)


def test_csv_split_column_and_train_without_one(tmp_path):
    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "split.csv").write_text("path,label\n0.png,cat,train\n1.png,dog,train\n2.png,cat,test\n3.png,dog,test\n")
    train, test = load_dataset("csv", tmp_path / "split.csv", "train"), load_dataset("csv", tmp_path / "split.csv")
    assert train.files == ("0.png", "1.png") and test.files == ("2.png", "3.png")
    assert train.classnames == test.classnames == ("cat", "dog")
    with pytest.raises(DataError, match="a held-out test\\s+fraction is only for a CSV without one"):
        load_dataset("csv", tmp_path / "split.csv", "all")
    (tmp_path / "plain.csv").write_text("0.png,cat\n1.png,dog\n")
    assert len(load_dataset("csv", tmp_path / "plain.csv", "test")) == 2  # a single test set
    with pytest.raises(DataError, match="no split column"):
        load_dataset("csv", tmp_path / "plain.csv", "train")
    (tmp_path / "mixed.csv").write_text("0.png,cat,train\n1.png,dog\n")
    with pytest.raises(DataError, match="mixed.csv:2: no split"):
        load_dataset("csv", tmp_path / "mixed.csv", "train")
