"""A content-addressed cache of frozen image features.

Every image is identified by the hash of its bytes. Features live in *tables*, one per
(backbone fingerprint, image transform, train/eval, augmentation view index, augmentation
seed); a table maps image hashes to feature rows, stored in shards::

    CACHE/<backbone>-<fp12>/<table key16>/meta.json
    CACHE/<backbone>-<fp12>/<table key16>/shard-<id>.safetensors   features (n, D) float32
    CACHE/<backbone>-<fp12>/<table key16>/shard-<id>.json          sidecar: key, hashes, shape, dtype

A shard counts only once its sidecar exists; both files are written atomically (temporary file +
rename), the tensors first, so a killed extraction leaves complete shards and nothing else, and
the next call encodes only what is missing. Several processes may share a cache (Ray workers):
shard names are unique, and what a killed writer leaves is removed once it is an hour old. Shards are written incrementally: after every encoded
batch of at least ``FeatureStore.min_shard_rows`` images (smaller batches are gathered until they
reach that many images or ``FeatureStore.flush_seconds`` have passed), and on any exception
(Ctrl-C) whatever is complete; so an interruption loses at most the batch in flight. Shards are
verified on scan (key, tensor file present with the recorded size) and on read (shape, dtype);
a shard that fails is reported, removed and re-encoded, never read.

Augmented views have one entry point, :meth:`FeatureStore.views`, which returns (N, V, D) for
both kinds of :mod:`calibprompt.data.views`: ``kind="train"`` (the prompt-tuning crops, views
0..V-1, one table per view) and ``kind="test_time"`` (TPT: view 0 is the evaluation transform --
the table of :meth:`FeatureStore.features` -- and views 1..V-1 the test-time views, one table
per view). View v of an image runs under the torch seed ``view_seed(image hash, v, augmentation
seed)``, so it is the same crop on every machine, in every worker and for every backbone with
the same preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from calibprompt.data.datasets import DataError
from calibprompt.data.images import file_hash, open_image
from calibprompt.data.views import VIEW_KINDS, view_seed, view_transform
from calibprompt.files import atomic_path, slug, write_json
from calibprompt.progress import rate_progress

__all__ = ["FeatureResult", "FeatureStore", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$CALIBPROMPT_CACHE`` or ``~/.cache/calibprompt``."""
    return Path(os.environ.get("CALIBPROMPT_CACHE", Path.home() / ".cache" / "calibprompt"))


@dataclass
class FeatureResult:
    """Features of the readable inputs, in input order.

    ``features`` is (N_ok, D) -- or (N_ok, V, D) for augmented views; ``index`` holds the input
    positions they belong to; ``excluded`` lists ``(path, reason)`` of inputs without features.
    """

    features: torch.Tensor
    index: list[int]
    hashes: list[str]
    excluded: list[tuple[str, str]] = field(default_factory=list)
    encoded: int = 0
    reused: int = 0
    tables: list[str] = field(default_factory=list)


class _Images(torch.utils.data.Dataset):
    """Decoded + transformed images; a failure is returned with its reason, not raised.

    With a seed per image, the transform runs under that torch seed; with a *list* of seeds per
    image, the item is the stack of one view per seed (the image is decoded once)."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Any], torch.Tensor],
                 seeds: Sequence[int | list[int]] | None) -> None:
        self.paths, self.transform, self.seeds = list(paths), transform, seeds

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = open_image(self.paths[i])
        except Exception as exc:
            return i, None, f"unreadable image ({type(exc).__name__}: {str(exc)[:120]})"
        if self.seeds is None:
            return i, self.transform(image), None
        seeds = self.seeds[i]
        views = []
        for seed in seeds if isinstance(seeds, list) else [seeds]:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                views.append(self.transform(image))
        return i, torch.stack(views) if isinstance(seeds, list) else views[0], None


def _collate(items: list) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    ok = [(i, t) for i, t, err in items if err is None]
    errors = [(i, err) for i, _, err in items if err is not None]
    pixels = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], pixels, errors


class _Table:
    """One feature table: image hash -> row, over complete shards."""

    def __init__(self, directory: Path, key: dict[str, Any]) -> None:
        self.dir = directory
        self.key = key
        self.key_id = _key_id(key)
        directory.mkdir(parents=True, exist_ok=True)
        meta = directory / "meta.json"
        if meta.is_file():
            stored = json.loads(meta.read_text())
            if stored.get("key") != key:
                raise DataError(f"{meta}: table key differs from the expected one (hash collision or a "
                                "tampered cache); delete this directory")
        else:
            write_json(meta, {"key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.rows: dict[str, tuple[str, int]] = {}
        self._cache: dict[str, torch.Tensor] = {}
        self._info: dict[str, dict[str, Any]] = {}  # sidecar contents of each valid shard
        self._scan()

    def _scan(self) -> None:
        for leftover in self.dir.glob(".*.tmp"):  # a killed writer's; a live one's is younger
            _remove_if_stale(leftover)
        for sidecar in sorted(self.dir.glob("shard-*.json")):
            try:
                info = json.loads(sidecar.read_text())
                if info.get("key_id") != self.key_id:
                    raise ValueError("key differs")
                tensor_file = sidecar.with_suffix(".safetensors")
                if not tensor_file.is_file():
                    raise ValueError("tensor file missing")
                if "bytes" in info and tensor_file.stat().st_size != info["bytes"]:
                    raise ValueError(f"tensor file has {tensor_file.stat().st_size} bytes, "
                                     f"expected {info['bytes']} (torn write)")
                self._info[sidecar.stem] = info
            except (OSError, ValueError, TypeError, KeyError) as exc:
                self._discard(sidecar, str(exc))
                continue
            for row, h in enumerate(info["hashes"]):
                self.rows.setdefault(h, (sidecar.stem, row))
        complete = {s.stem for s in self.dir.glob("shard-*.json")}
        for orphan in self.dir.glob("shard-*.safetensors"):
            if orphan.stem not in complete:  # killed between the two writes (or another process is writing)
                _remove_if_stale(orphan)

    def _discard(self, sidecar: Path, reason: str) -> None:
        warnings.warn(f"feature cache: shard {sidecar} is invalid ({reason}); it is removed and "
                      "its images will be encoded again", RuntimeWarning, stacklevel=4)
        sidecar.unlink(missing_ok=True)
        sidecar.with_suffix(".safetensors").unlink(missing_ok=True)
        self._info.pop(sidecar.stem, None)
        self._cache.pop(sidecar.stem, None)
        self.rows = {h: loc for h, loc in self.rows.items() if loc[0] != sidecar.stem}

    def _load(self, shard: str) -> torch.Tensor:
        if shard not in self._cache:
            sidecar = self.dir / f"{shard}.json"
            info = self._info.get(shard) or json.loads(sidecar.read_text())
            try:
                tensor = load_file(str(self.dir / f"{shard}.safetensors"))["features"]
            except Exception as exc:
                self._discard(sidecar, f"unreadable: {exc}")
                raise _StaleShard(shard) from exc
            if list(tensor.shape) != info["shape"] or str(tensor.dtype) != info["dtype"]:
                self._discard(sidecar, f"shape/dtype {list(tensor.shape)}/{tensor.dtype} != "
                                       f"{info['shape']}/{info['dtype']}")
                raise _StaleShard(shard)
            self._cache[shard] = tensor
        return self._cache[shard]

    def gather(self, hashes: Sequence[str]) -> torch.Tensor:
        rows = [self.rows[h] for h in hashes]
        by_shard: dict[str, list[int]] = {}
        for pos, (shard, _) in enumerate(rows):
            by_shard.setdefault(shard, []).append(pos)
        first = self._load(rows[0][0])
        out = torch.empty(len(rows), first.shape[1], dtype=first.dtype)
        for shard, positions in by_shard.items():  # index tensors: cheap with many small shards
            source = torch.tensor([rows[p][1] for p in positions], dtype=torch.long)
            out.index_copy_(0, torch.tensor(positions, dtype=torch.long),
                            self._load(shard).index_select(0, source))
        return out

    def write(self, hashes: list[str], features: torch.Tensor) -> None:
        shard = f"shard-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
        features = features.detach().to("cpu", torch.float32).contiguous()
        with atomic_path(self.dir / f"{shard}.safetensors") as tmp:
            save_file({"features": features}, str(tmp))
            size = tmp.stat().st_size
        info = {"key_id": self.key_id, "hashes": hashes, "shape": list(features.shape),
                "dtype": str(features.dtype), "bytes": size}
        write_json(self.dir / f"{shard}.json", info)  # the commit point
        self._info[shard] = info
        for row, h in enumerate(hashes):
            self.rows.setdefault(h, (shard, row))
        self._cache[shard] = features


#: A temporary or half-committed cache file older than this (seconds) was left by a killed writer;
#: younger ones may belong to another process writing the same cache (sweep/certify on Ray).
STALE_SECONDS = 3600


def _remove_if_stale(path: Path) -> None:
    try:
        if time.time() - path.stat().st_mtime > STALE_SECONDS:
            path.unlink(missing_ok=True)
    except OSError:
        pass


class _StaleShard(Exception):
    pass


def _key_id(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class _Phase:
    """One progress bar shared by several extractions (e.g. every view of a training bank)."""

    def __init__(self, bar: Any, description: str, total: int) -> None:
        self.bar, self.encoded, self.start = bar, 0, time.perf_counter()
        self.task = bar.add_task(description, total=total, rate="-")

    def advance(self, done: int, encoded: int = 0) -> None:
        self.encoded += encoded
        rate = self.encoded / max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.task, advance=done, rate=f"{rate:.1f}")


class FeatureStore:
    """Image features computed once per (backbone, transform, view) and reused by every run."""

    #: a shard is written after every encoded batch that brings at least this many images ...
    min_shard_rows = 16
    #: ... or once this many seconds have passed since the last write (and at ``shard_size``)
    flush_seconds = 10.0

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None, shard_size: int = 1024) -> None:
        self.root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.shard_size = int(shard_size)
        self._hashes_file = self.root / "file_hashes.json"
        self._known: dict[str, list] = {}
        if self._hashes_file.is_file():
            try:
                self._known = json.loads(self._hashes_file.read_text())
            except json.JSONDecodeError:
                self._known = {}

    # -- identities ----------------------------------------------------------------------------
    def hashes(self, paths: Sequence[str | os.PathLike[str]]) -> list[str]:
        """Content hashes, remembered per (path, size, mtime) so unchanged files are not re-read."""
        out, changed = [], False
        for p in paths:
            path = Path(p).resolve()
            try:
                st = path.stat()
            except OSError as exc:
                raise DataError(f"{path}: cannot read ({exc.strerror})") from exc
            entry = self._known.get(str(path))
            if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
                out.append(entry[2])
                continue
            digest = file_hash(path)
            self._known[str(path)] = [st.st_size, st.st_mtime_ns, digest]
            out.append(digest)
            changed = True
        if changed:
            write_json(self._hashes_file, self._known)
        return out

    def _table_key(self, backbone: Any, transform: Any, view: int | None = None,
                   aug_seed: int = 0) -> dict[str, Any]:
        """Key of the evaluation table (``view=None``) or of training view ``view``."""
        train = view is not None
        return {
            "backbone": backbone.name, "fingerprint": backbone.fingerprint, "transform": repr(transform),
            "train": train, "view": int(view) if train else 0, "aug_seed": int(aug_seed) if train else 0,
        }

    def _table(self, key: dict[str, Any]) -> _Table:
        return _Table(self.root / f"{slug(key['backbone'])}-{key['fingerprint'][:12]}" / _key_id(key), key)

    # -- extraction ----------------------------------------------------------------------------
    def features(
        self, backbone: Any, paths: Sequence[str | os.PathLike[str]], *, batch_size: int = 64,
        num_workers: int | None = None, strict: bool = False, progress: bool = True,
    ) -> FeatureResult:
        """Features (N_ok, D) of ``paths`` under the backbone's evaluation transform; missing ones
        are encoded (and cached), the rest read from the cache. Augmented views: :meth:`views`."""
        return self._one_table(backbone, paths, backbone.image_transform(), None, 0, batch_size=batch_size,
                               num_workers=num_workers, strict=strict, progress=progress)

    def views(
        self, backbone: Any, paths: Sequence[str | os.PathLike[str]], views: int, *, kind: str,
        augmix: bool | None = None, aug_seed: int = 0, batch_size: int = 64,
        num_workers: int | None = None, strict: bool = False, progress: bool = True,
    ) -> FeatureResult:
        """Features (N_ok, V, D) of ``views`` augmented views per image, cached per view.

        ``kind="train"``: the prompt-tuning views 0..V-1
        (:func:`~calibprompt.data.views.train_view_transform`), for a bank from which training
        draws one view per image and epoch. ``kind="test_time"``: TPT's views (Shu et al. 2022),
        view 0 the evaluation transform (the table of :meth:`features`), views 1..V-1
        :func:`~calibprompt.data.views.tpt_view_transform`. View v of an image runs under the
        seed ``view_seed(image hash, v, aug_seed)``, so every method and hyperparameter evaluated
        on the same ``(kind, views, augmix, aug_seed)`` sees identical views. ``augmix=None`` is
        the kind's published default (train: off, test_time: on).
        """
        if kind not in VIEW_KINDS:
            raise DataError(f"views: kind must be one of {VIEW_KINDS}, got {kind!r}")
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise DataError(f"views: expected a positive integer, got {views!r}")
        kw = {"batch_size": batch_size, "num_workers": num_workers, "strict": strict, "progress": progress}
        transform = view_transform(kind, backbone.image_transform(), augmix)
        if kind == "train":
            return self._train_views(backbone, paths, views, transform, aug_seed, **kw)
        return self._test_time_views(backbone, paths, views, transform, aug_seed, **kw)

    def _one_table(
        self, backbone: Any, paths: Sequence[str | os.PathLike[str]], transform: Any, view: int | None,
        aug_seed: int, *, batch_size: int, num_workers: int | None, strict: bool, progress: bool,
        phase: _Phase | None = None,
    ) -> FeatureResult:
        """Features (N_ok, D) of one table: the evaluation transform (``view=None``) or training
        view ``view`` of ``transform`` under its per-image seeds."""
        paths = [Path(p) for p in paths]
        if not paths:
            raise DataError("features: no image paths given")
        hashes = self.hashes(paths)
        table = self._table(self._table_key(backbone, transform, view, aug_seed))
        missing = list(dict.fromkeys(h for h in hashes if h not in table.rows))
        first = {h: i for i, h in reversed(list(enumerate(hashes)))}
        bad: dict[str, str] = {}
        encoded = 0
        if phase is not None:
            phase.advance(len(paths) - len(missing))
        if missing:
            todo = [first[h] for h in missing]
            seeds = None if view is None else [view_seed(hashes[i], view, aug_seed) for i in todo]
            encoded, bad = self._extract(backbone, [table], [paths[i] for i in todo],
                                         [hashes[i] for i in todo], transform, seeds, batch_size,
                                         num_workers, strict, progress,
                                         label=f"{backbone.name} {'eval' if view is None else f'view {view}'}",
                                         phase=phase)
        index = [i for i, h in enumerate(hashes) if h in table.rows]
        excluded = [(str(paths[i]), bad.get(hashes[i], "no features")) for i, h in enumerate(hashes)
                    if h not in table.rows]
        try:
            feats = table.gather([hashes[i] for i in index]) if index else torch.empty(0, backbone.embed_dim)
        except _StaleShard:
            return self._one_table(backbone, paths, transform, view, aug_seed, batch_size=batch_size,
                                   num_workers=num_workers, strict=strict, progress=progress, phase=phase)
        return FeatureResult(feats, index, [hashes[i] for i in index], excluded,
                             encoded=encoded, reused=len(set(hashes)) - len(missing),
                             tables=[str(table.dir)])

    def _train_views(
        self, backbone: Any, paths: Sequence[str | os.PathLike[str]], views: int, transform: Any,
        aug_seed: int, **kw: Any,
    ) -> FeatureResult:
        """The ``kind="train"`` views: one cache table per view, filled in one pass in which each
        image is hashed and decoded once and all its missing views derived from it (view v under
        its own seed, so the features equal a per-view extraction's), under one progress bar."""
        paths = [Path(p) for p in paths]
        if not paths:
            raise DataError("features: no image paths given")
        hashes = self.hashes(paths)
        tables = [self._table(self._table_key(backbone, transform, v, aug_seed)) for v in range(views)]
        unique = list(dict.fromkeys(hashes))
        missing = [h for h in unique if any(h not in t.rows for t in tables)]
        bad: dict[str, str] = {}
        encoded = 0
        if missing:
            first = {h: i for i, h in reversed(list(enumerate(hashes)))}
            seeds = [[view_seed(h, v, aug_seed) for v in range(views)] for h in missing]
            encoded, bad = self._extract(backbone, tables, [paths[first[h]] for h in missing], missing, transform,
                                         seeds, kw["batch_size"], kw["num_workers"], kw["strict"], kw["progress"],
                                         label=f"{backbone.name} {views} training views")
        index = [i for i, h in enumerate(hashes) if all(h in t.rows for t in tables)]
        present = set(index)
        excluded = [(str(paths[i]), bad.get(h, "no features")) for i, h in enumerate(hashes) if i not in present]
        try:
            stacked = (torch.stack([t.gather([hashes[i] for i in index]) for t in tables], dim=1) if index
                       else torch.empty(0, views, backbone.embed_dim))
        except _StaleShard:
            return self._train_views(backbone, paths, views, transform, aug_seed, **kw)
        return FeatureResult(stacked, index, [hashes[i] for i in index], excluded, encoded=encoded * views,
                             reused=(len(unique) - len(missing)) * views, tables=[str(t.dir) for t in tables])

    def _test_time_views(
        self, backbone: Any, paths: Sequence[str | os.PathLike[str]], views: int, transform: Any,
        aug_seed: int, **kw: Any,
    ) -> FeatureResult:
        """The ``kind="test_time"`` views: the evaluation features, then views 1..V-1 of every
        image encoded in one pass (the image decoded once)."""
        original = self.features(backbone, paths, **kw)
        if views == 1:
            original.features = original.features[:, None]
            return original
        paths = [Path(p) for p in paths]
        hashes = self.hashes(paths)
        tables = [self._table({
            "backbone": backbone.name, "fingerprint": backbone.fingerprint, "transform": repr(transform),
            "kind": "test_time_view", "view": v, "aug_seed": int(aug_seed),
        }) for v in range(1, views)]
        readable = list(dict.fromkeys(original.hashes))
        missing = [h for h in readable if any(h not in t.rows for t in tables)]
        encoded = 0
        if missing:
            first = {h: i for i, h in reversed(list(enumerate(hashes)))}
            seeds = [[view_seed(h, v, aug_seed) for v in range(1, views)] for h in missing]
            encoded, bad = self._extract(backbone, tables, [paths[first[h]] for h in missing], missing,
                                         transform, seeds, kw["batch_size"], kw["num_workers"], kw["strict"],
                                         kw["progress"], label=f"{backbone.name} {views} test-time views")
            if bad:  # decoded once for the original view; failing now means the file changed
                raise DataError(f"{next(iter(bad.values()))}: image changed while its views were encoded")
        try:
            augmented = torch.stack([t.gather(original.hashes) for t in tables], dim=1)
        except _StaleShard:
            return self._test_time_views(backbone, paths, views, transform, aug_seed, **kw)
        return FeatureResult(torch.cat([original.features[:, None], augmented], dim=1), original.index,
                             original.hashes, original.excluded, encoded=original.encoded + encoded,
                             reused=len(readable) - len(missing),
                             tables=[*original.tables, *(str(t.dir) for t in tables)])

    def _extract(
        self, backbone: Any, tables: list[_Table], paths: list[Path], hashes: list[str],
        transform: Callable, seeds: list | None, batch_size: int, num_workers: int | None,
        strict: bool, progress: bool, label: str, phase: _Phase | None = None,
    ) -> tuple[int, dict[str, str]]:
        """Encode ``paths`` into ``tables``: one table, or one per view when each image has a
        list of view seeds (items are then (V, 3, H, W) and view v goes to ``tables[v]``).

        Shards are written as batches complete (see the module docstring); on an exception the
        completed, not yet written batches are written before it propagates."""
        if num_workers is None:
            num_workers = min(4, max(0, (os.cpu_count() or 1) - 1))
        multi = seeds is not None and isinstance(seeds[0], list)
        loader = torch.utils.data.DataLoader(
            _Images(paths, transform, seeds), shuffle=False,
            batch_size=max(1, batch_size // len(seeds[0])) if multi else batch_size,
            num_workers=num_workers, collate_fn=_collate,
            pin_memory=backbone.device.type == "cuda",
        )
        bad: dict[str, str] = {}
        pending_hashes: list[str] = []
        pending: list[torch.Tensor] = []  # (n, D), or (n, V, D) with several views
        encoded = 0
        last_write = time.monotonic()

        def flush() -> None:
            nonlocal pending, pending_hashes, last_write
            if pending_hashes:
                batch_hashes, batch = pending_hashes, pending
                pending, pending_hashes = [], []  # never written twice, even if writing fails
                self._flush(tables, batch_hashes, batch, multi)
            last_write = time.monotonic()

        with nullcontext(None) if phase is not None else rate_progress(progress) as bar:
            if phase is None:
                phase = _Phase(bar, f"encoding {label}", len(paths))
            try:
                for idx, pixels, errors in loader:
                    for i, reason in errors:
                        if strict:
                            raise DataError(f"{paths[i]}: {reason} (strict=True)")
                        bad[hashes[i]] = reason
                    if pixels is not None:
                        flat = pixels.flatten(0, 1) if multi else pixels
                        feats = torch.cat([backbone.encode_images(chunk).cpu()
                                           for chunk in flat.split(batch_size)])
                        pending.append(feats.view(len(idx), -1, feats.shape[-1]) if multi else feats)
                        pending_hashes.extend(hashes[i] for i in idx)
                        encoded += len(idx)
                        if (len(pending_hashes) >= min(self.min_shard_rows, self.shard_size)
                                or time.monotonic() - last_write >= self.flush_seconds):
                            flush()
                    phase.advance(len(idx) + len(errors), len(idx))
            except BaseException:
                flush()  # keep what is complete (Ctrl-C, a strict error); then propagate
                raise
            flush()
        return encoded, bad

    @staticmethod
    def _flush(tables: list[_Table], hashes: list[str], pending: list[torch.Tensor], multi: bool) -> None:
        feats = torch.cat(pending)
        if not multi:
            tables[0].write(hashes, feats)
            return
        for v, table in enumerate(tables):
            todo = [row for row, h in enumerate(hashes) if h not in table.rows]
            if todo:
                table.write([hashes[r] for r in todo], feats[todo, v])
