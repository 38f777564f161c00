"""The ``calibprompt`` command line: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from calibprompt import __version__

EXAMPLES = {
    "metrics": """examples:
  calibprompt metrics predictions.npz
  calibprompt metrics predictions.npz --n-bins 10 --bootstrap 1000 --plot reliability.png
  calibprompt metrics predictions.npz --calibrate temperature --fit-on validation.npz

The .npz file holds `labels` (N,) and either `logits` or `probs` (N, K).""",
    "losses": """examples:
  calibprompt losses""",
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

Manifests are drawn from the sorted train listing with the given seed, so they are identical on
every machine; existing manifests are validated and reused.""",
    "train": """examples:
  calibprompt train --backbone quiltnet --dataset kather --root ~/data --shots 8 --seed 1 --method calibprompt
  calibprompt train --backbone plip --weights ~/models/plip --dataset pannuke --root ~/data \\
      --objective "ls(alpha=0.2) + smac(alpha=0.2) + 0.1*as"
  calibprompt train --backbone demo --dataset demo --root demo_output/data --method ce --epochs 10

Methods (presets): ce, ls, focal, mdca, dca, mmce, mbls, logitnorm, zsnorm, penalty, smac,
calibprompt (paper's alpha/weight per backbone+dataset; override with --alpha/--weight).
A finished run is skipped (--force redoes it); an interrupted one resumes.""",
    "tpt": """examples:
  calibprompt tpt --backbone quiltnet --dataset kather --root ~/data --method tpt ctpt otpt soc
  calibprompt tpt --backbone demo --dataset demo --root demo_output/data --method zeroshot tpt ctpt
  calibprompt tpt --backbone plip --weights ~/models/plip --dataset covid --root ~/data \
      --method soc --lam 10 --delta 0.5 --seed 2
  calibprompt tpt --backbone quiltnet --dataset kather --root ~/data --method tpt \
      --init-prompt runs/kather/quiltnet/ce/16shot-seed1-0123456789       # TPT + CoOp

Default protocol (the published TPT protocol, --protocol published): 64 views (original + 63 RandomResizedCrop +
flip + AugMix), 4 context vectors from "a photo of a", the 10%% lowest-entropy views, one AdamW
step (lr 5e-3), fp16 autocast on CUDA, ECE with 20 bins. Regulariser weights: C-TPT 50, O-TPT 18,
SoC see docs/tpt.md. Every method run with the same --seed sees the same cached views; each
method writes its own run directory, a finished one is skipped (--force), an interrupted one
resumes.""",
    "zeroshot": """examples:
  calibprompt zeroshot --backbone quiltnet --dataset kather --root ~/data
  calibprompt zeroshot --backbone demo --dataset demo --root demo_output/data --out runs""",
    "evaluate": """examples:
  calibprompt evaluate runs/kather/quiltnet/calibprompt/8shot-seed1-0123456789 --n-bins 20
  calibprompt evaluate RUN_DIR --bootstrap 1000
  calibprompt evaluate RUN_DIR --dataset imagefolder --root ~/site_b      # external validation

External results go to RUN_DIR/external/<dataset>-<split>-<id>/ (predictions, metrics with and
without the run's temperature, reliability diagram).""",
    "predict": """examples:
  calibprompt predict runs/kather/quiltnet/calibprompt/8shot-seed1-0123456789 new_patches/ --out preds
  calibprompt predict RUN_DIR a.png b.png --out preds --device cuda

Writes OUT/predictions.csv (path, predicted_class, p_uncalibrated[<class>]..., and
p_temperature_scaled[<class>]... when the run has a fitted temperature) and OUT/predict.json.""",
    "calibrate": """examples:
  calibprompt calibrate RUN_DIR --calibrator temperature
  calibprompt calibrate RUN_DIR --calibrator isotonic

Fits on the run's validation logits (never test) and writes calibration_<name>.json.
Test-time (tpt) runs have validation logits only when run with --val-per-class N.""",
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
    "report": """examples:
  calibprompt report runs/
  calibprompt report runs/ --out reports/ --bootstrap 1000
  calibprompt report runs/ --baseline ce --n-bins 10

Runs are averaged only when they differ in their seed alone; rows name the settings that vary.""",
    "demo": """examples:
  calibprompt demo
  calibprompt demo --out demo_output --seeds 1 2 3
  calibprompt demo --simulated      # post-hoc calibrators on simulated logits""",
}


class CLIError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def _load_predictions(path: str, what: str, prefix: str = "") -> tuple[np.ndarray, np.ndarray, bool]:
    """(scores, labels, are_logits) from an .npz file with labels and logits or probs -- or a run's
    own ``predictions.npz`` (or its directory), whose arrays are ``test_logits`` / ``test_labels``
    (``prefix="val_"`` reads its validation arrays)."""
    file = Path(path)
    if file.is_dir() and (file / "predictions.npz").is_file():
        file = file / "predictions.npz"
    if not file.is_file():
        raise CLIError(f"{what} {path}: file not found")
    try:
        with np.load(file, allow_pickle=False) as data:
            keys = set(data.files)
            run_file = "test_logits" in keys
            if run_file or prefix:
                split = prefix or "test_"
                if f"{split}logits" not in keys:
                    raise CLIError(f"{what} {path}: this run's predictions have no {split[:-1]} split "
                                   f"(arrays: {sorted(keys)}); test-time runs have one when run with "
                                   "--val-per-class N")
                return data[f"{split}logits"], data[f"{split}labels"], True
            if "labels" not in keys or not ({"logits", "probs"} & keys):
                raise CLIError(
                    f"{what} {path}: expected arrays 'labels' and 'logits' or 'probs' (or a run's "
                    f"'test_logits' and 'test_labels'), found {sorted(keys) or 'none'}"
                )
            labels = data["labels"]
            if "logits" in keys:
                return data["logits"], labels, True
            return data["probs"], labels, False
    except (OSError, ValueError) as exc:
        raise CLIError(f"{what} {path}: not a readable .npz file ({exc})") from exc


def _cmd_metrics(args: argparse.Namespace) -> int:
    from scipy.special import softmax

    from calibprompt.calibrators import CALIBRATORS
    from calibprompt.files import write_json
    from calibprompt.metrics import evaluate
    from calibprompt.plots import plot_reliability

    scores, labels, are_logits = _load_predictions(args.predictions, "predictions")
    if args.calibrate:
        if not are_logits:
            raise CLIError(f"--calibrate needs logits, but {args.predictions} holds probs")
        fit_on = args.fit_on
        if not fit_on:
            if not _is_run_predictions(args.predictions):
                raise CLIError("--calibrate needs --fit-on FILE.npz (a labelled set other than the test set)")
            fit_scores, fit_labels, fit_logits = _load_predictions(args.predictions, "--calibrate", "val_")
        else:  # a run's predictions file is fitted on its validation arrays, never its test arrays
            fit_scores, fit_labels, fit_logits = _load_predictions(
                fit_on, "--fit-on", "val_" if _is_run_predictions(fit_on) else "")
        if not fit_logits:
            raise CLIError(f"--fit-on {args.fit_on}: must hold logits")
        calibrator = CALIBRATORS[args.calibrate]().fit(fit_scores, fit_labels)
        probs = calibrator.transform(scores)
    else:
        probs = softmax(np.asarray(scores, dtype=np.float64), axis=1) if are_logits else scores
        calibrator = None
    result = evaluate(probs, labels, n_bins=args.n_bins)
    if calibrator is not None:
        result["calibrator"] = calibrator.to_dict()
    if args.bootstrap:
        _add_intervals(result, probs, labels, args.bootstrap, args.n_bins, args.seed)
    _print_metrics(result)
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot_reliability(probs, labels, n_bins=args.n_bins, path=args.plot,
                         bootstrap=args.bootstrap, seed=args.seed)
    return 0


def _is_run_predictions(path: str) -> bool:
    file = Path(path)
    file = file / "predictions.npz" if file.is_dir() else file
    try:
        with np.load(file, allow_pickle=False) as data:
            return "test_logits" in data.files
    except (OSError, ValueError):
        return False


def _add_intervals(result: dict, probs, labels, n_resamples: int, n_bins: int, seed: int = 0) -> None:
    """95% stratified-bootstrap intervals of the headline metrics, as ``<name>_ci``."""
    from calibprompt.metrics import bootstrap

    for name in ("ece", "accuracy", "nll", "brier"):
        ci = bootstrap(name, probs, labels, n_resamples=n_resamples, seed=seed, n_bins=n_bins)
        result[f"{name}_ci"] = [ci.low, ci.high]


def _print_metrics(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"N = {result['n_samples']}, K = {result['n_classes']}, "
                        f"{result['n_bins']} bins")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI", justify="right")
    percent = {"accuracy", "macro_f1", "ece", "mce", "ace", "classwise_ece",
               "top_label_equal_mass_ece", "smooth_ece", "aurc", "auroc"}
    for name, value in result.items():
        if not isinstance(value, float) or name.endswith("_bandwidth"):
            continue
        scale, unit = (100.0, " %") if name in percent else (1.0, "")
        ci = result.get(f"{name}_ci")
        ci_text = f"[{scale * ci[0]:.2f}, {scale * ci[1]:.2f}]" if ci else ""
        table.add_row(name + unit, f"{scale * value:.4f}" if scale == 1 else f"{scale * value:.2f}", ci_text)
    Console().print(table)


def _cmd_losses(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from calibprompt.objective import PRESETS, describe_losses

    table = Table(title="registered loss terms (use in --objective, e.g. 'ls(alpha=0.1) + smac(alpha=0.1) + 3*as')")
    for col in ("name", "inputs", "keywords", "summary"):
        table.add_column(col)
    for row in describe_losses():
        keywords = ", ".join(f"{k}={v!r}" for k, v in row["keywords"].items())
        table.add_row(row["name"], ", ".join(row["inputs"]), keywords, row["summary"])
    console = Console()
    console.print(table)
    presets = Table(title="presets")
    presets.add_column("name")
    presets.add_column("objective")
    for name, expr in PRESETS.items():
        presets.add_row(name, expr)
    console.print(presets)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from rich.console import Console

    from calibprompt.backbones import load_backbone
    from calibprompt.data import FeatureStore, SplitManifest, load_dataset

    console = Console()
    dataset = load_dataset(args.dataset, args.root, args.split)
    if args.manifest:
        dataset = SplitManifest.load(args.manifest).subset_of(dataset)
    backbone = load_backbone(args.backbone, weights=args.weights, device=args.device,
                             precision=args.precision)
    store = FeatureStore(args.cache)
    kwargs = {"batch_size": args.batch_size, "num_workers": args.workers, "strict": args.strict}
    result = store.features(backbone, dataset.paths, **kwargs)
    console.print(f"[bold]{backbone.name}[/] on {dataset.name}/{dataset.split}: {len(result.index)} "
                  f"images — {result.encoded} encoded, {result.reused} already cached")
    excluded = list(result.excluded) + [(str(dataset.root / f), r) for f, r in dataset.excluded]
    if args.views:
        bank = store.view_bank(backbone, dataset.paths, views=args.views, aug_seed=args.aug_seed, **kwargs)
        console.print(f"{args.views} augmented views: {bank.encoded} encoded, {bank.reused} cached")
        excluded += [e for e in bank.excluded if e not in excluded]
    for table in result.tables:
        console.print(f"cache: {table}")
    if excluded:
        console.print(f"[yellow]{len(excluded)} file(s) excluded:[/]")
        for path, reason in excluded:
            console.print(f"  {path}: {reason}")
    return 0


def _cmd_splits(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from calibprompt.data import few_shot, load_dataset, validation_split

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
        if args.validation:
            vpath = out / f"{args.dataset}_{args.shots}shot_seed{seed}_validation.json"
            val = validation_split(train, exclude=shots, per_class=args.val_per_class, seed=seed,
                                   strict=args.strict, manifest_path=vpath)
            vcounts = np.bincount(val.labels, minlength=len(val.classnames)).tolist()
            table.add_row(str(seed), "validation", str(len(val)), str(vcounts), str(vpath))
    Console().print(table)
    return 0


def _run_config(args: argparse.Namespace, method: str):
    from calibprompt.runs import PromptRunConfig

    training = {k: getattr(args, k) for k in ("shots", "n_ctx", "init", "position", "class_specific", "views",
                                              "epochs", "lr", "alpha", "weight") if hasattr(args, k)}
    return PromptRunConfig(
        backbone=args.backbone, dataset=args.dataset, root=args.root, method=method, weights=args.weights,
        seed=args.seed, n_bins=args.n_bins, val_per_class=args.val_per_class, precision=args.precision,
        device=args.device, cache=args.cache, workers=args.workers, progress=not args.quiet, **training,
    )


def _summary_line(metrics: dict) -> str:
    u = metrics["uncalibrated"]
    line = (f"accuracy {100 * u['accuracy']:.2f}%  ECE({u['n_bins']} bins) {100 * u['ece']:.2f}%  "
            f"MCE {100 * u['mce']:.2f}%  NLL {u['nll']:.4f}")
    if "temperature_scaled" in metrics:
        t = metrics["temperature_scaled"]
        line += f"  |  after TS (T={metrics['temperature']:.3f}): ECE {100 * t['ece']:.2f}%  NLL {t['nll']:.4f}"
    return line


def _print_run(result, label: str = "") -> None:
    from rich.console import Console

    console = Console()
    state = "[yellow]already finished[/] (use --force to redo) " if result.skipped else ""
    rate = result.metrics.get("images_per_second")
    speed = f"  ({rate:.1f} img/s)" if rate and not result.skipped else ""
    console.print(f"{state}{label}{_summary_line(result.metrics)}{speed}")
    console.print(f"run directory: {result.directory}")


def _out_dir(path: str | None, flag: str) -> None:
    """An output directory must be a directory (or not exist yet): checked before any work."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise CLIError(f"{flag} {path}: exists and is not a directory; expected an output directory")


def _cmd_train(args: argparse.Namespace) -> int:
    from calibprompt.runs import execute_run

    _out_dir(args.out, "--out")
    method = args.objective or args.method
    _print_run(execute_run(_run_config(args, method), args.out, force=args.force))
    return 0


def _cmd_zeroshot(args: argparse.Namespace) -> int:
    from calibprompt.runs import execute_run

    _out_dir(args.out, "--out")
    _print_run(execute_run(_run_config(args, "zeroshot"), args.out, force=args.force))
    return 0


def _cmd_tpt(args: argparse.Namespace) -> int:
    from calibprompt.runs import TPTRunConfig, execute_run

    methods = list(dict.fromkeys(args.method))
    if len(methods) > 1 and (args.lam is not None or args.delta is not None):
        raise CLIError("--lam/--delta apply to one method; run the methods separately to set them")
    configs = [TPTRunConfig(
        backbone=args.backbone, dataset=args.dataset, root=args.root, method=method,
        weights=args.weights, seed=args.seed, protocol=args.protocol, lam=args.lam, delta=args.delta,
        views=args.views, augmix=args.augmix, selection=args.selection, steps=args.steps, lr=args.lr,
        ctx_init=args.ctx_init, autocast=args.autocast, n_bins=args.n_bins, init_prompt=args.init_prompt,
        limit=args.limit, val_per_class=args.val_per_class, precision=args.precision, device=args.device,
        cache=args.cache, workers=args.workers, batch_size=args.batch_size, progress=not args.quiet,
    ) for method in methods]
    for config in configs:  # every method's options are checked before the first one runs
        config.resolved()
    _out_dir(args.out, "--out")
    for config in configs:
        _print_run(execute_run(config, args.out, force=args.force), label=f"[bold]{config.method}[/]: ")
    return 0


def _load_run(path: str):
    from calibprompt.runs import load_run

    try:
        return load_run(path)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from scipy.special import softmax

    from calibprompt.files import write_json
    from calibprompt.metrics import evaluate

    run = _load_run(args.run)
    if args.n_bins is not None and args.n_bins < 1:
        raise CLIError(f"--n-bins {args.n_bins}: expected a positive integer")
    if args.dataset or args.root:
        if not (args.dataset and args.root):
            raise CLIError("external evaluation needs both --dataset and --root")
        result = run.evaluate(args.dataset, args.root, split=args.split, n_bins=args.n_bins, device=args.device,
                              cache=args.cache, workers=args.workers, progress=not args.quiet, force=args.force,
                              weights=args.weights)
        _print_run(result, label=f"{run.method} on {args.dataset} ({args.split}): ")
        return 0
    preds = run.predictions()
    n_bins = args.n_bins or run.metrics.get("n_bins", 15)
    probs = softmax(preds["test_logits"], axis=1)
    result = evaluate(probs, preds["test_labels"], n_bins=n_bins)
    if args.bootstrap:
        _add_intervals(result, probs, preds["test_labels"], args.bootstrap, n_bins)
    _print_metrics(result)
    write_json(run.directory / f"metrics_{n_bins}bins.json", result)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from calibprompt.calibrators import CALIBRATORS
    from calibprompt.files import write_json
    from calibprompt.metrics import evaluate

    run = _load_run(args.run)
    preds = run.predictions()
    if "val_logits" not in preds:
        how = ("rerun it with --val-per-class N to adapt a validation split of the train pool too"
               if run.kind == "tpt" else "rerun it with this version of calibprompt")
        raise CLIError(f"{run.directory}: the run has no validation predictions to fit a calibrator on; {how}")
    calibrator = CALIBRATORS[args.calibrator]().fit(preds["val_logits"], preds["val_labels"])
    result = evaluate(calibrator.transform(preds["test_logits"]), preds["test_labels"], n_bins=args.n_bins)
    result["calibrator"] = calibrator.to_dict()
    result["fitted_on"] = f"validation split ({len(preds['val_labels'])} images)"
    _print_metrics(result)
    write_json(run.directory / f"calibration_{args.calibrator}.json", result)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from rich.console import Console

    from calibprompt.runs import collect_images
    from calibprompt.runs.apply import write_prediction_files

    run = _load_run(args.run)
    _out_dir(args.out, "--out")
    collect_images(args.images)  # bad paths fail before the backbone is loaded
    result = run.predict(args.images, device=args.device, cache=args.cache, workers=args.workers,
                         progress=not args.quiet, weights=args.weights)
    written = write_prediction_files(result, run, args.out)
    console = Console()
    calibrated = ("with temperature-scaled probabilities (T fitted on the run's "
                  f"{result.calibrator.get('split', 'validation')} split)" if result.calibrator else
                  "uncalibrated probabilities only (the run has no fitted calibrator)")
    console.print(f"{len(result.paths)} image(s) classified, {calibrated}: {written['csv']}")
    for path, reason in result.excluded:
        console.print(f"[yellow]excluded[/] {path}: {reason}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from rich.console import Console

    from calibprompt.runs import run_sweep

    console = Console()

    def progress(i, total, config, result):
        state = "skipped (finished)" if result.skipped else "done"
        ece = 100 * result.metrics["uncalibrated"]["ece"]
        console.print(f"[{i + 1}/{total}] {config.backbone} {config.dataset} {config.method} seed "
                      f"{config.seed}: {state}, ECE {ece:.2f}%  {result.directory.name}")

    _out_dir(args.out, "--out")
    results = run_sweep(args.file, out=args.out, force=args.force, on_run=progress)
    console.print(f"{len(results)} runs; report written next to them")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from calibprompt.runs import write_report

    _out_dir(args.out or args.runs, "--out" if args.out else "RUNS")
    written = write_report(args.runs, out=args.out, n_resamples=args.bootstrap, n_bins=args.n_bins,
                           baseline=args.baseline)
    Console().print(written["markdown"].read_text())
    figures = [k for k in written if k.startswith("reliability_")]
    Console().print(f"written: {written['markdown']}, {written['csv']}, {written['latex']} and "
                    f"{len(figures)} reliability diagram(s)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    _out_dir(args.out, "--out")
    if args.simulated:
        from calibprompt.demo.calibration import run_calibration_demo

        result = run_calibration_demo(args.out, seed=args.seed)
        table = Table(title="simulated overconfident 9-class model (T_true = 3), calibrators fitted "
                            "on 50 samples, test N = 5000")
        for col in ("method", "acc %", "ECE %", "ECE CI", "MCE %", "ACE %", "Brier", "NLL"):
            table.add_column(col, justify="right" if col != "method" else "left")
        for name, row in result.rows.items():
            lo, hi = row["ece_ci"]
            table.add_row(name, f"{100 * row['accuracy']:.2f}", f"{100 * row['ece']:.2f}",
                          f"{100 * lo:.1f}–{100 * hi:.1f}", f"{100 * row['mce']:.2f}",
                          f"{100 * row['ace']:.2f}", f"{row['brier']:.4f}", f"{row['nll']:.4f}")
        console.print(table)
        console.print(f"fitted temperature T = {result.temperature:.3f} (true 3.0)")
        console.print(f"results.json and reliability diagrams written to {result.out_dir}/")
        return 0

    from calibprompt.demo.pipeline import DEMO_METHODS, run_demo

    with console.status("demo: generating data, encoding once, tuning prompts over seeds ..."):
        report = run_demo(args.out, seeds=args.seeds, epochs=args.epochs, progress=False)
    table = Table(title=f"embedded demo model — {report.n_test} test patches, mean ± std over seeds "
                        f"{list(args.seeds)}, 8 shots/class, 15-bin ECE")
    table.add_column("method", no_wrap=True)
    for col in ("acc %", "ECE %", "MCE %", "ACE %", "Brier", "NLL"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in report.rows:  # mean ± std of accuracy and ECE; means elsewhere (all in report.md)
        for variant, suffix in (("uncalibrated", ""), ("temperature_scaled", " + TS")):
            stats = {k.split(".", 1)[1]: v for k, v in row.stats.items() if k.startswith(variant + ".")}
            if not stats:
                continue
            cells = [f"{100 * stats[k]['mean']:.1f}±{100 * stats[k]['std']:.1f}" for k in ("accuracy", "ece")]
            cells += [f"{100 * stats[k]['mean']:.1f}" for k in ("mce", "ace")]
            cells += [f"{stats[k]['mean']:.3f}" for k in ("brier", "nll")]
            table.add_row(DEMO_METHODS.get(row.method, row.method) + suffix, *cells)
    console.print(table)
    console.print(f"runs in {report.out_dir / 'runs'}; report.md, report.csv, report_per_class.csv, report.tex and "
                  f"reliability "
                  f"diagrams in {report.out_dir}/ ({report.seconds:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calibprompt",
        description="Calibration-aware prompt tuning and calibration metrics for medical VLMs.",
    )
    parser.add_argument("--version", action="version", version=f"calibprompt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("metrics", "calibration metrics of saved predictions (optionally post-hoc calibrated)")
    p.add_argument("predictions", help=".npz with 'labels' and 'logits' or 'probs'")
    p.add_argument("--n-bins", type=int, default=15, help="bins of ECE/MCE/ACE (default 15)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="stratified bootstrap resamples for 95%% intervals (default: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--calibrate", choices=["temperature", "vector", "matrix", "histogram", "isotonic"],
                   help="fit this post-hoc calibrator on --fit-on, apply it before measuring")
    p.add_argument("--fit-on", metavar="FILE", help=".npz of labelled logits to fit the calibrator on")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a reliability diagram (PNG)")
    p.set_defaults(func=_cmd_metrics)

    p = add("losses", "list the registered loss terms and objective presets")
    p.set_defaults(func=_cmd_losses)

    p = add("extract", "encode a dataset's images once into the feature cache")
    p.add_argument("--backbone", required=True, help="plip, quiltnet, biomedclip, medclip, clip:<arch>")
    p.add_argument("--weights", help="hub id, local directory or file (default: the family's hub id)")
    p.add_argument("--dataset", required=True, help="covid, rsna18, kather, pannuke, digestpath, imagefolder, csv")
    p.add_argument("--root", required=True, help="dataset root (ROOT or ROOT/<dataset dir>)")
    p.add_argument("--split", default="test", help="train or test (default test)")
    p.add_argument("--manifest", help="restrict to the files of a split manifest (JSON)")
    p.add_argument("--views", type=int, default=0, help="also cache this many augmented views per image")
    p.add_argument("--aug-seed", type=int, default=0, help="seed of the augmented views (default 0)")
    p.add_argument("--cache", help="feature cache directory")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores - 1, max 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--strict", action="store_true", help="abort on the first unreadable image")
    p.set_defaults(func=_cmd_extract)

    p = add("splits", "draw reproducible few-shot (and validation) split manifests")
    p.add_argument("--dataset", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--shots", type=int, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", default="splits", help="directory for the manifests (default splits/)")
    p.add_argument("--validation", action="store_true", help="also draw a validation split per seed")
    p.add_argument("--val-per-class", type=int, default=None, help="validation images per class")
    p.add_argument("--strict", action="store_true", help="fail on small classes and unreadable images")
    p.set_defaults(func=_cmd_splits)

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backbone", required=True, help="plip, quiltnet, biomedclip, medclip, clip:<arch>, demo")
        p.add_argument("--weights", help="hub id, local directory or file (default: the family's hub id)")
        p.add_argument("--dataset", required=True, help="covid, rsna18, kather, pannuke, digestpath, demo, imagefolder")
        p.add_argument("--root", required=True, help="dataset root")
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--out", default="runs", help="runs directory (default runs/)")
        p.add_argument("--n-bins", type=int, default=15)
        p.add_argument("--cache", help="feature cache directory")
        p.add_argument("--workers", type=int, default=None)
        p.add_argument("--device", default="cpu")
        p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
        p.add_argument("--val-per-class", type=int, default=None, metavar="N",
                       help="validation images per class for temperature scaling (default: max(4, 64/classes); "
                            "tpt: none unless given)")
        p.add_argument("--force", action="store_true", help="redo a finished run")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = add("train", "few-shot prompt tuning with a preset or any objective; writes a run directory")
    run_options(p)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--method", default="calibprompt", help="preset name (default calibprompt)")
    p.add_argument("--objective", help="an objective expression instead of --method")
    p.add_argument("--alpha", type=float, help="calibprompt/smac presets: LS = SMAC alpha")
    p.add_argument("--weight", type=float, help="calibprompt preset: angular separation weight")
    p.add_argument("--n-ctx", type=int, default=16)
    p.add_argument("--init", default="random", choices=["random", "words"])
    p.add_argument("--position", default="end", choices=["end", "middle", "front"])
    p.add_argument("--class-specific", action="store_true")
    p.add_argument("--views", type=int, default=50, help="augmented views per training image (default 50)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.002)
    p.set_defaults(func=_cmd_train)

    p = add("zeroshot", "zero-shot classification with the dataset's templates; writes a run directory")
    run_options(p)
    p.set_defaults(func=_cmd_zeroshot)

    p = add("tpt", "test-time prompt tuning over a test set: TPT, C-TPT, O-TPT, SoC (or zero-shot)")
    run_options(p)
    p.set_defaults(n_bins=None)
    p.add_argument("--method", nargs="+", default=["tpt"],
                   choices=["zeroshot", "tpt", "ctpt", "otpt", "otpt_fro", "soc"],
                   help="one or more methods, each its own run directory (default tpt)")
    p.add_argument("--protocol", default="published", choices=["published", "published-noaugmix"])
    p.add_argument("--lam", type=float, help="regulariser weight (default: C-TPT 50, O-TPT 18, SoC docs/tpt.md)")
    p.add_argument("--delta", type=float, help="SoC Huber threshold")
    p.add_argument("--views", type=int, help="views per image incl. the original (default 64)")
    p.add_argument("--augmix", action=argparse.BooleanOptionalAction, default=None,
                   help="AugMix on the augmented views (default: on)")
    p.add_argument("--selection", type=float, help="fraction of lowest-entropy views kept (default 0.1)")
    p.add_argument("--steps", type=int, help="AdamW steps per image (default 1)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 5e-3)")
    p.add_argument("--ctx-init", help='initial context words (default "a photo of a")')
    p.add_argument("--init-prompt", metavar="RUN_OR_FILE",
                   help="start from a CoOp-tuned context: a train run directory or its prompt.safetensors")
    p.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                   help="fp16 autocast on CUDA as the published code (default: on)")
    p.add_argument("--batch-size", type=int, default=16, help="images adapted at once (default 16)")
    p.add_argument("--limit", type=int, help="only the first N test images")
    p.set_defaults(func=_cmd_tpt)

    p = add("evaluate", "recompute a run's test metrics (e.g. other bins), or evaluate it on another dataset")
    p.add_argument("run", help="a run directory (any method)")
    p.add_argument("--n-bins", type=int, default=None, help="bins of ECE/MCE/ACE (default: the run's)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N", help="bootstrap resamples for 95%% intervals")
    p.add_argument("--dataset", help="external validation: the dataset to apply the run to (same classes)")
    p.add_argument("--root", help="external validation: that dataset's root")
    p.add_argument("--split", default="test", help="external validation: the split to use (default test)")
    p.add_argument("--device", default=None, help="device for external validation (default: the run's)")
    p.add_argument("--weights", help="the run's backbone weights, if they moved (default: the path the run recorded)")
    p.add_argument("--cache", help="feature cache directory (default: the run's)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--force", action="store_true", help="redo a finished external evaluation")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_evaluate)

    p = add("predict", "apply a finished run to new images; writes OUT/predictions.csv")
    p.add_argument("run", help="a run directory (any method)")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="directory for predictions.csv and predict.json")
    p.add_argument("--device", default=None, help="device (default: the run's)")
    p.add_argument("--weights", help="the run's backbone weights, if they moved (default: the path the run recorded)")
    p.add_argument("--cache", help="feature cache directory (default: the run's)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_predict)

    p = add("calibrate", "fit a post-hoc calibrator on a run's validation logits, evaluate on test")
    p.add_argument("run", help="a run directory")
    p.add_argument("--calibrator", default="temperature",
                   choices=["temperature", "vector", "matrix", "histogram", "isotonic"])
    p.add_argument("--n-bins", type=int, default=15)
    p.set_defaults(func=_cmd_calibrate)

    p = add("sweep", "run a YAML grid of backbones x datasets x methods x seeds (resumable)")
    p.add_argument("file", help="sweep YAML")
    p.add_argument("--out", help="runs directory (default: the file's 'out' or runs/)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_sweep)

    p = add("report", "tables over run directories: mean ± std across seeds, bootstrap CIs, diagrams")
    p.add_argument("runs", help="directory containing run directories")
    p.add_argument("--out", help="where to write report.md / report.csv (default: RUNS)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    p.add_argument("--n-bins", type=int, default=15, help="bins of every number in the report (default 15)")
    p.add_argument("--baseline", metavar="METHOD",
                   help="add each row's difference to this method (paired bootstrap over the same test set and seeds)")
    p.set_defaults(func=_cmd_report)

    p = add("demo", "run the offline demo on the embedded model and write its report")
    p.add_argument("--out", default="demo_output", help="output directory (default demo_output)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=int, default=50, help="prompt-tuning epochs (default 50)")
    p.add_argument("--simulated", action="store_true",
                   help="instead: the calibrator demo on simulated overconfident logits")
    p.add_argument("--seed", type=int, default=0, help="seed of the --simulated demo")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except CLIError as exc:
        print(f"calibprompt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # validation errors of the library name the bad input
        print(f"calibprompt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"calibprompt {args.command}: interrupted; finished runs are kept and an unfinished one "
              "resumes when the same command is run again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
