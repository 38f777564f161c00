"""Prompt-tuning text forward + backward: truncated context vs the full context length.

The research code runs the text encoder over all 77 (CLIP) or 256 (BiomedCLIP's BERT) positions
for every class prompt on every step. calibprompt cuts the sequence after the longest real
prompt (exact: causal or masked attention). Measured here for C class prompts
``"X X ... X {class}."`` with 16 learnable context vectors: the time of forward + backward to the
context, truncated vs full, and the largest difference between the two sets of features.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from functools import partial
from pathlib import Path

import torch

from benchmarks.common import median_time, write_result
from calibprompt.backbones import load_backbone
from calibprompt.backbones.testing import random_biomedclip_backbone

CLASS_NAMES = [
    "adipose tissue", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
    "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium",
]
N_CTX = 16


def class_names(c: int) -> list[str]:
    return [CLASS_NAMES[i % len(CLASS_NAMES)] + ("" if i < len(CLASS_NAMES) else f" {i}") for i in range(c)]


def step(backbone, batch, base, ctx, mode: str) -> torch.Tensor:
    """One prompt-learner forward + backward: context replaces positions 1..16.
    ``mode``: "full" (research code), "truncated", or "shared_prefix" (truncated + the start token
    and context encoded once for all classes; causal encoders only)."""
    if mode == "shared_prefix":
        prefix = torch.cat([base[:1, :1], ctx[None]], dim=1)
        feats = backbone.encode_shared_prefix(prefix, base[:, 1 + N_CTX:], batch)
    else:
        embeds = torch.cat([base[:, :1], ctx.expand(base.shape[0], -1, -1), base[:, 1 + N_CTX:]], dim=1)
        feats = backbone.encode_token_embeddings(embeds, batch, truncate=mode == "truncated")
    feats.sum().backward()
    ctx.grad = None
    return feats.detach()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 9, 100])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", choices=["all", "clip", "bert"], default="all",
                        help="which text towers to measure (a subset writes text_encoder_<family>.json)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    models = {}
    if args.families in ("all", "clip"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models["clip:ViT-B-32 (causal, 77)"] = load_backbone("clip:ViT-B-32", weights="random")
    tmp = tempfile.TemporaryDirectory()
    if args.families in ("all", "bert"):
        models["BiomedCLIP architecture (BERT-base, 256)"] = random_biomedclip_backbone(Path(tmp.name))

    results, ratios = {}, {}
    for label, backbone in models.items():
        width = backbone.embed_tokens(torch.zeros(1, 1, dtype=torch.long)).shape[-1]
        for c in args.classes:
            prompts = [" ".join(["X"] * N_CTX) + f" {name}." for name in class_names(c)]
            batch = backbone.tokenize(prompts)
            base = backbone.embed_tokens(batch.ids).detach()
            ctx = (torch.randn(N_CTX, width) * 0.02).requires_grad_(True)
            full = median_time(partial(step, backbone, batch, base, ctx, "full"), args.repeats)
            short = median_time(partial(step, backbone, batch, base, ctx, "truncated"), args.repeats)
            reference = step(backbone, batch, base, ctx, "full")
            diff = (step(backbone, batch, base, ctx, "truncated") - reference).abs().max()
            key = f"{label} | C={c}"
            results[key] = {"full_s": full["median_s"], "truncated_s": short["median_s"],
                            "context_length": batch.ids.shape[1], "truncated_length": batch.real_length,
                            "max_feature_abs_diff": float(diff)}
            ratios[key] = full["median_s"] / short["median_s"]
            line = (f"{key:55s} full {full['median_s'] * 1e3:8.1f} ms  truncated {short['median_s'] * 1e3:8.1f} ms"
                    f"  ({batch.ids.shape[1]} -> {batch.real_length} tokens)  x{ratios[key]:.2f}  diff {float(diff):.1e}")
            if backbone.causal:
                shared = median_time(partial(step, backbone, batch, base, ctx, "shared_prefix"), args.repeats)
                shared_diff = (step(backbone, batch, base, ctx, "shared_prefix") - reference).abs().max()
                results[key].update(shared_prefix_s=shared["median_s"],
                                    shared_prefix_max_feature_abs_diff=float(shared_diff))
                ratios[f"{key} | shared prefix vs full"] = full["median_s"] / shared["median_s"]
                ratios[f"{key} | shared prefix vs truncated"] = short["median_s"] / shared["median_s"]
                line += f"  shared prefix {shared['median_s'] * 1e3:8.1f} ms (x{full['median_s'] / shared['median_s']:.2f})"
            print(line)
    tmp.cleanup()
    name = "text_encoder" if args.families == "all" else f"text_encoder_{args.families}"
    path = write_result(name, {"n_ctx": N_CTX, "classes": args.classes, "repeats": args.repeats,
                               "families": args.families, "dtype": "float32", "device": "cpu"}, results, ratios)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
