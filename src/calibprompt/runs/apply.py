"""Finished runs as objects: read them, apply them to new images, evaluate them on another dataset.

::

    run = load_run("runs/kather/quiltnet/calibprompt/8shot-seed1-0123456789")
    result = run.predict(["new_slides/"])           # class probabilities (+ temperature-scaled)
    result.to_csv("out/predictions.csv")
    shifted = run.evaluate("imagefolder", "~/site_b")  # external validation, stored beside the run

A prompt run applies its stored classifier (``classifier.safetensors``); a test-time run adapts
its initial prompt to each new image with its own method and settings. The backbone is loaded as
the run recorded it and must have the same fingerprint (the same weights).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from calibprompt.data import FeatureStore, load_dataset
from calibprompt.data.datasets import IMAGE_EXTENSIONS
from calibprompt.decisions import ConformalSets
from calibprompt.files import slug, write_json, write_text
from calibprompt.metrics import METRICS_VERSION
from calibprompt.plots import plot_reliability
from calibprompt.runs.certify import CertifyRunConfig
from calibprompt.runs.common import cached_backbone, dataset_fingerprint, device_kind
from calibprompt.runs.directory import RunDirectory, read_predictions, read_record, write_npz
from calibprompt.runs.execute import RunResult, score
from calibprompt.runs.identity import SCHEMA_VERSION, digest
from calibprompt.runs.prompt import PromptRunConfig
from calibprompt.runs.tpt import TPTRunConfig

__all__ = ["KINDS", "Predictions", "Run", "collect_images", "load_run"]

#: Run kinds and their config classes.
KINDS: dict[str, type] = {"prompt": PromptRunConfig, "tpt": TPTRunConfig, "certify": CertifyRunConfig}


def collect_images(items: Sequence[str | Path]) -> list[Path]:
    """Image files from ``items`` (files, or folders searched recursively; hidden files skipped),
    sorted within each folder. Missing paths, non-image files and folders without images raise
    ``ValueError`` naming them."""
    out: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise ValueError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            out.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(f"{path}: not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
            out.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    if not out:
        raise ValueError("images: expected at least one image file or folder")
    return list(dict.fromkeys(out))


@dataclass
class Predictions:
    """Class probabilities of new images under a run (``calibrated`` when the run has a fitted
    temperature: softmax(z / T), with T fitted on ``calibrator['split']``)."""

    paths: list[str]
    classnames: list[str]
    logits: np.ndarray
    probs: np.ndarray
    calibrated: np.ndarray | None = None
    calibrator: dict[str, Any] | None = None
    excluded: list[tuple[str, str]] = field(default_factory=list)
    #: the run's referral rule (``referral.json``) applied: True = accept, False = refer
    accept: np.ndarray | None = None
    #: the run's conformal rule (``conformal.json``) applied: (N, C), label c in the set of image i
    sets: np.ndarray | None = None
    decisions: dict[str, Any] = field(default_factory=dict)  # the rules applied, as the run stored them

    @property
    def predicted(self) -> list[str]:
        return [self.classnames[i] for i in self.probs.argmax(axis=1)]

    def to_csv(self, path: str | Path) -> Path:
        """``path, predicted_class, p_uncalibrated[<class>]...`` and, with a calibrator,
        ``p_temperature_scaled[<class>]...``; with the run's decision rules, ``decision``
        (``accept`` / ``refer``) and ``prediction_set`` (class names joined by ``|``; empty for an
        empty set). Written atomically."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        header = ["path", "predicted_class", *(f"p_uncalibrated[{c}]" for c in self.classnames)]
        if self.calibrated is not None:
            header += [f"p_temperature_scaled[{c}]" for c in self.classnames]
        header += [name for name, values in (("decision", self.accept), ("prediction_set", self.sets))
                   if values is not None]
        writer.writerow(header)
        for i, (p, name) in enumerate(zip(self.paths, self.predicted, strict=True)):
            row = [p, name, *(f"{v:.6g}" for v in self.probs[i])]
            if self.calibrated is not None:
                row += [f"{v:.6g}" for v in self.calibrated[i]]
            if self.accept is not None:
                row.append("accept" if self.accept[i] else "refer")
            if self.sets is not None:
                row.append("|".join(c for c, inside in zip(self.classnames, self.sets[i], strict=True) if inside))
            writer.writerow(row)
        return write_text(path, buffer.getvalue())


class Run:
    """A finished run directory (any kind)."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        if directory.is_file() and directory.name in ("predictions.npz", "config.json", "metrics.json"):
            directory = directory.parent  # a run's own file stands for the run
        self.directory = directory
        self.record = read_record(self.directory)
        version = self.record.get("schema_version", 1)
        if version != SCHEMA_VERSION:
            raise ValueError(f"{self.directory}: written by an older calibprompt (run schema {version}, "
                             f"this version reads {SCHEMA_VERSION}); re-run it")
        if not (self.directory / "metrics.json").is_file():
            raise ValueError(f"{self.directory}: not a finished run (no metrics.json)")
        self.metrics: dict[str, Any] = json.loads((self.directory / "metrics.json").read_text())
        self.kind: str = self.record.get("kind", "?")
        if self.kind not in KINDS:
            raise ValueError(f"{self.directory}: a result of kind {self.kind!r}, not a run (an external "
                             "evaluation lives in RUN/external/; pass RUN)")
        self.config = KINDS[self.kind].from_dict(self.record["config"])

    @property
    def method(self) -> str:
        return self.record["method"]

    @property
    def classnames(self) -> list[str]:
        return list(self.record["classnames"])

    @property
    def temperature(self) -> float | None:
        return self.metrics.get("temperature")

    def predictions(self) -> dict[str, np.ndarray]:
        """The arrays of ``predictions.npz`` (test, and validation when the run has one)."""
        return read_predictions(self.directory)

    def backbone(self, device: str | None = None, weights: str | None = None) -> Any:
        """The run's backbone (same name and precision; its recorded weights, or ``weights`` when
        they have moved), checked against the run's backbone fingerprint."""
        weights = weights or self.config.weights
        backbone = cached_backbone(self.config.backbone, weights, device or self.config.device,
                                   self.config.precision)
        expected = self.record["identity"]["backbone"]
        if backbone.fingerprint != expected:
            raise ValueError(f"{self.directory}: the backbone loaded from {weights or 'its default weights'} "
                             f"is not the one this run used (fingerprint {backbone.fingerprint[:12]} != "
                             f"{expected[:12]}); pass the run's weights")
        return backbone

    def _logits(self, paths: list[Path], device: str | None, cache: str | None, workers: int | None,
                progress: bool, weights: str | None):
        device_kind(device or self.config.device)
        backbone = self.backbone(device, weights)
        store = FeatureStore(cache if cache is not None else self.config.cache)
        return self.config.predict_logits(self.directory, backbone, paths, store, workers=workers,
                                          progress=progress)

    def predict(self, images: Sequence[str | Path], *, device: str | None = None, cache: str | None = None,
                workers: int | None = None, progress: bool = True, weights: str | None = None) -> Predictions:
        """Classify ``images`` (files or folders) with the run; unreadable images are listed in
        ``excluded`` with their reason."""
        paths = collect_images(images)
        logits, index, excluded = self._logits(paths, device, cache, workers, progress, weights)
        probs = softmax(logits, axis=1)
        t = self.temperature
        result = Predictions(
            paths=[str(paths[i]) for i in index], classnames=self.classnames, logits=logits, probs=probs,
            calibrated=None if t is None else softmax(logits / t, axis=1),
            calibrator=None if t is None else {"name": "temperature", "temperature": t,
                                               **self.metrics.get("calibrator", {})},
            excluded=[tuple(e) for e in excluded])
        self._decide(result)
        return result

    def _decide(self, result: Predictions) -> None:
        """Apply the run's stored decision rules (``referral.json``, ``conformal.json``), each to
        the probabilities it was fitted on (the model's, or temperature-scaled)."""
        for name in ("referral", "conformal"):
            path = self.directory / f"{name}.json"
            if not path.is_file():
                continue
            record = json.loads(path.read_text())
            if record.get("run_id") != self.record["run_id"]:
                raise ValueError(f"{path}: fitted on another run (run_id {record.get('run_id')!r}); refit it with "
                                 f"calibprompt {name} {self.directory}")
            probs = result.probs
            if record.get("probabilities") == "temperature":
                probs = softmax(result.logits / float(self.temperature), axis=1)
            if name == "referral":
                result.accept = (np.zeros(len(probs), dtype=bool) if record["threshold"] is None
                                 else probs.max(axis=1) >= record["threshold"])
            else:
                result.sets = ConformalSets.from_dict(record["fitted"]).predict(probs)
            result.decisions[name] = {k: record.get(k) for k in ("guarantee", "threshold", "score", "coverage",
                                                                  "mondrian", "max_error", "confidence",
                                                                  "probabilities") if k in record}

    def evaluate(self, dataset: str, root: str | Path, *, split: str = "test", n_bins: int | None = None,
                 device: str | None = None, cache: str | None = None, workers: int | None = None,
                 progress: bool = True, force: bool = False, weights: str | None = None) -> RunResult:
        """External validation: the run applied to ``dataset``'s ``split`` under ``root`` (another
        dataset or site, same classes), without retraining. Stored beside the run in
        ``external/<dataset>-<split>-<id>/`` (predictions, metrics with and without the run's
        temperature, reliability diagram), identified by the run, the data's content, ``n_bins``,
        the metrics version and the device kind; a finished one is reused unless ``force``."""
        n_bins = int(n_bins or self.metrics.get("n_bins", 15))
        if n_bins < 1:
            raise ValueError(f"n_bins: expected a positive integer, got {n_bins}")
        data = load_dataset(dataset, root, split)
        if list(data.classnames) != self.classnames:
            raise ValueError(f"{root}: classes {list(data.classnames)} are not the run's classes "
                             f"{self.classnames} (same names in the same order are needed; for an image folder, a "
                             "classnames.txt with lines '<folder> <class name>' sets them)")
        store = FeatureStore(cache if cache is not None else self.config.cache)
        kind = device_kind(device or self.config.device)
        identity = {"run_id": self.record["run_id"], "data": dataset_fingerprint(data, store),
                    "n_bins": n_bins, "metrics_version": METRICS_VERSION, "device_kind": kind}
        ext_id = digest(identity)
        target = RunDirectory(self.directory / "external" / f"{slug(dataset)}-{slug(split)}-{ext_id[:10]}")
        if target.finished and not force:
            return RunResult(target.final, json.loads((target.final / "metrics.json").read_text()), skipped=True)
        logits, index, excluded = self._logits(data.paths, device, cache, workers, progress, weights)
        labels = data.labels[index]
        target.begin({"schema_version": SCHEMA_VERSION, "kind": "external", "run_id": ext_id,
                      "identity": identity, "run": str(self.directory), "dataset": dataset,
                      "root": str(root), "split": split, "classnames": self.classnames}, force=force)
        write_npz(target.path("predictions.npz"), test_logits=logits, test_labels=labels,
                  test_files=np.asarray([data.files[i] for i in index], dtype=str))
        metrics = score(logits, labels, n_bins, temperature=self.temperature)
        if "calibrator" in self.metrics:
            metrics["calibrator"] = self.metrics["calibrator"]
        metrics["excluded_test_images"] = [list(e) for e in excluded]
        plot_reliability(softmax(logits, axis=1), labels, n_bins=n_bins, path=target.path("reliability.png"),
                         title=f"{self.method} applied to {dataset} ({split})")
        return RunResult(target.finish(metrics), metrics)


def load_run(path: str | Path) -> Run:
    """The finished run at ``path`` (a run directory)."""
    return Run(path)


def write_prediction_files(result: Predictions, run: Run, out: str | Path) -> dict[str, Path]:
    """``out/predictions.csv`` and ``out/predict.json`` (the run, the calibrator and where it was
    fitted, excluded images)."""
    out = Path(out)
    csv_path = result.to_csv(out / "predictions.csv")
    info = write_json(out / "predict.json", {
        "run": str(run.directory), "run_id": run.record["run_id"], "method": run.method,
        "classnames": run.classnames, "images": len(result.paths), "calibrator": result.calibrator,
        "decisions": result.decisions,
        "excluded": [list(e) for e in result.excluded]})
    return {"csv": csv_path, "json": info}
