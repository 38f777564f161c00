"""Choosing hyperparameters without the test set: search spaces, objective placeholders, and a
search over candidates scored on a labelled tuning split.

An objective expression may leave values open as named placeholders, ``?name``::

    ls(alpha=?a) + smac(alpha=?a) + ?w*as

and a search space gives each a range -- ``a=0.01:0.3:log`` (log-uniform), ``w=0.1:10`` (uniform)
or a list of choices, ``w=0.1,1,10``. :func:`search` proposes candidates in batches (so that a
batch can be trained in lockstep), has them scored by the caller on the tuning split, and returns
every candidate with its scores and the choice: the candidate with the lowest value of the
chosen proper scoring rule (NLL by default) -- or the lowest ECE among the candidates within one
accuracy point of the most accurate (``constrained-ece``). The proposals come from Optuna's TPE sampler
(seeded, so a search is deterministic for a seed) or, when every dimension is a list of choices
that the trial budget covers, the full grid -- every combination once, no sampler needed.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ACCURACY_TOLERANCE", "SCORES", "Dimension", "SearchResult", "bind", "choose", "parse_space", "placeholders",
           "search"]

_PLACEHOLDER = re.compile(r"\?([A-Za-z_][A-Za-z0-9_]*)")
#: What a search may minimise: the proper scoring rules NLL and Brier, ECE, and ``constrained-ece``
#: -- the lowest ECE among the candidates whose accuracy is within :data:`ACCURACY_TOLERANCE` of the
#: most accurate candidate's (calibration without giving up accuracy).
SCORES = ("nll", "brier", "ece", "constrained-ece")
#: ``constrained-ece``: the accuracy a candidate may lose against the most accurate one (1 point).
ACCURACY_TOLERANCE = 0.01


def placeholders(expression: str) -> list[str]:
    """The placeholder names of an objective expression, in order of first appearance."""
    return list(dict.fromkeys(_PLACEHOLDER.findall(expression)))


def bind(expression: str, values: dict[str, float]) -> str:
    """The expression with every ``?name`` replaced by ``values[name]`` (a concrete objective)."""
    missing = [name for name in placeholders(expression) if name not in values]
    if missing:
        raise ValueError(f"objective {expression!r}: no value for {', '.join('?' + m for m in missing)}")
    return _PLACEHOLDER.sub(lambda m: repr(float(values[m.group(1)])), expression)


@dataclass(frozen=True)
class Dimension:
    """One searched value: a range ``[low, high]`` (log-uniform with ``log``) or ``choices``."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[float, ...] | None = None

    def __str__(self) -> str:
        if self.choices is not None:
            return f"{self.name}=" + ",".join(f"{c:g}" for c in self.choices)
        return f"{self.name}={self.low:g}:{self.high:g}" + (":log" if self.log else "")

    def to_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"name": self.name, "choices": list(self.choices)}
        return {"name": self.name, "low": self.low, "high": self.high, "log": self.log}


def parse_space(specs: Sequence[str]) -> dict[str, Dimension]:
    """``["a=0.01:0.3:log", "w=0.1,1,10"]`` -> the search space (``NAME=LOW:HIGH[:log]`` or
    ``NAME=V1,V2,...``); malformed entries are errors that say what is expected."""
    space: dict[str, Dimension] = {}
    for spec in specs:
        name, sep, rest = str(spec).partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or not rest.strip():
            raise ValueError(f"--search {spec!r}: expected NAME=LOW:HIGH[:log] or NAME=V1,V2,... "
                             "(e.g. a=0.01:0.3:log)")
        if name in space:
            raise ValueError(f"--search {spec!r}: {name} is given twice")
        try:
            if ":" in rest:
                parts = [p.strip() for p in rest.split(":")]
                log = len(parts) == 3 and parts[2] == "log"
                if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
                    raise ValueError
                low, high = float(parts[0]), float(parts[1])
                if not (math.isfinite(low) and math.isfinite(high) and low < high) or (log and low <= 0):
                    raise ValueError
                space[name] = Dimension(name, low, high, log)
            else:
                choices = tuple(float(v) for v in rest.split(","))
                if not all(math.isfinite(c) for c in choices) or len(set(choices)) != len(choices):
                    raise ValueError
                space[name] = Dimension(name, choices=choices)
        except ValueError:
            raise ValueError(f"--search {spec!r}: expected NAME=LOW:HIGH[:log] with LOW < HIGH (LOW > 0 for "
                             "log) or NAME=V1,V2,... with distinct numbers") from None
    return space


@dataclass
class SearchResult:
    """Every candidate (``values``, ``scores``) in the order proposed, and the chosen one."""

    candidates: list[dict[str, Any]]
    chosen: dict[str, Any]
    metric: str
    sampler: str

    def to_dict(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "chosen": self.chosen, "metric": self.metric, "sampler": self.sampler}


def _grid(space: dict[str, Dimension], trials: int) -> list[dict[str, float]] | None:
    """Every combination of the choices, when every dimension is a list that the budget covers."""
    if not all(d.choices is not None for d in space.values()):
        return None
    grid = [dict(zip(space, combo, strict=True)) for combo in itertools.product(*(d.choices for d in space.values()))]
    return grid if len(grid) <= trials else None


def search(space: dict[str, Dimension], evaluate: Callable[[list[dict[str, float]]], list[dict[str, float]]],
           trials: int = 16, metric: str = "nll", seed: int = 0, batch: int = 4) -> SearchResult:
    """Propose up to ``trials`` candidates of ``space`` in batches of ``batch``; ``evaluate`` scores a
    batch (a list of ``{name: value}``) and returns one ``{score: value}`` per candidate, which must
    hold ``metric`` (``constrained-ece``: ``ece`` and ``accuracy``). The chosen candidate has the
    lowest ``metric`` (the first proposed on ties); for ``constrained-ece``, the lowest ECE among
    the candidates with accuracy >= (best accuracy - :data:`ACCURACY_TOLERANCE`), and the sampler
    is told ``ECE + max(0, best accuracy so far - tolerance - accuracy)`` (a shortfall beyond the
    tolerance counts as calibration error).
    With only lists of choices whose product is at most ``trials`` the search is the full grid, in
    order; otherwise Optuna's TPE sampler, seeded by ``seed``, proposes (a batch is asked at once,
    with the constant-liar strategy), so a search is deterministic for a seed and batch size."""
    import optuna

    if metric not in SCORES:
        raise ValueError(f"tune_metric: expected one of {', '.join(SCORES)}, got {metric!r}")
    if not space:
        raise ValueError("search: the search space is empty; give --search NAME=... for each placeholder")
    if trials < 1 or batch < 1:
        raise ValueError(f"trials and batch: expected positive integers, got {trials!r} and {batch!r}")
    candidates: list[dict[str, Any]] = []

    def scored(proposals: list[dict[str, float]]) -> list[float]:
        scores = evaluate(proposals)
        if len(scores) != len(proposals):
            raise ValueError(f"search: evaluate returned {len(scores)} scores for {len(proposals)} candidates")
        for values, score in zip(proposals, scores, strict=True):
            candidates.append({"values": values, "scores": {k: float(v) for k, v in score.items()}})
        if metric != "constrained-ece":
            return [_finite(float(score[metric])) for score in scores]
        best = max(c["scores"]["accuracy"] for c in candidates)
        return [_finite(float(score["ece"]) + max(0.0, best - ACCURACY_TOLERANCE - float(score["accuracy"])))
                for score in scores]

    grid = _grid(space, trials)
    if grid is not None:
        kind = "grid"
        for start in range(0, len(grid), batch):
            scored(grid[start:start + batch])
    else:
        kind = "tpe"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="minimize",
                                    sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True))
        while len(candidates) < trials:
            asked = [study.ask() for _ in range(min(batch, trials - len(candidates)))]
            proposals = [{name: float(trial.suggest_categorical(name, list(d.choices))) if d.choices is not None
                          else float(trial.suggest_float(name, d.low, d.high, log=d.log))
                          for name, d in space.items()} for trial in asked]
            for trial, value in zip(asked, scored(proposals), strict=True):
                study.tell(trial, value)
    best = choose(candidates, metric)
    return SearchResult(candidates, {"index": best, **candidates[best]}, metric, kind)


def choose(candidates: Sequence[dict[str, Any]], metric: str) -> int:
    """Index of the chosen candidate: the lowest ``metric`` score, the first on ties; for
    ``constrained-ece`` the lowest ECE among those within :data:`ACCURACY_TOLERANCE` of the best
    accuracy. Non-finite scores lose."""
    eligible: Sequence[int] = range(len(candidates))
    if metric == "constrained-ece":
        top = max(c["scores"]["accuracy"] for c in candidates)
        eligible = [i for i in eligible if candidates[i]["scores"]["accuracy"] >= top - ACCURACY_TOLERANCE]
        metric = "ece"
    return min(eligible, key=lambda i: (_finite(candidates[i]["scores"][metric]), i))


def _finite(value: float) -> float:
    return value if math.isfinite(value) else float("inf")
