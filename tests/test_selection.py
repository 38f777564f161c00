"""Hyperparameter search without the test set: objective placeholders, search spaces and the
Optuna-driven search (deterministic for a seed, the full grid for small lists of choices)."""

from __future__ import annotations

import itertools
import math

import pytest

from calibprompt.methods.selection import Dimension, bind, choose, parse_space, placeholders, search
from calibprompt.objective import Objective


def test_placeholders_bind_to_a_concrete_objective():
    text = "ls(alpha=?a) + smac(alpha=?a) + ?w*as"
    assert placeholders(text) == ["a", "w"]
    bound = bind(text, {"a": 0.05, "w": 3})
    assert bound == "ls(alpha=0.05) + smac(alpha=0.05) + 3.0*as"
    objective = Objective.parse(bound)
    assert [(t.name, t.weight, t.kwargs) for t in objective.terms] == [
        ("ls", 1.0, {"alpha": 0.05}), ("smac", 1.0, {"alpha": 0.05}), ("as", 3.0, {})]
    with pytest.raises(ValueError, match=r"no value for \?w"):
        bind(text, {"a": 0.1})
    with pytest.raises(ValueError, match=r"placeholder \?a.*has no value"):
        Objective.parse(text)


def test_parse_space_and_its_errors():
    space = parse_space(["a=0.01:0.3:log", "w=0.1:10", "m=1,2,5"])
    assert space["a"] == Dimension("a", 0.01, 0.3, True)
    assert space["w"] == Dimension("w", 0.1, 10.0, False)
    assert space["m"] == Dimension("m", choices=(1.0, 2.0, 5.0))
    assert [str(d) for d in space.values()] == ["a=0.01:0.3:log", "w=0.1:10", "m=1,2,5"]
    for bad in ("a", "a=", "=1:2", "a=2:1", "a=0:1:log", "a=1:2:lin", "a=1,1", "a=x:2", "a=1:2:3:4", "1a=1:2"):
        with pytest.raises(ValueError, match="--search"):
            parse_space([bad])
    with pytest.raises(ValueError, match="given twice"):
        parse_space(["a=1:2", "a=3:4"])


def quadratic(batches):
    """A stand-in for training + scoring: NLL minimal at a = 0.1, w = 2 (log scale)."""
    def evaluate(proposals):
        batches.append(len(proposals))
        return [{"nll": (math.log10(v["a"]) + 1) ** 2 + (math.log10(v["w"]) - math.log10(2)) ** 2,
                 "ece": v["a"]} for v in proposals]
    return evaluate


def test_search_is_deterministic_for_a_seed_and_chooses_the_lowest_score():
    space = parse_space(["a=0.001:1:log", "w=0.01:100:log"])
    sizes_a, sizes_b = [], []
    a = search(space, quadratic(sizes_a), trials=20, seed=7, batch=4)
    b = search(space, quadratic(sizes_b), trials=20, seed=7, batch=4)
    assert a.candidates == b.candidates and a.chosen == b.chosen and a.sampler == "tpe"
    assert sizes_a == [4] * 5 and len(a.candidates) == 20
    best = min(c["scores"]["nll"] for c in a.candidates)
    assert a.chosen["scores"]["nll"] == best and a.candidates[a.chosen["index"]] == {
        k: v for k, v in a.chosen.items() if k != "index"}
    assert all(0.001 <= c["values"]["a"] <= 1 and 0.01 <= c["values"]["w"] <= 100 for c in a.candidates)
    other = search(space, quadratic([]), trials=20, seed=8, batch=4)
    assert other.candidates != a.candidates
    by_ece = search(space, quadratic([]), trials=20, seed=7, batch=4, metric="ece")
    assert by_ece.chosen["values"]["a"] == min(c["values"]["a"] for c in by_ece.candidates)


def test_small_lists_of_choices_are_searched_as_the_full_grid():
    space = parse_space(["a=0.01,0.1,0.3", "w=1,3"])
    result = search(space, quadratic([]), trials=16, seed=0, batch=4)
    assert result.sampler == "grid" and len(result.candidates) == 6
    combos = {(c["values"]["a"], c["values"]["w"]) for c in result.candidates}
    assert combos == set(itertools.product((0.01, 0.1, 0.3), (1.0, 3.0)))
    assert result.chosen["values"] == {"a": 0.1, "w": 3.0}  # closest to (0.1, 2) on the log scale
    assert search(space, quadratic([]), trials=4, seed=0).sampler == "tpe"  # the grid does not fit the budget


def test_search_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="tune_metric"):
        search(parse_space(["a=1:2"]), quadratic([]), metric="accuracy")
    with pytest.raises(ValueError, match="empty"):
        search({}, quadratic([]))
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        search(parse_space(["a=1:2"]), lambda p: [{"nll": 1.0}], trials=2, batch=2)


def test_constrained_ece_is_the_lowest_ece_within_one_accuracy_point(monkeypatch):
    """Hand-made candidates: the lowest ECE overall is 3 points less accurate than the best, so it
    is not eligible; among those within 1 point the lowest ECE wins, the first on ties."""
    import optuna

    table = {1.0: (0.90, 0.08), 2.0: (0.895, 0.03), 3.0: (0.87, 0.01), 4.0: (0.905, 0.05), 5.0: (0.896, 0.03)}

    def evaluate(proposals):
        return [dict(zip(("accuracy", "ece"), table[float(round(p["a"]))], strict=True)) for p in proposals]

    result = search(parse_space(["a=1,2,3,4,5"]), evaluate, trials=5, metric="constrained-ece", batch=2)
    assert result.sampler == "grid" and result.chosen["values"] == {"a": 2.0}  # 0.895 >= 0.905 - 0.01; ECE 0.03
    assert choose(result.candidates, "ece") == 2  # unconstrained: the inaccurate a=3
    assert choose(result.candidates, "constrained-ece") == 1
    # TPE is told ECE plus the accuracy shortfall beyond the tolerance (best accuracy of the batch)
    told = []
    real = optuna.study.Study.tell
    monkeypatch.setattr(optuna.study.Study, "tell",
                        lambda self, trial, value, *a, **k: (told.append(value), real(self, trial, value))[1])
    result = search(parse_space(["a=1:5"]), evaluate, trials=4, metric="constrained-ece", batch=4, seed=0)
    top = max(c["scores"]["accuracy"] for c in result.candidates)
    assert told == pytest.approx([c["scores"]["ece"] + max(0.0, top - 0.01 - c["scores"]["accuracy"])
                                  for c in result.candidates])


def test_a_repeated_proposal_is_not_evaluated_again():
    """TPE may propose a choice again when the grid exceeds the budget: it is scored from the
    first time, counts as a trial, and the candidates hold each value once."""
    evaluated = []

    def evaluate(proposals):
        evaluated.extend(_key(p) for p in proposals)
        return [{"nll": (p["a"] - 2) ** 2} for p in proposals]

    result = search(parse_space(["a=1,2,3,4,5,6"]), evaluate, trials=5, seed=0, batch=4)  # 6 choices > 5 trials
    assert result.sampler == "tpe" and len(evaluated) == len(set(evaluated)) == len(result.candidates)
    assert result.repeats == 5 - len(result.candidates) and result.to_dict()["repeated_proposals"] == result.repeats
    assert result.repeats > 0  # seed 0 proposes a value twice


def _key(values):
    return tuple(sorted(values.items()))


def test_constrained_ece_tolerates_one_image_when_that_is_more_than_a_point():
    candidates = [{"values": {"a": 1.0}, "scores": {"accuracy": 0.90, "ece": 0.05, "n": 64.0}},
                  {"values": {"a": 2.0}, "scores": {"accuracy": 0.90 - 1 / 64, "ece": 0.02, "n": 64.0}},
                  {"values": {"a": 3.0}, "scores": {"accuracy": 0.90 - 2 / 64, "ece": 0.01, "n": 64.0}}]
    assert choose(candidates, "constrained-ece") == 1  # one image below the best: eligible; two: not
    without_n = [{**c, "scores": {k: v for k, v in c["scores"].items() if k != "n"}} for c in candidates]
    assert choose(without_n, "constrained-ece") == 0  # 1 point only
