"""Where one prompt-tuning step's time goes (ViT-B/32 CLIP text tower, random weights, real size).

One step of calibprompt's prompt tuning on cached image features: batch 16, C = 9 class prompts
of 16 context vectors + the class name, timed in parts -- text forward (with and without the
shared-prefix path), the objective's loss terms, the backward pass, the SGD update -- and as a
whole, so that "overhead" (the whole minus its parts: Python, autograd bookkeeping) is visible.
Objectives: CE, and CalibPrompt's ``ls + smac + w·as``. Medians of repeats, one run.
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


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    from calibprompt.backbones import load_backbone
    from calibprompt.prompts import PromptLearner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone("clip:ViT-B-32", weights="random")
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(16, backbone.embed_dim), dim=-1)
    labels = torch.arange(16) % len(NAMES)
    objectives = {"ce": Objective.parse("ce"), "calibprompt": Objective.parse("ls(alpha=0.1) + smac(alpha=0.1) + as")}
    results = {}
    for shared in (True, False):
        learner = PromptLearner(backbone, NAMES, n_ctx=16, seed=0)
        learner.use_shared_prefix = shared
        optimizer = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
        for name, objective in objectives.items():
            parts: dict[str, list[float]] = {"text_forward": [], "loss": [], "backward": [], "optimizer": [], "step": []}
            for _ in range(args.repeats + 1):  # the first is a warm-up
                start = time.perf_counter()
                t0 = time.perf_counter()
                text = learner()
                t1 = time.perf_counter()
                logits = backbone.logit_scale * image @ text.T
                result = objective(**{k: v for k, v in {"logits": logits, "labels": labels,
                                                        "text_features": text}.items()
                                      if k in objective.required_inputs})
                t2 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                result.total.backward()
                t3 = time.perf_counter()
                optimizer.step()
                t4 = time.perf_counter()
                for key, value in (("text_forward", t1 - t0), ("loss", t2 - t1), ("backward", t3 - t2),
                                   ("optimizer", t4 - t3), ("step", t4 - start)):
                    parts[key].append(value)
            row = {k: _median(v[1:]) for k, v in parts.items()}
            row["overhead"] = row["step"] - sum(row[k] for k in ("text_forward", "loss", "backward", "optimizer"))
            key = f"{name}, {'shared prefix' if shared else 'truncated, no shared prefix'}"
            results[key] = row
            print(key, {k: round(v * 1000, 1) for k, v in row.items()}, "ms", flush=True)
    ratios = {f"{k}: backward / text forward": v["backward"] / v["text_forward"] for k, v in results.items()}
    ratios["shared prefix speed-up of the CE step"] = (results["ce, truncated, no shared prefix"]["step"]
                                                       / results["ce, shared prefix"]["step"])
    write_result("step", {"backbone": "ViT-B/32 CLIP, random weights", "classes": len(NAMES), "n_ctx": 16,
                          "batch": 16, "repeats": args.repeats, "threads": torch.get_num_threads()},
                 results, ratios)


if __name__ == "__main__":
    main()
