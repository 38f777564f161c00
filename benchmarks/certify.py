"""Certification throughput: calibprompt's CERTIFY vs the published PromptSmooth loop design.

Both certify the same image with the same noise draws through a ViT-B/32 CLIP (PLIP / QuiltNet
architecture, random weights, real size) with 9 class prompts of 16 context vectors + class name:

- reference (the published design): one image at a time, the class text features recomputed for
  every batch of noisy copies, over the full 77-token context;
- calibprompt (:func:`calibprompt.methods.smoothing.certify_image`): the text features computed
  once per prompt, noisy copies in batches of ``batch_size``.

Reported: image-encoder forwards per second of each, their ratio, and the projected cost of the
paper's protocol (500 images × 4 σ × 10,100 forwards) from the measured rate (a projection, not
a measurement). No GPU here: GPU figures are "not measured".
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from benchmarks.common import write_result
from calibprompt.methods.smoothing import certify_image, noise, prompted_classifier

NAMES = ["adipose tissue", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
         "cancer-associated stroma", "colorectal adenocarcinoma epithelium"]
PROTOCOL_FORWARDS = 500 * 4 * 10_100


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300, help="estimation draws per measurement")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args(argv)
    from calibprompt.backbones import load_backbone
    from calibprompt.prompts import PromptLearner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone("clip:ViT-B-32", weights="random")
    learner = PromptLearner(backbone, NAMES, n_ctx=16, seed=0)
    torch.manual_seed(0)
    pixels = torch.rand(3, 224, 224)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    def reference() -> None:
        """One image; text features recomputed (full 77-token context) for every batch."""
        draws = list(range(args.n0 + args.n))
        with torch.no_grad():
            for start in range(0, len(draws), args.batch_size):
                chunk = draws[start:start + args.batch_size]
                text = backbone.encode_token_embeddings(learner.prompt_embeddings(), learner.batch, truncate=False)
                noisy = pixels[None] + noise(pixels.shape, 0, "img", 0.25, chunk)
                image = backbone.encode_images(normalize(noisy))
                (backbone.logit_scale * image @ text.T).argmax(1)

    def ours() -> None:
        with torch.no_grad():
            classify = prompted_classifier(backbone, learner())
            certify_image(classify, pixels, normalize, len(NAMES), key="img", sigma=0.25, n0=args.n0, n=args.n,
                          alpha=0.001, seed=0, batch_size=args.batch_size)

    forwards = args.n0 + args.n
    results = {}
    for name, fn in (("reference", reference), ("calibprompt", ours)):
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        results[name] = {"seconds": seconds, "forwards": forwards, "forwards_per_s": forwards / seconds}
        print(name, {k: round(v, 3) for k, v in results[name].items()}, flush=True)
    ratio = results["calibprompt"]["forwards_per_s"] / results["reference"]["forwards_per_s"]
    projected_h = PROTOCOL_FORWARDS / results["calibprompt"]["forwards_per_s"] / 3600
    results["projection"] = {"paper_protocol_forwards": PROTOCOL_FORWARDS,
                             "cpu_hours_calibprompt (projected)": projected_h,
                             "cpu_hours_reference (projected)": PROTOCOL_FORWARDS / results["reference"][
                                 "forwards_per_s"] / 3600,
                             "gpu": "not measured (no GPU was available)"}
    write_result("certify", {"backbone": "ViT-B/32 CLIP, random weights", "classes": len(NAMES), "n_ctx": 16,
                             "n0": args.n0, "n": args.n, "batch_size": args.batch_size, "image_size": 224},
                 results, {"calibprompt / reference forwards per second": ratio})
    print(f"ratio {ratio:.2f}x; paper protocol projected {projected_h:.0f} CPU hours")


if __name__ == "__main__":
    main()
