"""Lockstep training: the per-run cost of a prompt-tuning step when R runs share one text-encoder
pass, against the same R runs stepping one after another (the reference design: one run at a time).

Setup: the ViT-B/32 CLIP text tower at real size (random weights), C = 9 classes, 16 context
vectors, batch 16 of cached image features, CalibPrompt's objective (LS + SMAC + AS); each run
has its own context, images, SGD state. Group sizes 1, 4, 12, 36 (36 = the paper's 12 methods x
3 seeds of one backbone and dataset). A step is broken down into the text forward, the loss terms,
the backward pass and the R optimizer updates. Medians of repeats, one process, one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from benchmarks.common import write_result
from calibprompt.objective import Objective

NAMES = ["adipose tissue", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
         "cancer-associated stroma", "colorectal adenocarcinoma epithelium"]


def _group(backbone, runs: int):
    from calibprompt.prompts import PromptLearner

    learners = [PromptLearner(backbone, NAMES, n_ctx=16, seed=r) for r in range(runs)]
    optimizers = [torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4) for learner in learners]
    g = torch.Generator().manual_seed(0)
    images = [torch.nn.functional.normalize(torch.randn(16, backbone.embed_dim, generator=g), dim=-1)
              for _ in range(runs)]
    labels = torch.arange(16) % len(NAMES)
    return learners, optimizers, images, labels


def _step(learners, optimizers, images, labels, objective, scale, lockstep: bool, parts=None) -> None:
    t0 = time.perf_counter()
    if lockstep:
        texts = learners[0].contexts_features(torch.stack([learner.ctx for learner in learners])).unbind(0)
    else:
        texts = None
    t1 = time.perf_counter()
    total = 0.0
    for r, learner in enumerate(learners):
        text = texts[r] if lockstep else learner()
        logits = scale * images[r] @ text.T
        result = objective(logits=logits, labels=labels, text_features=text)
        if lockstep:
            total = total + result.total
        else:  # one run at a time: its own backward and update
            optimizers[r].zero_grad(set_to_none=True)
            result.total.backward()
            optimizers[r].step()
    t2 = time.perf_counter()
    if lockstep:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        total.backward()
    t3 = time.perf_counter()
    if lockstep:
        for opt in optimizers:
            opt.step()
    t4 = time.perf_counter()
    if parts is not None:
        for key, value in (("text_forward", t1 - t0), ("loss", t2 - t1), ("backward", t3 - t2),
                           ("optimizer", t4 - t3), ("step", t4 - t0)):
            parts.setdefault(key, []).append(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 12, 36])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from calibprompt.backbones import load_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone("clip:ViT-B-32", weights="random")
    objective = Objective.parse("ls(alpha=0.1) + smac(alpha=0.1) + as")
    scale = backbone.logit_scale
    results = {}
    for runs in args.sizes:
        group = _group(backbone, runs)
        parts: dict[str, list[float]] = {}
        alone_parts: dict[str, list[float]] = {}
        _step(*group, objective, scale, lockstep=True)  # warm-up
        _step(*group, objective, scale, lockstep=False)
        for _ in range(args.repeats):  # interleaved, so that the machine's drift hits both alike
            _step(*group, objective, scale, lockstep=True, parts=parts)
            _step(*group, objective, scale, lockstep=False, parts=alone_parts)
        lockstep = {k: statistics.median(v) for k, v in parts.items()}
        alone = statistics.median(alone_parts["step"])
        results[str(runs)] = {
            "lockstep_step_s": lockstep["step"], "lockstep_per_run_s": lockstep["step"] / runs,
            "lockstep_breakdown_s": lockstep,
            "alone_step_s (runs one after another)": alone, "alone_per_run_s": alone / runs,
        }
        print(f"{runs:3d} runs: lockstep {1000 * lockstep['step'] / runs:.0f} ms/run-step, alone "
              f"{1000 * alone / runs:.0f} ms/run-step "
              f"(forward {1000 * lockstep['text_forward']:.0f}, backward {1000 * lockstep['backward']:.0f}, "
              f"loss {1000 * lockstep['loss']:.0f}, sgd {1000 * lockstep['optimizer']:.1f} ms)", flush=True)
    ratios = {f"lockstep speed-up per run-step, group of {k}": v["alone_per_run_s"] / v["lockstep_per_run_s"]
              for k, v in results.items()}
    write_result("lockstep", {"backbone": "clip:ViT-B-32 text tower, random weights", "classes": len(NAMES),
                              "n_ctx": 16, "batch": 16, "objective": str(objective), "sizes": args.sizes,
                              "repeats": args.repeats, "threads": torch.get_num_threads(),
                              "device": "cpu (no GPU lent to this session: GPU not measured)"},
                 results, ratios)


if __name__ == "__main__":
    main()
