"""Run every benchmark in turn: ``python -m benchmarks``."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ["metrics", "text_encoder", "feature_cache", "sweep", "tpt", "finetune", "certify", "step",
              "lockstep", "encoder", "executors"]

if __name__ == "__main__":
    names = sys.argv[1:] or BENCHMARKS
    for name in names:
        print(f"== {name}")
        importlib.import_module(f"benchmarks.{name}").main([])
