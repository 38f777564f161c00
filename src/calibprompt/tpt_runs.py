"""Test-time prompt tuning over a test set: TPT, C-TPT, O-TPT, SoC (and zero-shot), resumable.

A TPT run directory (named after the effective configuration, like :mod:`calibprompt.runs`)::

    config.json          resolved config: method, regulariser weight, protocol, view cache tables,
                         package versions, metric convention
    parts/part-*.npz     logits of the images adapted so far (written atomically per batch group;
                         an interrupted run resumes after the last complete part)
    predictions.npz      test logits + labels
    metrics.json         test metrics at ``n_bins`` (20, as the TPT papers) -- written last
    reliability.png

The views come from :meth:`calibprompt.data.FeatureStore.test_time_views`, keyed by (image,
view, ``seed``): every method and every regulariser weight run with the same seed is evaluated
on identical views, and a second method re-encodes nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibprompt import losses
from calibprompt.methods.tpt import TPTConfig

__all__ = ["METHOD_DEFAULTS", "PROTOCOLS", "TPTRunConfig", "execute_tpt_run"]

#: Regulariser weights of the published methods; SoC's delta/lambda come from the sweep recorded
#: in docs/tpt.md (its paper does not publish them).
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "zeroshot": {},
    "tpt": {"lam": 0.0},
    "ctpt": {"lam": 50.0},
    "otpt": {"lam": 18.0},
    "otpt_fro": {"lam": 18.0},
    "soc": {"lam": 1.0, "delta": losses.SOC_DELTA},
}

#: Protocols: ``published`` is SPEC.md §7 as TPT runs its fine-grained datasets (AugMix views);
#: ``published-noaugmix`` as it runs the ImageNet variants (crop + flip only).
PROTOCOLS: dict[str, dict[str, Any]] = {
    "published": {"views": 64, "augmix": True, "selection": 0.1, "steps": 1, "lr": 5e-3,
                  "weight_decay": 0.01, "ctx_init": "a photo of a", "autocast": True, "n_bins": 20},
}
PROTOCOLS["published-noaugmix"] = {**PROTOCOLS["published"], "augmix": False}

#: Images per part file (the unit of resumption).
PART_IMAGES = 64

#: Fields that do not change a run's result.
NON_EFFECTIVE = ("device", "cache", "root", "progress", "workers", "batch_size", "protocol")


@dataclass(frozen=True)
class TPTRunConfig:
    """One test-time tuning run; ``None`` fields take the method's / protocol's default."""

    backbone: str
    dataset: str
    root: str
    method: str = "tpt"
    weights: str | None = None
    seed: int = 1
    protocol: str = "published"
    lam: float | None = None
    delta: float | None = None
    views: int | None = None
    augmix: bool | None = None
    selection: float | None = None
    steps: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    ctx_init: str | None = None
    autocast: bool | None = None
    n_bins: int | None = None
    init_prompt: str | None = None
    limit: int | None = None
    precision: str = "fp32"
    device: str = "cpu"
    cache: str | None = None
    workers: int | None = None
    batch_size: int = 16
    progress: bool = True

    def resolved(self) -> TPTRunConfig:
        """Every ``None`` filled from the protocol and the method; validated."""
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        if self.method not in METHOD_DEFAULTS:
            raise ValueError(f"method: expected one of {sorted(METHOD_DEFAULTS)}, got {self.method!r}")
        if self.method in ("zeroshot", "tpt") and self.lam not in (None, 0.0):
            raise ValueError(f"lam: {self.method} has no regulariser; --lam applies to ctpt, otpt, otpt_fro, soc")
        if self.method != "soc" and self.delta is not None:
            raise ValueError(f"delta: only SoC has a Huber threshold, not {self.method}")
        defaults = {**PROTOCOLS[self.protocol], "lam": 0.0, "delta": losses.SOC_DELTA,
                    **METHOD_DEFAULTS[self.method]}
        if self.method == "zeroshot":
            defaults["steps"] = 0
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        out = replace(self, **filled)
        if out.views < 1:
            raise ValueError(f"views: expected a positive integer, got {out.views}")
        if out.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {out.batch_size}")
        if out.limit is not None and out.limit < 1:
            raise ValueError(f"limit: expected a positive integer, got {out.limit}")
        if out.method == "zeroshot" and out.steps != 0:
            raise ValueError("steps: zero-shot takes no adaptation step")
        out.tpt_config()  # validates the algorithm's own fields
        return out

    def tpt_config(self) -> TPTConfig:
        return TPTConfig(method="tpt" if self.method == "zeroshot" else self.method, lam=self.lam,
                         delta=self.delta, selection=self.selection, steps=self.steps, lr=self.lr,
                         weight_decay=self.weight_decay, autocast=self.autocast)

    def effective(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in NON_EFFECTIVE}


def tpt_run_directory(out: Path, config: TPTRunConfig, dataset_fingerprint: str, backbone_fingerprint: str,
                      prompt_digest: str | None) -> Path:
    """``out/<dataset>/<backbone>/tpt-<method>/seed<seed>-<hash of the effective config>``."""
    from calibprompt.runs import config_digest, safe_name

    digest = config_digest({**config.effective(), "init_prompt_digest": prompt_digest},
                           dataset_fingerprint, backbone_fingerprint)
    return out / config.dataset / safe_name(config.backbone) / f"tpt-{config.method}" / f"seed{config.seed}-{digest}"


def _initial_learner(backbone: Any, classnames: list[str], config: TPTRunConfig):
    """The prompt every image starts from: ``ctx_init`` words, or a CoOp-tuned context (TPT + CoOp)
    read from a run directory or its ``prompt.safetensors``. Returns (learner, digest of the prompt)."""
    import hashlib

    from safetensors.torch import load_file

    from calibprompt.prompts import PromptLearner

    if config.init_prompt is None:
        return PromptLearner(backbone, classnames, init="words", init_words=config.ctx_init), None
    path = Path(config.init_prompt)
    tensor_file = path / "prompt.safetensors" if path.is_dir() else path
    if not tensor_file.is_file():
        raise ValueError(f"--init-prompt {path}: expected a finished prompt-tuning run directory or its "
                         "prompt.safetensors")
    run_config = {}
    if (tensor_file.parent / "config.json").is_file():
        run_config = json.loads((tensor_file.parent / "config.json").read_text()).get("config", {})
    try:
        ctx = load_file(str(tensor_file))["ctx"]
    except Exception as exc:
        raise ValueError(f"--init-prompt {tensor_file}: not a calibprompt prompt file ({exc})") from exc
    if ctx.ndim != 2 or run_config.get("class_specific"):
        raise ValueError(f"--init-prompt {tensor_file}: TPT needs one generic context (n_ctx, width); "
                         f"got shape {tuple(ctx.shape)}")
    if run_config.get("backbone") not in (None, config.backbone):
        raise ValueError(f"--init-prompt {tensor_file}: tuned on backbone {run_config['backbone']!r}, "
                         f"this run uses {config.backbone!r}")
    learner = PromptLearner(backbone, classnames, n_ctx=ctx.shape[0],
                            position=run_config.get("position", "end"))
    if learner.ctx.shape != ctx.shape:
        raise ValueError(f"--init-prompt {tensor_file}: context of shape {tuple(ctx.shape)} does not fit "
                         f"{config.backbone} (expected (n_ctx, {learner.ctx.shape[-1]}))")
    with torch.no_grad():
        learner.ctx.copy_(ctx)
    return learner, hashlib.sha256(ctx.float().numpy().tobytes()).hexdigest()[:16]


def _done_parts(parts: Path) -> dict[int, np.ndarray]:
    """Position -> logits of the images finished by an earlier (interrupted) call."""
    done: dict[int, np.ndarray] = {}
    for part in sorted(parts.glob("part-*.npz")):
        with np.load(part, allow_pickle=False) as data:
            done.update(zip(data["positions"].tolist(), data["logits"], strict=True))
    return done


def execute_tpt_run(config: TPTRunConfig, out: str | Path, force: bool = False):
    """Resolve, validate and run ``config`` over the test split under ``out``; a finished run is
    skipped unless ``force``; an interrupted one resumes after its last complete part."""
    from calibprompt.data import FeatureStore, load_dataset
    from calibprompt.io import atomic_path, write_json
    from calibprompt.methods.tpt import tpt_adapt
    from calibprompt.metrics import BINNING_CONVENTION, evaluate
    from calibprompt.plots import plot_reliability
    from calibprompt.progress import rate_progress
    from calibprompt.runs import RunResult, cached_backbone, package_versions

    out = Path(out)
    config = config.resolved()
    test = load_dataset(config.dataset, config.root, "test")
    backbone = cached_backbone(config.backbone, config.weights, config.device, config.precision)
    learner, prompt_digest = _initial_learner(backbone, list(test.classnames), config)
    directory = tpt_run_directory(out, config, test.fingerprint, backbone.fingerprint, prompt_digest)
    if (directory / "metrics.json").is_file() and not force:
        return RunResult(directory, json.loads((directory / "metrics.json").read_text()), skipped=True)
    parts = directory / "parts"
    if force and directory.exists():
        (directory / "metrics.json").unlink(missing_ok=True)
        for part in parts.glob("part-*.npz"):
            part.unlink()

    paths = test.paths[: config.limit] if config.limit else test.paths
    store = FeatureStore(config.cache)
    views = store.test_time_views(backbone, paths, config.views, augmix=config.augmix, aug_seed=config.seed,
                                  num_workers=config.workers, progress=config.progress)
    directory.mkdir(parents=True, exist_ok=True)
    parts.mkdir(exist_ok=True)
    write_json(directory / "config.json", {
        "config": asdict(config), "effective": config.effective(), "tpt": config.tpt_config().to_dict(),
        "versions": package_versions(), "metric_convention": BINNING_CONVENTION,
        "backbone_fingerprint": backbone.fingerprint, "test_fingerprint": test.fingerprint,
        "init_prompt_digest": prompt_digest, "cache_tables": views.tables,
        "test_images": len(views.index), "excluded_test_images": [list(e) for e in views.excluded],
    })

    done = _done_parts(parts)
    todo = [p for p in range(len(views.index)) if p not in done]
    tpt = config.tpt_config()
    group = max(config.batch_size, PART_IMAGES)
    start = time.perf_counter()
    with rate_progress(config.progress) as bar:
        task = bar.add_task(f"{config.method} on {config.dataset}", total=len(views.index),
                            completed=len(done), rate="-")
        for g in range(0, len(todo), group):
            chunk = todo[g: g + group]
            logits = []
            for b in range(0, len(chunk), config.batch_size):
                batch = chunk[b: b + config.batch_size]
                out_logits, _ = tpt_adapt(learner, views.features[batch], tpt)
                logits.append(out_logits.double().cpu().numpy())
                rate = (g + b + len(batch)) / max(time.perf_counter() - start, 1e-9)
                bar.update(task, advance=len(batch), rate=f"{rate:.2f}")
            with atomic_path(parts / f"part-{chunk[0]:07d}.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, positions=np.asarray(chunk), logits=np.concatenate(logits))
            done.update(zip(chunk, np.concatenate(logits), strict=True))
    seconds = time.perf_counter() - start

    test_logits = np.stack([done[p] for p in range(len(views.index))])
    test_labels = test.labels[views.index]
    with atomic_path(directory / "predictions.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, test_logits=test_logits, test_labels=test_labels)
    probs = torch.softmax(torch.from_numpy(test_logits), -1).numpy()
    metrics = {
        "uncalibrated": evaluate(probs, test_labels, n_bins=config.n_bins),
        "n_bins": config.n_bins,
        "adapted_images": len(todo),
        "images_per_second": len(todo) / seconds if todo and seconds > 0 else None,
        "excluded_test_images": [list(e) for e in views.excluded],
    }
    plot_reliability(probs, test_labels, n_bins=config.n_bins, path=directory / "reliability.png",
                     title=f"{config.backbone} / {config.dataset} / {config.method}, seed {config.seed}")
    write_json(directory / "metrics.json", metrics)
    return RunResult(directory, metrics, skipped=False)
