"""Full fine-tuning step vs prompt-tuning step on the same backbone: step time and peak memory.

One training step at batch 16 with C = 9 class prompts of the Kather template, on random-weight
backbones of real size: the ViT-B/32 CLIP architecture (PLIP / QuiltNet) and the BiomedCLIP
architecture (ViT-B/16 + BERT-base text tower, context 256, BERT dropout active in train mode).

- prompt step (calibprompt's prompt tuning): 16 context vectors through the text tower (forward +
  backward, truncated sequence), logits against *cached* image features, SGD on the context;
- full step (``train --regime full``): a trainable fp32 copy of the backbone in train mode, 16
  images (224 px) through the image tower and the C prompts through the text tower, forward +
  backward into every weight, SGD with momentum on all of them; the frozen original is kept (the
  run machinery shares it between runs), with no gradient.

Each measurement runs in its own process so that the peak resident memory (``ru_maxrss``) is that
step's; "peak over the loaded model" subtracts the resident memory after loading the backbone.
Measured on CPU (this machine); on a GPU the same script reports ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common import write_result

PROMPTS = [f"An H&E image of {n}." for n in (
    "adipose tissue", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
    "cancer-associated stroma", "colorectal adenocarcinoma epithelium")]
ARCHITECTURES = {"vit_b32": "ViT-B/32 CLIP (PLIP / QuiltNet architecture)",
                 "biomedclip": "BiomedCLIP architecture (ViT-B/16 + BERT-base, context 256)"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(arch: str, tmp: Path):
    from calibprompt.backbones import load_backbone
    from calibprompt.backbones.testing import random_biomedclip_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch == "vit_b32":
            return load_backbone("clip:ViT-B-32", weights="random")
        return random_biomedclip_backbone(tmp)


def measure(arch: str, mode: str, repeats: int) -> dict:
    """One (architecture, mode) in this process: median step time and peak memory."""
    from calibprompt.methods.coop import TrainConfig
    from calibprompt.methods.finetune import _features, trainable_copy
    from calibprompt.prompts import PromptLearner

    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    backbone = _load(arch, Path(tmp.name))
    loaded_mb = _rss_mb()
    labels = torch.arange(16) % len(PROMPTS)
    config = TrainConfig()
    if mode == "prompt":
        learner = PromptLearner(backbone, [p[len("An H&E image of "):-1] for p in PROMPTS], n_ctx=16, seed=0)
        optimizer = torch.optim.SGD([learner.ctx], lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        image = torch.nn.functional.normalize(torch.randn(16, backbone.embed_dim), dim=-1)  # cached features

        def step() -> None:
            text = learner()
            loss = torch.nn.functional.cross_entropy(backbone.logit_scale * image @ text.T, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        parameters = learner.ctx.numel()
    else:
        model = trainable_copy(backbone)
        tokens = model.tokenize(PROMPTS)
        size = 224
        pixels = torch.randn(16, 3, size, size)
        trainable = [p for p in model.model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=2e-7, momentum=config.momentum, weight_decay=config.weight_decay)

        def step() -> None:
            image, text = _features(model, pixels, tokens)
            loss = torch.nn.functional.cross_entropy(model.logit_scale * image @ text.T, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        parameters = sum(p.numel() for p in trainable)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up (allocates the momentum buffers)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    out = {"step_s": statistics.median(times), "step_s_all": times, "trained_parameters": parameters,
           "rss_after_load_mb": loaded_mb, "peak_rss_mb": _rss_mb(), "peak_over_loaded_mb": _rss_mb() - loaded_mb}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--one", nargs=2, metavar=("ARCH", "MODE"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.repeats)))
        return
    results, ratios = {}, {}
    for arch in args.architectures:
        row = {}
        for mode in ("prompt", "full"):
            done = subprocess.run([sys.executable, "-m", "benchmarks.finetune", "--one", arch, mode, "--repeats",
                                   str(args.repeats)], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).resolve().parents[1])
            row[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(arch, mode, {k: round(v, 3) if isinstance(v, float) else v for k, v in row[mode].items()
                               if k != "step_s_all"}, flush=True)
        results[ARCHITECTURES[arch]] = row
        ratios[f"{arch}: full / prompt step time"] = row["full"]["step_s"] / row["prompt"]["step_s"]
        ratios[f"{arch}: full / prompt peak memory over the loaded model"] = (
            row["full"]["peak_over_loaded_mb"] / max(row["prompt"]["peak_over_loaded_mb"], 1.0))
    write_result("finetune", {"batch": 16, "classes": len(PROMPTS), "n_ctx": 16, "image_size": 224,
                              "repeats": args.repeats, "precision": "fp32", "weights": "random, real size",
                              "optimizer": "SGD momentum 0.9, weight decay 5e-4"}, results, ratios)


if __name__ == "__main__":
    main()
