"""What every kind of run shares: the plan a method hands to the run machinery, its outputs,
the backbone kept across the runs of a sweep, dataset fingerprints and package versions."""

from __future__ import annotations

import platform
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import save_file

from calibprompt import __version__
from calibprompt.backbones import list_backbones, load_backbone
from calibprompt.data import (
    DataError,
    Dataset,
    FeatureStore,
    list_datasets,
    load_dataset,
    load_train_test,
)
from calibprompt.data.splits import HOLDOUT_SEED, default_per_class
from calibprompt.files import atomic_path, write_json
from calibprompt.methods.coop import PromptJob
from calibprompt.methods.zeroshot import zeroshot_logits
from calibprompt.runs.directory import RunDirectory
from calibprompt.runs.identity import RunIdentity, data_fingerprint

__all__ = [
    "Outputs",
    "Plan",
    "RunConfigBase",
    "Training",
    "cached_backbone",
    "classifier_outputs",
    "dataset_fingerprint",
    "default_precision",
    "device_kind",
    "labelled_sizes",
    "option",
    "package_versions",
    "test_split_record",
    "unreadable_hint",
    "unreadable_message",
]


#: The precisions a frozen backbone runs in.
PRECISIONS = ("fp32", "bf16", "fp16")


def default_precision(device: Any) -> str:
    """``auto`` precision: fp16 on CUDA (the published models' precision; the trained parameters
    stay fp32), fp32 on CPU and MPS (half precision is slower than fp32 on CPUs)."""
    return "fp16" if str(device).startswith("cuda") else "fp32"


def option(default: Any = MISSING, help: str = "", **cli: Any) -> Any:
    """A config field with its documentation: ``help`` (shown by ``--help``, with the default) and
    command-line details (``choices``, ``metavar``, ``default_text`` -- how to show a default that
    is resolved later, ``cli=False`` for fields without a flag). The schema is the one place of
    each default: the CLI's flags are generated from it."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class RunConfigBase:
    """The fields every kind of run has: what to run on (backbone, dataset, root), the method, the
    seed, and where and how it runs (precision, device, cache, workers, progress bars)."""

    kind: ClassVar[str] = ""

    backbone: str = option(help=", ".join(list_backbones()))
    dataset: str = option(help=", ".join(list_datasets()))
    root: str = option(help="dataset root (ROOT or ROOT/<dataset dir>; for csv, the CSV file)")
    test_fraction: float | None = option(
        None, help="hold out this fraction of each class of a folder or CSV without its own train/test split as "
                   "the test set (seeded, the same images for every seed and method)", metavar="F",
        default_text="the dataset's own test split")
    skip_unreadable: bool = option(False, help="leave out images that do not decode (each listed with its reason "
                                               "in metrics.json) instead of stopping at them")
    method: str = option("", help="the method")
    weights: str | None = option(None, help="hub id, local directory or file", default_text="the family's hub id")
    seed: int = option(1, help="seed of everything random in the run (splits, initialisation, views, batches)")
    precision: str = option("auto", help="precision of the frozen backbone, autocast on an accelerator (trained "
                                         "parameters stay fp32: the context, fine-tuned weights' master copy); part "
                                         "of a run's identity",
                            choices=("auto", *PRECISIONS),
                            default_text="auto: fp16 on CUDA, fp32 elsewhere (recorded resolved)")
    device: str = option("cpu", help="torch device: cpu, cuda, cuda:1, mps")
    cache: str | None = option(None, help="feature cache directory",
                               default_text="$CALIBPROMPT_CACHE or ~/.cache/calibprompt")
    workers: int | None = option(None, help="image-decoding worker processes", default_text="cores - 1, at most 4")
    progress: bool = option(True, help="progress bars", cli=False)  # the CLI's --quiet

    def __post_init__(self) -> None:
        if self.precision == "auto":  # resolved at once: the config, its record and identity say which
            object.__setattr__(self, "precision", default_precision(self.device))

    def check_types(self) -> None:
        """Every field holds a value of its declared type (a sweep file or a Python caller can pass
        anything: ``"no"`` for a bool, ``"abc"`` for a learning rate); ints are accepted as floats."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            allowed = typing.get_args(hint) if union else (hint,)
            if not any(_is_a(value, a) for a in allowed):
                names = " or ".join("None" if a is type(None) else getattr(a, "__name__", str(a)) for a in allowed)
                raise ValueError(f"{f.name}: expected {names}, got {value!r}")

    def check_base_options(self) -> None:
        """``test_fraction`` is a fraction strictly between 0 and 1 (or unset); ``workers`` is not
        negative (0 decodes in the main process)."""
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers: expected a non-negative number of processes (0 = decode in the main "
                             f"process), got {self.workers!r}")
        if self.cache is not None and Path(self.cache).expanduser().exists() and not Path(self.cache).expanduser().is_dir():
            raise ValueError(f"cache: {self.cache} exists and is not a directory; expected the feature cache "
                             "directory (created if missing)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected auto, {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision != "fp32" and str(self.device).split(":")[0] == "cpu":
            raise ValueError(f"precision: {self.precision} is autocast on an accelerator; on the CPU the encoder runs in "
                             "fp32 (a run asking for it would compute fp32 under another identity) -- use fp32 or auto")
        f = self.test_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1):
            raise ValueError(f"test_fraction: expected a number strictly between 0 and 1, got {f!r}")

    def data_effective(self) -> dict[str, Any]:
        """The data options that determine a result (empty when the dataset's own splits are used,
        so that such runs keep their identity)."""
        return {} if self.test_fraction is None else {"test_fraction": float(self.test_fraction)}

    @property
    def needs_train(self) -> bool:
        """Whether the run reads the train split (a run that does not takes a flat folder as its
        test set)."""
        return True

    def load_splits(self) -> tuple[Dataset | None, Dataset]:
        """(train, test) of the run: the dataset's own splits (classes cross-checked) or a held-out
        test fraction of a folder without one; a run that does not need the train split reads only
        a test set (a flat folder is one) unless a fraction is held out (train is then ``None``)."""
        if self.needs_train or self.test_fraction is not None:
            train, test = load_train_test(self.dataset, self.root, self.test_fraction)
            return (train if self.needs_train else None), test
        return None, load_dataset(self.dataset, self.root, "test")

    def check_readable(self, excluded: Sequence[tuple[str, str]], what: str) -> None:
        """Unreadable images stop the run (listed with their reasons) unless ``skip_unreadable``
        -- skipping is a choice the user makes, recorded in the run."""
        if excluded and not self.skip_unreadable:
            raise DataError(unreadable_message(excluded, what))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """The config from its stored form (``config.json``'s ``config``); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{cls.kind} run config: unknown keys {sorted(unknown)}; expected some of "
                             f"{sorted(known)}")
        return cls(**data)


def unreadable_message(excluded: Sequence[tuple[str, str]], what: str, shown: int = 10) -> str:
    """``N image(s) of WHAT do not decode`` with each path and reason (the first ``shown``) and
    what to do about it."""
    lines = [f"  {path}: {reason}" for path, reason in excluded[:shown]]
    if len(excluded) > shown:
        lines.append(f"  ... and {len(excluded) - shown} more")
    return (f"{len(excluded)} image(s) of {what} do not decode:\n" + "\n".join(lines) +
            "\nReplace or remove them, or pass --skip-unreadable (Python: skip_unreadable=True) to leave them "
            "out; the run then lists them in metrics.json. Features encoded so far are cached.")


@contextmanager
def unreadable_hint() -> Iterator[None]:
    """Inside: a split draw that meets an image that does not decode fails with the way out."""
    try:
        yield
    except DataError as exc:
        if "unreadable image" not in str(exc):
            raise
        raise DataError(f"{exc}\nReplace or remove it, or pass --skip-unreadable (Python: skip_unreadable=True) "
                        "to leave such images out of the draw (the run's split manifests list them).") from exc


def labelled_sizes(train: Dataset, shots: int, val_per_class: int | None, calib_per_class: int | None,
                   dataset: str) -> tuple[int, int]:
    """(tuning, calibration) images per class drawn from the train pool after ``shots`` per class.

    Unset sizes default to ``max(4, ceil(64 / C))`` each; when the smallest class has fewer images
    left than both defaults need, the tuning split gets half of what is left and the calibration
    split the rest (a size that is set is kept and the other gets what remains, up to its default).
    Each split needs at least one image per class; a pool too small is an error naming the flags."""
    counts = train.class_counts()
    left = int(counts.min()) - shots
    default = default_per_class(train.num_classes)
    if val_per_class is not None and calib_per_class is not None:
        val, calib = val_per_class, calib_per_class
    elif val_per_class is not None:
        val, calib = val_per_class, min(default, left - val_per_class)
    elif calib_per_class is not None:
        val, calib = min(default, left - calib_per_class), calib_per_class
    elif left >= 2 * default:
        val, calib = default, default
    else:
        val = max(1, left // 2)
        val, calib = val, left - val
    if val < 1 or calib < 1 or val + calib > left:
        small = [train.classnames[i] for i in np.flatnonzero(counts == counts.min())]
        asked = f"--val-per-class {val_per_class or 'default'} / --calib-per-class {calib_per_class or 'default'}"
        raise DataError(f"{asked}: class(es) {small} of {dataset}/train have {counts.min()} image(s), {left} left "
                        "after the few-shot split for the tuning and calibration splits (at least one image per "
                        "class each); use fewer tuning or calibration images or fewer shots")
    return int(val), int(calib)


def test_split_record(config: RunConfigBase, train: Dataset | None, test: Dataset) -> dict[str, Any]:
    """The ``config.json`` entry of a held-out test set (empty for a dataset's own test split)."""
    if config.test_fraction is None:
        return {}
    total = len(test) + (len(train) if train is not None else 0)
    return {"test_split": {"held_out_fraction": float(config.test_fraction), "images": len(test), "of": total,
                           "seed": HOLDOUT_SEED}}


def _is_a(value: Any, kind: Any) -> bool:
    if kind is type(None):
        return value is None
    if typing.get_origin(kind) is tuple:  # tuple[float, ...]: a list from a sweep file is fine too
        element = typing.get_args(kind)[0]
        return isinstance(value, (tuple, list)) and all(_is_a(v, element) for v in value)
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


@dataclass
class Outputs:
    """What a method computed: logits of the test split (and of the validation split, when the
    run has one), each with labels and the files' paths relative to their dataset root."""

    test_logits: np.ndarray
    test_labels: np.ndarray
    test_files: list[str]
    val_logits: np.ndarray | None = None  # the tuning split (its historical name: validation)
    val_labels: np.ndarray | None = None
    val_files: list[str] | None = None
    calib_logits: np.ndarray | None = None  # the calibration split: post-hoc calibrators are fitted here
    calib_labels: np.ndarray | None = None
    calib_files: list[str] | None = None
    excluded: list[tuple[str, str]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # merged into metrics.json


@dataclass
class Training:
    """A run paused before its prompt tuning, so that runs can train in lockstep
    (:func:`calibprompt.methods.coop.train_prompts`): ``job`` is its training, ``finish()`` what
    the run does once the job is trained (returns its :class:`Outputs`)."""

    job: PromptJob
    finish: Callable[[], Outputs]
    label: str  # how the progress display names the run


@dataclass
class Plan:
    """A validated run, ready to execute: every input was checked and nothing written yet.

    ``work(directory)`` does the method's computation inside the run directory under construction
    (checkpointing there, resuming from what an interrupted call left) and returns its
    :class:`Outputs` -- or, for a prompt-tuning run, a :class:`Training` that the run machinery
    trains (alone, or in lockstep with the runs of the same ``lockstep_key``) and then finishes."""

    identity: RunIdentity
    path: Path  # relative: <dataset>/<backbone>/<method>/<name>
    config: dict[str, Any]  # the config as given, every field (stored, not hashed)
    classnames: list[str]
    n_bins: int
    title: str
    work: Callable[[RunDirectory], Outputs]
    record: dict[str, Any] = field(default_factory=dict)  # extra entries of config.json
    method: str = ""  # display name in reports (default: the config's method)
    #: files a finished run must hold to be reused (e.g. weights asked for by a later call);
    #: a finished run without them is redone
    required_files: tuple[str, ...] = ()
    #: runs with equal keys (not None) may train in lockstep: same backbone, data and prompt shape
    lockstep_key: tuple[Any, ...] | None = None


def classifier_outputs(directory: RunDirectory, text: torch.Tensor, scale: float, test: Dataset, test_feats: Any,
                       labelled: dict[str, tuple[Dataset, Any]], tables: set[str], manifests: Sequence[Any],
                       logs: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Outputs:
    """The end of a run that classifies with class text features ``text`` (C, D): writes
    ``classifier.safetensors`` (what :meth:`Run.predict` applies) and ``cache_tables.json``, and
    returns the logits ``s · F · Tᵀ`` of the test features and of the ``labelled`` splits
    (``"val"``: tuning, ``"calib"``: calibration; each (split, its features)) as
    :class:`Outputs`, with the images the split draws (``manifests``) left out."""
    text = text.detach().float().cpu().contiguous()
    with atomic_path(directory.path("classifier.safetensors")) as tmp:
        save_file({"text_features": text, "logit_scale": torch.tensor(float(scale))}, str(tmp))
    write_json(directory.path("cache_tables.json"), sorted(tables))
    test_logits = zeroshot_logits(test_feats.features, text, scale).double().cpu().numpy()
    arrays: dict[str, Any] = {}
    for prefix, (subset, feats) in labelled.items():
        arrays[f"{prefix}_logits"] = zeroshot_logits(feats.features, text, scale).double().cpu().numpy()
        arrays[f"{prefix}_labels"] = subset.labels[feats.index]
        arrays[f"{prefix}_files"] = [subset.files[i] for i in feats.index]
    excluded_train = [[e["file"], e["reason"]] for m in manifests if m is not None for e in m.excluded]
    return Outputs(
        test_logits=test_logits, test_labels=test.labels[test_feats.index],
        test_files=[test.files[i] for i in test_feats.index], **arrays,
        excluded=list(test_feats.excluded), logs=logs,
        extra={"excluded_train_images": excluded_train, **(extra or {})})


_BACKBONES: dict[tuple, Any] = {}


def cached_backbone(name: str, weights: str | None, device: str, precision: str) -> Any:
    """The frozen backbone of a run, kept for the next run of a sweep (loading and
    fingerprinting a ViT-B model costs seconds; the last two backbones stay in memory)."""
    key = (name, weights, device, precision)
    if key not in _BACKBONES:
        while len(_BACKBONES) >= 2:
            _BACKBONES.pop(next(iter(_BACKBONES)))
        _BACKBONES[key] = load_backbone(name, weights=weights, device=device, precision=precision)
    return _BACKBONES[key]


def dataset_fingerprint(dataset: Dataset, store: FeatureStore) -> str:
    """Content fingerprint of a whole dataset split (every file's bytes, via the store's hash
    memo, which re-reads a file only when its size or modification time changed)."""
    hashes = store.hashes(dataset.paths)
    return data_fingerprint(dataset.name, dataset.split, dataset.classnames, dataset.files,
                            dataset.labels.tolist(), hashes, dataset.excluded)


def device_kind(device: str) -> str:
    """``cpu`` / ``cuda`` / ``mps`` of a device string (the index does not change results); a device
    this machine does not have is an error."""
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ValueError(f"device: {device!r} is not a torch device (expected cpu, cuda, cuda:1, ...)") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r}, but this machine has no CUDA device (use cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: {device!r}, but this machine has no MPS device (use cpu)")
    return kind


def package_versions() -> dict[str, str]:
    """Versions of calibprompt and the libraries that decide its numbers."""
    out = {"calibprompt": __version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    for name in ("open_clip", "transformers"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except ImportError:
            pass
    return out
