"""Stratified bootstrap: the resamples of a seed (stratified_bootstrap_indices), bootstrap_many's
shared draw against bootstrap and against a per-resample loop written from the definitions, and
its independence from how the work is chunked and threaded."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from calibprompt import metrics as M
from calibprompt.metrics import resampling

FAST = ["ece", "mce", "brier", "nll", "accuracy"]


def random_predictions(n: int, k: int, seed: int, scale: float = 2.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * scale
    y = rng.integers(0, k, n)
    z[np.arange(n), y] += rng.normal(1.0, 1.0, n)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True), y


def drawn_by_definition(labels: np.ndarray, n_resamples: int, seed: int, block: int) -> np.ndarray:
    """The resamples of ``seed`` as the module docstring defines them: blocks of ``block``
    resamples; per block, one ``integers(0, n_c, size=(rows, n_c))`` per class in label order."""
    rng = np.random.default_rng(seed)
    strata = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    rows = []
    for start in range(0, n_resamples, block):
        m = min(block, n_resamples - start)
        rows.append(np.concatenate([s[rng.integers(0, s.shape[0], size=(m, s.shape[0]))]
                                    for s in strata], axis=1))
    return np.concatenate(rows)


# ---------------------------------------------------------------------------------------------
# stratified_bootstrap_indices: what its docstring claims
# ---------------------------------------------------------------------------------------------


def test_indices_keep_every_class_count_and_draw_within_the_class():
    _, labels = random_predictions(157, 4, 1)
    idx = M.stratified_bootstrap_indices(labels, 60, seed=3)
    assert idx.shape == (60, 157) and idx.dtype == np.int64
    counts = np.bincount(labels, minlength=4)
    for row in idx:
        drawn = labels[row]
        assert np.array_equal(np.bincount(drawn, minlength=4), counts)
        assert np.all(np.diff(drawn) >= 0)  # the draws of the first class come first


def test_indices_same_seed_same_indices_other_seed_others():
    _, labels = random_predictions(200, 3, 2)
    a = M.stratified_bootstrap_indices(labels, 40, seed=7)
    assert np.array_equal(a, M.stratified_bootstrap_indices(labels, 40, seed=7))
    assert not np.array_equal(a, M.stratified_bootstrap_indices(labels, 40, seed=8))


@pytest.mark.parametrize("block_size", [2_000_000, 1000, 150, 40])
def test_indices_follow_the_blocks_of_the_definition(monkeypatch, block_size):
    """Also when N * n_resamples exceeds the block size (formerly one draw for all rows, which
    differed from bootstrap's blocks), down to one resample per block (N > block size)."""
    monkeypatch.setattr(resampling, "_BLOCK", block_size)
    _, labels = random_predictions(97, 3, 4)
    block = max(1, min(23, block_size // 97))
    expected = drawn_by_definition(labels, 23, 5, block)
    assert np.array_equal(M.stratified_bootstrap_indices(labels, 23, seed=5), expected)


def test_indices_are_bootstraps_resamples_on_the_large_path():
    """N * R > 2e6 (three blocks): row r is the r-th resample of bootstrap and bootstrap_many."""
    probs, labels = random_predictions(100_000, 3, 6)
    n_resamples = 45  # blocks of 20, 20, 5 resamples
    idx = M.stratified_bootstrap_indices(labels, n_resamples, seed=9)
    assert np.array_equal(idx, drawn_by_definition(labels, n_resamples, 9, 20))
    weights = np.random.default_rng(0).random(labels.shape[0])

    def fingerprint(p, y):  # depends on which samples are drawn and on their order
        return float(p[:, 0] @ weights + y @ weights[::-1])

    via_bootstrap = M.bootstrap(fingerprint, probs, labels, n_resamples=n_resamples, seed=9).samples
    assert np.array_equal(via_bootstrap, [fingerprint(probs[row], labels[row]) for row in idx])
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    many = M.bootstrap_many(["accuracy"], probs, labels, n_resamples=n_resamples, seed=9)
    assert np.array_equal(many["accuracy"].samples, correct[idx].mean(axis=1))


# ---------------------------------------------------------------------------------------------
# bootstrap_many = bootstrap, metric by metric, bit for bit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k", "n_resamples"), [(300, 4, 40), (37, 2, 25)])
def test_bootstrap_many_equals_bootstrap_for_every_metric(n, k, n_resamples):
    probs, labels = random_predictions(n, k, 11)
    names = list(M.METRICS)
    many = M.bootstrap_many(names, probs, labels, n_resamples=n_resamples, seed=4, n_bins=10)
    assert list(many) == names
    for name in names:
        one = M.bootstrap(name, probs, labels, n_resamples=n_resamples, seed=4, n_bins=10)
        assert np.array_equal(many[name].samples, one.samples), name
        assert many[name].to_dict() == one.to_dict(), name


@pytest.mark.parametrize("method", ["percentile", "basic"])
def test_bootstrap_many_equals_bootstrap_across_blocks(method):
    """N * R = 2.5e6: two drawn blocks (80 + 20 resamples), several chunks per block."""
    probs, labels = random_predictions(25_000, 5, 12)
    many = M.bootstrap_many(FAST, probs, labels, n_resamples=100, seed=2, method=method,
                            confidence=0.9)
    for name in FAST:
        one = M.bootstrap(name, probs, labels, n_resamples=100, seed=2, method=method,
                          confidence=0.9)
        assert np.array_equal(many[name].samples, one.samples), name
        assert (many[name].low, many[name].high) == (one.low, one.high), name
        assert many[name].estimate == one.estimate == M.METRICS[name](probs, labels)


def row_formulas(probs: np.ndarray, labels: np.ndarray, idx: np.ndarray, n_bins: int) -> dict:
    """Each fast metric on the index rows ``idx`` with the plain formulas (and float operations)
    of the vectorised bootstrap: a mean of gathered per-sample terms; one bincount of the
    residuals over (row, bin) keys."""
    rows, n = idx.shape
    conf, correct = M.top_label(probs, labels)
    every = np.arange(n)
    terms = {"accuracy": correct,
             "brier": np.sum(probs * probs, axis=1) - 2.0 * probs[every, labels] + 1.0,
             "nll": -np.log(np.maximum(probs[every, labels], M.LOG_EPS))}
    out = {name: t[idx].mean(axis=1) for name, t in terms.items()}
    keys = (M.bin_index(conf, n_bins)[idx] + n_bins * np.arange(rows)[:, None]).ravel()
    sums = np.bincount(keys, weights=(correct - conf)[idx].ravel(), minlength=rows * n_bins)
    sums = np.abs(sums.reshape(rows, n_bins))
    counts = np.bincount(keys, minlength=rows * n_bins).reshape(rows, n_bins)
    out["ece"] = sums.sum(axis=1) / n
    out["mce"] = (sums / np.maximum(counts, 1)).max(axis=1)
    return out


def test_every_subset_of_the_fast_metrics_equals_the_row_formulas():
    """The per-sample records are laid out differently for each set of metrics (complex
    residual-and-count or a second count, one or two records): the values are bit for bit those
    of the plain formulas on stratified_bootstrap_indices (as the previous bootstrap computed)."""
    probs, labels = random_predictions(240, 3, 17)
    idx = M.stratified_bootstrap_indices(labels, 30, seed=6)
    expected = row_formulas(probs, labels, idx, 12)
    for size in range(1, len(FAST) + 1):
        for subset in itertools.combinations(FAST, size):
            many = M.bootstrap_many(list(subset), probs, labels, n_resamples=30, seed=6, n_bins=12,
                                    chunk=7, workers=2)
            for name in subset:
                assert np.array_equal(many[name].samples, expected[name]), (subset, name)


def test_bootstrap_many_checks_its_arguments():
    probs, labels = random_predictions(50, 3, 13)
    with pytest.raises(ValueError, match="unknown name"):
        M.bootstrap_many(["ece", "nope"], probs, labels)
    with pytest.raises(ValueError, match="at least one"):
        M.bootstrap_many([], probs, labels)
    with pytest.raises(ValueError, match="sequence of metric names"):
        M.bootstrap_many("ece", probs, labels)
    with pytest.raises(ValueError, match="chunk"):
        M.bootstrap_many(["ece"], probs, labels, chunk=0)
    with pytest.raises(ValueError, match="workers"):
        M.bootstrap_many(["ece"], probs, labels, workers=True)
    with pytest.raises(ValueError, match="method"):
        M.bootstrap_many(["ece"], probs, labels, method="bca")
    with pytest.raises(ValueError, match="confidence"):
        M.bootstrap_many(["ece"], probs, labels, confidence=1.0)
    assert list(M.bootstrap_many(["nll", "ece", "nll"], probs, labels, n_resamples=5)) == ["nll", "ece"]


# ---------------------------------------------------------------------------------------------
# against a per-resample loop written from the definitions
# ---------------------------------------------------------------------------------------------


def loop_metrics(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, float]:
    """ECE, MCE, Brier, NLL and accuracy of one resample with explicit loops (no NumPy
    reductions over samples)."""
    n, k = probs.shape
    count = [0] * n_bins
    hits = [0.0] * n_bins
    conf_sum = [0.0] * n_bins
    brier = nll = correct_total = 0.0
    for i in range(n):
        row, label = probs[i].tolist(), int(labels[i])
        top = max(range(k), key=lambda c: (row[c], -c))  # argmax, ties to the lowest index
        conf, correct = row[top], float(top == label)
        b = min(int(conf * n_bins), n_bins - 1)
        count[b] += 1
        hits[b] += correct
        conf_sum[b] += conf
        brier += sum((row[c] - (c == label)) ** 2 for c in range(k))
        nll -= np.log(max(row[label], 1e-12))
        correct_total += correct
    gaps = [abs(hits[b] - conf_sum[b]) / count[b] for b in range(n_bins) if count[b]]
    ece = sum(abs(hits[b] - conf_sum[b]) for b in range(n_bins) if count[b]) / n
    return {"ece": ece, "mce": max(gaps), "brier": brier / n, "nll": nll / n,
            "accuracy": correct_total / n}


def test_shared_draw_equals_a_per_resample_loop():
    probs, labels = random_predictions(120, 3, 14)
    n_resamples, seed, n_bins, confidence = 60, 21, 8, 0.9
    many = M.bootstrap_many(FAST, probs, labels, n_resamples=n_resamples, seed=seed,
                            n_bins=n_bins, confidence=confidence)
    idx = drawn_by_definition(labels, n_resamples, seed, n_resamples)
    loop = [loop_metrics(probs[row], labels[row], n_bins) for row in idx]
    full = loop_metrics(probs, labels, n_bins)
    for name in FAST:
        values = np.array([v[name] for v in loop])
        np.testing.assert_allclose(many[name].samples, values, rtol=0, atol=1e-12, err_msg=name)
        low, high = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
        assert many[name].low == pytest.approx(low, abs=1e-12), name
        assert many[name].high == pytest.approx(high, abs=1e-12), name
        assert many[name].estimate == pytest.approx(full[name], abs=1e-12), name


# ---------------------------------------------------------------------------------------------
# chunks and threads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "n_resamples"), [(211, 90), (9_000, 300)])
def test_results_do_not_depend_on_chunk_or_workers(n, n_resamples):
    probs, labels = random_predictions(n, 4, 15)
    names = [*FAST, "ace", "auroc"] if n < 1000 else FAST
    base = M.bootstrap_many(names, probs, labels, n_resamples=n_resamples, seed=3, chunk=1,
                            workers=1)
    for chunk in (2, 7, 64, None, 10**9):
        for workers in (1, 2, 3):
            other = M.bootstrap_many(names, probs, labels, n_resamples=n_resamples, seed=3,
                                     chunk=chunk, workers=workers)
            for name in names:
                assert np.array_equal(other[name].samples, base[name].samples), (name, chunk, workers)


def test_one_class_and_singleton_classes():
    probs, labels = random_predictions(30, 3, 16)
    labels = np.zeros(30, dtype=np.int64)
    labels[0] = 2  # a class of one sample: always drawn itself
    many = M.bootstrap_many(FAST, probs, labels, n_resamples=20, seed=1, chunk=3, workers=2)
    idx = M.stratified_bootstrap_indices(labels, 20, seed=1)
    assert np.all(idx[:, -1] == 0)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    assert np.array_equal(many["accuracy"].samples, correct[idx].mean(axis=1))


# ---------------------------------------------------------------------------------------------
# evaluate's shared work (the single pass beside the bootstrap)
# ---------------------------------------------------------------------------------------------


def test_evaluate_equals_each_metric_exactly():
    """evaluate computes accuracy from the shared correctness and the non-empty bins by one
    bincount: the same numbers as the metric functions, bit for bit (ties in argmax included)."""
    probs, labels = random_predictions(1001, 4, 18)
    probs[::7] = 0.25  # rows with a four-way tie
    out = M.evaluate(probs, labels, n_bins=10)
    assert out["accuracy"] == M.accuracy(probs, labels)
    for name in ("ece", "mce", "brier", "nll", "ace", "auroc", "aurc", "macro_f1"):
        expected = M.METRICS[name](probs, labels, 10) if name in ("ece", "mce", "ace") \
            else M.METRICS[name](probs, labels)
        assert out[name] == expected, name
    assert out["n_nonempty_bins"] == M.reliability_bins(probs, labels, 10).n_nonempty
