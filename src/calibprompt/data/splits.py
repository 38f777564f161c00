"""Reproducible few-shot, tuning and calibration splits, saved as JSON manifests.

``few_shot(dataset, shots, seed)`` draws ``shots`` images per class from the **sorted** file list
with a seeded generator (the published code samples in filesystem order, so the same seed gave
different subsets on different machines). Files that do not decode are skipped in the draw and
recorded with their reason. A manifest stores relative paths, labels, content hashes and the
dataset fingerprint; loading one validates that every file still exists with the same content.

Labelled images beyond the few shots have one purpose each, all drawn from the *train* pool, never
from test: ``validation_split(dataset, exclude=few_shot_manifest, ...)`` is the **tuning** split
(hyperparameter choice; the name "validation" is kept for existing scripts and manifests), and
``calibration_split(dataset, exclude=[few_shot, tuning], ...)`` the disjoint **calibration** split
(post-hoc calibrators, decision methods). Each has its own seeded stream.

``load_train_test(name, root, test_fraction=None)`` is how runs get their train and test splits:
the dataset's own (with the class lists cross-checked), or -- for a folder or CSV without a
split -- a seeded, class-stratified test set held out by :func:`holdout_split`.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibprompt.data.datasets import ALL, DataError, Dataset, load_dataset
from calibprompt.data.images import check_image, file_hash
from calibprompt.files import write_json

__all__ = ["HOLDOUT_SEED", "SplitManifest", "calibration_split", "cv_folds", "default_per_class", "few_shot", "holdout_split",
           "load_train_test", "split_rng", "validation_split"]

MANIFEST_VERSION = 1
_STREAMS = {"few_shot": 1, "validation": 2, "holdout": 3, "calibration": 4, "folds": 6}

#: The seed of every held-out test set: independent of the run seed, so that every seed and
#: method of an experiment is measured on the same images.
HOLDOUT_SEED = 0


def split_rng(seed: int, stream: str) -> np.random.Generator:
    """The generator of one sampler: the run seed and a fixed stream id per purpose."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _STREAMS[stream]]))


@dataclass
class SplitManifest:
    """A saved subset of a dataset split: what was drawn, how, and from what."""

    kind: str
    dataset: str
    split: str
    seed: int
    shots: int
    classnames: list[str]
    files: list[str]
    labels: list[int]
    hashes: list[str]
    dataset_fingerprint: str
    excluded: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    version: int = MANIFEST_VERSION

    def __len__(self) -> int:
        return len(self.files)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write atomically as JSON."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> SplitManifest:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            manifest = cls(**data)
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise DataError(f"{path}: not a readable split manifest ({exc})") from exc
        if not (len(manifest.files) == len(manifest.labels) == len(manifest.hashes)):
            raise DataError(f"{path}: files, labels and hashes have different lengths")
        return manifest

    def validate(self, dataset: Dataset, source: str = "manifest") -> None:
        """Every file must exist under ``dataset.root`` with its recorded content and label."""
        if dataset.name != self.dataset or list(dataset.classnames) != list(self.classnames):
            raise DataError(f"{source}: made for dataset '{self.dataset}' {self.classnames}, "
                            f"not '{dataset.name}' {list(dataset.classnames)}")
        problems = []
        for rel, expected in zip(self.files, self.hashes, strict=True):
            path = dataset.root / rel
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif file_hash(path) != expected:
                problems.append(f"{path}: content changed since the manifest was written")
        if problems:
            more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
            raise DataError(f"{source}: {len(problems)} file(s) no longer match: "
                            + "; ".join(problems[:5]) + more
                            + ". Delete the manifest to draw a new split, or restore the files.")

    def subset_of(self, dataset: Dataset) -> Dataset:
        """The manifest's files as a Dataset (validated)."""
        self.validate(dataset)
        index = {f: i for i, f in enumerate(dataset.files)}
        missing = [f for f in self.files if f not in index]
        if missing:
            raise DataError(f"manifest files not in the dataset listing: {missing[:5]}")
        return dataset.subset([index[f] for f in self.files], split=f"{dataset.split}:{self.kind}")


def _draw(
    dataset: Dataset, per_class: int, rng: np.random.Generator, strict: bool,
    exclude: set[str] = frozenset(),
) -> tuple[list[int], list[dict[str, str]], list[str]]:
    """``per_class`` readable files per class in a seeded order of the sorted listing."""
    chosen, excluded, notes = [], [], []
    files = np.asarray(dataset.files)
    order = np.argsort(files, kind="stable")  # the sorted listing, however it was produced
    for label, name in enumerate(dataset.classnames):
        pool = [int(i) for i in order if dataset.labels[i] == label and dataset.files[i] not in exclude]
        permuted = [pool[j] for j in rng.permutation(len(pool))]
        taken = []
        for i in permuted:
            if len(taken) == per_class:
                break
            reason = check_image(dataset.path(i))
            if reason is None:
                taken.append(i)
            else:
                excluded.append({"file": dataset.files[i], "reason": reason})
                if strict:
                    raise DataError(f"{dataset.path(i)}: {reason}")
        if len(taken) < per_class:
            msg = (f"class '{name}' has {len(taken)} usable image(s), fewer than {per_class}; "
                   "using all of them")
            if strict:
                raise DataError(f"{dataset.root}: {msg.replace('; using all of them', '')} (strict=True)")
            warnings.warn(msg, UserWarning, stacklevel=3)
            notes.append(msg)
        chosen.extend(taken)
    return chosen, excluded, notes


def _manifest(kind: str, dataset: Dataset, seed: int, shots: int, chosen: Sequence[int],
              excluded: list[dict[str, str]], notes: list[str]) -> SplitManifest:
    chosen = sorted(chosen, key=lambda i: (int(dataset.labels[i]), dataset.files[i]))
    return SplitManifest(
        kind=kind, dataset=dataset.name, split=dataset.split, seed=int(seed), shots=int(shots),
        classnames=list(dataset.classnames), files=[dataset.files[i] for i in chosen],
        labels=[int(dataset.labels[i]) for i in chosen],
        hashes=[file_hash(dataset.path(i)) for i in chosen],
        dataset_fingerprint=dataset.fingerprint,
        excluded=[*excluded, *({"file": f, "reason": r} for f, r in dataset.excluded)],
        warnings=notes,
    )


def few_shot(
    dataset: Dataset, shots: int, seed: int, *, strict: bool = False,
    manifest_path: str | Path | None = None,
) -> SplitManifest:
    """``shots`` images per class, drawn reproducibly (see the module docstring).

    With ``manifest_path``: an existing manifest is loaded, checked to be for the same dataset,
    shots and seed, validated against the files, and returned; otherwise the new one is saved
    there.
    """
    if int(shots) < 1:
        raise DataError(f"shots: expected a positive integer, got {shots!r}")
    if manifest_path is not None and Path(manifest_path).is_file():
        manifest = SplitManifest.load(manifest_path)
        if (manifest.kind, manifest.dataset, manifest.shots, manifest.seed) != ("few_shot", dataset.name, shots, seed):
            raise DataError(
                f"{manifest_path}: holds a {manifest.kind} split of '{manifest.dataset}' with "
                f"{manifest.shots} shots, seed {manifest.seed}; asked for {shots} shots, seed {seed} "
                f"of '{dataset.name}'. Use another path or delete it."
            )
        manifest.validate(dataset, source=str(manifest_path))
        return manifest
    chosen, excluded, notes = _draw(dataset, int(shots), split_rng(seed, "few_shot"), strict)
    manifest = _manifest("few_shot", dataset, seed, shots, chosen, excluded, notes)
    if manifest_path is not None:
        manifest.save(manifest_path)
    return manifest


def validation_split(
    dataset: Dataset, exclude: SplitManifest | None = None, per_class: int | None = None,
    seed: int = 0, *, strict: bool = False, manifest_path: str | Path | None = None,
) -> SplitManifest:
    """The **tuning** split (its historical name: validation): a class-balanced labelled set from
    ``dataset`` (a *train* split) minus the files of ``exclude`` (the few-shot manifest), used to
    choose hyperparameters. ``per_class`` defaults to ``max(4, ceil(64 / C))``."""
    return _labelled_split("validation", dataset, [exclude], per_class, seed, strict, manifest_path)


def calibration_split(
    dataset: Dataset, exclude: Sequence[SplitManifest | None] = (), per_class: int | None = None,
    seed: int = 0, *, strict: bool = False, manifest_path: str | Path | None = None,
) -> SplitManifest:
    """The **calibration** split: a class-balanced labelled set from ``dataset`` (a *train* split)
    minus the files of every manifest in ``exclude`` (the few-shot and tuning splits), reserved
    for post-hoc calibrators and decision methods -- their guarantees need images that chose
    nothing else. ``per_class`` defaults to ``max(4, ceil(64 / C))``: about 64 images, above the
    40-50 that temperature scaling needs (Tu et al. 2024)."""
    return _labelled_split("calibration", dataset, list(exclude), per_class, seed, strict, manifest_path)


def cv_folds(labels: Sequence[int] | np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0 .. ``folds`` - 1) of each item for class-stratified k-fold cross-validation:
    each class's items are put in a random order seeded by (seed, the folds stream, class) and dealt
    to the folds in turn, so every fold holds ⌊n_c / k⌋ or ⌈n_c / k⌉ items of class c. Deterministic
    for a seed; an item's fold depends on its class's items and their order only."""
    labels = np.asarray(labels)
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds: expected an integer >= 2, got {folds!r}")
    out = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        index = np.flatnonzero(labels == c)
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), _STREAMS["folds"], int(c)]))
        out[index[rng.permutation(len(index))]] = np.arange(len(index)) % folds
    return out


def default_per_class(num_classes: int) -> int:
    """The default size of a tuning or calibration split: ``max(4, ceil(64 / C))`` per class."""
    return max(4, math.ceil(64 / num_classes))


def _labelled_split(kind: str, dataset: Dataset, exclude: Sequence[SplitManifest | None], per_class: int | None,
                    seed: int, strict: bool, manifest_path: str | Path | None) -> SplitManifest:
    if dataset.split.startswith("test"):
        raise DataError(f"{kind}_split: refusing to carve {kind} data from the test split of "
                        f"{dataset.name}; pass the train split")
    for other in exclude:
        if other is not None and other.dataset != dataset.name:
            raise DataError(f"{kind}_split: the excluded manifest is for '{other.dataset}', not '{dataset.name}'")
    per_class = per_class or default_per_class(dataset.num_classes)
    if manifest_path is not None and Path(manifest_path).is_file():
        manifest = SplitManifest.load(manifest_path)
        if (manifest.kind, manifest.dataset, manifest.shots, manifest.seed) != (kind, dataset.name, per_class, seed):
            raise DataError(f"{manifest_path}: holds a different split ({manifest.kind}, "
                            f"{manifest.shots} per class, seed {manifest.seed}); use another path")
        manifest.validate(dataset, source=str(manifest_path))
        return manifest
    taken = {f for other in exclude if other is not None for f in other.files}
    chosen, excluded, notes = _draw(dataset, per_class, split_rng(seed, kind), strict, taken)
    manifest = _manifest(kind, dataset, seed, per_class, chosen, excluded, notes)
    if manifest_path is not None:
        manifest.save(manifest_path)
    return manifest


def holdout_split(dataset: Dataset, fraction: float) -> tuple[Dataset, Dataset]:
    """A class-stratified, seeded train/test split of a dataset without its own.

    Each class's **sorted** file list is permuted by ``SeedSequence([HOLDOUT_SEED, 3])`` (one
    generator, classes in label order); its first ``round(fraction * n_c)`` files -- at least 1,
    at most ``n_c - 1`` -- are the test set, the rest the train pool. The split depends only on
    the listing and ``fraction`` (never on the run seed); the two parts are disjoint and cover
    the dataset. A class with fewer than 2 images cannot be split and is an error naming it.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise DataError(f"test_fraction: expected a number strictly between 0 and 1, got {fraction!r}")
    counts = dataset.class_counts()
    small = [dataset.classnames[c] for c in np.flatnonzero(counts < 2)]
    if small:
        raise DataError(f"{dataset.root}: class(es) {small} have fewer than 2 images; a held-out test set "
                        "needs at least one train and one test image per class")
    rng = split_rng(HOLDOUT_SEED, "holdout")
    files = np.asarray(dataset.files)
    order = np.argsort(files, kind="stable")
    train, test = [], []
    for label in range(dataset.num_classes):
        pool = [int(i) for i in order if dataset.labels[i] == label]
        permuted = [pool[j] for j in rng.permutation(len(pool))]
        k = min(len(pool) - 1, max(1, round(fraction * len(pool))))
        test += permuted[:k]
        train += permuted[k:]
    def listing(indices: list[int]) -> list[int]:  # in sorted-file order, like a loaded split
        return sorted(indices, key=lambda i: dataset.files[i])

    return dataset.subset(listing(train), split="train"), dataset.subset(listing(test), split="test")


def load_train_test(name: str, root: str | Path, test_fraction: float | None = None) -> tuple[Dataset, Dataset]:
    """The train and test splits of a run.

    Without ``test_fraction``: the dataset's own ``train`` and ``test`` splits, whose class lists
    must agree (labels follow the folder order, so a test split lacking a class would silently
    shift every label after it). With it: :func:`holdout_split` of the whole folder or CSV
    (``split="all"``), which must not have a split of its own."""
    if test_fraction is None:
        train = load_dataset(name, root, "train")
        test = load_dataset(name, root, "test")
        if list(train.classnames) != list(test.classnames) or train.class_folders != test.class_folders:
            raise DataError(f"{root}: the train classes {list(train.class_folders or train.classnames)} differ "
                            f"from the test classes {list(test.class_folders or test.classnames)}; labels follow "
                            "the sorted folder order, so both splits need the same class folders")
        return train, test
    whole = load_dataset(name, root, ALL)
    return holdout_split(whole, test_fraction)
