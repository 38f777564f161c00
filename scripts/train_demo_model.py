"""Train the embedded demo model (deterministic; ~minutes on 2 CPU cores).

A small CLIP (open_clip architecture: ViT 32 px / patch 8, 3 layers, width 64; text transformer
2 layers, width 64, word-level vocabulary) is trained on procedurally generated tissue patches
paired with captions from four templates. 15 % of the captions name a random other class
(noisy web captions), and the classes overlap in appearance, so the model's zero-shot
classification is useful but imperfect.

The logit scale (inverse temperature) is learned from CLIP's initial 1/0.07 and clamped to 100,
as CLIP trains it; on this small, noisy corpus it settles near 10 (the shipped model: 9.7), far
below the ~100 of the released CLIP-type models. ``--logit-scale 100`` holds it fixed at that
value instead (an experiment towards the real models' regime: see the project's notes; the
shipped model is the default run). Output: ``src/calibprompt/backbones/demo_model.safetensors``
(float16) and ``demo_model.json``, the files ``load_backbone("demo")`` reads.

    .venv/bin/python scripts/train_demo_model.py [--steps 1500] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from calibprompt.backbones.demo import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    DemoTokenizer,
    build_demo_clip,
    demo_vocabulary,
)
from calibprompt.backbones.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from calibprompt.demo.tissue import CAPTION_TEMPLATES, CLASSES, render_batch, sample_latents
from calibprompt.files import atomic_path, write_json

IMAGE_SIZE = 32


def model_config(vocab_size: int) -> dict:
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16},
        "text_cfg": {"context_length": 24, "vocab_size": vocab_size, "width": 64, "heads": 4, "layers": 2},
    }


def to_pixels(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    return (x - mean) / std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--corpus", type=int, default=16384, help="pre-rendered training images")
    parser.add_argument("--caption-noise", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logit-scale", type=float, default=None,
                        help="hold the logit scale fixed at this value (default: learn it, clamped to 100)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/calibprompt/backbones")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)

    folders = sorted(CLASSES)
    names = [CLASSES[f] for f in folders]
    vocab = demo_vocabulary(names, CAPTION_TEMPLATES)
    tokenizer = DemoTokenizer(vocab, context_length=24)
    config = {"model_cfg": model_config(tokenizer.vocab_size), "vocab": vocab,
              "preprocess": {"size": IMAGE_SIZE, "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD),
                             "interpolation": "bicubic"}}
    model = build_demo_clip(config)
    if args.logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(float(np.log(args.logit_scale)))
        model.logit_scale.requires_grad_(False)

    # corpus: images, their true class, and a caption (class possibly replaced by noise)
    labels = rng.integers(0, len(names), args.corpus)
    start = time.perf_counter()
    images = np.concatenate([render_batch(sample_latents(labels[i:i + 2048], rng), rng, IMAGE_SIZE)
                             for i in range(0, args.corpus, 2048)])
    print(f"rendered {args.corpus} images in {time.perf_counter() - start:.1f} s")
    caption_class = np.where(rng.random(args.corpus) < args.caption_noise,
                             rng.integers(0, len(names), args.corpus), labels)
    caption_template = rng.integers(0, len(CAPTION_TEMPLATES), args.corpus)
    captions = sorted({t.format(n) for t in CAPTION_TEMPLATES for n in names})
    caption_index = {c: i for i, c in enumerate(captions)}
    targets = torch.tensor([caption_index[CAPTION_TEMPLATES[t].format(names[c])]
                            for t, c in zip(caption_template, caption_class, strict=True)])
    caption_ids = tokenizer(captions)
    pixels_all = to_pixels(images)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.steps, pct_start=0.1)
    model.train()
    for step in range(args.steps):
        batch = torch.from_numpy(rng.integers(0, args.corpus, args.batch_size))
        image = F.normalize(model.encode_image(pixels_all[batch]), dim=-1)
        text = F.normalize(model.encode_text(caption_ids), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T
        loss = F.cross_entropy(logits, targets[batch])  # image -> caption over the caption set
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} scale {model.logit_scale.exp().item():.1f}")

    # zero-shot check on fresh images with the first template
    model.eval()
    test_rng = np.random.default_rng(args.seed + 1)
    test_labels = np.repeat(np.arange(len(names)), 250)
    test_pixels = to_pixels(render_batch(sample_latents(test_labels, test_rng), test_rng, IMAGE_SIZE))
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer([CAPTION_TEMPLATES[0].format(n) for n in names])), dim=-1)
        image = F.normalize(model.encode_image(test_pixels), dim=-1)
        probs = (model.logit_scale.exp() * image @ text.T).softmax(-1)
    accuracy = float((probs.argmax(1).numpy() == test_labels).mean())
    confidence = float(probs.max(1).values.mean())
    print(f"zero-shot on 1000 fresh patches: accuracy {accuracy:.3f}, mean confidence {confidence:.3f}")

    config["training"] = {"steps": args.steps, "batch_size": args.batch_size, "corpus": args.corpus,
                          "caption_noise": args.caption_noise, "seed": args.seed,
                          "logit_scale_fixed": args.logit_scale,
                          "zero_shot_accuracy": accuracy, "zero_shot_mean_confidence": confidence,
                          "logit_scale": float(model.logit_scale.detach().exp())}
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(args.out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    write_json(args.out / CONFIG_FILE, config)
    size = (args.out / WEIGHTS_FILE).stat().st_size
    print(f"wrote {args.out / WEIGHTS_FILE} ({size / 1e6:.2f} MB) and {CONFIG_FILE}")
    print(json.dumps(config["training"], indent=1))


if __name__ == "__main__":
    main()
