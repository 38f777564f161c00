"""What a run *is*: the hash of everything that determines its result, and a readable name.

A run's identity is the JSON of

* ``kind`` -- the run machinery that produced it (``prompt``: zero-shot and prompt tuning;
  ``tpt``: test-time prompt tuning);
* ``config`` -- the method's effective configuration with every default filled in (fields that
  cannot change the result -- where files live, the device index, worker counts, progress bars --
  are not part of it);
* ``data`` -- content fingerprints of the dataset splits the run draws from (the whole train pool
  and the whole test split, not only the drawn few-shot subset, so that the seeds of one
  experiment share them): relative path, label and BLAKE2b hash of every file's bytes;
* ``backbone`` -- the backbone's fingerprint (architecture, weights, preprocessing);
* ``protocol_version`` of the method and ``metrics_version`` of :mod:`calibprompt.metrics` --
  bumped when a method's or a metric's semantics change, so old and new results never mix;
* ``precision`` and ``device_kind`` (``cpu`` / ``cuda`` / ``mps``): results agree across them
  only within a tolerance, so they are part of the identity.

``run_id`` hashes all of it; ``experiment_id`` hashes it without the seed. Runs with equal
``experiment_id`` differ in their seed alone -- the only runs a report averages.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from calibprompt.files import slug

__all__ = ["SCHEMA_VERSION", "RunIdentity", "data_fingerprint", "digest", "run_name"]

#: Version of the run-directory layout and its files (config.json, metrics.json, predictions.npz).
SCHEMA_VERSION = 2


def digest(data: Any) -> str:
    """SHA-256 (hex) of ``data``'s canonical JSON (sorted keys, no whitespace, NaN rejected)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def data_fingerprint(name: str, split: str, classnames: Sequence[str], files: Sequence[str],
                     labels: Sequence[int], hashes: Sequence[str],
                     excluded: Sequence[tuple[str, str]] = ()) -> str:
    """BLAKE2b-128 of a dataset split's content: name, split, class names, and per file its
    relative path, label and content hash (plus the files left out, with their reason)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([name, split, list(classnames)]).encode())
    for f, y, c in zip(files, labels, hashes, strict=True):
        h.update(f"\n{f}|{int(y)}|{c}".encode())
    for f, reason in excluded:
        h.update(f"\nexcluded:{f}|{reason}".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class RunIdentity:
    """Everything that determines a run's result (see the module docstring)."""

    kind: str
    config: dict[str, Any]
    data: dict[str, str | None]
    backbone: str
    protocol_version: int
    metrics_version: int
    precision: str
    device_kind: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.config, "data": self.data, "backbone": self.backbone,
                "protocol_version": self.protocol_version, "metrics_version": self.metrics_version,
                "precision": self.precision, "device_kind": self.device_kind}

    @property
    def run_id(self) -> str:
        """SHA-256 (hex) of the whole identity."""
        return digest(self.to_dict())

    @property
    def experiment_id(self) -> str:
        """SHA-256 (hex) of the identity without the seed: equal for the seeds of one experiment."""
        data = self.to_dict()
        data["config"] = {k: v for k, v in self.config.items() if k != "seed"}
        return digest(data)


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run_name(head: Sequence[str], config: dict[str, Any], defaults: dict[str, Any], run_id: str,
             skip: Sequence[str] = ()) -> str:
    """A readable directory name: the ``head`` parts (e.g. ``8shot``, ``seed1``), then every field of
    ``config`` whose value differs from ``defaults`` (``epochs3``, ``lr0.01``), then the first 10 hex
    digits of the run id -- so a name says what varies and never collides."""
    parts = list(head)
    for key in sorted(config):
        if key in skip or key not in defaults or config[key] == defaults[key]:
            continue
        value = config[key]
        if isinstance(value, (dict, list)):
            continue  # structured values (a resolved objective) are in config.json, not the name
        parts.append(f"{key.replace('_', '')}{_short(value)}")
    return f"{slug('-'.join(parts), limit=70)}-{run_id[:10]}"
