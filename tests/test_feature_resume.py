"""Feature extraction writes its cache incrementally: an interruption loses at most the batch in
flight, the resumed cache equals an uninterrupted one, and a torn write is redone, never read."""

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from calibprompt.backbones import load_backbone
from calibprompt.data import features as F
from calibprompt.data.features import FeatureStore
from calibprompt.demo.tissue import write_demo_dataset

BATCH = 4


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("demo")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    base = write_demo_dataset(tmp_path_factory.mktemp("data"), per_class={"train": 2, "test": 10})
    return sorted((base / "images" / "test").rglob("*.png"))  # 40 images


def extract(backbone, cache, paths, **kw):
    kw = {"batch_size": BATCH, "num_workers": 0, "progress": False, **kw}
    return FeatureStore(cache).features(backbone, paths, **kw)


def interrupt_after(monkeypatch, backbone, k):
    calls = {"n": 0}
    encode = type(backbone).encode_images

    def encode_images(self, pixels):
        calls["n"] += 1
        if calls["n"] > k:
            raise KeyboardInterrupt("killed")
        return encode(self, pixels)

    monkeypatch.setattr(type(backbone), "encode_images", encode_images)


@pytest.mark.parametrize("k", [1, 3, 9])
def test_interrupted_extraction_resumes_with_only_the_remainder(tmp_path, monkeypatch, backbone, paths, k):
    with monkeypatch.context() as m:
        interrupt_after(m, backbone, k)
        with pytest.raises(KeyboardInterrupt):
            extract(backbone, tmp_path / "cache", paths)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]
    resumed = extract(backbone, tmp_path / "cache", paths)
    assert resumed.encoded == len(paths) - k * BATCH and resumed.reused == k * BATCH
    fresh = extract(backbone, tmp_path / "fresh", paths)
    assert fresh.encoded == len(paths)
    assert torch.equal(resumed.features, fresh.features) and resumed.hashes == fresh.hashes


def test_kill_9_loses_at_most_the_batch_in_flight(tmp_path, backbone, paths):
    """No exception handler runs under kill -9: the shards written after each batch survive."""
    script = textwrap.dedent("""
        import os, sys
        from calibprompt.backbones import load_backbone
        from calibprompt.data.features import FeatureStore
        backbone, calls = load_backbone("demo"), [0]
        encode = backbone.encode_images
        def killed(pixels):
            calls[0] += 1
            if calls[0] > 2:
                os._exit(9)
            return encode(pixels)
        backbone.encode_images = killed
        FeatureStore(sys.argv[1]).features(backbone, sys.argv[2:], batch_size=16, num_workers=0,
                                           progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache"), *map(str, paths)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    resumed = extract(backbone, tmp_path / "cache", paths, batch_size=16)
    assert resumed.encoded == len(paths) - 32
    fresh = extract(backbone, tmp_path / "fresh", paths, batch_size=16)
    assert torch.equal(resumed.features, fresh.features)


def test_tiny_batches_are_gathered_but_never_lost_on_ctrl_c(tmp_path, monkeypatch, backbone, paths):
    full = extract(backbone, tmp_path / "full", paths, batch_size=2)
    sizes = [json.loads(p.read_text())["shape"][0] for p in (tmp_path / "full").rglob("shard-*.json")]
    assert sorted(sizes) == [8, 16, 16]  # batches of 2 gathered into min_shard_rows = 16
    with monkeypatch.context() as m:
        interrupt_after(m, backbone, 5)  # 10 images, fewer than min_shard_rows: written on the way out
        with pytest.raises(KeyboardInterrupt):
            extract(backbone, tmp_path / "cache", paths, batch_size=2)
    resumed = extract(backbone, tmp_path / "cache", paths, batch_size=2)
    assert resumed.encoded == len(paths) - 10
    assert torch.equal(resumed.features, full.features)


def shards(cache):
    return sorted(cache.rglob("shard-*.json"))


@pytest.mark.parametrize("tear", ["sidecar_missing", "tensor_truncated", "tensor_truncated_old_sidecar"])
def test_torn_shard_is_detected_removed_and_redone(tmp_path, monkeypatch, backbone, paths, tear):
    first = extract(backbone, tmp_path / "cache", paths)
    sidecar = shards(tmp_path / "cache")[1]
    tensor_file = sidecar.with_suffix(".safetensors")
    rows = json.loads(sidecar.read_text())["shape"][0]
    if tear == "sidecar_missing":  # killed between the two writes, an hour ago (younger: maybe another writer's)
        sidecar.unlink()
        past = time.time() - F.STALE_SECONDS - 60
        os.utime(tensor_file, (past, past))
    else:
        data = tensor_file.read_bytes()
        tensor_file.write_bytes(data[: len(data) // 2])
        if tear == "tensor_truncated_old_sidecar":  # no recorded size: caught when loading
            info = json.loads(sidecar.read_text())
            del info["bytes"]
            sidecar.write_text(json.dumps(info))
    loaded = []
    load_file = F.load_file
    monkeypatch.setattr(F, "load_file", lambda path: (loaded.append(path), load_file(path))[1])
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        again = extract(backbone, tmp_path / "cache", paths)
    assert again.encoded == rows
    assert torch.equal(again.features, first.features)
    if tear != "tensor_truncated_old_sidecar":
        assert str(tensor_file) not in loaded  # never read
    assert not sidecar.exists() and not tensor_file.exists()
    assert extract(backbone, tmp_path / "cache", paths).encoded == 0


def test_many_small_shards_load_back(tmp_path, monkeypatch, backbone, paths):
    monkeypatch.setattr(FeatureStore, "min_shard_rows", 1)
    first = extract(backbone, tmp_path / "cache", paths, batch_size=1)
    assert len(shards(tmp_path / "cache")) == len(paths)
    again = extract(backbone, tmp_path / "cache", paths, batch_size=1)
    assert again.encoded == 0 and torch.equal(again.features, first.features)


def test_training_views_show_one_progress_bar(tmp_path, progress_bars, backbone, paths):
    bars = progress_bars(F)
    store = FeatureStore(tmp_path / "cache")
    out = store.views(backbone, paths, 3, kind="train", batch_size=8, num_workers=0, progress=False)
    assert out.features.shape[:2] == (len(paths), 3) and out.encoded == 3 * len(paths)
    assert len(bars) == 1
    (task,) = bars[0].tasks
    assert task.total == len(paths) and task.completed == len(paths)  # images: each decoded once for its 3 views
    # decoding once and deriving every view gives what extracting one view at a time gives
    from calibprompt.data.views import view_transform

    transform = view_transform("train", backbone.image_transform())
    for v in range(3):
        alone = FeatureStore(tmp_path / f"alone{v}")._one_table(
            backbone, paths, transform, v, 0, batch_size=8, num_workers=0, strict=False, progress=False)
        assert torch.allclose(alone.features, out.features[:, v], atol=1e-5)  # batch composition: float32 rounding


def test_a_shared_cache_keeps_what_another_process_is_writing(tmp_path, backbone, paths):
    """Another process's temporary file or shard awaiting its sidecar is left alone; a killed
    writer's (older than an hour) is removed -- so Ray workers can share one cache."""
    extract(backbone, tmp_path / "cache", paths[:8])
    (table,) = {p.parent for p in (tmp_path / "cache").rglob("shard-*.json")}
    young = [table / ".shard-x.safetensors.123.tmp", table / "shard-20990101000000-aaaaaaaa.safetensors"]
    old = [table / ".shard-y.json.456.tmp", table / "shard-20000101000000-bbbbbbbb.safetensors"]
    for p in young + old:
        p.write_bytes(b"partial")
    for p in old:
        past = time.time() - F.STALE_SECONDS - 60
        os.utime(p, (past, past))
    again = extract(backbone, tmp_path / "cache", paths[:8])
    assert again.encoded == 0
    assert all(p.exists() for p in young) and not any(p.exists() for p in old)
