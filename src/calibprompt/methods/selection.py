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
#: ``constrained-ece``: the accuracy a candidate may lose against the most accurate one (1 point, or
#: one image of the scored set when that is more).
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


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: {text.strip()!r} is not a finite number")
    return value


def _dimension(name: str, rest: str, where: str) -> Dimension:
    """One ``NAME=...`` entry, with an error that says what is wrong with it."""
    if ":" in rest:
        parts = [p.strip() for p in rest.split(":")]
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
            raise ValueError(f"{where}: expected LOW:HIGH or LOW:HIGH:log, got {len(parts)} parts"
                             + (f" ending in {parts[2]!r}" if len(parts) == 3 else ""))
        low, high = _number(parts[0], where), _number(parts[1], where)
        log = len(parts) == 3
        if not low < high:
            raise ValueError(f"{where}: LOW must be smaller than HIGH, got {low:g} and {high:g}")
        if log and low <= 0:
            raise ValueError(f"{where}: a log range needs LOW > 0, got {low:g}")
        return Dimension(name, low, high, log)
    choices = tuple(_number(v, where) for v in rest.split(","))
    if len(set(choices)) != len(choices):
        raise ValueError(f"{where}: the choices repeat a value")
    return Dimension(name, choices=choices)


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
        space[name] = _dimension(name, rest, f"--search {spec!r}")
    return space


@dataclass
class SearchResult:
    """Every candidate (``values``, ``scores``) in the order proposed, and the chosen one."""

    candidates: list[dict[str, Any]]
    chosen: dict[str, Any]
    metric: str
    sampler: str
    repeats: int = 0  # proposals that repeated a candidate (not trained again; they count as trials)

    def to_dict(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "chosen": self.chosen, "metric": self.metric, "sampler": self.sampler,
                "repeated_proposals": self.repeats}


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
    the candidates with accuracy >= (best accuracy - tolerance), the tolerance being
    :data:`ACCURACY_TOLERANCE` or one image (``1 / scores["n"]``) when scores hold ``n`` and that is
    more, and the sampler is told ``ECE + max(0, best accuracy so far - tolerance - accuracy)`` (a
    shortfall beyond the tolerance counts as calibration error). A proposal repeating an earlier
    candidate (TPE may propose a choice again) is not evaluated again: the sampler is told its
    earlier score, it counts towards ``trials`` and ``candidates`` holds each candidate once.
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
    seen: dict[tuple, dict[str, float]] = {}  # values -> scores: a repeated proposal is not trained again
    repeats = 0

    def scored(proposals: list[dict[str, float]]) -> list[float]:
        nonlocal repeats
        fresh = list({_key(p): p for p in proposals if _key(p) not in seen}.values())
        scores = evaluate(fresh) if fresh else []
        if len(scores) != len(fresh):
            raise ValueError(f"search: evaluate returned {len(scores)} scores for {len(fresh)} candidates")
        for values, score in zip(fresh, scores, strict=True):
            seen[_key(values)] = {k: float(v) for k, v in score.items()}
            candidates.append({"values": values, "scores": seen[_key(values)]})
        repeats += len(proposals) - len(fresh)
        if metric != "constrained-ece":
            return [_finite(seen[_key(p)][metric]) for p in proposals]
        best = max(c["scores"]["accuracy"] for c in candidates)
        return [_finite(seen[_key(p)]["ece"] + max(0.0, best - _tolerance(seen[_key(p)]) - seen[_key(p)]["accuracy"]))
                for p in proposals]

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
        asked_total = 0
        while asked_total < trials:
            asked = [study.ask() for _ in range(min(batch, trials - asked_total))]
            asked_total += len(asked)
            proposals = [{name: float(trial.suggest_categorical(name, list(d.choices))) if d.choices is not None
                          else float(trial.suggest_float(name, d.low, d.high, log=d.log))
                          for name, d in space.items()} for trial in asked]
            for trial, value in zip(asked, scored(proposals), strict=True):
                study.tell(trial, value)
    best = choose(candidates, metric)
    return SearchResult(candidates, {"index": best, **candidates[best]}, metric, kind, repeats)


def _key(values: dict[str, float]) -> tuple:
    return tuple(sorted(values.items()))


def _tolerance(scores: dict[str, float]) -> float:
    """``constrained-ece``'s accuracy tolerance: one point, or one image of the scored set when
    that is more (64 images: 1.6 points) -- a one-image difference is not a real one."""
    return max(ACCURACY_TOLERANCE, 1.0 / scores["n"]) if scores.get("n") else ACCURACY_TOLERANCE


def choose(candidates: Sequence[dict[str, Any]], metric: str) -> int:
    """Index of the chosen candidate: the lowest ``metric`` score, the first on ties; for
    ``constrained-ece`` the lowest ECE among those within :data:`ACCURACY_TOLERANCE` of the best
    accuracy. Non-finite scores lose."""
    eligible: Sequence[int] = range(len(candidates))
    if metric == "constrained-ece":
        top = max(c["scores"]["accuracy"] for c in candidates)
        eligible = [i for i in eligible
                    if candidates[i]["scores"]["accuracy"] >= top - _tolerance(candidates[i]["scores"]) - 1e-12]
        metric = "ece"
    return min(eligible, key=lambda i: (_finite(candidates[i]["scores"][metric]), i))


def _finite(value: float) -> float:
    return value if math.isfinite(value) else float("inf")
