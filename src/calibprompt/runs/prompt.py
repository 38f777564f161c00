"""Zero-shot and few-shot prompt-tuning runs (the ``prompt`` kind).

Zero-shot classifies with the dataset's template ensemble; every other method tunes a CoOp
context on a seeded few-shot split with an objective (a preset or an expression), on a cached
bank of augmented views (the paper's protocol: SGD 0.002, 50 epochs, warm-up, cosine).
Both draw a seeded validation split from the rest of the train pool for temperature scaling.

Files of a prompt run besides the common ones (:mod:`calibprompt.runs.directory`):
``splits/few_shot.json`` and ``splits/validation.json`` (manifests), ``classifier.safetensors``
(the class text features and logit scale -- what :meth:`Run.predict` applies to new images),
``prompt.safetensors`` (the learned context) and ``log.json`` (per-epoch loss terms) when trained.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from calibprompt.data import (
    DataError,
    FeatureStore,
    calibration_split,
    cv_folds,
    few_shot,
    validation_split,
)
from calibprompt.data.views import SeededViews, train_view_transform
from calibprompt.files import atomic_path, slug, write_json
from calibprompt.losses import LOSSES
from calibprompt.methods import coop
from calibprompt.methods.coop import TrainConfig
from calibprompt.methods.selection import bind, parse_space, placeholders
from calibprompt.methods.smoothing import noise, pixel_transform
from calibprompt.methods.zeroshot import zeroshot_logits, zeroshot_text_features
from calibprompt.metrics import METRICS_VERSION
from calibprompt.metrics._validation import MAX_BINS
from calibprompt.objective import PRESET_SEARCH, PRESETS, Objective
from calibprompt.prompts import POSITIONS, PromptLearner, check_distinct_prompts
from calibprompt.runs import finetune as finetune_run  # finetune_run.work_full: patchable in tests
from calibprompt.runs.common import (
    Outputs,
    Plan,
    RunConfigBase,
    Training,
    cached_backbone,
    classifier_outputs,
    dataset_fingerprint,
    device_kind,
    labelled_sizes,
    option,
    test_split_record,
    unreadable_hint,
)
from calibprompt.runs.directory import RunDirectory
from calibprompt.runs.identity import RunIdentity, run_name
from calibprompt.runs.tuning import (
    TUNED_SUFFIX,
    check_tuning_options,
    check_untuned,
    identity_fields,
    run_search,
    search_option,
    trials_option,
    tune_metric_option,
    tune_option,
    tuning_scores,
    write_tuning,
)

__all__ = ["PROTOCOL_VERSION", "PromptRunConfig", "RunConfig"]

#: Bumped when the prompt-tuning or zero-shot procedure changes its results (2: temperature scaling
#: fitted on the calibration split, was the validation -- now tuning -- split).
PROTOCOL_VERSION = 2
#: Bumped when the full fine-tuning procedure changes its results (part of full runs' identity).
FINETUNE_PROTOCOL_VERSION = 1
#: Bumped when training on noisy views changes its results (part of those runs' identity).
NOISE_PROTOCOL_VERSION = 1

#: The warm-up learning rate of MedCLIP in the published framework (others: TrainConfig's).
MEDCLIP_WARMUP_LR = 1e-3

#: Fields that only apply to training (not part of a zero-shot run's identity or name).
TRAINING_FIELDS = ("shots", "n_ctx", "init", "position", "class_specific", "views", "epochs",
                   "batch_size", "lr", "warmup_lr", "alpha", "weight", "tune", "search", "trials", "tune_metric",
                   "tune_folds")
#: Fields of the prompt (context) that full fine-tuning does not have.
PROMPT_FIELDS = ("n_ctx", "init", "position", "class_specific", "views")
#: The training regimes: prompt tuning (a learned context, frozen towers) and full fine-tuning.
REGIMES = ("prompt", "full")
#: The full regime's learning rate (the paper's); prompt tuning's is TrainConfig's.
FULL_LR = 2e-7


@dataclass(frozen=True)
class PromptRunConfig(RunConfigBase):
    """A zero-shot (``method="zeroshot"``) or prompt-tuning run; the same schema as the ``train``
    / ``zeroshot`` flags and the ``config`` of ``config.json``.

    ``method`` is an objective preset (``ce``, ``calibprompt``, ...) or an objective expression;
    ``warmup_lr=None`` means the protocol's warm-up lr (1e-3 for MedCLIP, else 1e-5);
    ``val_per_class=None`` / ``calib_per_class=None`` mean ``max(4, ceil(64 / classes))`` tuning
    / calibration images per class (when the train pool left after the few-shot split holds fewer
    than both, the tuning split gets half of it and the calibration split the rest).
    ``root``, ``weights``, ``cache``, ``device``'s index, ``workers`` and ``progress`` do not
    enter the run's identity (the data and weights enter by content), nor does ``n_bins``: it
    changes how the predictions are measured, not the predictions (a finished run asked for other
    bins is measured again, not retrained)."""

    kind: ClassVar[str] = "prompt"

    method: str = option("calibprompt", help="objective preset (ce, ls, focal, mdca, dca, mmce, mbls, logitnorm, "
                                             "zsnorm, penalty, smac, calibprompt), an objective expression, or zeroshot")
    regime: str = option("prompt", help="prompt: tune a context, towers frozen; full: fine-tune every weight of both "
                                        "towers on the dataset template's class prompts", choices=REGIMES)
    shots: int = option(8, help="labelled images per class")
    n_ctx: int = option(16, help="context vectors")
    init: str = option("random", help="context initialisation", choices=("random", "words"))
    position: str = option("end", help="class name position relative to the context", choices=POSITIONS)
    class_specific: bool = option(False, help="one context per class")
    views: int = option(50, help="cached augmented views per training image")
    epochs: int = option(TrainConfig.epochs, help="training epochs")
    batch_size: int = option(TrainConfig.batch_size, help="training batch size")
    lr: float | None = option(None, help="SGD learning rate",
                              default_text=f"{TrainConfig.lr:g} (prompt regime), {FULL_LR:g} (full regime)")
    warmup_lr: float | None = option(
        None, help="learning rate of one constant warm-up epoch before the cosine schedule",
        default_text=f"prompt regime: {MEDCLIP_WARMUP_LR:g} for MedCLIP, else {TrainConfig.warmup_lr:g}; full regime: "
                     "no warm-up epoch (a value adds one)")
    noise_sigmas: tuple[float, ...] | None = option(
        None, help="PromptSmooth's few-shot prompt: train on views with Gaussian noise of a level drawn per image and "
                   "step from these (0 = clean), in the [0, 1] pixel space; fresh noise every step (nothing cached)",
        metavar="SIGMA", default_text="no noise")
    train_logit_scale: bool = option(False, help="full regime: train the logit scale too (frozen by default)")
    save_weights: bool = option(False, help="full regime: save the fine-tuned weights as weights.safetensors (the "
                                            "size of the model; needed to apply the run to new images)")
    n_bins: int = option(15, help="bins of ECE/MCE/ACE in metrics.json")
    val_per_class: int | None = option(None, help="tuning images per class (hyperparameter selection; the split "
                                                  "called validation before the calibration split existed)",
                                       default_text="max(4, 64 / classes); shared with the calibration split when "
                                                    "the pool left after the shots is small")
    calib_per_class: int | None = option(None, help="calibration images per class (temperature scaling, decision "
                                                    "methods), disjoint from the shots and the tuning split",
                                         default_text="max(4, 64 / classes), at most what is left")
    alpha: float | None = option(None, help="calibprompt/smac presets: the LS = SMAC alpha",
                                 default_text="the paper's for this backbone and dataset")
    weight: float | None = option(None, help="calibprompt preset: the angular-separation weight",
                                  default_text="the paper's for this backbone and dataset")
    tune: str | None = tune_option("the objective's free hyperparameters (a preset's, or the ?placeholders of "
                                   "--objective): candidates trained on the few-shot split, scored on the tuning "
                                   "split (or by cross-validation, --tune-folds)")
    search: tuple[str, ...] | None = search_option("a preset's own ranges")
    trials: int = trials_option()
    tune_metric: str = tune_metric_option()
    tune_folds: int | None = option(None, help="--tune auto: score each candidate by K-fold cross-validation over the "
                                               "few-shot and tuning images (class-stratified; K trainings per "
                                               "candidate) instead of on the tuning split -- for small splits",
                                    metavar="K", default_text="off: the tuning split")

    @property
    def zero_shot(self) -> bool:
        return self.method == "zeroshot"

    @property
    def full(self) -> bool:
        return self.regime == "full" and not self.zero_shot

    def train_config(self) -> TrainConfig:
        """The training hyperparameters with the regime's defaults resolved: prompt tuning warms up
        for one epoch at 1e-5 (MedCLIP 1e-3) unless told otherwise; full fine-tuning trains at
        2e-7 without a warm-up epoch unless ``warmup_lr`` asks for one."""
        lr = self.lr if self.lr is not None else (FULL_LR if self.full else TrainConfig.lr)
        if self.full:
            warmup_epochs, warmup = (0, 0.0) if self.warmup_lr is None else (1, self.warmup_lr)
        else:
            default = MEDCLIP_WARMUP_LR if self.backbone == "medclip" else TrainConfig.warmup_lr
            warmup_epochs, warmup = 1, (self.warmup_lr if self.warmup_lr is not None else default)
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=lr, warmup_lr=warmup,
                           warmup_epochs=warmup_epochs, seed=self.seed)

    def objective_template(self) -> tuple[str, dict[str, Any]]:
        """``--tune auto``: the objective with placeholders and the search space of each (a preset's
        own ranges, :data:`calibprompt.objective.PRESET_SEARCH`, replaced by ``--search``)."""
        if self.method in PRESETS:
            if self.method not in PRESET_SEARCH:
                raise ValueError(f"--tune auto: the {self.method} preset has no hyperparameters to tune; write an "
                                 "objective with ?placeholders, e.g. --objective 'ce + ?w*mdca' --search w=0.1:10:log")
            template, ranges = PRESET_SEARCH[self.method]
            space = parse_space(ranges)
        else:
            template, space = self.method, {}
        names = placeholders(template)
        given = parse_space(self.search or ())
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"--search: {', '.join(unknown)} is not a placeholder of the objective {template!r} "
                             f"(its placeholders: {', '.join('?' + n for n in names) or 'none'})")
        space.update(given)
        missing = [n for n in names if n not in space]
        if not names:
            raise ValueError(f"--tune auto: the objective {template!r} has no ?placeholders to tune, e.g. "
                             "--objective 'ls(alpha=?a) + smac(alpha=?a) + ?w*as' --search a=0.01:0.3:log w=0.1:10:log")
        if missing:
            raise ValueError(f"--search: give a range for {', '.join('?' + n for n in missing)} "
                             f"(NAME=LOW:HIGH[:log] or NAME=V1,V2,...)")
        return template, {n: space[n] for n in names}

    def objective(self):
        """The resolved objective (``None`` for zero-shot and for ``--tune auto``: each candidate
        has its own); errors name the bad option."""
        if self.tune:
            return None
        overrides = {k: v for k, v in (("alpha", self.alpha), ("weight", self.weight)) if v is not None}
        if self.zero_shot:
            if overrides:
                raise ValueError("--alpha/--weight: zero-shot has no objective")
            return None
        if self.method in PRESETS:
            return Objective.preset(self.method, backbone=self.backbone, dataset=self.dataset, **overrides)
        if self.method.isidentifier() and self.method not in LOSSES:  # a misspelt preset, not an expression
            close = difflib.get_close_matches(self.method, [*PRESETS, "zeroshot"], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"method {self.method!r}: unknown method; presets: {', '.join(PRESETS)}, zeroshot, or "
                             f"an objective expression such as 'ls(alpha=0.1) + smac(alpha=0.1) + 3*as'{hint}")
        if overrides:
            raise ValueError("--alpha/--weight apply to presets only; write them into the objective")
        return Objective.parse(self.method)

    def validate(self) -> None:
        """Reject values no run can have (before anything is loaded or written)."""
        self.check_types()
        if self.init not in ("random", "words"):
            raise ValueError(f"init: expected 'random' or 'words', got {self.init!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position: expected one of {', '.join(POSITIONS)}, got {self.position!r}")
        positive = ("shots", "n_ctx", "views", "epochs", "batch_size", "n_bins")
        if self.n_bins > MAX_BINS:
            raise ValueError(f"n_bins: expected an integer from 1 to {MAX_BINS:,}, got {self.n_bins!r}")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.regime not in REGIMES:
            raise ValueError(f"regime: expected one of {', '.join(REGIMES)}, got {self.regime!r}")
        if self.noise_sigmas is not None:
            if self.full or self.zero_shot:
                raise ValueError("--noise-sigmas: noisy views train a prompt (--regime prompt), not zero-shot or full "
                                 "fine-tuning")
            if not self.noise_sigmas or any(not (v >= 0) for v in self.noise_sigmas):
                raise ValueError(f"noise_sigmas: expected one or more noise levels >= 0, got {self.noise_sigmas!r}")
        if self.regime != "full" and (self.train_logit_scale or self.save_weights):
            raise ValueError("--train-logit-scale/--save-weights apply to --regime full only")
        if self.lr is not None and not self.lr >= 0:  # 0 is a valid (frozen) control
            raise ValueError(f"lr: expected a non-negative learning rate, got {self.lr!r}")
        if self.warmup_lr is not None and not self.warmup_lr >= 0:
            raise ValueError(f"warmup_lr: expected a non-negative learning rate, got {self.warmup_lr!r}")
        for name in ("val_per_class", "calib_per_class"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {self.seed!r}")
        self.check_base_options()

        self._validate_tuning()
        self.objective()  # an unknown preset or a malformed expression fails here
        device_kind(self.device)

    def _validate_tuning(self) -> None:
        if not self.tune:
            check_untuned(self, ("tune_folds",))
            names = [] if self.zero_shot else placeholders(self.method)
            if names:
                shown = ", ".join("?" + n for n in names)
                raise ValueError(f"objective {self.method!r}: placeholders ({shown}) need --tune auto and "
                                 "--search NAME=RANGE")
            return
        check_tuning_options(self)
        if self.zero_shot or self.full or self.noise_sigmas is not None:
            raise ValueError("--tune auto: tunes prompt tuning's objective (not zero-shot, --regime full or "
                             "--noise-sigmas)")
        if self.alpha is not None or self.weight is not None:
            raise ValueError("--alpha/--weight fix what --tune auto would choose; give one or the other")
        if self.tune_folds is not None and (isinstance(self.tune_folds, bool) or self.tune_folds < 2):
            raise ValueError(f"tune_folds: expected an integer >= 2 (folds of the cross-validation), got "
                             f"{self.tune_folds!r}")
        template, space = self.objective_template()
        lowest = {n: d.choices[0] if d.choices is not None else d.low for n, d in space.items()}
        for name, d in space.items():  # every end of every range (or every choice) is a valid objective
            values = d.choices if d.choices is not None else (d.low, d.high)
            if min(values) < 0 and re.search(rf"\?{name}\s*\*", template):
                raise ValueError(f"--search {d}: ?{name} weights a term; expected values >= 0 (a negative weight "
                                 "turns the term around -- write the minus sign into the objective instead)")
            for value in values:
                try:
                    Objective.parse(bind(template, {**lowest, name: value})).check_values()
                except ValueError as exc:
                    raise ValueError(f"--search {d}: {name}={value:g} is outside what the objective accepts "
                                     f"({exc})") from None

    def effective(self, objective: Any = None, sizes: tuple[int, int] | None = None) -> dict[str, Any]:
        """The fields that determine the result, defaults resolved (``sizes``: the tuning and
        calibration images per class); zero-shot runs leave out the training fields (they do not
        apply)."""
        val, calib = sizes if sizes is not None else (self.val_per_class, self.calib_per_class)
        data = {"method": self.method, "backbone": self.backbone, "dataset": self.dataset, "seed": self.seed,
                "val_per_class": val, "calib_per_class": calib, **self.data_effective()}
        if not self.zero_shot:
            train = self.train_config()
            skip = ("alpha", "weight", *(PROMPT_FIELDS if self.full else ()))
            data.update({k: getattr(self, k) for k in TRAINING_FIELDS if k not in skip})
            data.update(lr=train.lr, warmup_lr=train.warmup_lr, momentum=train.momentum,
                        weight_decay=train.weight_decay, warmup_epochs=train.warmup_epochs)
            if self.tune:
                template, space = self.objective_template()
                data["objective"] = template
                data.update(identity_fields(space, self.trials, self.tune_metric))
                for key in ("tune", "alpha", "weight", *(("tune_folds",) if self.tune_folds is None else ())):
                    data.pop(key, None)  # holdout searches keep the identities they had before folds existed
            else:
                data["objective"] = str(objective if objective is not None else self.objective())
                for key in ("tune", "search", "trials", "tune_metric", "tune_folds"):  # untuned runs: as before
                    data.pop(key, None)
            if self.noise_sigmas is not None:  # fresh noisy views replace the cached view bank
                data.pop("views", None)
                data.update(noise_sigmas=sorted(float(v) for v in self.noise_sigmas),
                            noise_protocol=NOISE_PROTOCOL_VERSION)
            if self.full:  # prompt runs keep the identities they had before the full regime existed
                data.update(regime="full", train_logit_scale=self.train_logit_scale,
                            finetune_protocol=FINETUNE_PROTOCOL_VERSION)
        return data

    # -- the run -----------------------------------------------------------------------------
    def plan(self) -> Plan:
        """Validate everything, load the data and backbone, identify the run (no writes)."""
        self.validate()
        objective = self.objective()
        train, test = self.load_splits()
        counts = train.class_counts()
        if not self.zero_shot and self.shots > counts.min():
            small = [train.classnames[i] for i in np.flatnonzero(counts < self.shots)]
            raise DataError(f"--shots {self.shots}: class(es) {small} of {self.dataset}/train have fewer "
                            f"images ({counts.min()} at least); use fewer shots")
        sizes = labelled_sizes(train, 0 if self.zero_shot else self.shots, self.val_per_class, self.calib_per_class,
                               self.dataset)
        if self.tune_folds is not None and self.tune_folds > self.shots + sizes[0]:
            raise DataError(f"--tune-folds {self.tune_folds}: cross-validation over {self.shots} shot(s) + {sizes[0]} "
                            f"tuning image(s) per class allows at most {self.shots + sizes[0]} folds; use fewer folds "
                            "or more tuning images (--val-per-class)")
        default_sizes = labelled_sizes(train, 0 if self.zero_shot else self.shots, None, None, self.dataset)
        kind = device_kind(self.device)
        backbone = cached_backbone(self.backbone, self.weights, self.device, self.precision)
        for template in train.templates:  # classes the model cannot tell apart: refused before any work
            check_distinct_prompts(backbone.tokenize(train.prompts(template)), train.classnames, backbone.name)
        store = FeatureStore(self.cache)
        effective = self.effective(objective, sizes)
        identity = RunIdentity(
            kind=self.kind, config=effective,
            data={"train": dataset_fingerprint(train, store), "test": dataset_fingerprint(test, store)},
            backbone=backbone.fingerprint, protocol_version=PROTOCOL_VERSION,
            metrics_version=METRICS_VERSION, precision=self.precision, device_kind=kind)
        defaults = PromptRunConfig(self.backbone, self.dataset, self.root, method=self.method, regime=self.regime,
                                   tune=self.tune, search=self.search).effective(objective, default_sizes)
        head = [f"seed{self.seed}"] if self.zero_shot else [f"{self.shots}shot", f"seed{self.seed}"]
        head += [f"{k}{v:g}" for k, v in (("alpha", self.alpha), ("weight", self.weight)) if v is not None]
        if self.noise_sigmas is not None:
            head.append("noise" + "-".join(f"{v:g}" for v in sorted(self.noise_sigmas)))
        if self.tune_folds is not None:
            head.append(f"folds{self.tune_folds}")
        name = run_name(head, effective, defaults, identity.run_id,
                        skip=("method", "backbone", "dataset", "seed", "shots", "objective"))
        method = f"full-{self.method}" if self.full else self.method  # how reports name the row
        path = Path(slug(self.dataset)) / slug(self.backbone) / (slug(method, limit=40) + ("-tuned" if self.tune else ""))
        path /= name
        method += TUNED_SUFFIX if self.tune else ""
        record = {"objective": None if objective is None else objective.to_dict(),
                  "regime": "full" if self.full else "prompt", **test_split_record(self, train, test)}

        def work(directory: RunDirectory) -> Outputs | Training:
            return _work(self, directory, backbone, store, train, test, objective, sizes)

        return Plan(identity, path, asdict(self), list(train.classnames), self.n_bins,
                    f"{self.backbone} / {self.dataset} / {method}, seed {self.seed}", work, record,
                    method=method, required_files=(finetune_run.WEIGHTS_FILE,) if self.save_weights else (),
                    lockstep_key=self.lockstep_key())

    def lockstep_key(self) -> tuple[Any, ...] | None:
        """Runs with the same key train well in lockstep (one text-encoder pass per step for all):
        prompt tuning on cached views with the same backbone, data, prompt shape and step
        schedule. ``None`` (zero-shot, full fine-tuning, noisy views): the run trains alone."""
        if self.zero_shot or self.full or self.noise_sigmas is not None:
            return None
        return (self.backbone, self.weights, self.precision, self.device, self.dataset, self.root,
                self.test_fraction, self.n_ctx, self.init, self.position, self.class_specific, self.shots,
                self.epochs, self.batch_size, self.cache)

    def predict_logits(self, directory: Path, backbone: Any, paths: list[Path], store: FeatureStore,
                       *, workers: int | None = None, progress: bool = True):
        """Logits of new images under the run's classifier (``classifier.safetensors``):
        ``s · f(x) · Tᵀ`` with the run's class features T -- for a full fine-tuning run with the
        image tower of its saved weights. Returns (logits, index, excluded)."""
        tensors = load_file(str(Path(directory) / "classifier.safetensors"))
        if self.full:
            backbone = finetune_run.load_finetuned(backbone, directory)
        feats = store.features(backbone, paths, num_workers=workers, progress=progress)
        logits = zeroshot_logits(feats.features, tensors["text_features"], float(tensors["logit_scale"]))
        return logits.double().cpu().numpy(), feats.index, feats.excluded


class NoisyViews:
    """Features of noisy training views (PromptSmooth's few-shot prompt): view ``epoch`` of image i
    is the prompt-tuning crop under the seed of (image, epoch, run seed), in the [0, 1] pixel
    space, plus Gaussian noise of a level drawn from ``sigmas`` per (image, epoch) and noise drawn
    per (seed, image, level, epoch) -- then normalised and encoded by the frozen image tower."""

    def __init__(self, backbone: Any, paths: list[Path], sigmas: tuple[float, ...], seed: int) -> None:
        self.split = pixel_transform(train_view_transform(backbone.image_transform()))
        self.views = SeededViews(paths, self.split.to_pixels, seed)  # the crops, in [0, 1] pixels
        self.backbone, self.sigmas, self.seed = backbone, tuple(float(v) for v in sigmas), seed

    def level(self, i: int, epoch: int) -> float:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 5, epoch, i]))
        return self.sigmas[int(rng.integers(len(self.sigmas)))]

    def __call__(self, batch: Any, epoch: int) -> torch.Tensor:
        batch = [int(b) for b in batch]
        pixels = self.views(batch, epoch)
        for row, i in enumerate(batch):
            sigma = self.level(i, epoch)
            if sigma > 0:
                pixels[row] += noise(pixels.shape[1:], self.seed, f"{self.views.hashes[i]}|train", sigma, [epoch])[0]
        return self.backbone.encode_images(self.split.normalize(pixels))


#: The name this config had before other kinds of runs existed (kept for users' scripts).
RunConfig = PromptRunConfig


def _work(config: PromptRunConfig, directory: RunDirectory, backbone: Any, store: FeatureStore,
          train: Any, test: Any, objective: Any, sizes: tuple[int, int]) -> Outputs | Training:
    kw = {"num_workers": config.workers, "progress": config.progress}
    shots = None
    if not config.zero_shot:
        with unreadable_hint():
            shots = few_shot(train, config.shots, config.seed, strict=not config.skip_unreadable,
                             manifest_path=directory.path("splits/few_shot.json"))
    with unreadable_hint():
        val = validation_split(train, exclude=shots, per_class=sizes[0], seed=config.seed,
                               strict=not config.skip_unreadable, manifest_path=directory.path("splits/validation.json"))
        calib = calibration_split(train, exclude=[shots, val], per_class=sizes[1], seed=config.seed,
                                  strict=not config.skip_unreadable,
                                  manifest_path=directory.path("splits/calibration.json"))
    if config.full:
        return finetune_run.work_full(config, directory, backbone, store, train, test, objective, shots, val, calib)
    test_feats = store.features(backbone, test.paths, **kw)
    config.check_readable(test_feats.excluded, f"the test split ({test.root})")
    labelled = {prefix: (m.subset_of(train), store.features(backbone, m.subset_of(train).paths, **kw))
                for prefix, m in (("val", val), ("calib", calib))}
    zs_text = zeroshot_text_features(backbone, train.classnames, train.templates)

    logs: list[dict[str, Any]] = []
    tables = {*test_feats.tables, *(t for _, feats in labelled.values() for t in feats.tables)}
    if not config.zero_shot:
        shot_set = shots.subset_of(train)
        features_fn = None
        if config.noise_sigmas is None:
            bank = store.views(backbone, shot_set.paths, config.views, kind="train", aug_seed=config.seed, **kw)
            tables |= set(bank.tables)
            features, bank_labels = bank.features, shot_set.labels[bank.index]
        else:  # fresh noise every step: the views are encoded as training draws them
            features_fn = NoisyViews(backbone, shot_set.paths, config.noise_sigmas, config.seed)
            features, bank_labels = torch.zeros(len(shot_set), 1, backbone.embed_dim), shot_set.labels
        extra: dict[str, Any] = {}
        if config.tune:
            objective, extra, chosen = _tune(config, directory, backbone, store, train, labelled, shots, features,
                                             torch.as_tensor(bank_labels), zs_text, tables)
            if chosen is not None:  # tuned on the tuning split: the chosen candidate is the run
                learner = _learner(config, backbone, train)
                with torch.no_grad():
                    learner.ctx.copy_(chosen["tensors"]["ctx"])
                    text = learner()
                _save_prompt(directory, learner)
                write_json(directory.path("log.json"), chosen["info"])
                return classifier_outputs(directory, text, backbone.logit_scale, test, test_feats, labelled, tables,
                                          (shots, val, calib), chosen["info"], extra)
            # cross-validated: the chosen objective is trained on the few-shot split below, as any run
        learner = _learner(config, backbone, train)
        start_epoch, optimizer_state = 0, None
        checkpoint = directory.load_checkpoint()
        if checkpoint is not None:
            tensors, info = checkpoint
            with torch.no_grad():
                learner.ctx.copy_(tensors["ctx"])
            if "momentum" in tensors:
                optimizer_state = {"state": {0: {"momentum_buffer": tensors["momentum"]}},
                                   "param_groups": info["param_groups"]}
            start_epoch, logs = info["epoch"] + 1, info["logs"]

        def on_epoch(log, learner_, optimizer) -> None:
            logs.append(asdict(log))
            state = optimizer.state_dict()
            tensors = {"ctx": learner_.ctx}
            momentum = state["state"].get(0, {}).get("momentum_buffer")
            if momentum is not None:
                tensors["momentum"] = momentum
            directory.save_checkpoint(tensors, {"epoch": log.epoch, "logs": logs,
                                                "param_groups": state["param_groups"]})

        def finish() -> Outputs:
            with torch.no_grad():
                text = learner()
            _save_prompt(directory, learner)
            write_json(directory.path("log.json"), logs)
            return classifier_outputs(directory, text, backbone.logit_scale, test, test_feats, labelled, tables,
                                      (shots, val, calib), logs, extra)

        job = coop.PromptJob(learner, features, torch.as_tensor(bank_labels), objective, config.train_config(),
                             zs_text, on_epoch=on_epoch, start_epoch=start_epoch, optimizer_state=optimizer_state,
                             features_fn=features_fn)
        return Training(job, finish, config.method)
    return classifier_outputs(directory, zs_text, backbone.logit_scale, test, test_feats, labelled, tables,
                              (shots, val, calib), logs)


def _learner(config: PromptRunConfig, backbone: Any, train: Any) -> PromptLearner:
    """The run's prompt learner at its initial context."""
    return PromptLearner(backbone, train.classnames, n_ctx=config.n_ctx, init=config.init, position=config.position,
                         class_specific=config.class_specific, seed=config.seed)


def _save_prompt(directory: RunDirectory, learner: PromptLearner) -> None:
    with atomic_path(directory.path("prompt.safetensors")) as tmp:
        save_file({"ctx": learner.ctx.detach().cpu().contiguous()}, str(tmp))


def _tune(config: PromptRunConfig, directory: RunDirectory, backbone: Any, store: FeatureStore, train: Any,
          labelled: dict[str, tuple[Any, Any]], shots: Any, features: torch.Tensor, labels: torch.Tensor,
          zs_text: torch.Tensor, tables: set[str]) -> tuple[Objective, dict[str, Any], dict[str, Any] | None]:
    """``--tune auto``: search the objective's placeholders (:func:`calibprompt.runs.tuning.run_search`).

    Each candidate is a complete prompt-tuning run with the run's protocol, trained
    :data:`~calibprompt.runs.tuning.TUNE_BATCH` at a time in lockstep. On the tuning split (the
    default) it trains on the few-shot split and is scored on the tuning split; the run is then the
    chosen candidate (returned as its checkpoint). With ``tune_folds`` K, the few-shot and tuning
    images are cut into K class-stratified folds (:func:`calibprompt.data.cv_folds`), the candidate
    is trained K times on all folds but one (their augmented views) and scored on the out-of-fold
    predictions of all K (original views); the chosen objective is then trained on the few-shot
    split by the caller (chosen checkpoint ``None``). Returns the chosen objective, the ``tuning``
    entry of ``metrics.json`` and the chosen checkpoint; writes ``tuning.json``."""
    template, space = config.objective_template()
    tuning_set, tuning_feats = labelled["val"]
    tuning_labels = tuning_set.labels[tuning_feats.index]
    scale = backbone.logit_scale
    folds = config.tune_folds
    if folds is None:
        score_feats, score_labels = tuning_feats.features, tuning_labels
        splits = [(features, labels, np.arange(len(score_labels)))]  # (train views, their labels, scored rows)
        scored_on = {"split": "tuning", "tuning_images": len(tuning_labels)}
    else:
        kw = {"num_workers": config.workers, "progress": config.progress}
        shot_set = shots.subset_of(train)
        shot_feats = store.features(backbone, shot_set.paths, **kw)
        tuning_bank = store.views(backbone, tuning_set.paths, config.views, kind="train", aug_seed=config.seed, **kw)
        tables |= {*shot_feats.tables, *tuning_bank.tables}
        if len(shot_feats.index) != len(labels) or len(tuning_bank.index) != len(tuning_labels):
            raise DataError("--tune-folds: an image of the few-shot or tuning split has no view features; "
                            "cross-validation needs every image in both transforms")
        pool_views = torch.cat([features, tuning_bank.features.to(features.dtype)])
        pool_labels = torch.cat([labels, torch.as_tensor(tuning_set.labels[tuning_bank.index])])
        score_feats = torch.cat([shot_feats.features, tuning_feats.features.to(shot_feats.features.dtype)])
        score_labels = pool_labels.numpy()
        fold = cv_folds(score_labels, folds, config.seed)
        if np.bincount(fold, minlength=folds).min() == 0 or any(
                np.unique(score_labels[fold != k]).size < len(train.classnames) for k in range(folds)):
            raise DataError(f"--tune-folds {folds}: the few-shot and tuning splits hold too few images per class for "
                            f"{folds} folds (every class needs an image outside each fold); use fewer folds")
        splits = [(pool_views[fold != k], pool_labels[fold != k], np.flatnonzero(fold == k)) for k in range(folds)]
        scored_on = {"split": "cross-validation", "folds": folds, "images": len(score_labels),
                     "few_shot_images": len(labels), "tuning_images": len(tuning_labels)}
    capacity = None

    def evaluate_batch(proposals: list[dict[str, float]]) -> list[tuple[dict[str, float], dict[str, Any], Any]]:
        nonlocal capacity
        jobs, logs = [], []
        for values in proposals:
            for views, view_labels, _ in splits:
                log: list[dict[str, Any]] = []
                logs.append(log)
                jobs.append(coop.PromptJob(_learner(config, backbone, train), views, view_labels,
                                           Objective.parse(bind(template, values)), config.train_config(), zs_text,
                                           on_epoch=lambda entry, *_, log=log: log.append(asdict(entry))))
        if capacity is None:
            capacity = 1 if len(jobs) == 1 else coop.lockstep_capacity(jobs[0].learner)
        for start in range(0, len(jobs), capacity):
            coop.train_prompts(jobs[start:start + capacity])
        out = []
        for c in range(len(proposals)):
            logits = np.zeros((len(score_labels), len(train.classnames)))
            for k, (_, _, rows) in enumerate(splits):
                with torch.no_grad():
                    text = jobs[c * len(splits) + k].learner()
                logits[rows] = zeroshot_logits(score_feats[rows], text, scale).double().cpu().numpy()
            scores = tuning_scores(logits, score_labels, config.n_bins)
            if folds is None:  # the candidate is the run if chosen: keep its context and epoch log
                out.append((scores, {"ctx": jobs[c].learner.ctx}, logs[c]))
            else:
                out.append((scores, {"logits": torch.from_numpy(logits)}, None))
        return out

    result, chosen = run_search(directory, space, evaluate_batch, trials=config.trials, metric=config.tune_metric,
                                seed=config.seed, label=f"tuning {config.method}", progress=config.progress)
    chosen_objective = bind(template, result.chosen["values"])
    extra = {"tuning": write_tuning(directory, result, space, objective=template, chosen_objective=chosen_objective,
                                    trials=config.trials, seed=config.seed, scored_on=scored_on)}
    return Objective.parse(chosen_objective), extra, (chosen if folds is None else None)
