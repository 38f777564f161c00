"""Test-time prompt tuning runs (the ``tpt`` kind): TPT, C-TPT, O-TPT, SoC and zero-shot with the
same initial prompt, over a test split -- resumable, on cached views.

The views come from :meth:`calibprompt.data.FeatureStore.views` (``kind="test_time"``), keyed by
(image, view, ``seed``): every method and every regulariser weight run with the same seed is evaluated on
identical views, and a second method re-encodes nothing.

Files of a TPT run besides the common ones (:mod:`calibprompt.runs.directory`):
``prompt.safetensors`` (the initial context every image starts from -- what :meth:`Run.predict`
adapts to new images) and, while running (removed when the run is complete),
``parts/<split>-*.npz`` (logits of the images adapted so far, written atomically per group; an
interrupted run resumes after the last complete part).
With ``val_per_class`` the run also adapts a seeded tuning split of the train pool (its scores
choose hyperparameters); with ``calib_per_class`` a disjoint calibration split, on which
temperature scaling is fitted (``calibprompt calibrate`` needs it).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from calibprompt import losses
from calibprompt.data import (
    DataError,
    FeatureStore,
    calibration_split,
    default_per_class,
    validation_split,
)
from calibprompt.files import atomic_path, slug, write_json
from calibprompt.methods import (
    tpt as tpt_method,  # tpt_method.tpt_adapt: one name for tests to patch
)
from calibprompt.methods.selection import Dimension, parse_space
from calibprompt.methods.tpt import TPTConfig
from calibprompt.metrics import METRICS_VERSION
from calibprompt.metrics._validation import MAX_BINS
from calibprompt.progress import rate_progress
from calibprompt.prompts import TEMPLATE_SETS, PromptLearner, prefix_words, template_set
from calibprompt.runs.common import (
    Outputs,
    Plan,
    RunConfigBase,
    cached_backbone,
    dataset_fingerprint,
    device_kind,
    option,
    test_split_record,
    unreadable_hint,
)
from calibprompt.runs.directory import RunDirectory, write_npz
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

__all__ = ["METHOD_DEFAULTS", "PROTOCOLS", "PROTOCOL_VERSION", "TPT_SEARCH", "TPTRunConfig"]

#: Bumped when the test-time procedure changes its results (2: ``limit`` draws a class-stratified
#: subset instead of the first files of the sorted listing; 3: with several steps the confident
#: views are selected once, at the first step, as the published code does).
PROTOCOL_VERSION = 3

#: Regulariser weights of the published methods; SoC's delta/lambda come from the sweep recorded
#: in docs/tpt.md (its paper does not publish them).
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "zeroshot": {},
    "tpt": {"lam": 0.0},
    "ctpt": {"lam": 50.0},
    "otpt": {"lam": 18.0},
    "otpt_fro": {"lam": 18.0},
    "soc": {"lam": 50.0, "delta": losses.SOC_DELTA},
    "atpt": {"lam": 80.0},  # A-TPT's fine-grained value (10 for natural distribution shift)
    # TCA: alpha (inter) and beta (intra); no published values established here -- C-TPT's lambda
    # for the same kind of dispersion of class means, our choice (tune them: --tune auto)
    "tca": {"lam": 50.0, "beta": 50.0},
}

#: ``--tune auto``: the ranges searched per method (our choice, covering every published value:
#: C-TPT's lambda 50 fine-grained / 20 natural shift, O-TPT's 18, A-TPT's 80 / 10; SoC's lambda and
#: delta have none).
TPT_SEARCH: dict[str, tuple[str, ...]] = {
    "ctpt": ("lam=1:100:log",),
    "otpt": ("lam=1:100:log",),
    "otpt_fro": ("lam=1:100:log",),
    "soc": ("lam=1:100:log", "delta=0.05:1:log"),
    "atpt": ("lam=1:100:log",),
    "tca": ("lam=1:100:log", "beta=1:100:log"),
}

#: Protocols: ``published`` is the TPT papers' protocol on fine-grained datasets (AugMix views);
#: ``published-noaugmix`` as they run the ImageNet variants (crop + flip only).
PROTOCOLS: dict[str, dict[str, Any]] = {
    "published": {"views": 64, "augmix": True, "selection": 0.1, "steps": 1, "lr": 5e-3,
                  "weight_decay": 0.01, "ctx_init": "a photo of a", "autocast": True, "n_bins": 20,
                  "reselect": False},
}
PROTOCOLS["published-noaugmix"] = {**PROTOCOLS["published"], "augmix": False}

#: Images per part file (the unit of resumption).
PART_IMAGES = 64

#: Fields that do not change a run's result (``protocol`` only supplies defaults, which are
#: resolved into the other fields).
NON_EFFECTIVE = ("root", "weights", "device", "cache", "workers", "batch_size", "progress", "protocol",
                 "precision", "init_prompt", "n_bins", "skip_unreadable", "test_fraction", "attributes")

#: Fields of the adaptation step, which zero-shot does not take (not part of its identity).
ADAPTATION_FIELDS = ("lam", "delta", "beta", "selection", "steps", "lr", "weight_decay", "views", "augmix",
                     "reselect")


def _protocol(key: str) -> str:
    """How --help shows a default the protocol supplies."""
    return f"the protocol's: {PROTOCOLS['published'][key]!r} with published"


@dataclass(frozen=True)
class TPTRunConfig(RunConfigBase):
    """One test-time tuning run; ``None`` fields take the method's / protocol's default."""

    kind: ClassVar[str] = "tpt"

    method: str = option("tpt", help="test-time method", choices=tuple(METHOD_DEFAULTS))
    protocol: str = option("published", help="the defaults of the fields below", choices=tuple(PROTOCOLS))
    lam: float | None = option(None, help="regulariser weight",
                               default_text=", ".join(f"{m} {d['lam']:g}" for m, d in METHOD_DEFAULTS.items()
                                                      if d.get("lam")))
    delta: float | None = option(None, help="SoC Huber threshold", default_text=f"{losses.SOC_DELTA:g}")
    beta: float | None = option(None, help="TCA: weight of the intra-class dispersion (--lam weights the inter-class "
                                           "one)", default_text=f"{METHOD_DEFAULTS['tca']['beta']:g}")
    attributes: str | None = option(None, help="TCA: a JSON file mapping each class name to its attribute words, e.g. "
                                               '{"adipose tissue": ["fatty", "pale"], ...}', metavar="FILE")
    views: int | None = option(None, help="views per image incl. the original", default_text=_protocol("views"))
    augmix: bool | None = option(None, help="AugMix on the augmented views", default_text=_protocol("augmix"))
    selection: float | None = option(None, help="fraction of lowest-entropy views kept",
                                     default_text=_protocol("selection"))
    steps: int | None = option(None, help="AdamW steps per image", default_text=_protocol("steps"))
    lr: float | None = option(None, help="AdamW learning rate", default_text=_protocol("lr"))
    weight_decay: float | None = option(None, help="AdamW weight decay", default_text=_protocol("weight_decay"))
    ctx_init: str | None = option(None, help="initial context words", default_text=_protocol("ctx_init"))
    autocast: bool | None = option(None, help="fp16 autocast on CUDA, as the published code",
                                   default_text=_protocol("autocast"))
    reselect: bool | None = option(None, help="re-select the confident views at every step (not the published "
                                              "algorithm, which selects them once, at the first step)",
                                   default_text=_protocol("reselect"))
    n_bins: int | None = option(None, help="bins of ECE/MCE/ACE in metrics.json", default_text=_protocol("n_bins"))
    init_prompt: str | None = option(None, help="start from a CoOp-tuned context: a train run directory or its "
                                                "prompt.safetensors", metavar="RUN_OR_FILE")
    limit: int | None = option(None, help="a class-stratified subset of N test images", metavar="N",
                               default_text="all")
    val_per_class: int | None = option(None, help="also adapt N tuning images per class of the train pool (for "
                                                  "hyperparameter selection; called validation before the calibration "
                                                  "split existed)", metavar="N",
                                       default_text="none; with --tune auto max(4, 64 / classes)")
    calib_per_class: int | None = option(None, help="also adapt N calibration images per class of the train pool, "
                                                    "disjoint from the tuning split (temperature scaling is fitted "
                                                    "there)", metavar="N", default_text="none")
    batch_size: int = option(16, help="images adapted at once")
    ensemble: str | None = option(None, help="the template-ensemble setting: one context per template (each "
                                             "initialised from its words, adapted on the same views), logits "
                                             "averaged; tpt4: the 4 templates of C-TPT's ensemble tables, "
                                             "imagenet80: CLIP's ImageNet templates, dataset: the dataset's own",
                                  choices=TEMPLATE_SETS, default_text="off: one prompt, --ctx-init")
    tune: str | None = tune_option("the regulariser weight (and SoC's delta): every candidate adapts the tuning "
                                   "split (--val-per-class, default max(4, 64 / classes)), scored there")
    search: tuple[str, ...] | None = search_option("lam=1:100:log (SoC also delta=0.05:1:log)")
    trials: int = trials_option()
    tune_metric: str = tune_metric_option()

    @property
    def needs_train(self) -> bool:
        """Only a run with a tuning or calibration split (or a search) reads the train split."""
        return bool(self.val_per_class or self.calib_per_class or self.tune)

    def resolved(self) -> TPTRunConfig:
        """Every ``None`` filled from the protocol and the method; validated."""
        self.check_types()
        self.check_base_options()
        device_kind(self.device)
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        if self.method not in METHOD_DEFAULTS:
            raise ValueError(f"method: expected one of {sorted(METHOD_DEFAULTS)}, got {self.method!r}")
        if self.method in ("zeroshot", "tpt") and self.lam not in (None, 0.0):
            raise ValueError(f"lam: {self.method} has no regulariser; --lam applies to ctpt, otpt, otpt_fro, soc")
        if self.method != "soc" and self.delta is not None:
            raise ValueError(f"delta: only SoC has a Huber threshold, not {self.method}")
        if self.method != "tca" and (self.beta is not None or self.attributes is not None):
            raise ValueError(f"--beta/--attributes apply to --method tca, not {self.method}")
        if self.method == "tca":
            if self.attributes is None:
                raise ValueError("--attributes: TCA needs a JSON file of attribute words per class")
            if self.ensemble is not None:
                raise ValueError("--ensemble: TCA has its own prompts (one per attribute); use one or the other")
        if self.ensemble is not None:
            if self.ensemble not in TEMPLATE_SETS:
                raise ValueError(f"ensemble: expected one of {', '.join(TEMPLATE_SETS)}, got {self.ensemble!r}")
            if self.ctx_init is not None or self.init_prompt is not None:
                raise ValueError("--ensemble: each template initialises its own context; --ctx-init and "
                                 "--init-prompt apply to the single-prompt setting")
        if self.tune is not None:
            check_tuning_options(self)
            if self.lam is not None or self.delta is not None or self.beta is not None:
                raise ValueError("--lam/--delta/--beta fix what --tune auto would choose; give one or the other")
            self.search_space()
        else:
            check_untuned(self)
        defaults = {**PROTOCOLS[self.protocol], "lam": 0.0, "delta": losses.SOC_DELTA, "beta": 0.0,
                    **METHOD_DEFAULTS[self.method]}
        if self.method == "zeroshot":
            defaults["steps"] = 0
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        out = replace(self, **filled)
        for name in ("views", "batch_size", "n_bins"):
            if getattr(out, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(out, name)}")
        if out.n_bins > MAX_BINS:
            raise ValueError(f"n_bins: expected an integer from 1 to {MAX_BINS:,}, got {out.n_bins}")
        for name in ("limit", "val_per_class", "calib_per_class"):
            if getattr(out, name) is not None and getattr(out, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(out, name)}")
        if not out.lr >= 0:
            raise ValueError(f"lr: expected a non-negative learning rate, got {out.lr}")
        if out.weight_decay < 0:
            raise ValueError(f"weight_decay: expected a non-negative value, got {out.weight_decay}")
        if out.seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {out.seed}")
        if out.method == "zeroshot" and out.steps != 0:
            raise ValueError("steps: zero-shot takes no adaptation step")
        out.tpt_config()  # validates the algorithm's own fields
        return out

    def search_space(self) -> dict[str, Dimension]:
        """``--tune auto``: the method's ranges (:data:`TPT_SEARCH`), replaced by ``--search``."""
        if self.method not in TPT_SEARCH:
            raise ValueError(f"--tune auto: {self.method} has no regulariser weight to tune (tuned: "
                             f"{', '.join(TPT_SEARCH)})")
        space = parse_space(TPT_SEARCH[self.method])
        given = parse_space(self.search or ())
        unknown = sorted(set(given) - set(space))
        if unknown:
            raise ValueError(f"--search: {self.method} tunes {' and '.join(space)}, not {', '.join(unknown)}")
        space.update(given)
        for d in space.values():
            smallest = min(d.choices) if d.choices is not None else d.low
            if smallest < 0 or (d.name == "delta" and smallest <= 0):
                raise ValueError(f"--search {d}: {d.name} must be {'positive' if d.name == 'delta' else '>= 0'}")
        return space

    def tpt_config(self) -> TPTConfig:
        return TPTConfig(method="tpt" if self.method == "zeroshot" else self.method, lam=self.lam,
                         delta=self.delta, beta=self.beta, selection=self.selection, steps=self.steps, lr=self.lr,
                         weight_decay=self.weight_decay, autocast=self.autocast, reselect=self.reselect)

    def effective(self) -> dict[str, Any]:
        """The resolved fields that determine the result (call on :meth:`resolved`); ``n_bins``
        measures the result and is not part of it."""
        skip = (*NON_EFFECTIVE, *(ADAPTATION_FIELDS if self.method == "zeroshot" else ()),
                *(() if self.needs_train else ("calib_per_class",)),  # runs without labelled splits: as before
                "tune", "search", "trials", "tune_metric",
                *(("ensemble",) if self.ensemble is None else ("ctx_init",)),  # single prompt: as before
                *(() if self.method == "tca" else ("beta",)))
        out = {**{k: v for k, v in asdict(self).items() if k not in skip}, **self.data_effective()}
        if self.tune:  # the search determines lam (and delta), not the fields
            space = self.search_space()
            out = {k: v for k, v in out.items() if k not in space}
            out.update(tune_objective=_tuned_name(self.method, space), **identity_fields(space, self.trials,
                                                                                          self.tune_metric))
        return out

    # -- the run -----------------------------------------------------------------------------
    def plan(self) -> Plan:
        """Validate everything, load the data and backbone, identify the run (no writes)."""
        config = self.resolved()
        kind = device_kind(config.device)
        train, test = config.load_splits()
        if config.tune and config.val_per_class is None:
            config = replace(config, val_per_class=default_per_class(train.num_classes))
        wanted = (config.val_per_class or 0) + (config.calib_per_class or 0)
        if train is not None and wanted > train.class_counts().min():
            asked = " + ".join(f"{flag} {value}" for flag, value in (("--val-per-class", config.val_per_class),
                                                                       ("--calib-per-class", config.calib_per_class))
                               if value)
            raise DataError(f"{asked}: {config.dataset}/train has only {train.class_counts().min()} image(s) in its "
                            "smallest class")
        backbone = cached_backbone(config.backbone, config.weights, config.device, config.precision)
        attributes = _load_attributes(config.attributes, list(test.classnames)) if config.method == "tca" else None
        learner, prompt_digest = _initial_learner(backbone, list(test.classnames), config,
                                                  train.templates if train is not None else test.templates, attributes)
        store = FeatureStore(config.cache)
        effective = {**config.effective(), "init_prompt_digest": prompt_digest}
        if attributes is not None:  # the words, by content (not the file's path)
            effective["attributes_digest"] = hashlib.sha256(json.dumps(attributes, sort_keys=True).encode()).hexdigest()
        identity = RunIdentity(
            kind=self.kind, config=effective,
            data={"train": dataset_fingerprint(train, store) if train is not None else None,
                  "test": dataset_fingerprint(test, store)},
            backbone=backbone.fingerprint, protocol_version=PROTOCOL_VERSION,
            metrics_version=METRICS_VERSION, precision=config.precision, device_kind=kind)
        base = TPTRunConfig(config.backbone, config.dataset, config.root, method=config.method,
                            protocol=config.protocol, tune=config.tune, search=config.search,
                            attributes=config.attributes).resolved()
        defaults = {"calib_per_class": None, "ensemble": None, **base.effective(),
                    "init_prompt_digest": None, "attributes_digest": None}  # named when set
        name = run_name([f"seed{config.seed}"], effective, defaults, identity.run_id,
                        skip=("method", "backbone", "dataset", "seed", "init_prompt_digest", "attributes_digest"))
        if prompt_digest is not None:
            name = f"coop{prompt_digest[:6]}-{name}"
        folder = f"tpt-{config.method}" + (f"-{config.ensemble}" if config.ensemble else "")  # tpt-ctpt-tpt4
        method = folder + (TUNED_SUFFIX if config.tune else "")  # how reports name the row
        path = Path(slug(config.dataset)) / slug(config.backbone) / (folder + ("-tuned" if config.tune else "")) / name
        tpt_record = config.tpt_config().to_dict()
        if config.tune:  # chosen by the search (tuning.json), not the defaults tpt_config() holds
            tpt_record.update(dict.fromkeys(config.search_space(), "tuned"))
        record = {"tpt": tpt_record, "protocol": config.protocol,
                  **({"templates": [lrn.template for lrn in learner]} if config.ensemble else {}),
                  **({"attributes": attributes} if attributes is not None else {}),
                  "init_prompt_digest": prompt_digest, **test_split_record(config, train, test)}

        def work(directory: RunDirectory) -> Outputs:
            return _work(config, directory, backbone, store, learner, test, train)

        return Plan(identity, path, asdict(self), list(test.classnames), config.n_bins,
                    f"{config.backbone} / {config.dataset} / {config.method}, seed {config.seed}", work, record,
                    method=method)

    def predict_logits(self, directory: Path, backbone: Any, paths: list[Path], store: FeatureStore,
                       *, workers: int | None = None, progress: bool = True):
        """Adapt the run's initial prompt (``prompt.safetensors``) to each new image with the run's
        method and settings, and classify it. Returns (logits, index, excluded)."""
        config = self.resolved()
        if config.tune:  # the search's choice, not the method's defaults
            config = replace(config, **json.loads((Path(directory) / "tuning.json").read_text())["chosen"]["values"])
        record = json.loads((Path(directory) / "config.json").read_text())
        if config.ensemble:  # every template's initial context, rebuilt from its words
            learner = _ensemble_learners(backbone, record["classnames"], record["templates"])
        elif config.method == "tca":  # the attribute prompts, with the run's initial context
            learner = tpt_method.tca_learner(backbone, record["classnames"], record["attributes"], config.ctx_init)
            with torch.no_grad():
                learner.ctx.copy_(load_file(str(Path(directory) / "prompt.safetensors"))["ctx"])
        else:
            learner = _learner_from_file(backbone, Path(directory) / "prompt.safetensors", record["classnames"])
        views = store.views(backbone, paths, _views(config), kind="test_time", augmix=config.augmix,
                            aug_seed=config.seed, num_workers=workers, progress=progress)
        logits = _adapt(learner, views.features, config, progress, "adapting")
        return logits, views.index, views.excluded


def stratified_subset(labels: np.ndarray, limit: int) -> np.ndarray:
    """Positions of ``limit`` images with every class in proportion, the same for every seed and
    method (so that runs limited to a subset stay comparable): each class is put in a fixed random
    order (generator seed 0) and its r-th image gets the key (r + 0.5) / n_class; the ``limit``
    smallest keys are taken (ties by position), returned in listing order."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(0)
    keys = np.empty(len(labels))
    for c in np.unique(labels):
        index = np.flatnonzero(labels == c)
        keys[index[rng.permutation(len(index))]] = (np.arange(len(index)) + 0.5) / len(index)
    return np.sort(np.argsort(keys, kind="stable")[:limit])


def _views(config: TPTRunConfig) -> int:
    """Views to encode: zero-shot classifies the original view only."""
    return 1 if config.method == "zeroshot" else config.views


def _learner_from_file(backbone: Any, path: Path, classnames: list[str]):
    tensors = load_file(str(path))
    ctx = tensors["ctx"]
    position = {0: "end", 1: "middle", 2: "front"}[int(tensors.get("position", torch.tensor(0)))]
    learner = PromptLearner(backbone, classnames, n_ctx=ctx.shape[0], position=position)
    with torch.no_grad():
        learner.ctx.copy_(ctx)
    return learner


def _load_attributes(path: str, classnames: list[str]) -> dict[str, list[str]]:
    """TCA's attribute words: a JSON object mapping every class name of the dataset to a non-empty
    list of distinct words or short phrases (extra keys are an error too: a misspelt class)."""
    file = Path(path).expanduser()
    where = f"--attributes {file}"
    if not file.is_file():
        raise ValueError(f"{where}: no such file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: not JSON ({exc})") from None
    example = '{"' + classnames[0] + '": ["word", "another word"], ...}'
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object of class name -> list of attribute words, e.g. {example}")
    missing = [c for c in classnames if c not in data]
    unknown = sorted(set(data) - set(classnames))
    if missing or unknown:
        raise ValueError(f"{where}: expected exactly the classes {classnames}; missing {missing}, unknown {unknown}")
    out = {}
    for name in classnames:
        words = data[name]
        if (not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words)
                or len(set(words)) != len(words)):
            raise ValueError(f"{where}: class {name!r} needs a non-empty list of distinct, non-empty strings, got "
                             f"{words!r}")
        out[name] = [w.strip() for w in words]
    return out


def _initial_learner(backbone: Any, classnames: list[str], config: TPTRunConfig, dataset_templates: list[str],
                     attributes: dict[str, list[str]] | None = None):
    """The prompt every image starts from (see :func:`initial_learner`); with ``ensemble`` one
    learner per template of the set (:func:`calibprompt.prompts.template_set`); for TCA the
    attribute prompts (:func:`calibprompt.methods.tpt.tca_learner`)."""
    if attributes is not None:
        return tpt_method.tca_learner(backbone, classnames, attributes, config.ctx_init), None
    if config.ensemble:
        return _ensemble_learners(backbone, classnames, template_set(config.ensemble, dataset_templates)), None
    return initial_learner(backbone, classnames, config.init_prompt, config.ctx_init, config.backbone)


def _ensemble_learners(backbone: Any, classnames: list[str], templates: list[str]) -> list[PromptLearner]:
    """One prompt learner per template, its context the template's words before the class."""
    learners = []
    for template in templates:
        learner = PromptLearner(backbone, classnames, init="words", init_words=prefix_words(template))
        learner.template = template  # recorded in config.json
        learners.append(learner)
    return learners


def initial_learner(backbone: Any, classnames: list[str], init_prompt: str | None, ctx_init: str,
                    backbone_name: str, flag: str = "--init-prompt"):
    """The prompt a per-image test-time step starts from: ``ctx_init`` words, or a CoOp-tuned
    context read from a run directory or its ``prompt.safetensors`` (``flag`` names the option in
    errors). Returns (learner, digest of the prompt or None)."""
    if init_prompt is None:
        return PromptLearner(backbone, classnames, init="words", init_words=ctx_init), None
    path = Path(init_prompt)
    tensor_file = path / "prompt.safetensors" if path.is_dir() else path
    record_file = (path if path.is_dir() else path.parent) / "config.json"
    if record_file.is_file() and json.loads(record_file.read_text()).get("regime") == "full":
        raise ValueError(f"{flag} {path}: a full fine-tuning run has no prompt to start from; pass a prompt-tuning run")
    if not tensor_file.is_file():
        raise ValueError(f"{flag} {path}: expected a finished prompt-tuning run directory or its "
                         "prompt.safetensors")
    run_config = {}
    if (tensor_file.parent / "config.json").is_file():
        run_config = json.loads((tensor_file.parent / "config.json").read_text()).get("config", {})
    try:
        ctx = load_file(str(tensor_file))["ctx"]
    except Exception as exc:
        raise ValueError(f"{flag} {tensor_file}: not a calibprompt prompt file ({exc})") from exc
    if ctx.ndim != 2 or run_config.get("class_specific"):
        raise ValueError(f"{flag} {tensor_file}: a test-time step needs one generic context (n_ctx, width); "
                         f"got shape {tuple(ctx.shape)}")
    if run_config.get("backbone") not in (None, backbone_name):
        raise ValueError(f"{flag} {tensor_file}: tuned on backbone {run_config['backbone']!r}, "
                         f"this run uses {backbone_name!r}")
    learner = PromptLearner(backbone, classnames, n_ctx=ctx.shape[0],
                            position=run_config.get("position", "end"))
    if learner.ctx.shape != ctx.shape:
        raise ValueError(f"{flag} {tensor_file}: context of shape {tuple(ctx.shape)} does not fit "
                         f"{backbone_name} (expected (n_ctx, {learner.ctx.shape[-1]}))")
    with torch.no_grad():
        learner.ctx.copy_(ctx)
    return learner, hashlib.sha256(ctx.float().numpy().tobytes()).hexdigest()[:16]


def _adapt(learner: Any, features: torch.Tensor, config: TPTRunConfig, progress: bool, label: str,
           done: dict[int, np.ndarray] | None = None, save_part: Any = None) -> np.ndarray:
    """Logits of every image (batched ``tpt_adapt``), skipping positions in ``done`` and handing
    each finished group of :data:`PART_IMAGES` images to ``save_part(positions, logits)``."""
    done = dict(done or {})
    n = features.shape[0]
    todo = [p for p in range(n) if p not in done]
    tpt = config.tpt_config()
    group = max(config.batch_size, PART_IMAGES)
    start = time.perf_counter()
    with rate_progress(progress) as bar:
        task = bar.add_task(f"{label} ({config.method})", total=n, completed=n - len(todo), rate="-")
        for g in range(0, len(todo), group):
            chunk = todo[g: g + group]
            logits = []
            for b in range(0, len(chunk), config.batch_size):
                batch = chunk[b: b + config.batch_size]
                if isinstance(learner, list):  # the template ensemble
                    out_logits, _ = tpt_method.tpt_adapt_ensemble(learner, features[batch], tpt)
                else:
                    out_logits, _ = tpt_method.tpt_adapt(learner, features[batch], tpt)
                logits.append(out_logits.double().cpu().numpy())
                rate = (g + b + len(batch)) / max(time.perf_counter() - start, 1e-9)
                bar.update(task, advance=len(batch), rate=f"{rate:.2f}")
            stacked = np.concatenate(logits)
            if save_part is not None:
                save_part(chunk, stacked)
            done.update(zip(chunk, stacked, strict=True))
    first = learner[0] if isinstance(learner, list) else learner
    groups = getattr(first, "groups", None)  # TCA: prompts per class
    classes = int(groups.max()) + 1 if groups is not None else len(first.classnames)
    return np.stack([done[p] for p in range(n)]) if n else np.zeros((0, classes))


def _done_parts(parts: Path, split: str) -> dict[int, np.ndarray]:
    """Position -> logits of the images finished by an earlier (interrupted) call."""
    done: dict[int, np.ndarray] = {}
    for part in sorted(parts.glob(f"{split}-*.npz")):
        with np.load(part, allow_pickle=False) as data:
            done.update(zip(data["positions"].tolist(), data["logits"], strict=True))
    return done


def _work(config: TPTRunConfig, directory: RunDirectory, backbone: Any, store: FeatureStore, learner: Any,
          test: Any, train: Any) -> Outputs:
    with atomic_path(directory.path("prompt.safetensors")) as tmp:
        if isinstance(learner, list):  # the ensemble: every template's initial context
            save_file({f"ctx_{k:03d}": lrn.ctx.detach().cpu().contiguous() for k, lrn in enumerate(learner)}, str(tmp))
        else:
            position = {"end": 0, "middle": 1, "front": 2}[learner.position]
            save_file({"ctx": learner.ctx.detach().cpu().contiguous(), "position": torch.tensor(position)}, str(tmp))
    parts = directory.path("parts")
    parts.mkdir(exist_ok=True)
    kw = {"augmix": config.augmix, "aug_seed": config.seed, "num_workers": config.workers,
          "progress": config.progress}

    def run_split(name: str, dataset: Any) -> tuple[np.ndarray, Any, float, int]:
        paths = dataset.paths
        views = store.views(backbone, paths, _views(config), kind="test_time", **kw)
        config.check_readable(views.excluded, f"the {name} split ({dataset.root})")
        tables.update(views.tables)
        done = _done_parts(parts, name)

        def save_part(chunk: list[int], logits: np.ndarray) -> None:
            write_npz(parts / f"{name}-{chunk[0]:07d}.npz", positions=np.asarray(chunk), logits=logits)

        start = time.perf_counter()
        logits = _adapt(learner, views.features, config, config.progress, f"{name} on {config.dataset}",
                        done, save_part)
        return logits, views, time.perf_counter() - start, len(views.index) - len(done)

    tables: set[str] = set()
    val_out: dict[str, Any] = {}
    excluded_train: list[list[str]] = []
    tuning, tuned = None, {}
    for prefix, per_class in (("val", config.val_per_class), ("calib", config.calib_per_class)):
        if not per_class:
            continue
        with unreadable_hint():
            if prefix == "val":
                manifest = tuning = validation_split(train, per_class=per_class, seed=config.seed,
                                                     strict=not config.skip_unreadable,
                                                     manifest_path=directory.path("splits/validation.json"))
            else:
                manifest = calibration_split(train, exclude=[tuning], per_class=per_class, seed=config.seed,
                                             strict=not config.skip_unreadable,
                                             manifest_path=directory.path("splits/calibration.json"))
        subset = manifest.subset_of(train)
        excluded_train += [[e["file"], e["reason"]] for e in manifest.excluded]
        if prefix == "val" and config.tune:  # the choice is made here, before the other splits are adapted
            split_views = store.views(backbone, subset.paths, _views(config), kind="test_time", **kw)
            config.check_readable(split_views.excluded, f"the tuning split ({subset.root})")
            tables.update(split_views.tables)
            config, logits, tuned = _tune(config, directory, learner, split_views.features,
                                          subset.labels[split_views.index])
        else:
            logits, split_views, _, _ = run_split(prefix, subset)
        val_out.update({f"{prefix}_logits": logits, f"{prefix}_labels": subset.labels[split_views.index],
                        f"{prefix}_files": [subset.files[i] for i in split_views.index]})
    if config.limit:
        test = test.subset(stratified_subset(test.labels, config.limit), split=test.split)
    test_logits, views, seconds, adapted = run_split("test", test)
    write_json(directory.path("cache_tables.json"), sorted(tables))
    return Outputs(
        test_logits=test_logits, test_labels=test.labels[views.index],
        test_files=[test.files[i] for i in views.index], excluded=list(views.excluded), **val_out,
        extra={**tuned, "adapted_images": adapted,
               "images_per_second": adapted / seconds if adapted and seconds > 0 else None,
               "test_images": len(views.index), "excluded_train_images": excluded_train})


def _tuned_name(method: str, space: dict[str, Dimension]) -> str:
    """How ``tuning.json`` names the tuned method: ``ctpt(lam=?lam)``."""
    return f"{method}(" + ", ".join(f"{n}=?{n}" for n in space) + ")"


def _tune(config: TPTRunConfig, directory: RunDirectory, learner: Any, features: torch.Tensor,
          labels: np.ndarray) -> tuple[TPTRunConfig, np.ndarray, dict[str, Any]]:
    """``--tune auto``: every candidate (lam, and SoC's delta) adapts each image of the tuning split
    on its cached views -- the run's procedure, per image from the initial prompt -- and is scored
    on those images' predictions (:func:`calibprompt.runs.tuning.run_search`). Returns the config
    with the chosen values, the chosen candidate's tuning-split logits and the ``tuning`` entry of
    ``metrics.json``; writes ``tuning.json``."""
    space = config.search_space()

    def evaluate_batch(proposals: list[dict[str, float]]) -> list[tuple[dict[str, float], dict[str, Any], Any]]:
        out = []
        for values in proposals:
            logits = _adapt(learner, features, replace(config, **values), False, "tuning")
            out.append((tuning_scores(logits, labels, config.n_bins), {"logits": torch.from_numpy(logits)}, None))
        return out

    result, chosen = run_search(directory, space, evaluate_batch, trials=config.trials, metric=config.tune_metric,
                                seed=config.seed, label=f"tuning {config.method}", progress=config.progress)
    values = result.chosen["values"]
    template = _tuned_name(config.method, space)
    chosen_name = f"{config.method}(" + ", ".join(f"{n}={v!r}" for n, v in values.items()) + ")"
    entry = write_tuning(directory, result, space, objective=template, chosen_objective=chosen_name,
                         trials=config.trials, seed=config.seed,
                         scored_on={"split": "tuning", "tuning_images": len(labels)})
    return replace(config, **values), chosen["tensors"]["logits"].numpy(), {"tuning": entry}
