"""``--tune auto`` of a run: the search machinery shared by prompt-tuning (``train``) and test-time
(``tpt``) runs -- their options, the scores of a candidate, resumable candidates, and the record.

A run with ``--tune auto`` proposes candidates with :func:`calibprompt.methods.selection.search`
(Optuna's TPE sampler seeded by the run's seed, or the full grid of a list of choices), has each
one scored on labelled images that are neither test nor calibration images (the tuning split, or
out-of-fold predictions of a cross-validation over the few-shot and tuning images), and becomes
the candidate with the lowest score. Every finished candidate is checkpointed in the run directory
under construction (``parts/tuning/<index>.safetensors``: its scores, values and whatever the
run needs of it later); the search is deterministic for a seed, so an interrupted run replays the
proposals, takes the finished candidates from there and trains only the rest. ``tuning.json``
holds every candidate (``candidates``) and the choice (``chosen``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from scipy.special import softmax

from calibprompt.files import atomic_path, write_json
from calibprompt.methods.selection import SCORES, Dimension, SearchResult, search
from calibprompt.metrics import evaluate
from calibprompt.progress import rate_progress
from calibprompt.runs.common import option
from calibprompt.runs.directory import RunDirectory

__all__ = ["TUNE_BATCH", "TUNE_PROTOCOL_VERSION", "CandidateStore", "run_search", "tuning_scores"]

#: Bumped when the hyperparameter search changes its results (part of tuned runs' identity).
TUNE_PROTOCOL_VERSION = 1
#: Candidates proposed and trained (in lockstep) at once; fixed, so that a search is the same on
#: every machine (the proposals of a batch depend on its size).
TUNE_BATCH = 4
#: How reports name the row of a tuned run: ``calibprompt (tuned)``, ``tpt-ctpt (tuned)``.
TUNED_SUFFIX = " (tuned)"
#: The default number of candidates.
TRIALS = 16


def tune_option(what: str) -> Any:
    return option(None, help=f"auto: choose {what} on labelled images of the train pool -- never on the test or "
                             "calibration split", choices=("auto",), default_text="off")


def search_option(default_text: str) -> Any:
    return option(None, help="--tune auto: NAME=LOW:HIGH[:log] or NAME=V1,V2,... (repeatable)", metavar="NAME=RANGE",
                  default_text=default_text)


def trials_option() -> Any:
    return option(TRIALS, help="--tune auto: candidates scored (a list of choices whose grid fits is searched whole)")


def tune_metric_option() -> Any:
    return option("nll", help="--tune auto: the score minimised (constrained-ece: the lowest ECE among candidates "
                              "within 1 accuracy point of the most accurate)", choices=SCORES)


def check_tuning_options(config: Any) -> None:
    """The options every tuned run shares: ``tune``, ``trials``, ``tune_metric`` (``search`` is
    checked against the run's own space)."""
    if config.tune != "auto":
        raise ValueError(f"tune: expected auto, got {config.tune!r}")
    if isinstance(config.trials, bool) or not isinstance(config.trials, int) or config.trials < 1:
        raise ValueError(f"trials: expected a positive integer, got {config.trials!r}")
    if config.tune_metric not in SCORES:
        raise ValueError(f"tune_metric: expected one of {', '.join(SCORES)}, got {config.tune_metric!r}")


def check_untuned(config: Any, extra: tuple[str, ...] = ()) -> None:
    """A run without ``--tune auto`` rejects the options only a search reads (``search``,
    ``extra``, and ``trials`` / ``tune_metric`` when changed from their defaults)."""
    given = [name for name in ("search", *extra) if getattr(config, name) is not None]
    given += [name for name, default in (("trials", TRIALS), ("tune_metric", "nll")) if getattr(config, name) != default]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} applies to --tune auto")


def identity_fields(space: dict[str, Dimension], trials: int, metric: str) -> dict[str, Any]:
    """What a search adds to a tuned run's identity (the values it chooses leave it)."""
    return {"search": [str(d) for d in space.values()], "trials": trials, "tune_metric": metric,
            "tune_protocol": TUNE_PROTOCOL_VERSION, "tune_batch": TUNE_BATCH}


def tuning_scores(logits: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, float]:
    """The scores of one candidate's predictions: NLL, Brier, ECE (``n_bins`` equal-width bins) and
    accuracy of ``softmax(logits)`` (the float64 metrics of :func:`calibprompt.metrics.evaluate`),
    and ``n``, the number of images scored."""
    measured = evaluate(softmax(np.asarray(logits, dtype=np.float64), axis=1), np.asarray(labels), n_bins=n_bins)
    return {**{k: float(measured[k]) for k in ("nll", "brier", "ece", "accuracy")}, "n": float(len(labels))}


class CandidateStore:
    """Finished candidates of a search, one ``safetensors`` file each in ``parts/tuning/`` of the
    run directory under construction (removed with ``parts/`` when the run is finished): the
    candidate's tensors, and its values, scores and ``info`` (JSON) in the file's metadata."""

    def __init__(self, directory: RunDirectory) -> None:
        self.root = directory.path("parts") / "tuning"

    def _file(self, index: int):
        return self.root / f"{index:04d}.safetensors"

    def get(self, index: int, values: dict[str, float]) -> dict[str, Any] | None:
        """The candidate checkpointed at ``index`` if it had these ``values`` (else None)."""
        path = self._file(index)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            record = json.loads(f.metadata()["candidate"])
            if record["values"] != values:
                return None
            record["tensors"] = {k: f.get_tensor(k) for k in f.keys()}
        return record

    def put(self, index: int, values: dict[str, float], scores: dict[str, float],
            tensors: dict[str, torch.Tensor], info: Any = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        metadata = {"candidate": json.dumps({"values": values, "scores": scores, "info": info})}
        with atomic_path(self._file(index)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


Evaluate = Callable[[list[dict[str, float]]], list[tuple[dict[str, float], dict[str, torch.Tensor], Any]]]


def run_search(directory: RunDirectory, space: dict[str, Dimension], evaluate_batch: Evaluate, *, trials: int,
               metric: str, seed: int, label: str, progress: bool) -> tuple[SearchResult, dict[str, Any]]:
    """Search ``space`` (:func:`calibprompt.methods.selection.search`, batches of :data:`TUNE_BATCH`);
    ``evaluate_batch(proposals)`` returns per proposal (scores, tensors, info) and is called only
    for candidates not checkpointed by an interrupted call. Returns the result and the chosen
    candidate's checkpoint (``values``, ``scores``, ``tensors``, ``info``). One progress bar."""
    store = CandidateStore(directory)
    count = reused = 0

    def scored(proposals: list[dict[str, float]]) -> list[dict[str, float]]:
        nonlocal count, reused
        first = count
        count += len(proposals)
        found = {i: store.get(first + i, values) for i, values in enumerate(proposals)}
        todo = [i for i, record in found.items() if record is None]
        reused += len(proposals) - len(todo)
        if reused:
            bar.update(task, description=f"{label} ({reused} finished before, resumed)")
        if todo:
            for i, (scores, tensors, info) in zip(todo, evaluate_batch([proposals[i] for i in todo]), strict=True):
                store.put(first + i, proposals[i], scores, tensors, info)
                found[i] = {"values": proposals[i], "scores": scores}
        bar.update(task, advance=len(proposals))
        return [found[i]["scores"] for i in range(len(proposals))]

    with rate_progress(progress, unit="candidates") as bar:
        task = bar.add_task(label, total=trials, rate="-")
        result = search(space, scored, trials=trials, metric=metric, seed=seed, batch=TUNE_BATCH)
        bar.update(task, completed=trials)  # repeated proposals are trials that trained nothing
    chosen = store.get(result.chosen["index"], result.chosen["values"])
    assert chosen is not None, "the chosen candidate was checkpointed"
    return result, chosen


def write_tuning(directory: RunDirectory, result: SearchResult, space: dict[str, Dimension], *, objective: str,
                 chosen_objective: str, trials: int, seed: int, scored_on: dict[str, Any]) -> dict[str, Any]:
    """Write ``tuning.json`` (every candidate, the choice, the space and what the candidates were
    scored on) and return the ``tuning`` entry of ``metrics.json``."""
    write_json(directory.path("tuning.json"), {
        **scored_on, "objective": objective, "space": [d.to_dict() for d in space.values()], "trials": trials,
        "batch": TUNE_BATCH, "seed": seed, "chosen_objective": chosen_objective, **result.to_dict()})
    return {"chosen": result.chosen["values"], "objective": chosen_objective, "metric": result.metric,
            "score": result.chosen["scores"]["ece" if result.metric == "constrained-ece" else result.metric], "candidates": len(result.candidates),
            "sampler": result.sampler, "split": scored_on["split"],
            **({"folds": scored_on["folds"]} if "folds" in scored_on else {})}
