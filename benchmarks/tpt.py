"""Test-time prompt tuning: calibprompt's batched TPT family vs the research code's per-image loop.

Setup: ``clip:ViT-B-32`` at real size (random weights), generated 224-px JPEGs, 64 views per image
(original + 63 RandomResizedCrop + flip + AugMix), C in {2, 9, 200} classes, one AdamW step.

- Reference (the structure of the TPT / C-TPT / O-TPT code): per image, fresh random views are
  drawn and encoded, the 77-token prompts are encoded with gradient, forward-backward-step, then
  the original image and the prompts are encoded again for the prediction. A method comparison
  repeats all of it per method.
- calibprompt: the 64 views of every image are encoded once into the feature cache
  (``FeatureStore.views(..., kind="test_time")``), then B images are adapted at once on the cached
  features (truncated prompts, the initial forward shared by the batch). A method comparison
  encodes the views once and adapts four times.

Measured (medians): the reference per image and per method on real images; calibprompt's view
encoding per image on real images; calibprompt's adaptation per image on batches of view features
(the adaptation's cost does not depend on the feature values). (a) one method end to end, and
adaptation alone; (b) the four-method comparison. Writes ``benchmarks/results/tpt.json``.

Run: ``python -m benchmarks.tpt`` (about 22 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import median_time, write_result
from calibprompt import losses
from calibprompt.backbones import load_backbone
from calibprompt.data import FeatureStore, load_dataset
from calibprompt.data.images import open_image
from calibprompt.data.synthetic import make_dataset_tree
from calibprompt.data.views import tpt_view_transform
from calibprompt.methods.tpt import REGULARIZERS, TPTConfig, confident_views, tpt_adapt
from calibprompt.prompts import PromptLearner
from calibprompt.runs.tpt import METHOD_DEFAULTS

METHODS = ("tpt", "ctpt", "otpt", "soc")
KATHER = ["adipose tissue", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
          "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"]
_ADJ = ["atypical", "benign", "malignant", "necrotic", "fibrotic", "inflamed", "cystic", "granular",
        "metaplastic", "dysplastic"]
_NOUN = ["gland", "stroma", "epithelium", "mucosa", "lymph node", "adipose tissue", "muscle", "vessel",
         "duct", "nerve", "cartilage", "bone marrow", "papilla", "crypt", "follicle", "alveolus", "tubule",
         "sinusoid", "capsule", "septum"]


def classnames(c: int) -> list[str]:
    if c <= len(KATHER):
        return KATHER[:c]
    names = [f"{a} {n}" for n in _NOUN for a in _ADJ]
    return names[:c]


def method_config(method: str) -> TPTConfig:
    d = METHOD_DEFAULTS[method]
    return TPTConfig(method=method, lam=d.get("lam", 0.0), delta=d.get("delta", 0.5))


def reference_image(backbone, path: Path, names: list[str], config: TPTConfig, views: int) -> dict[str, float]:
    """One image as the research code processes it; returns seconds spent on each part."""
    t0 = time.perf_counter()
    image = open_image(path)
    eval_transform = backbone.image_transform()
    augment = tpt_view_transform(eval_transform, augmix=True)
    pixels = torch.stack([eval_transform(image)] + [augment(image) for _ in range(views - 1)])
    t1 = time.perf_counter()
    image_features = backbone.encode_images(pixels)
    t2 = time.perf_counter()
    learner = PromptLearner(backbone, names, init="words", init_words="a photo of a", shared_prefix=False)
    optimizer = torch.optim.AdamW([learner.ctx], lr=config.lr, weight_decay=config.weight_decay)

    def full_length_text():  # the research code encodes the whole 77-token context
        return backbone.encode_token_embeddings(learner.prompt_embeddings(), learner.batch, truncate=False)

    text = full_length_text()
    logits = backbone.logit_scale * image_features @ text.T
    chosen = confident_views(logits[None].detach(), config.selection)[0]
    loss = losses.marginal_entropy(logits[chosen])
    name = REGULARIZERS[config.method]
    if name is not None:
        spec = losses.LOSSES[name]
        reg = spec.fn(text, **({"delta": config.delta} if name == "soc" else {}))
        loss = loss + (-1.0 if spec.maximize else 1.0) * config.lam * reg
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    t3 = time.perf_counter()
    with torch.no_grad():  # the prediction re-encodes the original image and the prompts
        original = backbone.encode_images(pixels[:1])
        t4 = time.perf_counter()
        _ = backbone.logit_scale * original @ full_length_text().T
    t5 = time.perf_counter()
    return {"views_s": t1 - t0, "image_encoder_s": (t2 - t1) + (t4 - t3), "text_s": (t3 - t2) + (t5 - t4),
            "total_s": t5 - t0}


def adapt_seconds_per_image(learner, feats: torch.Tensor, config: TPTConfig, repeats: int) -> float:
    """Median seconds per image of one batched adaptation (warm-up done by the caller)."""
    return median_time(lambda: tpt_adapt(learner, feats, config), repeats=repeats, warmup=0)["median_s"] / len(feats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 9, 200])
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--encode-images", type=int, default=3, help="images whose views calibprompt encodes")
    parser.add_argument("--reference-images", type=int, nargs="+", default=[2, 2, 1],
                        help="images per method for the reference loop, per class count")
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 16, 4], help="calibprompt batch per class count")
    parser.add_argument("--repeats", type=int, nargs="+", default=[3, 3, 2], help="adaptation repeats per class count")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone("clip:ViT-B-32", weights="random")
    results: dict = {"per_classes": {}}
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_img = max(args.encode_images, *args.reference_images)
        make_dataset_tree(tmp / "data", "kather", per_class=[n_img] * 9, splits=["test"], size=224,
                          suffix=".jpg")
        paths = load_dataset("kather", tmp / "data", "test").paths

        # calibprompt: encode the 64 views of each image once (independent of C and of the method)
        start = time.perf_counter()
        FeatureStore(tmp / "cache").views(backbone, paths[: args.encode_images], args.views, kind="test_time",
                                          num_workers=0, progress=False)
        encode_per_image = (time.perf_counter() - start) / args.encode_images
        results["calibprompt_view_encoding_s_per_image"] = encode_per_image
        print(f"view encoding: {encode_per_image:.2f} s/image")

        for c, n_ref, batch, repeats in zip(args.classes, args.reference_images, args.batch, args.repeats, strict=True):
            names = classnames(c)
            learner = PromptLearner(backbone, names, init="words", init_words="a photo of a")
            g = torch.Generator().manual_seed(c)
            feats = F.normalize(torch.randn(batch, args.views, backbone.embed_dim, generator=g), dim=-1)
            tpt_adapt(learner, feats, TPTConfig())  # warm-up
            row: dict = {"classes": c, "batch": batch, "reference_images": n_ref, "adapt_repeats": repeats,
                         "reference": {}, "calibprompt_adapt_s_per_image": {}}
            for method in METHODS:
                config = method_config(method)
                parts = [reference_image(backbone, p, names, config, args.views) for p in paths[:n_ref]]
                row["reference"][method] = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
                row["calibprompt_adapt_s_per_image"][method] = adapt_seconds_per_image(learner, feats, config, repeats)
                print(f"C={c} {method}: reference {row['reference'][method]['total_s']:.2f} s/image, "
                      f"calibprompt adaptation {row['calibprompt_adapt_s_per_image'][method]:.3f} s/image")
            row["calibprompt_adapt_unshared_tpt_s_per_image"] = adapt_seconds_per_image(
                learner, feats, TPTConfig(share_initial_forward=False), repeats)

            ref = row["reference"]
            adapt = row["calibprompt_adapt_s_per_image"]
            one_ref, one_ours = ref["tpt"]["total_s"], encode_per_image + adapt["tpt"]
            four_ref = sum(ref[m]["total_s"] for m in METHODS)
            four_ours = encode_per_image + sum(adapt[m] for m in METHODS)
            row["one_method"] = {"reference_s_per_image": one_ref, "calibprompt_s_per_image": one_ours,
                                 "reference_images_per_s": 1 / one_ref, "calibprompt_images_per_s": 1 / one_ours}
            row["four_methods"] = {"reference_s_per_image": four_ref, "calibprompt_s_per_image": four_ours}
            results["per_classes"][str(c)] = row
            ratios[f"one_method_end_to_end_C{c}"] = one_ref / one_ours
            ratios[f"one_method_adaptation_only_C{c}"] = ref["tpt"]["text_s"] / adapt["tpt"]
            ratios[f"four_methods_C{c}"] = four_ref / four_ours
            ratios[f"shared_initial_forward_C{c}"] = row["calibprompt_adapt_unshared_tpt_s_per_image"] / adapt["tpt"]
            print(f"C={c}: one method {one_ref / one_ours:.1f}x, four methods {four_ref / four_ours:.1f}x")

    config = {"backbone": "clip:ViT-B-32 (random weights)", "image_size": 224, "views": args.views,
              "augmix": True, "methods": list(METHODS), "classes": args.classes,
              "regularizer_weights": {m: METHOD_DEFAULTS[m] for m in METHODS},
              "encode_images": args.encode_images, "reference_images": args.reference_images,
              "batch": args.batch, "adapt_repeats": args.repeats,
              "reference": "per image: fresh views, 77-token prompts, forward-backward-step, re-encode for the "
                           "prediction (the research code's structure)"}
    path = write_result("tpt", config, results, ratios)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
