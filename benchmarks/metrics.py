"""Metric pass and bootstrap on N = 100,000 x 9 classes, against reference designs.

References measured in the same run:
- ``evaluate`` components vs a loop-over-bins / loop-over-classes implementation of the same
  textbook formulas (the structure of the research code), and ECE/MCE vs torchmetrics;
- ``bootstrap`` (vectorised, fast paths) vs the plain loop: index the arrays and call the public
  metric once per resample.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from benchmarks.common import median_time, write_result
from calibprompt import metrics as M


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


def plain_bootstrap(name: str, probs: np.ndarray, labels: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    idx = M.stratified_bootstrap_indices(labels, n_resamples, seed)
    fn = M.METRICS[name]
    return np.array([fn(probs[i], labels[i]) for i in idx])


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
    b = args.n_bins
    r = args.repeats

    results = {
        "evaluate": median_time(lambda: M.evaluate(probs, labels, b), r),
        "ece": median_time(lambda: M.ece(probs, labels, b), r),
        "ece_loop_reference": median_time(lambda: loop_ece(probs, labels, b), r),
        "ece_torchmetrics": median_time(lambda: multiclass_calibration_error(
            p_t, y_t, num_classes=args.classes, n_bins=b, norm="l1"), r),
        "ace": median_time(lambda: M.ace(probs, labels, b), r),
        "ace_loop_reference": median_time(lambda: loop_classwise_ace(probs, labels, b), r),
    }
    boot_repeats = max(1, r // 2)
    for name in ("ece", "accuracy", "nll"):
        results[f"bootstrap_{name}"] = median_time(
            lambda name=name: M.bootstrap(name, probs, labels, n_resamples=args.resamples), boot_repeats)
        results[f"bootstrap_{name}_plain_loop"] = median_time(
            lambda name=name: plain_bootstrap(name, probs, labels, args.resamples, 0), boot_repeats,
            warmup=0)
    # agreement: the fast and plain bootstraps draw the same indices
    fast = M.bootstrap("ece", probs, labels, n_resamples=20, seed=0).samples
    plain = plain_bootstrap("ece", probs, labels, 20, 0)
    agreement = {
        "bootstrap_ece_max_abs_diff": float(np.abs(fast - plain).max()),
        "ece_vs_loop_abs_diff": abs(M.ece(probs, labels, b) - loop_ece(probs, labels, b)),
        "ace_vs_loop_abs_diff": abs(M.ace(probs, labels, b) - loop_classwise_ace(probs, labels, b)),
    }

    def ratio(ref: str, ours: str) -> float:
        return results[ref]["median_s"] / results[ours]["median_s"]

    ratios = {
        "ece_vs_loop_reference": ratio("ece_loop_reference", "ece"),
        "ece_vs_torchmetrics": ratio("ece_torchmetrics", "ece"),
        "ace_vs_loop_reference": ratio("ace_loop_reference", "ace"),
        **{f"bootstrap_{n}_vs_plain_loop": ratio(f"bootstrap_{n}_plain_loop", f"bootstrap_{n}")
           for n in ("ece", "accuracy", "nll")},
    }
    config = {"n_samples": args.n, "n_classes": args.classes, "n_bins": b,
              "n_resamples": args.resamples, "repeats": r, "bootstrap_repeats": boot_repeats}
    path = write_result("metrics", config, {**results, "agreement": agreement}, ratios)
    for key, value in results.items():
        print(f"{key:34s} {value['median_s'] * 1000:10.1f} ms")
    for key, value in ratios.items():
        print(f"{key:34s} {value:10.1f}x")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
