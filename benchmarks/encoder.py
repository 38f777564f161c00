"""The encoding floor: can the frozen image encoder run cheaper on this CPU at equal outputs?

Setup: the ViT-B/32 CLIP image tower at real size (random weights), batches of 32 preprocessed
224-px images, inference (no gradient). Variants, each against eager fp32 in the same run:
channels-last memory format, ``torch.compile`` (inductor; the compile time is reported apart),
bf16 autocast. For each: median time per batch and the largest difference of the L2-normalised
features from eager fp32 (the tolerance a variant would have to document).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from benchmarks.common import median_time, write_result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    args = parser.parse_args(argv)
    from calibprompt.backbones import load_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone("clip:ViT-B-32", weights="random")
    model = backbone.model.eval()
    pixels = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def features(fn, x):
        with torch.no_grad():
            return torch.nn.functional.normalize(fn(x).float(), dim=-1)

    reference = features(model.encode_image, pixels)
    results: dict[str, dict] = {}

    def measure(name, fn, x=pixels, context=None):
        def run():
            if context is None:
                return features(fn, x)
            with context():
                return features(fn, x)
        out = run()
        timing = median_time(run, repeats=args.repeats)
        results[name] = {"median_s_per_batch": timing["median_s"], "images_per_s": args.batch / timing["median_s"],
                         "max_abs_feature_diff_vs_eager_fp32": float((out - reference).abs().max())}
        print(f"{name}: {timing['median_s']:.3f} s/batch, diff {results[name]['max_abs_feature_diff_vs_eager_fp32']:.2e}",
              flush=True)

    measure("eager fp32", model.encode_image)
    measure("channels-last fp32", model.encode_image, pixels.contiguous(memory_format=torch.channels_last))
    measure("bf16 autocast", model.encode_image,
            context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    if not args.no_compile:
        compiled = torch.compile(model.encode_image)
        start = time.perf_counter()
        try:
            features(compiled, pixels)
            compile_s = time.perf_counter() - start
            measure("torch.compile (inductor) fp32", compiled)
            results["torch.compile (inductor) fp32"]["compile_s"] = compile_s
        except Exception as exc:  # no C++ toolchain, unsupported op: recorded, not hidden
            results["torch.compile (inductor) fp32"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print("torch.compile failed:", exc)
    eager = results["eager fp32"]["median_s_per_batch"]
    ratios = {f"{name} speed-up vs eager fp32": eager / r["median_s_per_batch"]
              for name, r in results.items() if "median_s_per_batch" in r and name != "eager fp32"}
    write_result("encoder", {"backbone": "clip:ViT-B-32 image tower, random weights", "batch": args.batch,
                             "repeats": args.repeats, "threads": torch.get_num_threads(),
                             "device": "cpu (no GPU lent to this session: GPU not measured)"}, results, ratios)


if __name__ == "__main__":
    main()
