"""``calibprompt extract`` (encode a dataset once into the feature cache) and ``calibprompt splits``
(reproducible few-shot and validation manifests)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from calibprompt.backbones import load_backbone
from calibprompt.cli.common import CLIError
from calibprompt.cli.options import default_of, help_with_default
from calibprompt.data import (
    FeatureStore,
    SplitManifest,
    calibration_split,
    few_shot,
    load_dataset,
    validation_split,
)
from calibprompt.runs.common import RunConfigBase, labelled_sizes

EXAMPLES = {
    "extract": """examples:
  calibprompt extract --backbone quiltnet --dataset kather --root ~/data --split test
  calibprompt extract --backbone plip --weights ~/models/plip --dataset kather --root ~/data \\
      --split train --manifest splits/kather_8shot_seed1.json --views 50
  calibprompt extract --backbone clip:ViT-B-32 --weights openai --dataset imagefolder --root ~/images

Features go to --cache (default $CALIBPROMPT_CACHE or ~/.cache/calibprompt); a second call
encodes nothing that is already there.""",
    "splits": """examples:
  calibprompt splits --dataset kather --root ~/data --shots 8 --seeds 1 2 3
  calibprompt splits --dataset covid --root ~/data --shots 8 --seeds 1 --validation --out splits/
  calibprompt splits --dataset kather --root ~/data --shots 8 --validation --calibration

Manifests are drawn from the sorted train listing with the given seed, so they are identical on
every machine; existing manifests are validated and reused.""",
}

#: The help of the data flags, from the run schema (one text for every command).
_HELP = {f: RunConfigBase.__dataclass_fields__[f].metadata["help"] for f in ("backbone", "weights", "dataset", "root")}


def cmd_extract(args: argparse.Namespace) -> int:
    console = Console()
    dataset = load_dataset(args.dataset, args.root, args.split)
    if args.manifest:
        dataset = SplitManifest.load(args.manifest).subset_of(dataset)
    backbone = load_backbone(args.backbone, weights=args.weights, device=args.device, precision=args.precision)
    store = FeatureStore(args.cache)
    kwargs = {"batch_size": args.batch_size, "num_workers": args.workers, "strict": args.strict}
    result = store.features(backbone, dataset.paths, **kwargs)
    console.print(f"[bold]{backbone.name}[/] on {dataset.name}/{dataset.split}: {len(result.index)} "
                  f"images — {result.encoded} encoded, {result.reused} already cached")
    excluded = list(result.excluded) + [(str(dataset.root / f), r) for f, r in dataset.excluded]
    if args.views:
        bank = store.views(backbone, dataset.paths, args.views, kind="train", aug_seed=args.aug_seed, **kwargs)
        console.print(f"{args.views} augmented views: {bank.encoded} encoded, {bank.reused} cached")
        excluded += [e for e in bank.excluded if e not in excluded]
    for table in result.tables:
        console.print(f"cache: {table}")
    if excluded:
        console.print(f"[yellow]{len(excluded)} file(s) excluded:[/]")
        for path, reason in excluded:
            console.print(f"  {path}: {reason}")
    return 0


def cmd_splits(args: argparse.Namespace) -> int:
    if args.calib_per_class is not None and not args.calibration:
        raise CLIError("--calib-per-class applies to --calibration")
    if args.val_per_class is not None and not (args.validation or args.calibration):
        raise CLIError("--val-per-class applies to --validation (or --calibration, which draws the tuning split "
                       "first)")
    train = load_dataset(args.dataset, args.root, "train")
    out = Path(args.out)
    table = Table(title=f"{args.dataset}: {args.shots}-shot splits of {len(train)} train images")
    for col in ("seed", "kind", "images", "per class", "manifest"):
        table.add_column(col)
    for seed in args.seeds:
        path = out / f"{args.dataset}_{args.shots}shot_seed{seed}.json"
        shots = few_shot(train, args.shots, seed, strict=args.strict, manifest_path=path)
        counts = np.bincount(shots.labels, minlength=len(shots.classnames)).tolist()
        table.add_row(str(seed), "few-shot", str(len(shots)), str(counts), str(path))
        val, sizes = None, (args.val_per_class, args.calib_per_class)
        if args.calibration:  # the sizes a run would draw; the tuning split comes first, as in a run
            sizes = labelled_sizes(train, args.shots, args.val_per_class, args.calib_per_class, args.dataset)
        if args.validation or args.calibration:
            vpath = out / f"{args.dataset}_{args.shots}shot_seed{seed}_validation.json"
            val = validation_split(train, exclude=shots, per_class=sizes[0], seed=seed,
                                   strict=args.strict, manifest_path=vpath)
            vcounts = np.bincount(val.labels, minlength=len(val.classnames)).tolist()
            table.add_row(str(seed), "tuning (validation)", str(len(val)), str(vcounts), str(vpath))
        if args.calibration:
            cpath = out / f"{args.dataset}_{args.shots}shot_seed{seed}_calibration.json"
            calib = calibration_split(train, exclude=[shots, val], per_class=sizes[1], seed=seed,
                                      strict=args.strict, manifest_path=cpath)
            ccounts = np.bincount(calib.labels, minlength=len(calib.classnames)).tolist()
            table.add_row(str(seed), "calibration", str(len(calib)), str(ccounts), str(cpath))
    Console().print(table)
    return 0


def _default(function: Callable, name: str, text: str) -> dict:
    value = default_of(function, name)
    return {"default": value, "help": help_with_default(text, value)}


def register(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = add("extract", "encode a dataset's images once into the feature cache", EXAMPLES["extract"])
    p.add_argument("--backbone", required=True, help=_HELP["backbone"])
    p.add_argument("--weights", help=help_with_default(_HELP["weights"], "the family's hub id"))
    p.add_argument("--dataset", required=True, help=_HELP["dataset"])
    p.add_argument("--root", required=True, help=_HELP["root"])
    p.add_argument("--split", **_default(load_dataset, "split", "train or test"))
    p.add_argument("--manifest", help="restrict to the files of a split manifest (JSON)")
    p.add_argument("--views", type=int, default=0, help=help_with_default("also cache this many augmented views per image", 0))
    p.add_argument("--aug-seed", type=int, **_default(FeatureStore.views, "aug_seed", "seed of the augmented views"))
    p.add_argument("--cache", help=help_with_default("feature cache directory", "$CALIBPROMPT_CACHE or ~/.cache/calibprompt"))
    p.add_argument("--batch-size", type=int, **_default(FeatureStore.features, "batch_size", "images encoded at once"))
    p.add_argument("--workers", type=int, default=None,
                   help=help_with_default("image-decoding worker processes", "cores - 1, at most 4"))
    p.add_argument("--device", **_default(load_backbone, "device", "torch device"))
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   **_default(load_backbone, "precision", "precision of the backbone"))
    p.add_argument("--strict", action="store_true", help="abort on the first unreadable image")
    p.set_defaults(func=cmd_extract)

    p = add("splits", "draw reproducible few-shot (and tuning, calibration) split manifests", EXAMPLES["splits"])
    p.add_argument("--dataset", required=True, help=_HELP["dataset"])
    p.add_argument("--root", required=True, help=_HELP["root"])
    p.add_argument("--shots", type=int, required=True, help="labelled images per class")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help=help_with_default("seeds", "1 2 3"))
    p.add_argument("--out", default="splits", help=help_with_default("directory for the manifests", "splits"))
    p.add_argument("--validation", action="store_true",
                   help="also draw a tuning split per seed (for hyperparameter selection; the name is kept from "
                        "before the calibration split existed)")
    p.add_argument("--val-per-class", type=int,
                   **_default(validation_split, "per_class", "tuning images per class (none: max(4, 64 / classes))"))
    p.add_argument("--calibration", action="store_true",
                   help="also draw a calibration split per seed, disjoint from the shots and the tuning split (for "
                        "post-hoc calibrators and decision methods); draws the tuning split too, with the sizes a "
                        "run uses")
    p.add_argument("--calib-per-class", type=int,
                   **_default(calibration_split, "per_class", "calibration images per class (none: max(4, 64 / classes))"))
    p.add_argument("--strict", action="store_true", help="fail on small classes and unreadable images")
    p.set_defaults(func=cmd_splits)
