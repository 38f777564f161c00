"""The one run machinery: plan (validate, identify) -> skip or (re)build the directory -> work ->
predictions, metrics, diagram -> atomic rename. Every method goes through :func:`execute_run`."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from calibprompt.calibrators import TemperatureScaling
from calibprompt.files import write_json
from calibprompt.methods import coop
from calibprompt.methods.coop import lockstep_capacity
from calibprompt.metrics import BINNING_CONVENTION, evaluate
from calibprompt.plots import plot_reliability
from calibprompt.progress import rate_progress
from calibprompt.runs.common import Outputs, Plan, Training, package_versions
from calibprompt.runs.directory import RunDirectory, read_predictions, read_record, write_npz
from calibprompt.runs.identity import SCHEMA_VERSION

__all__ = ["RunResult", "execute_group", "execute_run", "plan_record", "score", "train_together"]


@dataclass
class RunResult:
    directory: Path
    metrics: dict[str, Any]
    skipped: bool = False
    logs: list[dict[str, Any]] = field(default_factory=list)


def score(test_logits: np.ndarray, test_labels: np.ndarray, n_bins: int, *,
          fit_logits: np.ndarray | None = None, fit_labels: np.ndarray | None = None,
          temperature: float | None = None, fitted_on: str = "calibration") -> dict[str, Any]:
    """Test metrics of ``softmax(test_logits)`` at ``n_bins``; with the logits of a labelled split
    (the run's calibration split), temperature scaling is fitted there (never on test) and the
    scaled metrics are added; a given ``temperature`` (fitted earlier, e.g. for an external test
    set) is applied as is."""
    test_logits = np.asarray(test_logits, dtype=np.float64)
    out: dict[str, Any] = {"n_bins": int(n_bins),
                           "uncalibrated": evaluate(softmax(test_logits, axis=1), test_labels, n_bins=n_bins)}
    caught: list[warnings.WarningMessage] = []
    if temperature is None and fit_logits is not None and len(fit_labels):
        with warnings.catch_warnings(record=True) as caught:  # kept in metrics.json, not lost on stderr
            warnings.simplefilter("always", RuntimeWarning)
            temperature = TemperatureScaling().fit(np.asarray(fit_logits, np.float64), fit_labels).temperature
        out["calibrator"] = {"name": "temperature", "split": fitted_on, "n_images": len(fit_labels)}
    if temperature is not None:
        out["temperature_scaled"] = evaluate(softmax(test_logits / temperature, axis=1), test_labels,
                                             n_bins=n_bins)
        out["temperature"] = float(temperature)
        out["temperature_warnings"] = [str(w.message) for w in caught]
    return _finite(out)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN): a metric that is
    undefined on this test set -- AUROC with one class present -- is stored as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _rebinned(directory: Path, metrics: dict[str, Any], n_bins: int) -> dict[str, Any]:
    """A finished run's metrics at ``n_bins`` (its temperature kept), stored as
    ``metrics_<n_bins>bins.json`` beside its ``metrics.json``."""
    preds = read_predictions(directory)
    out = {**metrics, **score(preds["test_logits"], preds["test_labels"], n_bins,
                              temperature=metrics.get("temperature"))}
    write_json(directory / f"metrics_{n_bins}bins.json", out)
    return out


def plan_record(plan: Plan) -> dict[str, Any]:
    """The ``config.json`` of a planned run."""
    identity = plan.identity
    return {
        "schema_version": SCHEMA_VERSION, "kind": identity.kind,
        "method": plan.method or identity.config["method"],
        "backbone": identity.config["backbone"], "dataset": identity.config["dataset"],
        "seed": identity.config["seed"], "classnames": plan.classnames,
        "run_id": identity.run_id, "experiment_id": identity.experiment_id,
        "identity": identity.to_dict(), "config": plan.config, "versions": package_versions(),
        "metric_convention": BINNING_CONVENTION, "regime": "prompt", **plan.record,
    }


def _finalize(directory: RunDirectory, outputs: Outputs, plan: Plan) -> dict[str, Any]:
    arrays: dict[str, Any] = {"test_logits": np.asarray(outputs.test_logits, np.float64),
                              "test_labels": np.asarray(outputs.test_labels, np.int64),
                              "test_files": np.asarray(outputs.test_files, dtype=str)}
    for prefix in ("val", "calib"):  # the tuning and calibration splits, when the run has them
        if getattr(outputs, f"{prefix}_logits") is not None:
            arrays.update({f"{prefix}_logits": np.asarray(getattr(outputs, f"{prefix}_logits"), np.float64),
                           f"{prefix}_labels": np.asarray(getattr(outputs, f"{prefix}_labels"), np.int64),
                           f"{prefix}_files": np.asarray(getattr(outputs, f"{prefix}_files"), dtype=str)})
    write_npz(directory.path("predictions.npz"), **arrays)
    metrics = score(arrays["test_logits"], arrays["test_labels"], plan.n_bins,
                    fit_logits=arrays.get("calib_logits"), fit_labels=arrays.get("calib_labels"))
    metrics["excluded_test_images"] = [list(e) for e in outputs.excluded]
    metrics.update(_finite(outputs.extra))  # undefined metrics (e.g. AUROC of one class) as null
    plot_reliability(softmax(arrays["test_logits"], axis=1), arrays["test_labels"], n_bins=plan.n_bins,
                     path=directory.path("reliability.png"), title=plan.title)
    return metrics


def finished_result(plan: Plan, out: str | Path) -> RunResult | None:
    """The result of the finished run with ``plan``'s identity under ``out`` (skipped), or None
    when it is not finished -- or finished without a file asked for now (e.g. --save-weights)."""
    directory = RunDirectory(Path(out) / plan.path)
    if not directory.finished or not all((directory.final / f).is_file() for f in plan.required_files):
        return None
    if read_record(directory.final).get("run_id") != plan.identity.run_id:
        raise ValueError(f"{directory.final}: holds another run whose id starts with the same digits; move it away")
    metrics = json.loads((directory.final / "metrics.json").read_text())
    if metrics.get("n_bins") != plan.n_bins:  # the same run measured at other bins: no retraining
        metrics = _rebinned(directory.final, metrics, plan.n_bins)
    return RunResult(directory.final, metrics, skipped=True)


def _open(plan: Plan, out: Path, force: bool) -> RunResult | RunDirectory:
    """A finished run with ``plan``'s identity (its result, skipped), or its directory under
    construction (begun, or resumed from an interrupted call)."""
    done = None if force else finished_result(plan, out)
    if done is not None:
        return done
    directory = RunDirectory(Path(out) / plan.path)
    directory.begin(plan_record(plan), force=force or directory.finished)  # finished but missing a file: redo
    return directory


def _close(plan: Plan, directory: RunDirectory, outputs: Outputs) -> RunResult:
    metrics = _finalize(directory, outputs, plan)
    final = directory.finish(metrics)
    return RunResult(final, metrics, skipped=False, logs=outputs.logs)


def train_together(trainings: list[Training], progress: bool = True, group_size: int | None = None) -> None:
    """Train the runs paused at their prompt tuning: in lockstep groups of at most ``group_size``
    runs (default: as many as fit the memory budget, :func:`lockstep_capacity`), one progress bar
    for all. Each run checkpoints after each of its epochs, as alone."""
    if not trainings:
        return
    if group_size is None:  # the memory probe (two encoder passes) only when there is a group to size
        group_size = 1 if len(trainings) == 1 else lockstep_capacity(trainings[0].job.learner)
    with rate_progress(progress, rate_label="loss") as bar:
        label = f"training {trainings[0].label}" if len(trainings) == 1 else \
            f"training {len(trainings)} runs in lockstep"
        task = bar.add_task(label,
                            total=sum(t.job.config.epochs for t in trainings),
                            completed=sum(t.job.start_epoch for t in trainings), rate="-")
        for start in range(0, len(trainings), group_size):
            group = trainings[start:start + group_size]
            jobs = []
            for t in group:
                def on_epoch(log, learner, optimizer, callback=t.job.on_epoch) -> None:
                    if callback is not None:
                        callback(log, learner, optimizer)
                    bar.update(task, advance=1, rate=f"{log.loss:.4f}")
                jobs.append(dataclasses.replace(t.job, on_epoch=on_epoch))
            coop.train_prompts(jobs)


def execute_group(configs: list[Any], out: str | Path, force: bool = False,
                  group_size: int | None = None) -> list[RunResult]:
    """Execute runs together: each as :func:`execute_run` would (skip, resume, work, finish), but
    the prompt tuning of those that train runs in lockstep (:func:`train_together`). Every config
    is validated and identified before the first run starts. Meant for runs of one
    ``lockstep_key`` (what :func:`calibprompt.runs.sweep.run_sweep` forms); others are correct
    too, they only share less."""
    plans: list[Plan] = [config.plan() for config in configs]
    results: list[RunResult | None] = [None] * len(plans)
    stages: list[tuple[int, Plan, RunDirectory, Outputs | Training]] = []
    for i, plan in enumerate(plans):
        opened = _open(plan, Path(out), force)
        if isinstance(opened, RunResult):
            results[i] = opened
        else:
            stages.append((i, plan, opened, plan.work(opened)))
    progress = any(getattr(config, "progress", True) for config in configs)
    train_together([stage for *_, stage in stages if isinstance(stage, Training)], progress, group_size)
    for i, plan, directory, stage in stages:
        results[i] = _close(plan, directory, stage.finish() if isinstance(stage, Training) else stage)
    return results  # type: ignore[return-value]


def execute_run(config: Any, out: str | Path, force: bool = False) -> RunResult:
    """Validate and identify ``config`` (any run config: :class:`~calibprompt.runs.PromptRunConfig`,
    :class:`~calibprompt.runs.TPTRunConfig`, ...), then run it under ``out``. A finished run with
    the same identity is skipped unless ``force``; an interrupted one resumes from its checkpoint."""
    return execute_group([config], out, force)[0]
