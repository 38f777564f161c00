"""Run directories: one few-shot prompt-tuning (or zero-shot) run, resolved, executed, recorded.

A run directory is named after its *effective* configuration (a changed hyperparameter is a new
directory, never a resumed old one) and holds::

    config.json          resolved config: every hyperparameter, seed, split manifests, cache keys,
                         package versions, metric convention
    splits/              the few-shot and validation manifests used
    checkpoint.*         (while training) context + optimizer state after the last finished epoch
    prompt.safetensors   the learned context
    predictions.npz      test logits + labels, validation logits + labels
    log.json             per-epoch loss terms, lr, accuracy
    metrics.json         test metrics, uncalibrated and after temperature scaling (written last:
                         its presence marks a finished run)
    reliability.png

Everything is validated before the directory is created, so a bad argument leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import platform
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibprompt.methods.coop import TrainConfig

__all__ = ["RunConfig", "RunResult", "cached_backbone", "config_digest", "execute_run", "package_versions",
           "run_directory", "safe_name"]

#: Fields that do not change a run's result (where it runs, where caches live).
NON_EFFECTIVE = ("device", "cache", "root", "progress", "workers")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (the same schema as the CLI flags and config.json)."""

    backbone: str
    dataset: str
    root: str
    method: str = "calibprompt"
    weights: str | None = None
    shots: int = 8
    seed: int = 1
    n_ctx: int = 16
    init: str = "random"
    position: str = "end"
    class_specific: bool = False
    views: int = 50
    epochs: int = 50
    batch_size: int = 16
    lr: float = 0.002
    warmup_lr: float | None = None
    n_bins: int = 15
    val_per_class: int | None = None
    precision: str = "fp32"
    device: str = "cpu"
    cache: str | None = None
    workers: int | None = None
    progress: bool = True
    alpha: float | None = None
    weight: float | None = None

    def train_config(self) -> TrainConfig:
        warmup = self.warmup_lr if self.warmup_lr is not None else (1e-3 if self.backbone == "medclip" else 1e-5)
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, warmup_lr=warmup,
                           seed=self.seed)

    def effective(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in NON_EFFECTIVE}
        data["train"] = self.train_config().to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"run config: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**data)


def safe_name(name: str, limit: int = 80) -> str:
    """``name`` with every character outside ``[A-Za-z0-9._-]`` replaced by ``_`` (a path part)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:limit]


def config_digest(data: dict[str, Any], dataset_fingerprint: str, backbone_fingerprint: str) -> str:
    """10 hex digits identifying an effective config on a dataset and backbone."""
    blob = json.dumps({"config": data, "dataset": dataset_fingerprint, "backbone": backbone_fingerprint},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_directory(out: Path, config: RunConfig, dataset_fingerprint: str, backbone_fingerprint: str) -> Path:
    """``out/<dataset>/<backbone>/<method>/<shots>shot_seed<seed>-<hash of the effective config>``."""
    digest = config_digest(config.effective(), dataset_fingerprint, backbone_fingerprint)
    name = f"{config.shots}shot_seed{config.seed}-{digest}"
    return out / config.dataset / safe_name(config.backbone) / safe_name(config.method, 40) / name


@dataclass
class RunResult:
    directory: Path
    metrics: dict[str, Any]
    skipped: bool = False
    logs: list[dict[str, Any]] = field(default_factory=list)


def package_versions() -> dict[str, str]:
    """Versions of calibprompt and the libraries that decide its numbers."""
    import calibprompt

    out = {"calibprompt": calibprompt.__version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    for name in ("open_clip", "transformers"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except ImportError:
            pass
    return out


_BACKBONES: dict[tuple, Any] = {}


def cached_backbone(name: str, weights: str | None, device: str, precision: str) -> Any:
    """The frozen backbone of a run, kept for the next run of a sweep (loading and
    fingerprinting a ViT-B model costs seconds; the last two backbones stay in memory)."""
    from calibprompt.backbones import load_backbone

    key = (name, weights, device, precision)
    if key not in _BACKBONES:
        while len(_BACKBONES) >= 2:
            _BACKBONES.pop(next(iter(_BACKBONES)))
        _BACKBONES[key] = load_backbone(name, weights=weights, device=device, precision=precision)
    return _BACKBONES[key]


def execute_run(config: RunConfig, out: str | Path, force: bool = False) -> RunResult:
    """Resolve, validate and run ``config`` under ``out``; a finished run is skipped unless
    ``force``; an interrupted one resumes from its last finished epoch."""
    from safetensors.torch import load_file, save_file

    from calibprompt.calibrators import TemperatureScaling
    from calibprompt.data import DataError, FeatureStore, few_shot, load_dataset, validation_split
    from calibprompt.io import atomic_path, write_json
    from calibprompt.methods.coop import train_prompt
    from calibprompt.methods.zeroshot import zeroshot_logits, zeroshot_text_features
    from calibprompt.metrics import BINNING_CONVENTION, evaluate
    from calibprompt.objective import PRESETS, Objective
    from calibprompt.plots import plot_reliability
    from calibprompt.prompts import PromptLearner

    out = Path(out)
    # ---- validate everything before anything is written --------------------------------------
    zero_shot = config.method == "zeroshot"
    if not zero_shot:
        overrides = {k: v for k, v in (("alpha", config.alpha), ("weight", config.weight)) if v is not None}
        if config.method in PRESETS:
            objective = Objective.preset(config.method, backbone=config.backbone, dataset=config.dataset, **overrides)
        else:
            if overrides:
                raise ValueError("--alpha/--weight apply to presets only; write them into the objective")
            objective = Objective.parse(config.method)
    train = load_dataset(config.dataset, config.root, "train")
    test = load_dataset(config.dataset, config.root, "test")
    counts = train.class_counts()
    if config.shots > counts.min():
        small = [train.classnames[i] for i in np.flatnonzero(counts < config.shots)]
        raise DataError(f"--shots {config.shots}: class(es) {small} of {config.dataset}/train have fewer "
                        f"images ({counts.min()} at least); use fewer shots")
    backbone = cached_backbone(config.backbone, config.weights, config.device, config.precision)
    directory = run_directory(out, config, train.fingerprint, backbone.fingerprint)
    if (directory / "metrics.json").is_file() and not force:
        return RunResult(directory, json.loads((directory / "metrics.json").read_text()), skipped=True)
    if force and directory.exists():
        for leftover in ("metrics.json", "checkpoint.json", "checkpoint.safetensors"):
            (directory / leftover).unlink(missing_ok=True)

    # ---- data and features ---------------------------------------------------------------------
    directory.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(config.cache)
    shots = few_shot(train, config.shots, config.seed, manifest_path=directory / "splits" / "few_shot.json")
    val = validation_split(train, exclude=shots, per_class=config.val_per_class, seed=config.seed,
                           manifest_path=directory / "splits" / "validation.json")
    kw = {"num_workers": config.workers, "progress": config.progress}
    test_feats = store.features(backbone, test.paths, **kw)
    val_set = val.subset_of(train)
    val_feats = store.features(backbone, val_set.paths, **kw)
    zs_text = zeroshot_text_features(backbone, train.classnames, train.templates)
    record = {
        "config": asdict(config), "effective": config.effective(), "versions": package_versions(),
        "metric_convention": BINNING_CONVENTION, "backbone_fingerprint": backbone.fingerprint,
        "dataset_fingerprint": train.fingerprint, "test_fingerprint": test.fingerprint,
        "cache_tables": sorted({*test_feats.tables, *val_feats.tables}),
        "objective": None if zero_shot else objective.to_dict(),
    }

    if not zero_shot:
        shot_set = shots.subset_of(train)
        bank = store.view_bank(backbone, shot_set.paths, views=config.views, aug_seed=config.seed, **kw)
        record["cache_tables"] = sorted({*record["cache_tables"], *bank.tables})
    write_json(directory / "config.json", record)

    # ---- training (resumable) ------------------------------------------------------------------
    logs: list[dict[str, Any]] = []
    if zero_shot:
        text = zs_text
    else:
        learner = PromptLearner(backbone, train.classnames, n_ctx=config.n_ctx, init=config.init,
                                position=config.position, class_specific=config.class_specific,
                                seed=config.seed)
        start_epoch, optimizer_state = 0, None
        ckpt_json, ckpt_tensors = directory / "checkpoint.json", directory / "checkpoint.safetensors"
        if ckpt_json.is_file() and ckpt_tensors.is_file():
            info = json.loads(ckpt_json.read_text())
            tensors = load_file(str(ckpt_tensors))
            with torch.no_grad():
                learner.ctx.copy_(tensors["ctx"])
            if "momentum" in tensors:
                optimizer_state = {"state": {0: {"momentum_buffer": tensors["momentum"]}},
                                   "param_groups": info["param_groups"]}
            start_epoch, logs = info["epoch"] + 1, info["logs"]

        def checkpoint(log, learner_, optimizer) -> None:
            logs.append(asdict(log))
            state = optimizer.state_dict()
            tensors = {"ctx": learner_.ctx.detach().cpu().contiguous()}
            momentum = state["state"].get(0, {}).get("momentum_buffer")
            if momentum is not None:
                tensors["momentum"] = momentum.detach().cpu().contiguous()
            with atomic_path(ckpt_tensors) as tmp:
                save_file(tensors, str(tmp))
            write_json(ckpt_json, {"epoch": log.epoch, "logs": logs, "param_groups": state["param_groups"]})

        train_prompt(learner, bank.features, torch.as_tensor(shot_set.labels[bank.index]), objective,
                     config.train_config(), zs_text, on_epoch=checkpoint, start_epoch=start_epoch,
                     optimizer_state=optimizer_state)
        with torch.no_grad():
            text = learner()
        with atomic_path(directory / "prompt.safetensors") as tmp:
            save_file({"ctx": learner.ctx.detach().cpu().contiguous()}, str(tmp))

    # ---- evaluation ------------------------------------------------------------------------------
    test_logits = zeroshot_logits(test_feats.features, text, backbone.logit_scale).double()
    val_logits = zeroshot_logits(val_feats.features, text, backbone.logit_scale).double()
    test_labels = test.labels[test_feats.index]
    val_labels = val_set.labels[val_feats.index]
    with atomic_path(directory / "predictions.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, test_logits=test_logits.numpy(), test_labels=test_labels,
                     val_logits=val_logits.numpy(), val_labels=val_labels)
    with warnings.catch_warnings(record=True) as caught:  # kept in metrics.json, not lost on stderr
        warnings.simplefilter("always", RuntimeWarning)
        ts = TemperatureScaling().fit(val_logits.numpy(), val_labels)
    probs = torch.softmax(test_logits, -1).numpy()
    metrics = {
        "uncalibrated": evaluate(probs, test_labels, n_bins=config.n_bins),
        "temperature_scaled": evaluate(ts.transform(test_logits.numpy()), test_labels, n_bins=config.n_bins),
        "temperature": ts.temperature,
        "temperature_warnings": [str(w.message) for w in caught],
        "excluded_test_images": [list(e) for e in test_feats.excluded],
    }
    plot_reliability(probs, test_labels, n_bins=config.n_bins, path=directory / "reliability.png",
                     title=f"{config.backbone} / {config.dataset} / {config.method}, seed {config.seed}")
    write_json(directory / "log.json", logs)
    for leftover in ("checkpoint.json", "checkpoint.safetensors"):
        (directory / leftover).unlink(missing_ok=True)
    write_json(directory / "metrics.json", metrics)
    return RunResult(directory, metrics, skipped=False, logs=logs)
