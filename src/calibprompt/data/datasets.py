"""Datasets: the five medical datasets of the paper, any image folder, and CSV manifests.

Layout of the registered datasets (the BAPLe preprocessing used by CalibPrompt)::

    ROOT/<dir>/images/{train,test}/<class_folder>/*
    ROOT/<dir>/classnames.txt        one line per class: "<class_folder> <class name words...>"

Labels follow the **sorted** class-folder order. ``root`` may be ROOT or ROOT/<dir>.
A :class:`Dataset` lists its files relative to its root (sorted), labels, class names and
zero-shot templates, and has a fingerprint of its listing (relative paths, labels, sizes).
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "DataError",
    "Dataset",
    "DatasetSpec",
    "list_datasets",
    "load_dataset",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")
DEFAULT_TEMPLATE = "a photo of a {}."
#: The split name of a whole folder or CSV without its own train/test split.
ALL = "all"


class DataError(ValueError):
    """Bad dataset input: the message names the file (and line) and what was expected."""


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its directory, class folders -> prompt names, templates."""

    name: str
    directory: str
    classes: dict[str, str]
    templates: tuple[str, ...]
    description: str = ""


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("covid", "covid", {"covid": "covid", "normal": "normal"},
                    ("A chest X-ray image of {} patient",),
                    "COVID-19 Radiography (COVID vs Normal), 50/50 per class"),
        DatasetSpec("rsna18", "rsna18",
                    {"lung_opacity": "lung opacity",
                     "no_lung_opacity_not_normal": "no lung opacity, not normal",
                     "normal": "normal"},
                    ("A chest X-ray image of {} patient",), "RSNA pneumonia 2018, 80/20"),
        DatasetSpec("kather", "kather",
                    {"ADI": "adipose tissue", "BACK": "background", "DEB": "debris",
                     "LYM": "lymphocytes", "MUC": "mucus", "MUS": "smooth muscle",
                     "NORM": "normal colon mucosa", "STR": "cancer-associated stroma",
                     "TUM": "colorectal adenocarcinoma epithelium"},
                    ("An H&E image of {}.",), "NCT-CRC-HE-100K train / CRC-VAL-HE-7K test"),
        DatasetSpec("pannuke", "pannuke", {"benign": "benign", "malignant": "malignant"},
                    ("An H&E image patch of {} skin tissue.",), "PanNuke, 30% train / 70% test"),
        DatasetSpec("digestpath", "digestpath", {"benign": "benign", "malignant": "malignant"},
                    ("An H&E image patch of {} tissue.",), "DigestPath, 70/30 patch level"),
        DatasetSpec("demo", "demo",
                    {"ADI": "adipose tissue", "LYM": "lymphocytes", "STR": "cancer-associated stroma",
                     "TUM": "colorectal adenocarcinoma epithelium"},
                    ("An H&E image of {}.",),
                    "procedurally generated tissue patches of the embedded demo (calibprompt.demo.tissue)"),
    )
}


@dataclass(frozen=True)
class Dataset:
    """A labelled list of image files.

    ``files`` are POSIX paths relative to ``root``; ``labels[i]`` indexes ``classnames``.
    ``excluded`` holds ``(file, reason)`` of files left out (unreadable or not images).
    """

    name: str
    root: Path
    split: str
    files: tuple[str, ...]
    labels: np.ndarray
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    class_folders: tuple[str, ...] = ()
    excluded: tuple[tuple[str, str], ...] = field(default=())

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    @property
    def paths(self) -> list[Path]:
        return [self.root / f for f in self.files]

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def prompts(self, template: str | None = None) -> list[str]:
        """Zero-shot prompts, one per class, from ``template`` or the first registered one."""
        template = template or self.templates[0]
        return [template.format(name) for name in self.classnames]

    def subset(self, indices: Sequence[int], split: str | None = None) -> Dataset:
        index = np.asarray(indices, dtype=np.int64)
        return replace(self, files=tuple(self.files[i] for i in index), labels=self.labels[index],
                       split=split or self.split, excluded=())

    def without(self, bad: dict[str, str]) -> Dataset:
        """A copy without the files in ``bad`` (file -> reason), recorded in ``excluded``."""
        keep = [i for i, f in enumerate(self.files) if f not in bad]
        out = self.subset(keep)
        return replace(out, excluded=self.excluded + tuple(sorted(bad.items())))

    @cached_property
    def fingerprint(self) -> str:
        """Identity of the listing: name, split, class names, relative paths, labels, sizes
        (computed once per Dataset object: one stat per file)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.name}|{self.split}|{'|'.join(self.classnames)}".encode())
        for f, y in zip(self.files, self.labels.tolist(), strict=True):
            size = (self.root / f).stat().st_size if (self.root / f).exists() else -1
            h.update(f"\n{f}|{y}|{size}".encode())
        return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Scanning
# ---------------------------------------------------------------------------------------------


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name in ("Thumbs.db", "desktop.ini")


def _scan_class_folders(
    split_dir: Path, folders: Sequence[str]
) -> tuple[list[str], list[int], dict[str, str]]:
    """Sorted files per class folder (recursively); non-images are reported, not listed."""
    files, labels, bad = [], [], {}
    for label, folder in enumerate(folders):
        class_dir = split_dir / folder
        if not class_dir.is_dir():
            raise DataError(f"{class_dir}: class folder missing (expected one folder per class: "
                            f"{', '.join(folders)})")
        found = 0
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file() and not _is_hidden(p)):
            rel = path.relative_to(split_dir).as_posix()
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                bad[rel] = f"not an image (extension '{path.suffix or 'none'}')"
                continue
            files.append(rel)
            labels.append(label)
            found += 1
        if found == 0:
            raise DataError(f"{class_dir}: empty class folder (no image files); every class needs "
                            "at least one image")
    return files, labels, bad


def read_classnames(path: Path, folders: Sequence[str], registry: dict[str, str] | None = None) -> list[str]:
    """Class names from ``classnames.txt`` ("<folder> <name words>" per line), in folder order.

    Errors name the file and line: a folder that does not exist, a folder missing from the file,
    a duplicate, a line without a name, or (with ``registry``) a folder the registry does not know.
    """
    names: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) < 2:
            raise DataError(f"{path}:{number}: expected '<class_folder> <class name>', got {raw!r}")
        folder, name = parts
        if registry is not None and folder not in registry:
            raise DataError(f"{path}:{number}: class folder '{folder}' is not a class of this dataset "
                            f"(expected one of: {', '.join(registry)})")
        if folder not in folders:
            raise DataError(f"{path}:{number}: class folder '{folder}' has no directory (folders: "
                            f"{', '.join(folders)})")
        if folder in names:
            raise DataError(f"{path}:{number}: class folder '{folder}' listed twice")
        names[folder] = name.strip()
    missing = [f for f in folders if f not in names]
    if missing:
        raise DataError(f"{path}: no line for class folder(s) {', '.join(missing)}; expected one line "
                        "'<class_folder> <class name>' per folder")
    return [names[f] for f in folders]


def _resolve_root(root: Path, directory: str) -> Path:
    root = Path(root).expanduser()
    if (root / directory / "images").is_dir():
        return root / directory
    if (root / "images").is_dir():
        return root
    raise DataError(
        f"{root}: expected the layout ROOT/{directory}/images/{{train,test}}/<class_folder>/* "
        f"(pass ROOT or ROOT/{directory}); found no 'images' folder"
    )


def _load_registered(spec: DatasetSpec, root: Path, split: str) -> Dataset:
    base = _resolve_root(root, spec.directory)
    split_dir = base / "images" / split
    if not split_dir.is_dir():
        available = sorted(p.name for p in (base / "images").iterdir() if p.is_dir())
        raise DataError(f"{split_dir}: split '{split}' not found (available: {', '.join(available) or 'none'})")
    folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not _is_hidden(p))
    unknown = [f for f in folders if f not in spec.classes]
    if unknown or set(folders) != set(spec.classes):
        raise DataError(f"{split_dir}: class folders {folders} do not match the {spec.name} classes "
                        f"{sorted(spec.classes)}")
    names_file = base / "classnames.txt"
    if names_file.is_file():
        classnames = read_classnames(names_file, folders, registry=spec.classes)
    else:
        warnings.warn(f"{names_file} not found; using the registered class names of {spec.name}",
                      UserWarning, stacklevel=3)
        classnames = [spec.classes[f] for f in folders]
    files, labels, bad = _scan_class_folders(split_dir, folders)
    dataset = Dataset(spec.name, split_dir, split, tuple(files), np.asarray(labels, dtype=np.int64),
                      tuple(classnames), spec.templates, tuple(folders))
    return dataset.without(bad) if bad else dataset


def _load_imagefolder(root: Path, split: str, templates: Sequence[str] | None) -> Dataset:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: not a directory; expected ROOT/{{train,test}}/<class>/* (a flat ROOT/<class>/* "
                        "serves as a test set only)")
    has_splits = any((root / s).is_dir() for s in ("train", "test"))
    if split == ALL and has_splits:
        raise DataError(f"{root}: has its own split folders ({', '.join(s for s in ('train', 'test') if (root / s).is_dir())}); "
                        "a held-out test fraction is only for a folder without one -- drop --test-fraction")
    requested = split
    if split == ALL:
        split = ""
    elif split and not (root / split).is_dir() and (has_splits or split == "train"):
        if split == "train":
            raise DataError(f"{root}: no 'train' folder. Training needs ROOT/train/<class>/* and ROOT/test/<class>/*, "
                            "or a seeded held-out test set from the flat folder: --test-fraction 0.3 (Python: "
                            "test_fraction=0.3). Using one folder for both would test on the training images. "
                            "Commands that only read a test set (tpt, evaluate --dataset) take a flat folder as "
                            "the test set.")
        raise DataError(f"{root}: split '{split}' not found (found: "
                        f"{', '.join(s for s in ('train', 'test') if (root / s).is_dir())})")
    split_dir = root / split if split and (root / split).is_dir() else root
    folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not _is_hidden(p))
    if not folders:
        raise DataError(f"{split_dir}: no class folders; expected {split_dir}/<class>/<images>")
    names_file = next((p for p in (split_dir / "classnames.txt", root / "classnames.txt") if p.is_file()), None)
    classnames = (read_classnames(names_file, folders) if names_file
                  else [f.replace("_", " ") for f in folders])
    files, labels, bad = _scan_class_folders(split_dir, folders)
    dataset = Dataset("imagefolder", split_dir, requested, tuple(files), np.asarray(labels, dtype=np.int64),
                      tuple(classnames), tuple(templates or (DEFAULT_TEMPLATE,)), tuple(folders))
    return dataset.without(bad) if bad else dataset


def _load_csv(path: Path, split: str, classnames: Sequence[str] | None,
              templates: Sequence[str] | None) -> Dataset:
    """A CSV with columns ``path,label[,split]`` (header optional); paths relative to the CSV's
    folder; labels are class indices, or class names (then sorted unless ``classnames`` gives the
    order). With a third column, a row belongs to the split it names (``train``, ``test``, ...);
    without one the CSV is a single test set (training on it needs a held-out test fraction)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: CSV manifest not found (expected rows 'relative/path.jpg,label')")
    rows: list[tuple[int, str, str]] = []
    splits: list[str] = []
    with path.open(newline="", encoding="utf-8") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if number == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
                continue
            if len(row) < 2:
                raise DataError(f"{path}:{number}: expected 'path,label[,split]', got {','.join(row)!r}")
            rows.append((number, row[0].strip(), row[1].strip()))
            splits.append(row[2].strip() if len(row) > 2 else "")
    if not rows:
        raise DataError(f"{path}: no rows; expected 'path,label[,split]' lines")
    if any(splits):
        blank = [r[0] for r, name in zip(rows, splits, strict=True) if not name]
        if blank:
            raise DataError(f"{path}:{blank[0]}: no split in the third column (other rows have one); "
                            "expected train, test, ...")
        if split == ALL:
            raise DataError(f"{path}: has a split column ({', '.join(sorted(set(splits)))}); a held-out test "
                            "fraction is only for a CSV without one -- drop --test-fraction")
        if split not in splits:
            raise DataError(f"{path}: no rows of split '{split}' (the split column holds: "
                            f"{', '.join(sorted(set(splits)))})")
        # labels are indexed over every row, so that the splits share one class list
        selected = [i for i, name in enumerate(splits) if name == split]
    elif split == "train":
        raise DataError(f"{path}: no split column, so the CSV is a single test set. Training needs rows "
                        "'path,label,train' and 'path,label,test', or a seeded held-out test set: "
                        "--test-fraction 0.3 (Python: test_fraction=0.3). Using the same rows for both "
                        "would test on the training images.")
    else:
        selected = list(range(len(rows)))
    raw_labels = [r[2] for r in rows]
    if all(lbl.lstrip("-").isdigit() for lbl in raw_labels):
        labels = [int(lbl) for lbl in raw_labels]
        k = len(classnames) if classnames else max(labels) + 1
        names = list(classnames) if classnames else [str(i) for i in range(k)]
        for (number, _, _), y in zip(rows, labels, strict=True):
            if not 0 <= y < k:
                raise DataError(f"{path}:{number}: label {y} outside [0, {k - 1}]")
    else:
        names = list(classnames) if classnames else sorted(set(raw_labels))
        index = {n: i for i, n in enumerate(names)}
        labels = []
        for number, _, lbl in rows:
            if lbl not in index:
                raise DataError(f"{path}:{number}: label '{lbl}' is not a class ({', '.join(names)})")
            labels.append(index[lbl])
    base = path.parent
    rows, labels = [rows[i] for i in selected], [labels[i] for i in selected]
    files, bad = [], {}
    for number, rel, _ in rows:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise DataError(f"{path}:{number}: path '{rel}' must be relative to {base} without '..'")
        if not (base / rel).is_file():
            raise DataError(f"{path}:{number}: file '{base / rel}' not found")
        if Path(rel).suffix.lower() not in IMAGE_EXTENSIONS:
            bad[rel] = f"not an image (extension '{Path(rel).suffix or 'none'}')"
        files.append(Path(rel).as_posix())
    order = sorted(range(len(files)), key=lambda i: files[i])
    dataset = Dataset("csv", base, split, tuple(files[i] for i in order),
                      np.asarray([labels[i] for i in order], dtype=np.int64), tuple(names),
                      tuple(templates or (DEFAULT_TEMPLATE,)))
    return dataset.without(bad) if bad else dataset


def _refuse_all(name: str) -> None:
    raise DataError(f"{name} has its own train/test split; a held-out test fraction (--test-fraction) is only "
                    "for an imagefolder or csv without one")


def list_datasets() -> list[str]:
    return [*DATASETS, "imagefolder", "csv"]


def load_dataset(
    name: str, root: str | Path, split: str = "test", *, classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
) -> Dataset:
    """Load a dataset split.

    ``name``: a registered dataset (``covid``, ``rsna18``, ``kather``, ``pannuke``,
    ``digestpath``), ``imagefolder`` (``root/<split>/<class>/*``, or a flat ``root/<class>/*``
    that serves as a test set only; class names from ``classnames.txt`` or the folder names) or
    ``csv`` (``root`` is the CSV file; a third column names each row's split).
    ``split="all"`` is the whole of a folder or CSV without its own split (the pool from which
    :func:`~calibprompt.data.splits.holdout_split` holds out a test set); data with a split
    refuse it.
    """
    if name in DATASETS:
        if split == ALL:
            _refuse_all(name)
        return _load_registered(DATASETS[name], Path(root), split)
    if name == "imagefolder":
        return _load_imagefolder(Path(root), split, templates)
    if name == "csv":
        return _load_csv(Path(root), split, classnames, templates)
    raise DataError(f"dataset '{name}' is unknown; available: {', '.join(list_datasets())}")
