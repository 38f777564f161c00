"""A sweep end to end: 12 presets x 3 seeds on one backbone/dataset, calibprompt vs the research design.

Setup: ``clip:ViT-B-32`` at real size (random weights), a generated Kather-layout dataset of
224-px JPEGs (9 classes), 8 shots per class, the paper's optimiser and schedule with the number of
epochs scaled down so the measurement fits on a 2-core CPU.

- calibprompt: the 36 runs as ``calibprompt sweep`` executes them (``execute_group``: they share
  a backbone, data, prompt shape and schedule, so they train in lockstep, one text-encoder pass
  per step for all): images encoded once into the feature cache (test set, validation set, a bank
  of ``epochs`` augmented views per seed, each image decoded once), text encoder truncated +
  shared prefix for the 9 classes, run directories with metrics, predictions, diagrams.
- research design (re-enacted faithfully): every training step decodes, augments and encodes
  its 16 images and runs the text encoder over the full 77-token context; every run re-encodes
  the whole test set. Executed for ``--reference-runs`` of the 36 runs; the total is projected
  from their median (all runs have the same structure; the loss terms cost nothing measurable).

Also reported: the time projected to the paper's full protocol (50 epochs = 200 steps, 7,180
test images, 50 views) from per-component costs measured in the same run -- for the research
design and for calibprompt (the encoding floor: every needed image view encoded once; plus
7,200 run-steps at the per-run cost of a lockstep group of 36) -- and how far calibprompt is above
its floor. Ratios: ``projected_paper_grid`` (research / calibprompt at the paper's protocol),
``floor_multiple`` (calibprompt / its encoding floor, projected), ``measured_end_to_end`` (the
scaled sweep, measured on calibprompt, projected from measured runs on the research design).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import median_time, write_result
from calibprompt.backbones import load_backbone
from calibprompt.data import load_dataset
from calibprompt.data.images import open_image
from calibprompt.data.synthetic import make_dataset_tree
from calibprompt.data.views import train_view_transform
from calibprompt.methods.coop import TrainConfig, coop_lr, epoch_batches
from calibprompt.metrics import evaluate
from calibprompt.objective import PRESETS, Objective
from calibprompt.prompts import PromptLearner
from calibprompt.runs import PromptRunConfig as RunConfig
from calibprompt.runs.execute import execute_group

PRESET_NAMES = list(PRESETS)  # 12 presets


def reference_run(backbone, train, shots, test, preset: str, seed: int, epochs: int) -> dict:
    """The research code's structure: no cache, full-length text, test re-encoded."""
    objective = Objective.preset(preset)
    learner = PromptLearner(backbone, train.classnames, n_ctx=16, seed=seed, shared_prefix=False)
    config = TrainConfig(epochs=epochs, seed=seed)
    test_tf = backbone.image_transform()
    train_tf = train_view_transform(test_tf)
    shot_set = shots.subset_of(train)
    labels = torch.as_tensor(shot_set.labels)
    optimizer = torch.optim.SGD([learner.ctx], lr=config.lr, momentum=0.9, weight_decay=5e-4)
    zs = None
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = coop_lr(epoch, config)
        rng = np.random.default_rng([seed, epoch])
        for batch in epoch_batches(len(shot_set), 16, rng):
            pixels = torch.stack([train_tf(open_image(shot_set.path(int(i)))) for i in batch])
            image = backbone.encode_images(pixels)  # the image encoder on every step
            text = backbone.encode_token_embeddings(learner.prompt_embeddings(), learner.batch, truncate=False)
            logits = backbone.logit_scale * image @ text.T
            inputs = {"logits": logits, "labels": labels[batch], "text_features": text}
            if "zs_logits" in objective.required_inputs:
                if zs is None:
                    zs = backbone.encode_texts(train.prompts())
                inputs["zs_logits"] = backbone.logit_scale * image @ zs.T
            loss = objective(**{k: v for k, v in inputs.items() if k in objective.required_inputs}).total
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        test_pixels = [test_tf(open_image(p)) for p in test.paths]
        feats = torch.cat([backbone.encode_images(torch.stack(test_pixels[i:i + 64]))
                           for i in range(0, len(test_pixels), 64)])
        text = backbone.encode_token_embeddings(learner.prompt_embeddings(), learner.batch, truncate=False)
    probs = torch.softmax(backbone.logit_scale * feats @ text.T, -1).double()
    return evaluate(probs, test.labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2, help="scaled from the paper's 50")
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--reference-runs", type=int, default=2)
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone("clip:ViT-B-32", weights="random")
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    make_dataset_tree(root / "data", "kather", per_class=[24] * 9, splits=["train"], size=224, suffix=".jpg")
    make_dataset_tree(root / "data", "kather", per_class=[args.test_per_class] * 9, splits=["test"], size=224,
                      suffix=".jpg", seed=1, classnames_file=False)
    train = load_dataset("kather", root / "data", "train")
    test = load_dataset("kather", root / "data", "test")
    configs = [RunConfig(backbone="clip:ViT-B-32", weights="random", dataset="kather", root=str(root / "data"),
                         method=m, seed=s, shots=8, epochs=args.epochs, views=args.epochs, val_per_class=8,
                         cache=str(root / "cache"), workers=1, progress=False)
               for m in PRESET_NAMES for s in args.seeds]

    # ---- calibprompt: the whole sweep ----------------------------------------------------------
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = execute_group(configs, root / "runs")
    ours_total = time.perf_counter() - start
    assert all(not r.skipped for r in results)

    # ---- research design: a measured subset ----------------------------------------------------
    from calibprompt.data import few_shot

    picks = [configs[i * len(configs) // args.reference_runs] for i in range(args.reference_runs)]
    reference_times = []
    for c in picks:
        shots = few_shot(train, 8, c.seed)
        t0 = time.perf_counter()
        reference_run(backbone, train, shots, test, c.method, c.seed, args.epochs)
        reference_times.append(time.perf_counter() - t0)
    reference_per_run = float(np.median(reference_times))
    reference_total = reference_per_run * len(configs)

    # ---- per-component costs for the paper-scale projection ------------------------------------
    tf = train_view_transform(backbone.image_transform())
    paths = train.paths[:16]
    img16 = median_time(lambda: backbone.encode_images(torch.stack([tf(open_image(p)) for p in paths])), repeats=3)
    learner = PromptLearner(backbone, train.classnames, n_ctx=16, seed=0)

    def text_step(mode: str) -> None:
        if mode == "full":
            t = backbone.encode_token_embeddings(learner.prompt_embeddings(), learner.batch, truncate=False)
        else:
            t = learner()
        t.sum().backward()
        learner.ctx.grad = None

    runs, seeds = len(PRESET_NAMES) * len(args.seeds), len(args.seeds)
    contexts = torch.stack([PromptLearner(backbone, train.classnames, n_ctx=16, seed=r).ctx.detach()
                            for r in range(runs)]).requires_grad_(True)

    def lockstep_step() -> None:  # the text pass of a group of all 36 runs (forward + backward)
        learner.contexts_features(contexts).sum().backward()
        contexts.grad = None

    text_full = median_time(lambda: text_step("full"), repeats=3)
    text_alone = median_time(lambda: text_step("ours"), repeats=3)
    text_group = median_time(lockstep_step, repeats=3)
    text_ours = text_group["median_s"] / runs
    per_image = img16["median_s"] / 16
    steps, test_images, views = 200, 7180, 50
    paper_reference = runs * (steps * (img16["median_s"] + text_full["median_s"]) + test_images * per_image)
    # per seed: 50 views of the 72 shots, the 72 tuning and the 72 calibration images (8 per class each)
    paper_floor = (test_images + seeds * (72 * views + 72 + 72)) * per_image
    paper_ours = paper_floor + runs * steps * text_ours
    tmp.cleanup()

    results_json = {
        "runs": len(configs), "epochs": args.epochs, "test_images": len(test),
        "calibprompt_total_s": ours_total,
        "reference_measured_runs_s": reference_times,
        "reference_per_run_s": reference_per_run,
        "reference_total_s (projected from measured runs)": reference_total,
        "components": {"encode_16_train_images_s": img16["median_s"], "text_step_full_s": text_full["median_s"],
                       "text_step_calibprompt_alone_s": text_alone["median_s"],
                       "text_step_calibprompt_lockstep_per_run_s": text_ours,
                       "text_step_lockstep_group_s": text_group["median_s"], "lockstep_group": runs,
                       "per_image_s": per_image},
        "paper_protocol_projection": {"reference_s": paper_reference, "calibprompt_s": paper_ours,
                                      "calibprompt_encoding_floor_s": paper_floor,
                                      "calibprompt_text_steps_s": paper_ours - paper_floor,
                                      "steps": steps, "test_images": test_images, "views": views},
    }
    ratios = {"projected_paper_grid": paper_reference / paper_ours, "floor_multiple": paper_ours / paper_floor,
              "measured_end_to_end": reference_total / ours_total}
    config = {"backbone": "clip:ViT-B-32 (random weights)", "dataset": "generated Kather layout, 224 px JPEG",
              "presets": PRESET_NAMES, "seeds": args.seeds, "shots": 8, "epochs": args.epochs,
              "views": args.epochs, "test_per_class": args.test_per_class, "reference_runs": args.reference_runs}
    path = write_result("sweep", config, results_json, ratios)
    print(f"calibprompt: {len(configs)} runs in {ours_total:.0f} s; reference {reference_per_run:.0f} s/run "
          f"-> {reference_total:.0f} s projected; x{ratios['measured_end_to_end']:.1f}")
    print(f"paper protocol projection: reference {paper_reference / 3600:.1f} h vs calibprompt "
          f"{paper_ours / 3600:.2f} h -> x{ratios['projected_paper_grid']:.1f}; floor {paper_floor / 3600:.2f} h "
          f"(x{ratios['floor_multiple']:.2f})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
