"""Metric pass and bootstrap on N = 100,000 x 9 classes, against reference designs.

References measured in the same run:
- ``evaluate`` against the previous design (validate once, then every registry kernel in turn),
  and its components against a loop-over-bins / loop-over-classes implementation of the same
  textbook formulas (the structure of the research code), and ECE/MCE vs torchmetrics;
- the intervals of ECE, MCE, Brier and NLL from one shared draw (``bootstrap_many``) against:
  drawing the resamples once (the floor of an exact resampling bootstrap: the generator calls
  alone, and with the resamples mapped to sample indices), ``bootstrap`` called per metric (one
  draw each), the previous design of ``bootstrap`` (one draw per metric, every block of index
  rows materialised, re-enacted here), the direct per-resample loop (index the arrays, call the
  public metrics) and torchmetrics called per resample on the same resamples.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.classification import multiclass_calibration_error

from benchmarks.common import median_time, write_result
from calibprompt import metrics as M
from calibprompt.metrics.registry import _KERNELS, _run_kernel
from calibprompt.metrics.smooth import _smooth_ece

#: The intervals measured together: bootstrap_many(BOOT_METRICS, ...) vs the references.
BOOT_METRICS = ["ece", "mce", "brier", "nll"]
#: Indices per drawn block (part of the definition of the resamples of a seed).
BLOCK = 2_000_000


def make_data(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 2.0
    y = rng.integers(0, k, n)
    z[np.arange(n), y] += rng.normal(1.5, 1.0, n)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True), y


def loop_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Research-code structure: one boolean mask per bin."""
    conf, pred = probs.max(1), probs.argmax(1)
    correct = pred == labels
    out = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        mask = (conf >= lo) & ((conf < hi) if b < n_bins - 1 else (conf <= hi))
        if mask.any():
            out += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return out


def loop_classwise_ace(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Loop over classes, sort each column, loop over equal-mass ranges."""
    n, k = probs.shape
    total = 0.0
    for c in range(k):
        order = np.argsort(probs[:, c], kind="stable")
        col, hit = probs[order, c], labels[order] == c
        for r in range(n_bins):
            s, e = -(-r * n // n_bins), -(-(r + 1) * n // n_bins)
            total += abs(hit[s:e].mean() - col[s:e].mean())
    return total / (k * n_bins)


def evaluate_previous_design(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, Any]:
    """``evaluate`` as it was: validate once, then every registry kernel in turn."""
    p, y = M.check_probs_labels(probs, labels)
    conf, correct = M.top_label(p, y)
    out: dict[str, Any] = {}
    for name, kernel in _KERNELS.items():
        if name == "smooth_ece":
            out[name], out["smooth_ece_bandwidth"] = _smooth_ece(conf, correct, 2000)
        else:
            out[name] = _run_kernel(kernel, p, y, conf, correct, n_bins)
    out["n_nonempty_bins"] = int(np.unique(M.bin_index(conf, n_bins)).size)
    return out


# ---------------------------------------------------------------------------------------------
# The resamples of a seed, and the references that use them
# ---------------------------------------------------------------------------------------------


def _strata(labels: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(labels == c) for c in np.unique(labels)]


def draw_once(labels: np.ndarray, n_resamples: int, seed: int) -> None:
    """The generator calls of the whole draw and nothing else -- what every exact stratified
    bootstrap of this seed must do: per block, one ``integers`` per class (see
    ``calibprompt.metrics.resampling``)."""
    rng = np.random.default_rng(seed)
    strata = _strata(labels)
    block = max(1, min(n_resamples, BLOCK // labels.shape[0]))
    draws = None
    for start in range(0, n_resamples, block):
        rows = min(block, n_resamples - start)
        draws = [rng.integers(0, s.shape[0], size=(rows, s.shape[0])) for s in strata]
    del draws


def index_blocks(labels: np.ndarray, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The resamples as blocks of index rows (sample indices), one reused buffer: the rows of
    ``stratified_bootstrap_indices(labels, n_resamples, seed)``, block by block."""
    rng = np.random.default_rng(seed)
    strata = _strata(labels)
    n = labels.shape[0]
    block = max(1, min(n_resamples, BLOCK // n))
    buffer = np.empty((block, n), dtype=np.int64)
    for start in range(0, n_resamples, block):
        rows = min(block, n_resamples - start)
        col = 0
        for s in strata:
            buffer[:rows, col:col + s.shape[0]] = s[rng.integers(0, s.shape[0], size=(rows, s.shape[0]))]
            col += s.shape[0]
        yield buffer[:rows]


def index_sets_once(labels: np.ndarray, n_resamples: int, seed: int) -> None:
    for _ in index_blocks(labels, n_resamples, seed):
        pass


def previous_design(name: str, probs: np.ndarray, labels: np.ndarray, n_resamples: int, seed: int,
                    n_bins: int) -> np.ndarray:
    """``bootstrap(name)`` as it was (ECE, MCE, Brier, NLL): its own draw, each block of index
    rows materialised (``s[integers(...)]`` per class, concatenated), then the per-sample terms
    or (bin, residual) gathered through it."""
    p, y = M.check_probs_labels(probs, labels)
    conf, correct = M.top_label(p, y)
    rows_ = np.arange(p.shape[0])
    bin_of, residual = M.bin_index(conf, n_bins), correct - conf
    terms = {"brier": lambda: np.sum(p * p, axis=1) - 2.0 * p[rows_, y] + 1.0,
             "nll": lambda: -np.log(np.maximum(p[rows_, y], M.LOG_EPS))}
    per_sample = terms[name]() if name in terms else None
    rng = np.random.default_rng(seed)
    strata = _strata(y)
    n = y.shape[0]
    block = max(1, min(n_resamples, BLOCK // n))
    values = np.empty(n_resamples)
    for start in range(0, n_resamples, block):
        m = min(block, n_resamples - start)
        idx = np.concatenate([s[rng.integers(0, s.shape[0], size=(m, s.shape[0]))] for s in strata],
                             axis=1)
        if per_sample is not None:
            values[start:start + m] = per_sample[idx].mean(axis=1)
            continue
        keys = (bin_of[idx] + n_bins * np.arange(m)[:, None]).ravel()
        sums = np.bincount(keys, weights=residual[idx].ravel(), minlength=m * n_bins)
        sums = np.abs(sums.reshape(m, n_bins))
        if name == "ece":
            values[start:start + m] = sums.sum(axis=1) / n
        else:
            counts = np.bincount(keys, minlength=m * n_bins).reshape(m, n_bins)
            values[start:start + m] = (sums / np.maximum(counts, 1)).max(axis=1)
    return values


def per_resample_loop(probs: np.ndarray, labels: np.ndarray, n_resamples: int, seed: int,
                      n_bins: int) -> dict[str, np.ndarray]:
    """The direct loop: index the arrays once per resample, call each public metric."""
    out: dict[str, list[float]] = {name: [] for name in BOOT_METRICS}
    for block in index_blocks(labels, n_resamples, seed):
        for row in block:
            p, y = probs[row], labels[row]
            out["ece"].append(M.ece(p, y, n_bins))
            out["mce"].append(M.mce(p, y, n_bins))
            out["brier"].append(M.brier(p, y))
            out["nll"].append(M.nll(p, y))
    return {name: np.array(v) for name, v in out.items()}


def torchmetrics_per_resample(probs: np.ndarray, labels: np.ndarray, n_resamples: int, seed: int,
                              n_bins: int) -> dict[str, np.ndarray]:
    """torchmetrics on each resample (the same index sets, float64 tensors): ECE and MCE with
    ``multiclass_calibration_error`` (l1 / max norm); torchmetrics has no Brier score or NLL,
    so Brier = K x its ``mean_squared_error`` against one-hot labels and NLL is
    ``torch.nn.functional.nll_loss`` of the clamped log-probabilities."""
    p_all, y_all = torch.from_numpy(probs), torch.from_numpy(labels)
    k = probs.shape[1]
    out: dict[str, list[float]] = {name: [] for name in BOOT_METRICS}
    with torch.inference_mode():
        for block in index_blocks(labels, n_resamples, seed):
            for row in torch.from_numpy(block):
                p, y = p_all[row], y_all[row]
                out["ece"].append(float(multiclass_calibration_error(
                    p, y, num_classes=k, n_bins=n_bins, norm="l1")))
                out["mce"].append(float(multiclass_calibration_error(
                    p, y, num_classes=k, n_bins=n_bins, norm="max")))
                onehot = torch.nn.functional.one_hot(y, k).to(p.dtype)
                out["brier"].append(k * float(mean_squared_error(p, onehot)))
                out["nll"].append(float(torch.nn.functional.nll_loss(
                    torch.log(p.clamp_min(M.LOG_EPS)), y)))
    return {name: np.array(v) for name, v in out.items()}


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """Median wall time of each function, the functions run in turn ``repeats`` times (after one
    warm-up round), so that a slow phase of a shared machine hits them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                   "repeats": repeats} for name, t in times.items()}


def once(fn: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    start = time.perf_counter()
    value = fn()
    elapsed = time.perf_counter() - start
    return {"median_s": elapsed, "min_s": elapsed, "max_s": elapsed, "repeats": 1}, value


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=9)
    parser.add_argument("--n-bins", type=int, default=15)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    probs, labels = make_data(args.n, args.classes)
    p_t, y_t = torch.from_numpy(probs), torch.from_numpy(labels)
    b, r, n_res = args.n_bins, args.repeats, args.resamples

    results: dict[str, Any] = interleaved_times({
        "evaluate": lambda: M.evaluate(probs, labels, b),
        "evaluate_previous_design": lambda: evaluate_previous_design(probs, labels, b),
    }, r)
    results.update({
        "ece": median_time(lambda: M.ece(probs, labels, b), r),
        "ece_loop_reference": median_time(lambda: loop_ece(probs, labels, b), r),
        "ece_torchmetrics": median_time(lambda: multiclass_calibration_error(
            p_t, y_t, num_classes=args.classes, n_bins=b, norm="l1"), r),
        "ace": median_time(lambda: M.ace(probs, labels, b), r),
        "ace_loop_reference": median_time(lambda: loop_classwise_ace(probs, labels, b), r),
    })

    # Intervals of ECE, MCE, Brier, NLL; the floor and the shared draw measured in turn.
    shared: dict[str, Any] = {}

    def run_shared(workers: int | None = None) -> None:
        shared["result"] = M.bootstrap_many(BOOT_METRICS, probs, labels, n_resamples=n_res,
                                            n_bins=b, workers=workers)

    results.update(interleaved_times({
        "bootstrap_draw_once": lambda: draw_once(labels, n_res, 0),
        "bootstrap_index_sets_once": lambda: index_sets_once(labels, n_res, 0),
        "bootstrap_many": run_shared,
        "bootstrap_many_1_thread": lambda: run_shared(workers=1),
    }, r))
    boot_repeats = max(1, r // 2)
    each: dict[str, Any] = {}
    previous: dict[str, Any] = {}
    results.update(interleaved_times({
        "bootstrap_each_metric": lambda: each.update(
            {name: M.bootstrap(name, probs, labels, n_resamples=n_res, n_bins=b) for name in BOOT_METRICS}),
        "bootstrap_previous_design_each_metric": lambda: previous.update(
            {name: previous_design(name, probs, labels, n_res, 0, b) for name in BOOT_METRICS}),
        "bootstrap_ece": lambda: M.bootstrap("ece", probs, labels, n_resamples=n_res, n_bins=b),
        "bootstrap_ece_previous_design": lambda: previous_design("ece", probs, labels, n_res, 0, b),
    }, boot_repeats))
    results["bootstrap_per_resample_loop"], loop = once(
        lambda: per_resample_loop(probs, labels, n_res, 0, b))
    results["bootstrap_torchmetrics_per_resample"], tm = once(
        lambda: torchmetrics_per_resample(probs, labels, n_res, 0, b))

    many = shared["result"]
    agreement = {
        "ece_vs_loop_abs_diff": abs(M.ece(probs, labels, b) - loop_ece(probs, labels, b)),
        "ace_vs_loop_abs_diff": abs(M.ace(probs, labels, b) - loop_classwise_ace(probs, labels, b)),
        "evaluate_vs_previous_design_max_abs_diff": max(
            abs(M.evaluate(probs, labels, b)[k] - v)
            for k, v in evaluate_previous_design(probs, labels, b).items()),
        **{f"bootstrap_many_{name}_vs_bootstrap_max_abs_diff":
           max_abs_diff(many[name].samples, each[name].samples) for name in BOOT_METRICS},
        **{f"bootstrap_many_{name}_vs_previous_design_max_abs_diff":
           max_abs_diff(many[name].samples, previous[name]) for name in BOOT_METRICS},
        **{f"bootstrap_many_{name}_vs_per_resample_loop_max_abs_diff":
           max_abs_diff(many[name].samples, loop[name]) for name in BOOT_METRICS},
        **{f"bootstrap_many_{name}_vs_torchmetrics_max_abs_diff":
           max_abs_diff(many[name].samples, tm[name]) for name in BOOT_METRICS},
    }

    def ratio(ref: str, ours: str) -> float:
        return results[ref]["median_s"] / results[ours]["median_s"]

    ratios = {
        "evaluate_vs_previous_design": ratio("evaluate_previous_design", "evaluate"),
        "ece_vs_loop_reference": ratio("ece_loop_reference", "ece"),
        "ece_vs_torchmetrics": ratio("ece_torchmetrics", "ece"),
        "ace_vs_loop_reference": ratio("ace_loop_reference", "ace"),
        # the goal (<= 3): the shared intervals in units of the draw (calibprompt / floor)
        "bootstrap_many_over_draw_once": ratio("bootstrap_many", "bootstrap_draw_once"),
        "bootstrap_many_over_index_sets_once": ratio("bootstrap_many", "bootstrap_index_sets_once"),
        "bootstrap_many_1_thread_over_draw_once": ratio("bootstrap_many_1_thread", "bootstrap_draw_once"),
        **{f"bootstrap_many_vs_{ref}": ratio(f"bootstrap_{ref}", "bootstrap_many") for ref in (
            "each_metric", "previous_design_each_metric", "per_resample_loop",
            "torchmetrics_per_resample")},
        "bootstrap_ece_vs_previous_design": ratio("bootstrap_ece_previous_design", "bootstrap_ece"),
    }
    config = {"n_samples": args.n, "n_classes": args.classes, "n_bins": b,
              "n_resamples": n_res, "repeats": r, "bootstrap_repeats": boot_repeats,
              "bootstrap_metrics": BOOT_METRICS, "loop_repeats": 1}
    path = write_result("metrics", config, {**results, "agreement": agreement}, ratios)
    for key, value in results.items():
        print(f"{key:42s} {value['median_s'] * 1000:10.1f} ms")
    for key, value in ratios.items():
        print(f"{key:42s} {value:10.2f}x")
    for key, value in agreement.items():
        print(f"{key:42s} {value:10.2e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
