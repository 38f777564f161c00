"""Executors: the same sweep and the same certification serially and on a local Ray with two
workers, side by side in one run, results compared for equality.

Setup: the sweep runs the embedded demo model (small: the measurement shows the executor's own
cost) on a generated demo dataset, 12 presets x 2 seeds (8 shots, 5 epochs, 5 views) +
zero-shot, cold feature cache each time. The certification runs ``clip:ViT-B-32`` at real size
(random weights) on 8 generated 224-px images, n0 = 32, n = 128 (160 image-encoder forwards per
image): there the work per unit is real. Ray's start-up (a local Ray started by the command) is
part of the Ray times and also measured apart. On this machine (2 cores) the two workers (one
thread each) share the cores that torch uses in the serial run (two threads).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import write_result
from calibprompt.data.synthetic import make_dataset_tree
from calibprompt.demo.tissue import write_demo_dataset
from calibprompt.objective import PRESETS


def _metrics(root: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(root)): json.loads(p.read_text())["uncalibrated"] for p in root.rglob("metrics.json")}


def _compare_certifications(a: str, b: str) -> dict:
    """Whether two certification.csv agree in every count, bound and radius, and how far apart
    their mean-softmax columns are (float32 rounding differs with the threads per process)."""
    rows_a, rows_b = (list(csv.DictReader(io.StringIO(t))) for t in (a, b))
    exact = ("image", "label", "sigma", "prediction", "n_a", "n", "p_lower", "radius")
    same = len(rows_a) == len(rows_b) and all(x[k] == y[k] for x, y in zip(rows_a, rows_b, strict=False) for k in exact)
    probs = [abs(float(x[k]) - float(y[k])) for x, y in zip(rows_a, rows_b, strict=False) for k in x
             if k.startswith("p_") and k != "p_lower"]
    return {"identical_predictions_counts_bounds_radii": same, "max_mean_softmax_difference": max(probs)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    import ray

    from calibprompt.runs import CertifyRunConfig, execute_run, run_sweep

    tmp = Path(tempfile.mkdtemp())
    data = tmp / "data"
    write_demo_dataset(data, per_class={"train": 24, "test": 50})
    spec = {"backbones": ["demo"], "datasets": [{"name": "demo", "root": str(data)}],
            "methods": ["zeroshot", *PRESETS], "seeds": [1, 2], "shots": 8, "epochs": 5, "views": 5,
            "workers": 0, "progress": False}
    results, times = {}, {}
    for name in ("serial", "ray"):
        (tmp / "sweep.yaml").write_text(yaml.safe_dump({**spec, "cache": str(tmp / f"cache-{name}")}))
        start = time.perf_counter()
        run_sweep(tmp / "sweep.yaml", out=tmp / name, executor=name,
                  ray_workers=args.workers if name == "ray" else None)
        times[f"sweep_{name}_s"] = time.perf_counter() - start
    a, b = _metrics(tmp / "serial"), _metrics(tmp / "ray")
    assert a.keys() == b.keys()
    diffs = [abs(a[k][m] - b[k][m]) for k in a for m in ("accuracy", "ece", "nll", "brier")]
    results["sweep"] = {"runs": len(a), **times, "max_metric_difference": max(diffs)}

    start = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, configure_logging=False)
    ray_start = time.perf_counter() - start
    ray.shutdown()
    results["ray_start_s"] = ray_start

    make_dataset_tree(tmp / "kather", "kather", per_class=[2] * 9, splits=["test"], size=224, suffix=".jpg")
    certify = {}
    for name in ("serial", "ray"):
        config = CertifyRunConfig("clip:ViT-B-32", "kather", str(tmp / "kather"), weights="random", subset=8, n0=32,
                                  n=128, batch_size=32, workers=0, progress=False, cache=str(tmp / "cache-serial"),
                                  executor=name, ray_workers=args.workers if name == "ray" else None)
        start = time.perf_counter()
        result = execute_run(config, tmp / f"certify-{name}")
        elapsed = time.perf_counter() - start
        certify[name] = {"s": elapsed, "images_per_s": 8 / elapsed,
                         "csv": (result.directory / "certification.csv").read_text()}
    results["certify"] = {
        "backbone": "clip:ViT-B-32 (random weights)", "images": 8, "n0": 32, "n": 128,
        "serial_s": certify["serial"]["s"], "ray_s": certify["ray"]["s"],
        "serial_images_per_s": certify["serial"]["images_per_s"],
        "ray_images_per_s": certify["ray"]["images_per_s"],
        "ray_images_per_s_per_worker": certify["ray"]["images_per_s"] / args.workers,
        "ray_images_per_s_without_start": 8 / max(certify["ray"]["s"] - ray_start, 1e-9),
        **_compare_certifications(certify["serial"]["csv"], certify["ray"]["csv"]),
    }
    shutil.rmtree(tmp, ignore_errors=True)
    ratios = {"sweep: ray / serial time": times["sweep_ray_s"] / times["sweep_serial_s"],
              "certify: ray / serial time": certify["ray"]["s"] / certify["serial"]["s"]}
    print(json.dumps(results, indent=1), json.dumps(ratios, indent=1))
    write_result("executors", {"backbone": "demo (embedded)", "workers": args.workers, "sweep_runs": len(a),
                               "sweep": {k: v for k, v in spec.items() if k != "datasets"}},
                 results, {k: float(np.round(v, 4)) for k, v in ratios.items()})


if __name__ == "__main__":
    main()
