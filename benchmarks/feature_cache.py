"""Feature cache: evaluating many runs from cached features vs re-encoding per run.

Reference design (the research code): every run (loss x hyperparameter x seed) decodes and
encodes the whole test set through the frozen image encoder before computing its logits.
calibprompt encodes each image once into the content-addressed FeatureStore; every later run
reads the features (hash lookup by file stat, shard gather) and only computes logits + metrics.

Also measured: extraction throughput (DataLoader decode + transform + encode + shard writes)
against the encoder's raw forward throughput on pre-loaded tensors -- how close data loading lets
extraction get to the compute limit.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common import median_time, write_result
from calibprompt.backbones import load_backbone
from calibprompt.data import FeatureStore, load_dataset
from calibprompt.data.images import open_image
from calibprompt.data.synthetic import make_dataset_tree
from calibprompt.metrics import evaluate


def run_metrics(backbone, image_features: torch.Tensor, text_features: torch.Tensor, labels) -> dict:
    logits = backbone.logit_scale * image_features @ text_features.T
    return evaluate(torch.softmax(logits, -1).double(), labels)


def reference_run(backbone, dataset, text_features, batch_size: int, workers: int) -> dict:
    """One run of the research design: decode, transform and encode the whole test set."""
    transform = backbone.image_transform()

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            return transform(open_image(dataset.path(i)))

    loader = torch.utils.data.DataLoader(Images(), batch_size=batch_size, num_workers=workers)
    feats = torch.cat([backbone.encode_images(x) for x in loader])
    return run_metrics(backbone, feats, text_features, dataset.labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1008, help="test images (9 classes)")
    parser.add_argument("--runs", type=int, default=20, help="runs evaluated (e.g. 12 losses x seeds)")
    parser.add_argument("--reference-runs", type=int, default=2,
                        help="reference runs actually executed (the rest is projected per run)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone("clip:ViT-B-32", weights="random")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        per_class = args.images // 9
        start = time.perf_counter()
        make_dataset_tree(tmp / "data", "kather", per_class=[per_class] * 9, splits=["test"], size=224,
                          suffix=".jpg")
        generation_s = time.perf_counter() - start
        dataset = load_dataset("kather", tmp / "data", "test")
        text = backbone.encode_texts(dataset.prompts())

        # raw encoder throughput on pre-loaded tensors
        pixels = torch.randn(args.batch_size, 3, 224, 224)
        raw = median_time(lambda: backbone.encode_images(pixels), repeats=3)
        raw_ips = args.batch_size / raw["median_s"]

        # extraction into an empty cache (one pass, as a user would run it)
        store = FeatureStore(tmp / "cache")
        start = time.perf_counter()
        extracted = store.features(backbone, dataset.paths, batch_size=args.batch_size,
                                   num_workers=args.workers, progress=False)
        extraction_s = time.perf_counter() - start
        assert extracted.encoded == len(dataset)

        # cached runs: a fresh store object per run (as a new process would), features read back
        def cached_run():
            feats = FeatureStore(tmp / "cache").features(backbone, dataset.paths, progress=False)
            assert feats.encoded == 0
            return run_metrics(backbone, feats.features, text, dataset.labels)

        cached = median_time(cached_run, repeats=5)
        reference = median_time(lambda: reference_run(backbone, dataset, text, args.batch_size, args.workers),
                                repeats=args.reference_runs, warmup=0)
        a = cached_run()
        b = reference_run(backbone, dataset, text, args.batch_size, 0)
        agreement = max(abs(a[k] - b[k]) for k in ("ece", "accuracy", "nll"))

    n = len(dataset)
    reference_total = args.runs * reference["median_s"]
    cached_total = extraction_s + args.runs * cached["median_s"]
    results = {
        "images": n, "image_generation_s": generation_s,
        "raw_forward": {**raw, "images_per_s": raw_ips},
        "extraction": {"seconds": extraction_s, "images_per_s": n / extraction_s},
        "cached_run": cached, "reference_run": reference,
        f"{args.runs}_runs_reference_s (projected from {args.reference_runs} measured)": reference_total,
        f"{args.runs}_runs_cached_s (extraction + runs)": cached_total,
        "max_metric_difference_cached_vs_reference": agreement,
    }
    ratios = {
        f"{args.runs}_runs_reference_vs_cache": reference_total / cached_total,
        "per_run_reference_vs_cached": reference["median_s"] / cached["median_s"],
        "extraction_vs_raw_forward_throughput": (n / extraction_s) / raw_ips,
    }
    config = {"backbone": "clip:ViT-B-32 (random weights)", "images": n, "image_size": 224,
              "format": "jpg", "runs": args.runs, "reference_runs_measured": args.reference_runs,
              "batch_size": args.batch_size, "workers": args.workers}
    path = write_result("feature_cache", config, results, ratios)
    print(f"raw forward {raw_ips:.1f} img/s; extraction {n / extraction_s:.1f} img/s "
          f"({100 * ratios['extraction_vs_raw_forward_throughput']:.0f}% of raw)")
    print(f"per run: reference {reference['median_s']:.1f} s, cached {cached['median_s'] * 1e3:.0f} ms")
    print(f"{args.runs} runs: reference {reference_total:.0f} s vs cache {cached_total:.1f} s "
          f"-> x{ratios[f'{args.runs}_runs_reference_vs_cache']:.1f}; metric agreement {agreement:.1e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
