"""The run directory: one layout for every method, created atomically, resumable.

::

    <out>/<dataset>/<backbone>/<method>/<name>-<run id[:10]>/
        config.json          schema version, kind, method, run id, experiment id, the identity
                             (everything hashed), the config as given, package versions
        predictions.npz      test_logits (N, K) float64, test_labels (N,), test_files (N,) relative
                             paths; val_logits / val_labels / val_files for the tuning split
                             (called validation before the calibration split existed) and
                             calib_logits / calib_labels / calib_files for the calibration split,
                             when the run has them
        metrics.json         test metrics at ``n_bins``; with a calibration split also the
                             temperature-scaled metrics, the temperature and where it was fitted
                             (runs made before the calibration split: on the validation split)
        reliability.png
        ...                  method files: prompt.safetensors, classifier.safetensors, log.json,
                             splits/*.json

Work happens in a hidden sibling ``.<name>.partial``: the directory appears under its real
name only once complete (``metrics.json`` is written last, then the rename), so a run directory
is always a finished run. An interrupted run leaves its ``.partial`` sibling with a checkpoint,
and the next call with the same identity resumes there. ``--force`` redoes a run in a fresh
``.partial`` and swaps it in when done: the old result stays until the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from calibprompt.files import atomic_path, write_json

__all__ = ["RunDirectory", "read_predictions", "read_record", "write_npz"]

CHECKPOINT_FILES = ("checkpoint.json", "checkpoint.safetensors")


def write_npz(path: str | os.PathLike[str], **arrays: np.ndarray) -> Path:
    """Atomically write an uncompressed ``.npz`` (no pickled objects: strings are stored as
    fixed-width unicode arrays)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return Path(path)


def read_record(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a run directory (``ValueError`` naming the directory if absent)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory}: not a run directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def read_predictions(directory: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of a run's ``predictions.npz``."""
    path = Path(directory) / "predictions.npz"
    if not path.is_file():
        raise ValueError(f"{directory}: not a finished run directory (no predictions.npz)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable predictions file ({str(exc)[:200]}); the run is damaged: "
                         "rerun it with --force") from exc


def calibration_prefix(arrays: Any) -> str | None:
    """The prefix of the arrays a post-hoc calibrator of a run is fitted on: ``calib_`` (its
    calibration split), ``val_`` for runs made before the calibration split existed (they fitted on
    their validation split), None when the run has neither. ``arrays``: the names in its
    ``predictions.npz``."""
    names = set(arrays)
    for prefix in ("calib_", "val_"):
        if f"{prefix}logits" in names:
            return prefix
    return None


class RunDirectory:
    """A run's final directory and the hidden sibling it is built in."""

    def __init__(self, final: str | os.PathLike[str]) -> None:
        self.final = Path(final)
        self.work = self.final.parent / f".{self.final.name}.partial"

    @property
    def finished(self) -> bool:
        return (self.final / "metrics.json").is_file() and (self.final / "config.json").is_file()

    def path(self, name: str) -> Path:
        """A file of the run under construction."""
        return self.work / name

    def begin(self, record: dict[str, Any], force: bool = False) -> bool:
        """Create (or reopen, to resume) the work directory and write ``config.json``. Returns
        True when an interrupted run of the same identity is resumed."""
        resumed = False
        if self.work.exists():
            previous = self.work / "config.json"
            same = previous.is_file() and json.loads(previous.read_text()).get("run_id") == record["run_id"]
            if force or not same:
                shutil.rmtree(self.work)
            else:
                resumed = True
        self.work.mkdir(parents=True, exist_ok=True)
        write_json(self.work / "config.json", record)
        return resumed

    # -- checkpoints (resumable work) ---------------------------------------------------------
    def save_checkpoint(self, tensors: dict[str, Any], info: dict[str, Any]) -> None:
        """One atomic safetensors file holding the tensors *and* ``info`` (in its metadata), so the
        two always belong together whenever the process is killed; ``checkpoint.json`` repeats
        ``info`` for people to read."""
        with atomic_path(self.path("checkpoint.safetensors")) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"info": json.dumps(info)})
        write_json(self.path("checkpoint.json"), info)

    def load_checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(tensors, info) of the last checkpoint, or None; ``info`` comes from the tensors' own
        file (the JSON copy may lag behind it by one write)."""
        tensors = self.path("checkpoint.safetensors")
        if not tensors.is_file():
            return None
        with safe_open(str(tensors), framework="pt") as f:
            meta = f.metadata() or {}
        if "info" in meta:
            info = json.loads(meta["info"])
        elif self.path("checkpoint.json").is_file():  # written by an earlier version
            info = json.loads(self.path("checkpoint.json").read_text())
        else:
            return None
        return load_file(str(tensors)), info

    # -- completion ----------------------------------------------------------------------------
    def finish(self, metrics: dict[str, Any]) -> Path:
        """Write ``metrics.json`` last, drop the checkpoint (and ``parts/``), and move the run to its final name
        (replacing a previous result only now, when the new one is complete)."""
        write_json(self.path("metrics.json"), metrics)
        for name in CHECKPOINT_FILES:
            self.path(name).unlink(missing_ok=True)
        if self.path("parts").is_dir():  # per-group checkpoints of test-time runs
            shutil.rmtree(self.path("parts"))
        old = self.final.parent / f".{self.final.name}.old"
        if self.final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.final, old)
        os.replace(self.work, self.final)
        if old.exists():
            shutil.rmtree(old)
        return self.final
