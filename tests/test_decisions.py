"""Decisions from probabilities: referral thresholds (Learn then Test) and conformal prediction
sets -- the guarantees hold on simulated data with known probabilities, exact edge cases, and
agreement with MAPIE and scipy where they compute the same thing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from calibprompt.decisions import (
    SCORES,
    THRESHOLDS,
    ConformalSets,
    fit_conformal,
    fit_referral,
    min_accepted,
    min_per_class,
    referral_outcome,
    set_outcome,
)
from calibprompt.decisions.conformal import conformal_scores


def simulate(rng: np.random.Generator, n: int, classes: int = 4, scale: float = 2.5):
    """Probabilities from random logits and labels drawn from them: a perfectly calibrated model,
    so the true selective risk and coverage are known in distribution."""
    logits = rng.normal(size=(n, classes)) * scale
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1).clip(max=classes - 1)
    return p, y


# -- referral ----------------------------------------------------------------------------------
def test_referral_guarantee_holds_in_at_least_one_minus_delta_of_repeats():
    """100 calibration draws of 1000 cases from a calibrated model: the selective error on a large
    test set (a proxy for the true selective risk at the chosen threshold) is at most the target
    in >= 90 % of draws. The naive rule -- the lowest threshold whose calibration error is within
    the target -- fails this in about half of the draws, so the check has power."""
    rng = np.random.default_rng(0)
    test_p, test_y = simulate(rng, 100_000)
    test_conf, test_wrong = test_p.max(1), test_p.argmax(1) != test_y
    violations = reached = naive_violations = 0
    for _ in range(100):
        p, y = simulate(rng, 1000)
        referral = fit_referral(p, y, max_error=0.1, confidence=0.9)
        if referral.threshold is not None:
            reached += 1
            violations += referral_outcome(referral, test_p, test_y)["selective_error"] > 0.1
        order = np.argsort(-p.max(1), kind="stable")
        running = np.cumsum((p.argmax(1) != y)[order]) / np.arange(1, 1001)
        naive = p.max(1)[order][np.flatnonzero(running <= 0.1).max()]
        naive_violations += test_wrong[test_conf >= naive].mean() > 0.1
    assert reached >= 90  # the target is reachable on most draws
    assert violations <= 10
    assert naive_violations >= 30


def test_a_threshold_certified_by_the_exact_tail_is_certified():
    """147 accepted, 5 wrong, target 0.1: the exact tail P(Binom(147, 0.1) <= 5) = 0.0024 is below
    Holm's first level 0.1 / 26 = 0.0038, so the threshold is certified (a tail evaluated at
    ceil(147 * (5/147)) = 6, as floating point gives, would be 0.0069 and refuse it)."""
    p = np.tile([0.9, 0.1], (147, 1))
    y = np.r_[np.ones(5), np.zeros(142)].astype(int)
    r = fit_referral(p, y, max_error=0.1, confidence=0.9)
    assert r.tests[0]["p_value"] == pytest.approx(binom.cdf(5, 147, 0.1)) and r.tests[0]["p_value"] < 0.1 / 26
    assert r.threshold == 0.0


def test_referral_p_values_are_exact_binomial_tails_and_holm_picks_the_lowest_certified():
    rng = np.random.default_rng(1)
    p, y = simulate(rng, 600)
    r = fit_referral(p, y, max_error=0.08, confidence=0.8)
    conf, wrong = p.max(1), p.argmax(1) != y
    for test in r.tests:
        kept = conf >= test["threshold"]
        assert test["accepted"] == kept.sum() and test["errors"] == (wrong & kept).sum()
        expected = binom.cdf(test["errors"], test["accepted"], 0.08) if test["accepted"] else 1.0
        assert test["p_value"] == pytest.approx(expected, rel=1e-9, abs=1e-300)
    # Holm by hand: sort p-values, reject while p_(i) <= delta / (m - i)
    m, delta = len(THRESHOLDS), 0.2
    order = np.argsort([t["p_value"] for t in r.tests], kind="stable")
    rejected = set()
    for i, j in enumerate(order):
        if r.tests[j]["p_value"] > delta / (m - i):
            break
        rejected.add(int(j))
    assert {i for i, t in enumerate(r.tests) if t["certified"]} == rejected
    assert r.threshold == THRESHOLDS[min(rejected)]


def test_referral_edge_cases():
    p = np.array([[0.99, 0.01]] * 300 + [[0.6, 0.4]] * 100)
    all_right = fit_referral(p, np.zeros(400, dtype=int), max_error=0.05, confidence=0.9)
    assert all_right.threshold == 0.0 and all_right.calibration_accepted == 400  # accept everything
    all_wrong = fit_referral(p, np.ones(400, dtype=int), max_error=0.05, confidence=0.9)
    assert all_wrong.threshold is None and not all_wrong.accept(p).any()  # refer everything
    assert referral_outcome(all_wrong, p, np.ones(400, dtype=int))["selective_error"] is None
    # ties: every case has the same confidence; a threshold cannot split them
    tied = fit_referral(np.tile([0.7, 0.3], (200, 1)), np.r_[np.zeros(195), np.ones(5)].astype(int),
                        max_error=0.1, confidence=0.9)
    assert tied.threshold is not None and tied.accept(np.array([[0.7, 0.3]])).all()
    # too few cases to reach the target at all, whatever they are
    need = min_accepted(0.05, 0.9)
    assert need == math.ceil(math.log(0.1 / 26) / math.log(0.95)) == 109
    few = fit_referral(p[:need - 1], np.zeros(need - 1, dtype=int), max_error=0.05, confidence=0.9)
    assert few.threshold is None and few.min_accepted == need
    enough = fit_referral(p[:need], np.zeros(need, dtype=int), max_error=0.05, confidence=0.9)
    assert enough.threshold == 0.0
    with pytest.raises(ValueError, match="max_error"):
        fit_referral(p, np.zeros(400, dtype=int), max_error=0)
    with pytest.raises(ValueError, match="max_error: expected a number"):
        fit_referral(p, np.zeros(400, dtype=int), max_error="0.1")
    with pytest.raises(ValueError, match="2 classes"):
        all_right.accept(np.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match="confidence"):
        fit_referral(p, np.zeros(400, dtype=int), confidence=1.0)


def test_referral_does_not_depend_on_case_order():
    rng = np.random.default_rng(2)
    p, y = simulate(rng, 500)
    perm = rng.permutation(500)
    assert fit_referral(p, y).to_dict() == fit_referral(p[perm], y[perm]).to_dict()


# -- conformal ---------------------------------------------------------------------------------
@pytest.mark.parametrize("score", SCORES)
def test_conformal_coverage_holds_on_average(score):
    """1000 calibration draws of 120 cases (4 classes): the mean test coverage is the theoretical
    ⌈(n + 1)(1 − α)⌉ / (n + 1) = 109/121 = 0.9008 within 3 Monte Carlo standard errors (~0.001),
    and every class reaches 1 − α on average with Mondrian sets."""
    rng = np.random.default_rng(3)
    marginal, per_class, empty = [], [], False
    for _ in range(1000):
        p, y = simulate(rng, 120)
        tp, ty = simulate(rng, 500)
        outcome = set_outcome(fit_conformal(p, y, 0.9, score).predict(tp), ty)
        marginal.append(outcome["coverage"])
        empty = empty or outcome["empty"] > 0
        outcome = set_outcome(fit_conformal(p, y, 0.9, score, mondrian=True).predict(tp), ty)
        per_class.append([c["coverage"] for c in outcome["by_class"].values()])
    error = 3 * np.std(marginal) / np.sqrt(1000)
    if score == "lac":  # {s <= q}: exactly the split-conformal coverage
        assert abs(np.mean(marginal) - 109 / 121) <= error
    else:  # the top label always added (no empty set): at least that; 0.94 / 0.93 in this simulation
        assert np.mean(marginal) >= 109 / 121 - error and not empty
    assert (np.mean(per_class, axis=0) >= 0.9 - 3 * np.std(per_class, axis=0) / np.sqrt(1000)).all()


def test_conformal_scores_against_an_independent_loop():
    rng = np.random.default_rng(4)
    p, y = simulate(rng, 50, classes=5)
    lam, k = 0.05, 2
    for score in SCORES:
        sets = fit_conformal(p, y, 0.8, score, raps_lambda=lam, raps_k=k)
        expected = np.zeros_like(p)
        for i in range(len(p)):
            for c in range(5):
                above = [j for j in range(5) if p[i, j] > p[i, c] or (p[i, j] == p[i, c] and j <= c)]
                aps = sum(p[i, j] for j in above)
                expected[i, c] = {"lac": 1 - p[i, c], "aps": aps, "raps": aps + lam * max(0, len(above) - k)}[score]
        true = sorted(expected[np.arange(50), y])
        q = true[math.ceil(51 * 0.8) - 1]
        assert sets.thresholds == (pytest.approx(q),)
        inside = expected <= q + 1e-12
        if score != "lac":  # APS / RAPS never leave out the top label
            inside[np.arange(50), p.argmax(1)] = True
        assert np.array_equal(sets.predict(p), inside)


def test_lac_sets_equal_mapie():
    from mapie.classification import SplitConformalClassifier
    from sklearn.base import BaseEstimator, ClassifierMixin

    class Probabilities(ClassifierMixin, BaseEstimator):  # MAPIE on precomputed probabilities
        def fit(self, X, y=None):
            self.classes_ = np.arange(4)
            return self

        def predict_proba(self, X):
            return np.asarray(X)

        def predict(self, X):
            return np.asarray(X).argmax(1)

    rng = np.random.default_rng(5)
    p, y = simulate(rng, 300)
    tp, _ = simulate(rng, 3000)
    mapie = SplitConformalClassifier(Probabilities().fit(p, y), confidence_level=0.9, conformity_score="lac",
                                     prefit=True).conformalize(p, y)
    assert np.array_equal(mapie.predict_set(tp)[1][:, :, 0], fit_conformal(p, y, 0.9, "lac").predict(tp))


def test_conformal_edge_cases_and_warnings():
    p = np.array([[0.7, 0.2, 0.1]] * 30)
    y = np.r_[np.zeros(25), np.ones(3), np.full(2, 2)].astype(int)
    mondrian = fit_conformal(p, y, 0.9, "lac", mondrian=True, classnames=["a", "b", "c"])
    assert min_per_class(0.9) == 9 and min_per_class(0.95) == 19
    assert mondrian.thresholds[1] == math.inf and mondrian.thresholds[2] == math.inf
    assert len(mondrian.warnings) == 2 and "'b' has 3 calibration case(s)" in mondrian.warnings[0]
    assert "needs at least 9" in mondrian.warnings[0]
    assert mondrian.predict(p)[:, 1:].all()  # too few: always in the set
    tiny = fit_conformal(p[:5], y[:5], 0.9, "aps")
    assert tiny.thresholds == (math.inf,) and tiny.predict(p).all() and tiny.warnings
    # APS: a confident case whose top probability exceeds the threshold keeps its top label; two
    # classes: the second label's score is exactly 1 whatever the rounding of the row sum
    confident = fit_conformal(np.tile([0.6, 0.4], (20, 1)), np.zeros(20, dtype=int), 0.8, "aps")
    assert confident.thresholds == (pytest.approx(0.6),)
    assert confident.predict(np.array([[0.97, 0.03]])).tolist() == [[True, False]]
    rows = np.array([[0.3, 0.7], [0.1 + 0.2, 0.7], [0.7, 0.1 + 0.2]])  # sums 1.0, 1.0000000000000002, ...
    scores = conformal_scores(rows, "aps")
    assert (scores.max(1) == 1.0).all()
    # ties in scores: every case identical, the threshold is their common score
    tied = fit_conformal(p, np.zeros(30, dtype=int), 0.9, "lac")
    assert tied.thresholds == (pytest.approx(0.3),) and tied.predict(p)[:, 0].all() and not tied.predict(p)[:, 1:].any()
    # stored and read back: the same rule
    again = ConformalSets.from_dict(mondrian.to_dict())
    assert again == mondrian and np.array_equal(again.predict(p), mondrian.predict(p))
    assert mondrian.to_dict()["thresholds"][1] is None  # JSON has no infinity
    with pytest.raises(ValueError, match="score"):
        fit_conformal(p, y, 0.9, "thr")
    for bad, match in ((float("nan"), "raps_lambda"), (-1.0, "raps_lambda")):
        with pytest.raises(ValueError, match=match):
            fit_conformal(p, y, 0.9, "raps", raps_lambda=bad)
    with pytest.raises(ValueError, match="raps_k"):
        fit_conformal(p, y, 0.9, "raps", raps_k=1.5)
    with pytest.raises(ValueError, match="classnames"):
        fit_conformal(p, y, 0.9, classnames=["a"])
    with pytest.raises(ValueError, match="3 classes"):
        mondrian.predict(np.array([[0.5, 0.5]]))
    with pytest.raises(ValueError, match="NaN"):
        mondrian.predict(np.array([[np.nan, 0.5, 0.5]]))
    with pytest.raises(ValueError, match="labels"):
        set_outcome(mondrian.predict(p), np.full(30, -1))
    with pytest.raises(ValueError, match="labels"):
        set_outcome(mondrian.predict(p), y[:5])
    with pytest.raises(ValueError, match="coverage"):
        fit_conformal(p, y, 1.5)
    outcome = set_outcome(mondrian.predict(p), y, ["a", "b", "c"])
    assert outcome["by_class"]["b"]["coverage"] == 1.0 and set(outcome["by_size"]) <= {"0", "1", "2", "3"}


# -- on runs -----------------------------------------------------------------------------------
def test_referral_and_conformal_commands_on_runs(tmp_path, capsys):
    """From the command line on finished runs: fitted on the calibration split, measured on test,
    stored beside the run (JSON, the risk-coverage PNG); a run without calibration predictions is
    refused with the way out, before anything is written."""
    import json

    from calibprompt.cli import main
    from calibprompt.runs.directory import read_predictions
    from tests.test_sweeps import imagefolder

    data = imagefolder(tmp_path, seed=0, train=14, test=10)
    common = ["--backbone", "demo", "--dataset", "imagefolder", "--root", str(data), "--cache", str(tmp_path / "cache"),
              "--workers", "0", "--quiet"]
    assert main(["train", *common, "--method", "ce", "--shots", "2", "--epochs", "2", "--views", "2",
                 "--calib-per-class", "8", "--val-per-class", "2", "--out", str(tmp_path / "runs")]) == 0
    assert main(["tpt", *common, "--method", "tpt", "--views", "2", "--out", str(tmp_path / "runs")]) == 0
    prompt_run = next(p.parent for p in (tmp_path / "runs").rglob("metrics.json") if "tpt-" not in str(p))
    tpt_run = next(p.parent for p in (tmp_path / "runs").rglob("metrics.json") if "tpt-" in str(p))
    capsys.readouterr()
    assert main(["referral", str(prompt_run), "--max-error", "0.3", "--confidence", "0.8"]) == 0
    record = json.loads((prompt_run / "referral.json").read_text())
    preds = read_predictions(prompt_run)
    calib = softmax_rows(preds["calib_logits"])
    expected = fit_referral(calib, preds["calib_labels"], 0.3, 0.8)
    assert record["threshold"] == expected.threshold and record["split"] == "calibration"
    assert record["sizes"] == {"calibration": 32, "test": 40}
    outcome = referral_outcome(expected, softmax_rows(preds["test_logits"]), preds["test_labels"])
    assert record["test"] == outcome and (prompt_run / "referral_risk_coverage.png").stat().st_size > 0
    assert main(["conformal", str(prompt_run), "--coverage", "0.8", "--score", "lac", "--mondrian"]) == 0
    stored = json.loads((prompt_run / "conformal.json").read_text())
    names = json.loads((prompt_run / "config.json").read_text())["classnames"]
    sets = ConformalSets.from_dict(stored["fitted"])
    assert sets == fit_conformal(calib, preds["calib_labels"], 0.8, "lac", mondrian=True, classnames=names)
    assert stored["test"] == set_outcome(sets.predict(softmax_rows(preds["test_logits"])), preds["test_labels"], names)
    assert "mean set size" in capsys.readouterr().out
    # predict applies both stored rules to new images: decision and prediction_set columns
    images = sorted((data / "test").rglob("*.png"))[:6]
    assert main(["predict", str(prompt_run), *map(str, images), "--out", str(tmp_path / "pred"), "--quiet"]) == 0
    import csv

    rows = list(csv.DictReader((tmp_path / "pred" / "predictions.csv").open()))
    probs = np.array([[float(r[f"p_uncalibrated[{c}]"]) for c in names] for r in rows])
    accept = probs.max(1) >= record["threshold"] if record["threshold"] is not None else np.zeros(6, bool)
    assert [r["decision"] for r in rows] == ["accept" if a else "refer" for a in accept]
    expected_sets = sets.predict(probs)
    assert [r["prediction_set"] for r in rows] == ["|".join(np.array(names)[m]) for m in expected_sets]
    assert set(json.loads((tmp_path / "pred" / "predict.json").read_text())["decisions"]) == {"referral", "conformal"}
    # the report shows each row's decisions beside its calibration numbers
    from calibprompt.runs import write_report

    written = write_report(tmp_path / "runs", out=tmp_path / "report", n_resamples=10)
    section = written["markdown"].read_text().split("## Decisions")[1]
    assert f"{100 * record['test']['coverage']:.1f} ± 0.0" in section
    assert f"{stored['test']['mean_size']:.2f} ± 0.00" in section and "lac, 0.8 per class" in section
    lines = written["decisions_csv"].read_text().splitlines()
    assert len(lines) == 3 and lines[1].split(",")[3] == "referral"
    # a test-time run without a calibration split: refused, nothing written
    assert main(["referral", str(tpt_run)]) == 2
    assert "--calib-per-class" in capsys.readouterr().err and not (tpt_run / "referral.json").exists()


def softmax_rows(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)
