"""The commands that write run directories: ``train``, ``zeroshot``, ``tpt`` and ``sweep``. Their
flags are generated from the run configs (:mod:`calibprompt.cli.options`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from rich.console import Console

from calibprompt.cli.common import CLIError, add_run_output_options, out_dir, print_run
from calibprompt.cli.options import add_config_options, config_from_args
from calibprompt.runs import CertifyRunConfig, PromptRunConfig, TPTRunConfig, execute_run, run_sweep
from calibprompt.runs.executors import ExecutorOptions
from calibprompt.runs.prompt import TRAINING_FIELDS

EXAMPLES = {
    "train": """examples:
  calibprompt train --backbone quiltnet --dataset kather --root ~/data --shots 8 --seed 1 --method calibprompt
  calibprompt train --backbone plip --weights ~/models/plip --dataset pannuke --root ~/data \\
      --objective "ls(alpha=0.2) + smac(alpha=0.2) + 0.1*as"
  calibprompt train --backbone demo --dataset demo --root demo_output/data --method ce --epochs 10
  calibprompt train --backbone quiltnet --dataset kather --root ~/data --method calibprompt --tune auto \\
      --tune-folds 3                                   # alpha, w chosen by 3-fold cross-validation

Methods (presets): ce, ls, focal, mdca, dca, mmce, mbls, logitnorm, zsnorm, penalty, smac,
calibprompt (paper's alpha/weight per backbone+dataset; override with --alpha/--weight).
A finished run is skipped (--force redoes it); an interrupted one resumes.""",
    "zeroshot": """examples:
  calibprompt zeroshot --backbone quiltnet --dataset kather --root ~/data
  calibprompt zeroshot --backbone demo --dataset demo --root demo_output/data --out runs""",
    "tpt": """examples:
  calibprompt tpt --backbone quiltnet --dataset kather --root ~/data --method tpt ctpt otpt soc
  calibprompt tpt --backbone demo --dataset demo --root demo_output/data --method zeroshot tpt ctpt
  calibprompt tpt --backbone plip --weights ~/models/plip --dataset covid --root ~/data \\
      --method soc --lam 10 --delta 0.5 --seed 2
  calibprompt tpt --backbone quiltnet --dataset kather --root ~/data --method tpt \\
      --init-prompt runs/kather/quiltnet/ce/16shot-seed1-0123456789       # TPT + CoOp
  calibprompt tpt --backbone quiltnet --dataset kather --root ~/data --method soc --tune auto  # lam, delta chosen

Default protocol (the published TPT protocol, --protocol published): 64 views (original + 63
RandomResizedCrop + flip + AugMix), 4 context vectors from "a photo of a", the 10% lowest-entropy
views, one AdamW step (lr 5e-3), fp16 autocast on CUDA, ECE with 20 bins. Regulariser weights:
C-TPT 50, O-TPT 18, SoC 50 with Huber delta 0.3 (SoC publishes none; chosen on the demo's
train split), A-TPT 80 (its fine-grained value; 10 under natural shift). Every method run with the same --seed sees the same cached
views; each method writes its own run directory, a finished one is skipped (--force), an
interrupted one resumes. --calib-per-class N also adapts a calibration split of the train pool
(temperature scaling is fitted there; calibrate needs it); --val-per-class N a tuning split,
on which --tune auto chooses lam (and SoC's delta): every candidate adapts it, scored by
--tune-metric (NLL by default).""",
    "certify": """examples:
  calibprompt certify --backbone plip --dataset kather --root ~/data --sigma 0.1 0.25 0.5 1.0
  calibprompt certify --backbone plip --dataset kather --root ~/data --prompt runs/kather/plip/ce/8shot-seed1-0123456789
  calibprompt certify --backbone demo --dataset demo --root demo_output/data --n 100 --n0 10 --subset 8
  calibprompt certify --backbone plip --dataset kather --root ~/data --test-time entropy+as --as-weight 1

Cohen et al.'s CERTIFY: n0 selection draws choose the class, n fresh draws bound its probability
(one-sided Clopper-Pearson at --alpha); the radius is sigma * PhiInv(p_lower), or the image is
abstained from when p_lower < 1/2. Noise is added in the [0, 1] pixel space at the backbone's
input resolution, before its normalisation, and seeded per (seed, image, sigma, draw): results do
not depend on --batch-size. Writes certification.csv (one row per image) and
certified_accuracy.png; metrics.json holds certified accuracy at radii 0-2.5, the abstention
rate and the calibration of the smoothed probabilities and of the vote share.""",
    "sweep": """examples:
  calibprompt sweep sweep.yaml
  calibprompt sweep sweep.yaml --out runs/paper

sweep.yaml:
  backbones: [quiltnet, {name: plip, weights: ~/models/plip}]
  datasets: [{name: kather, root: ~/data}]
  methods: [ce, ls, focal, mdca, calibprompt]
  seeds: [1, 2, 3]
  shots: 8                       # any run field, for every run
  grid:                          # the product over any run fields
    n_ctx: [4, 16]

`kind: tpt` sweeps test-time methods instead. The report covers the sweep's runs.""",
}


def cmd_train(args: argparse.Namespace) -> int:
    out_dir(args.out, "--out")
    config = config_from_args(PromptRunConfig, args, method=args.objective or args.method)
    print_run(execute_run(config, args.out, force=args.force))
    return 0


def cmd_zeroshot(args: argparse.Namespace) -> int:
    out_dir(args.out, "--out")
    print_run(execute_run(config_from_args(PromptRunConfig, args, method="zeroshot"), args.out, force=args.force))
    return 0


def cmd_tpt(args: argparse.Namespace) -> int:
    methods = list(dict.fromkeys(args.method))
    if len(methods) > 1 and (args.lam is not None or args.delta is not None):
        raise CLIError("--lam/--delta apply to one method; run the methods separately to set them")
    configs = [config_from_args(TPTRunConfig, args, method=method) for method in methods]
    for config in configs:  # every method's options are checked before the first one runs
        config.resolved()
    out_dir(args.out, "--out")
    for config in configs:
        print_run(execute_run(config, args.out, force=args.force), label=f"[bold]{config.method}[/]: ")
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    sigmas = list(dict.fromkeys(args.sigma))
    configs = [config_from_args(CertifyRunConfig, args, sigma=sigma) for sigma in sigmas]
    for config in configs:  # every sigma's options are checked before the first one runs
        config.validate()
    out_dir(args.out, "--out")
    for config in configs:
        result = execute_run(config, args.out, force=args.force)
        print_run(result, label=f"[bold]sigma {config.sigma:g}[/]: ")
        cert = result.metrics["certification"]
        radii = "  ".join(f"r={r}: {100 * a:.1f}%" for r, a in list(cert["certified_accuracy"].items())[:6])
        Console().print(f"  certified accuracy {radii}  |  abstained {100 * cert['abstention_rate']:.1f}%",
                        soft_wrap=True)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    console = Console()

    def progress(i, total, config, result):
        state = "skipped (finished)" if result.skipped else "done"
        ece = 100 * result.metrics["uncalibrated"]["ece"]
        console.print(f"[{i + 1}/{total}] {config.backbone} {config.dataset} {config.method} seed "
                      f"{config.seed}: {state}, ECE {ece:.2f}%  {result.directory.name}", soft_wrap=True)

    out_dir(args.out, "--out")
    results = run_sweep(args.file, out=args.out, force=args.force, on_run=progress, lockstep=args.lockstep,
                        executor=args.executor, address=args.address, ray_workers=args.ray_workers)
    console.print(f"{len(results)} runs; report written next to them")
    return 0


def register(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = add("train", "few-shot prompt tuning with a preset or any objective; writes a run directory", EXAMPLES["train"])
    add_config_options(p, PromptRunConfig)
    p.add_argument("--objective", help="an objective expression instead of --method")
    add_run_output_options(p)
    p.set_defaults(func=cmd_train)

    p = add("zeroshot", "zero-shot classification with the dataset's templates; writes a run directory",
            EXAMPLES["zeroshot"])
    add_config_options(p, PromptRunConfig, exclude=("method", *TRAINING_FIELDS))
    add_run_output_options(p)
    p.set_defaults(func=cmd_zeroshot)

    p = add("tpt", "test-time prompt tuning over a test set: TPT, C-TPT, O-TPT, SoC, A-TPT, TCA (or zero-shot)", EXAMPLES["tpt"])
    add_config_options(p, TPTRunConfig, exclude=("method",))
    method = TPTRunConfig.__dataclass_fields__["method"]
    p.add_argument("--method", nargs="+", default=[method.default], choices=list(method.metadata["choices"]),
                   help=f"one or more methods, each its own run directory (default: {method.default})")
    add_run_output_options(p)
    p.set_defaults(func=cmd_tpt)

    p = add("certify", "certified robustness by randomized smoothing of a prompted model (one run per sigma)",
            EXAMPLES["certify"])
    add_config_options(p, CertifyRunConfig, exclude=("sigma",))
    sigma = CertifyRunConfig.__dataclass_fields__["sigma"]
    p.add_argument("--sigma", type=float, nargs="+", default=[sigma.default],
                   help=f"one or more noise levels in the [0, 1] pixel space, each its own run (default: {sigma.default})")
    add_run_output_options(p)
    p.set_defaults(func=cmd_certify)

    p = add("sweep", "run a YAML grid of backbones x datasets x methods x seeds (resumable)", EXAMPLES["sweep"])
    p.add_argument("file", help="sweep YAML")
    p.add_argument("--out", help="runs directory (default: the file's 'out', else runs)")
    p.add_argument("--force", action="store_true", help="redo finished runs")
    p.add_argument("--lockstep", type=int, metavar="N",
                   help="at most N prompt-tuning runs per lockstep group (one text-encoder pass per step for the "
                        "group; 1 trains each run alone; results equal within float rounding) "
                        "(default: as many as fit a quarter of the free memory (CPU) or half (GPU), at most 64)")
    add_config_options(p, ExecutorOptions)
    p.set_defaults(func=cmd_sweep)
