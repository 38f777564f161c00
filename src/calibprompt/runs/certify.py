"""Certification runs (the ``certify`` kind): randomized smoothing of a prompted VLM at one σ.

The base classifier is the backbone with class text features computed once: the dataset's
zero-shot prompts, or the learned prompt of a finished prompt-tuning run (``prompt``). Each test
image of a seeded, class-stratified subset is certified with :func:`calibprompt.methods.smoothing.
certify_image` (``n0`` selection then ``n`` estimation draws of noise in the [0, 1] pixel space at
the backbone's input resolution); images are independent and checkpointed one by one, so an
interrupted run resumes after its last finished image.

Files besides the common ones: ``certification.csv`` (one row per image: ``image, label, sigma,
prediction`` (−1 = abstain), ``n_a, n, p_lower, radius``, then the mean softmax over the noise per
class), ``certified_accuracy.png``. ``predictions.npz`` holds ``log p̄(x)`` as ``test_logits``, so
``metrics.json``'s ``uncalibrated`` numbers are those of the smoothed probabilities p̄; its
``certification`` entry holds certified accuracy at the standard radii, the abstention rate, the
smoothed classifier's accuracy, the vote share's metrics (all images, and non-abstained ones with
their coverage) and the clean base classifier's metrics.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from calibprompt.data import FeatureStore, SplitManifest, calibration_split, validation_split
from calibprompt.data.images import open_image
from calibprompt.files import slug, write_text
from calibprompt.methods.promptsmooth import TestTimeConfig, adapt_to_noisy_copies
from calibprompt.methods.smoothing import (
    ABSTAIN,
    certified_accuracy,
    certify_image,
    max_certifiable_radius,
    noise,
    pixel_transform,
    prompted_classifier,
)
from calibprompt.methods.zeroshot import zeroshot_text_features
from calibprompt.metrics import METRICS_VERSION, evaluate
from calibprompt.metrics._validation import MAX_BINS
from calibprompt.plots import plot_certified_accuracy
from calibprompt.runs.common import (
    Outputs,
    Plan,
    RunConfigBase,
    cached_backbone,
    dataset_fingerprint,
    device_kind,
    labelled_sizes,
    option,
    test_split_record,
    unreadable_hint,
)
from calibprompt.runs.directory import RunDirectory, write_npz
from calibprompt.runs.executors import ExecutorOptions, check_executor, gpu_share, map_units
from calibprompt.runs.identity import RunIdentity, run_name
from calibprompt.runs.tpt import initial_learner, stratified_subset

__all__ = ["PROTOCOL_VERSION", "RADII", "CertifyRunConfig"]

#: Bumped when certification changes its results.
PROTOCOL_VERSION = 1
#: The radii at which certified accuracy is reported (pixel space [0, 1]).
RADII = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5)
#: PromptSmooth's per-image test-time steps (``test_time``).
TEST_TIME = ("entropy", "entropy+as")
#: ``--split``: the test split only, or the test and a calibration split of the train pool.
SPLITS = ("test", "calibration")
#: Images per checkpoint part (resumable per image).
PART_IMAGES = 1  # one image costs n0 + n forwards: minutes on a CPU
#: Fields that do not change a certification's result.
NON_EFFECTIVE = ("root", "weights", "device", "cache", "workers", "progress", "n_bins", "batch_size", "prompt",
                 "skip_unreadable", "precision", "test_fraction", "executor", "address", "ray_workers")


@dataclass(frozen=True)
class CertifyRunConfig(ExecutorOptions, RunConfigBase):
    """Certification of a prompted VLM by randomized smoothing at one noise level; the schema of
    the ``certify`` flags (one run per ``--sigma``)."""

    kind: ClassVar[str] = "certify"

    method: str = option("certify", help="the base classifier's name in reports", cli=False)
    sigma: float = option(0.25, help="noise level σ in the [0, 1] pixel space")
    n0: int = option(100, help="selection draws (choose the candidate class)")
    n: int = option(10_000, help="estimation draws (bound its probability); PromptSmooth 10,000, Cohen et al. 100,000")
    alpha: float = option(0.001, help="certification level: the certificate fails with probability at most alpha")
    subset: int | None = option(500, help="certify a seeded class-stratified subset of this many test images",
                                default_text="500 (all: 0 is refused, use a number at least the test size)")
    prompt: str | None = option(None, help="a finished prompt-tuning run whose learned prompt is the base classifier",
                                default_text="the dataset's zero-shot prompts")
    test_time: str | None = option(None, help="PromptSmooth's per-image step before certifying: entropy of the mean "
                                              "softmax over noisy copies (entropy), plus angular separation "
                                              "(entropy+as)", choices=TEST_TIME, default_text="none")
    as_weight: float = option(1.0, help="entropy+as: weight of the angular-separation term (no published value)")
    copies: int = option(TestTimeConfig.copies, help="test-time step: noisy copies of the image")
    ctx_init: str | None = option(None, help="test-time step without --prompt: the words the context starts from",
                                  default_text="the dataset template's words before the class name")
    batch_size: int = option(100, help="noisy copies per image-encoder forward (results do not depend on it)")
    n_bins: int = option(15, help="bins of ECE/MCE/ACE in metrics.json")
    split: str = option("test", help="calibration: also certify a calibration split of the train pool -- the "
                                     "smoothed probabilities that referral and conformal are fitted on (the test "
                                     "split is always certified)", choices=SPLITS)
    calib_per_class: int | None = option(None, help="--split calibration: calibration images per class",
                                         default_text="with --prompt, that run's calibration split; else as a "
                                                      "zero-shot run draws it: max(4, 64 / classes)")

    @property
    def needs_train(self) -> bool:
        return self.split == "calibration"

    def validate(self) -> None:
        self.check_types()
        self.check_base_options()
        if not self.sigma > 0:
            raise ValueError(f"sigma: expected a positive noise level, got {self.sigma!r}")
        for name in ("n0", "n", "batch_size", "n_bins"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.subset is not None and self.subset < 1:
            raise ValueError(f"subset: expected a positive number of images, got {self.subset!r}")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha: expected a level in (0, 0.5), got {self.alpha!r}")
        if self.test_time is not None and self.test_time not in TEST_TIME:
            raise ValueError(f"test_time: expected one of {', '.join(TEST_TIME)}, got {self.test_time!r}")
        if self.test_time != "entropy+as" and self.as_weight != CertifyRunConfig.as_weight:
            raise ValueError("--as-weight applies to --test-time entropy+as only")
        if self.test_time is None and self.ctx_init is not None:
            raise ValueError("--ctx-init applies to --test-time only")
        if self.copies < 1:
            raise ValueError(f"copies: expected a positive integer, got {self.copies!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.calib_per_class is not None:
            if self.split != "calibration":
                raise ValueError("--calib-per-class applies to --split calibration")
            if self.prompt is not None:
                raise ValueError("--calib-per-class: with --prompt the prompt run's own calibration split is "
                                 "certified (its images are disjoint from its shots and tuning split); drop one")
            if isinstance(self.calib_per_class, bool) or self.calib_per_class < 1:
                raise ValueError(f"calib_per_class: expected a positive integer, got {self.calib_per_class!r}")
        if self.n_bins > MAX_BINS:
            raise ValueError(f"n_bins: expected an integer from 1 to {MAX_BINS:,}, got {self.n_bins!r}")
        if self.seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {self.seed!r}")
        check_executor(self.executor, self.address, self.ray_workers)
        device_kind(self.device)

    def _base_text(self, backbone: Any, test: Any) -> tuple[torch.Tensor, str, str | None]:
        """(class text features, base classifier name, digest of the prompt run's features)."""
        if self.prompt is None:
            return zeroshot_text_features(backbone, list(test.classnames), test.templates), "zeroshot", None
        run = Path(self.prompt)
        record_file, classifier = run / "config.json", run / "classifier.safetensors"
        if not (record_file.is_file() and classifier.is_file() and (run / "metrics.json").is_file()):
            raise ValueError(f"--prompt {run}: expected a finished prompt-tuning run directory (config.json, "
                             "classifier.safetensors, metrics.json)")
        record = json.loads(record_file.read_text())
        if record.get("kind") != "prompt" or record.get("regime", "prompt") != "prompt":
            raise ValueError(f"--prompt {run}: a {record.get('regime', record.get('kind'))} run; certification takes "
                             "a prompt-tuning (or zero-shot) run")
        if record.get("backbone") != self.backbone or list(record.get("classnames", [])) != list(test.classnames):
            raise ValueError(f"--prompt {run}: made for {record.get('backbone')} with classes "
                             f"{record.get('classnames')}; this certification uses {self.backbone} with "
                             f"{list(test.classnames)}")
        text = load_file(str(classifier))["text_features"]
        digest = hashlib.sha256(text.float().numpy().tobytes()).hexdigest()[:16]
        return text, str(record.get("method", "prompt")), digest

    def context_words(self, test: Any) -> str:
        """The words the test-time context starts from: ``ctx_init`` or the dataset template's
        words before the class name ("An H&E image of" for Kather)."""
        if self.ctx_init is not None:
            return self.ctx_init
        words = test.templates[0].split("{}")[0].strip()
        return words or "a photo of a"

    def plan(self) -> Plan:
        self.validate()
        setup = _setup(self)
        backbone, test, digest, base = setup.backbone, setup.test, setup.digest, setup.base
        store = FeatureStore(self.cache)
        skip = (*NON_EFFECTIVE, *(() if self.test_time else ("as_weight", "copies", "ctx_init", "test_time")),
                *(() if self.test_time == "entropy+as" else ("as_weight",)),
                *(() if self.split == "calibration" else ("split", "calib_per_class")))  # test only: as before
        effective = {**{k: v for k, v in asdict(self).items() if k not in skip},
                     "base": base, "prompt_digest": digest, **self.data_effective()}
        data = {"test": dataset_fingerprint(test, store)}
        if setup.calib is not None:  # the calibration images certified, by content
            effective["calib_per_class"] = setup.calib_manifest.shots
            data["calibration"] = dataset_fingerprint(setup.calib, store)
        if self.test_time:
            effective["ctx_init"] = None if self.prompt else self.context_words(test)
        identity = RunIdentity(kind=self.kind, config=effective, data=data,
                               backbone=backbone.fingerprint, protocol_version=PROTOCOL_VERSION,
                               metrics_version=METRICS_VERSION, precision=self.precision,
                               device_kind=device_kind(self.device))
        defaults = {**{k: v for k, v in asdict(CertifyRunConfig(self.backbone, self.dataset, self.root)).items()
                       if k not in skip}, "base": base, "prompt_digest": digest}
        name = run_name([f"sigma{self.sigma:g}", f"seed{self.seed}"], effective, defaults, identity.run_id,
                        skip=("method", "backbone", "dataset", "seed", "sigma", "base", "prompt_digest", "test_time",
                              "ctx_init"))
        method = f"certify-{base}"
        path = Path(slug(self.dataset)) / slug(self.backbone) / slug(method, limit=40) / name
        record = {"base_classifier": base, "prompt": self.prompt, "prompt_digest": digest,
                  **test_split_record(self, None, test)}

        def work(directory: RunDirectory) -> Outputs:
            return _work(self, directory, store, setup)

        return Plan(identity, path, asdict(self), list(test.classnames), self.n_bins,
                    f"{self.backbone} / {self.dataset} / {method}, sigma {self.sigma:g}", work, record, method=method)

    def predict_logits(self, directory: Path, backbone: Any, paths: list[Path], store: FeatureStore,
                       *, workers: int | None = None, progress: bool = True):
        raise ValueError(f"{directory}: a certification run does not classify new images; certify them with "
                         "`calibprompt certify` (or predict with the run given as --prompt)")


@dataclass
class _Setup:
    """What certifying an image of a run needs: the backbone, the base classifier (class text
    features, or the test-time learner) and the run's test set (and its certified subset)."""

    backbone: Any
    test: Any
    subset: Any
    text: torch.Tensor | None
    learner: Any
    initial_ctx: torch.Tensor | None  # the test-time step resets the learner's context to it per image
    base: str
    digest: str | None
    calib: Any = None  # --split calibration: the calibration images (a subset of the train pool)
    calib_manifest: Any = None


@functools.lru_cache(maxsize=2)
def _setup(config: CertifyRunConfig) -> _Setup:
    """The run's :class:`_Setup`, once per process (the run's plan and each unit of work share it;
    a Ray worker builds it at its first image)."""
    train, test = config.load_splits()
    calib = manifest = None
    if config.split == "calibration":
        manifest = _calibration_manifest(config, train)
        calib = manifest.subset_of(train)
    backbone = cached_backbone(config.backbone, config.weights, config.device, config.precision)
    learner = None
    if config.test_time is None:
        text, base, digest = config._base_text(backbone, test)
    else:
        learner, digest = initial_learner(backbone, list(test.classnames), config.prompt, config.context_words(test),
                                          config.backbone, flag="--prompt")
        text, base = None, ("prompt" if config.prompt else "zeroshot") + f"+{config.test_time}"
    subset = test
    if config.subset is not None and config.subset < len(test):
        subset = test.subset(stratified_subset(test.labels, config.subset), split=test.split)
    initial_ctx = None if learner is None else learner.ctx.detach().clone()
    return _Setup(backbone, test, subset, text, learner, initial_ctx, base, digest, calib, manifest)


def _calibration_manifest(config: CertifyRunConfig, train: Any) -> Any:
    """``--split calibration``: the prompt run's calibration split (``--prompt``), or the one a
    zero-shot run with this seed draws (a tuning split first, then the calibration split)."""
    if config.prompt is not None:
        path = Path(config.prompt) / "splits" / "calibration.json"
        if not path.is_file():
            raise ValueError(f"--prompt {config.prompt}: the run has no calibration split (splits/calibration.json); "
                             "rerun it with this version of calibprompt, or certify without --split calibration")
        manifest = SplitManifest.load(path)
        manifest.validate(train, source=str(path))
        return manifest
    val_size, calib_size = labelled_sizes(train, 0, None, config.calib_per_class, config.dataset)
    with unreadable_hint():
        tuning = validation_split(train, per_class=val_size, seed=config.seed, strict=not config.skip_unreadable)
        return calibration_split(train, exclude=[tuning], per_class=calib_size, seed=config.seed,
                                 strict=not config.skip_unreadable)


def certify_images(config: CertifyRunConfig, items: list[tuple]) -> list[tuple[int, np.ndarray, str | None,
                                                                             list[int]]]:
    """Certify the images ``items`` -- (position in the certified subset, content hash), or (position
    in the calibration split, hash, ``"calibration"``) -- of the run ``config``: the unit of work of
    both executors. Each image's noise is seeded by (seed,
    hash, sigma, draw), so the result does not depend on the process that computes it. Returns
    (position, row, reason it does not decode or None, pixel shape) per image; a row holds
    prediction, n_a, n, p_lower, radius, candidate, counts (C), mean softmax (C), clean logits (C)."""
    setup = _setup(config)
    backbone, learner = setup.backbone, setup.learner
    split = pixel_transform(backbone.image_transform())
    classify = None if setup.text is None else prompted_classifier(backbone, setup.text)
    step = TestTimeConfig(copies=config.copies, as_weight=config.as_weight if config.test_time == "entropy+as" else 0.0)
    c = setup.test.num_classes
    out = []
    for i, key, *which in items:
        test = setup.calib if which == ["calibration"] else setup.subset
        try:
            pixels = split.to_pixels(open_image(test.path(i)))
        except Exception as exc:  # an image that does not decode
            out.append((i, np.full(6 + 3 * c, np.nan), f"unreadable image ({type(exc).__name__}: {str(exc)[:120]})",
                        []))
            continue
        if learner is not None:  # PromptSmooth's test-time step on this image's own noisy copies
            with torch.no_grad():
                copies = pixels[None] + noise(pixels.shape, config.seed, f"{key}|test-time", config.sigma,
                                              range(config.copies))
                feats = torch.cat([backbone.encode_images(split.normalize(copies[b:b + config.batch_size]))
                                   for b in range(0, config.copies, config.batch_size)])
            classify = prompted_classifier(backbone, adapt_to_noisy_copies(
                learner, setup.initial_ctx, feats, backbone.logit_scale, step))
        with torch.no_grad():
            result = certify_image(classify, pixels, split.normalize, c, key=key,
                                   sigma=config.sigma, n0=config.n0, n=config.n, alpha=config.alpha,
                                   seed=config.seed, batch_size=config.batch_size)
            clean = classify(split.normalize(pixels[None])).double().cpu().numpy()[0]
        cert = result.certificate
        out.append((i, np.array([cert.prediction, cert.n_a, cert.n, cert.p_lower, cert.radius, cert.candidate,
                                 *result.counts, *result.mean_probs, *clean], dtype=np.float64), None,
                    list(pixels.shape)))
    return out


def _work(config: CertifyRunConfig, directory: RunDirectory, store: FeatureStore, setup: _Setup) -> Outputs:
    test = setup.subset
    splits = {"test": ("certify", test), **({"calibration": ("calib", setup.calib)} if setup.calib is not None else {})}
    if setup.calib_manifest is not None:
        setup.calib_manifest.save(directory.path("splits/calibration.json"))
    parts = directory.path("parts")
    parts.mkdir(exist_ok=True)
    done: dict[str, dict[int, np.ndarray]] = {name: {} for name in splits}
    for name, (prefix, _) in splits.items():
        for part in sorted(parts.glob(f"{prefix}-*.npz")):
            with np.load(part, allow_pickle=False) as data:
                done[name].update(zip(data["positions"].tolist(), data["rows"], strict=True))
    excluded: list[tuple[str, str]] = []
    resolution: list[int] = []
    unit_config = replace(config, progress=False, executor="serial", address=None, ray_workers=None)
    units = []
    for name, (_, dataset) in splits.items():
        keys = store.hashes(dataset.paths)  # content hashes, memoised when the run was identified
        todo = [i for i in range(len(dataset)) if i not in done[name]]
        tag = () if name == "test" else (name,)
        units += [(unit_config, [(i, keys[i], *tag) for i in todo[g:g + PART_IMAGES]])
                  for g in range(0, len(todo), PART_IMAGES)]
    unit_split = [("test" if len(items[0]) == 2 else items[0][2]) for _, items in units]

    def finished(index: int, rows: list[tuple[int, np.ndarray, str | None, list[int]]]) -> None:
        name = unit_split[index]
        prefix, dataset = splits[name]
        for i, _row, reason, shape in rows:
            if reason is not None:
                excluded.append((str(dataset.path(i)), reason))
            resolution[:] = shape or resolution
        positions = [i for i, *_ in rows]
        stacked = np.stack([row for _, row, *_ in rows])
        write_npz(parts / f"{prefix}-{positions[0]:07d}.npz", positions=np.asarray(positions), rows=stacked)
        done[name].update(zip(positions, stacked, strict=True))

    map_units(certify_images, units, config.executor, address=config.address, workers=config.ray_workers,
              on_done=finished, description=f"certifying sigma {config.sigma:g} ({len(done['test'])} of {len(test)} "
                                            "test images done before)" if done["test"] else
                                            f"certifying sigma {config.sigma:g}",
              progress=config.progress, gpus=gpu_share(config.device))
    if not resolution:  # resumed with every image done: the input shape of the backbone
        size = pixel_transform(_setup(config).backbone.image_transform())
        resolution = list(size.to_pixels(Image.new("RGB", (8, 8))).shape)
    config.check_readable(excluded, f"the test split ({test.root})" + (" or the calibration split"
                                                                         if setup.calib is not None else ""))
    outputs = _outputs(config, directory, test, done["test"], resolution)
    if setup.calib is not None:  # the smoothed probabilities of the calibration images, as log p̄
        calib = setup.calib
        keep = [i for i in range(len(calib)) if not np.isnan(done["calibration"][i][0])]
        c = calib.num_classes
        mean_probs = np.stack([done["calibration"][i][6 + c:6 + 2 * c] for i in keep])
        outputs.calib_logits = np.log(np.clip(mean_probs, 1e-300, None))
        outputs.calib_labels = calib.labels[keep]
        outputs.calib_files = [calib.files[i] for i in keep]
    return outputs


def _outputs(config: CertifyRunConfig, directory: RunDirectory, test: Any, done: dict[int, np.ndarray],
             resolution: list[int]) -> Outputs:
    c = test.num_classes
    keep = [i for i in range(len(test)) if not np.isnan(done[i][0])]
    table = np.stack([done[i] for i in keep])
    labels = test.labels[keep]
    prediction, radius = table[:, 0].astype(int), table[:, 4]
    counts, mean_probs, clean_logits = table[:, 6:6 + c], table[:, 6 + c:6 + 2 * c], table[:, 6 + 2 * c:6 + 3 * c]
    correct = prediction == labels  # abstention (-1) is never correct
    abstained = prediction == ABSTAIN
    vote_probs = counts / counts.sum(1, keepdims=True)  # each class's share of the n estimation draws
    clean = np.exp(clean_logits - clean_logits.max(1, keepdims=True))
    clean /= clean.sum(1, keepdims=True)
    accuracy_at = certified_accuracy(radius, correct, RADII)
    answered = ~abstained
    certification = {
        "sigma": config.sigma, "n0": config.n0, "n": config.n, "alpha": config.alpha, "images": len(keep),
        "resolution": resolution, "noise_space": "[0, 1] pixels at the input resolution, before normalisation",
        "certified_accuracy": {f"{r:g}": float(a) for r, a in zip(RADII, accuracy_at, strict=True)},
        "abstention_rate": float(abstained.mean()), "smoothed_accuracy": float(correct.mean()),
        "max_certifiable_radius": max_certifiable_radius(config.sigma, config.n, config.alpha),
        "vote_share": {"all": evaluate(vote_probs, labels, n_bins=config.n_bins),
                       "answered": (evaluate(vote_probs[answered], labels[answered], n_bins=config.n_bins)
                                    if answered.any() else None),
                       "coverage": float(answered.mean())},
        "clean_base_classifier": evaluate(clean, labels, n_bins=config.n_bins),
        "covers": ("the smoothed classifier g of a fixed prompt: a certificate at x holds for every x' with "
                   "||x' - x||_2 < radius" if config.test_time is None else
                   "the smoothed classifier of the prompt tuned on x itself, around x -- not the map "
                   "x' -> g_theta(x')(x'): a perturbed input would get another prompt"),
    }
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "label", "sigma", "prediction", "n_a", "n", "p_lower", "radius",
                     *(f"p_{name}" for name in test.classnames)])
    for row, i in zip(table, keep, strict=True):
        writer.writerow([test.files[i], int(test.labels[i]), config.sigma, int(row[0]), int(row[1]), int(row[2]),
                         repr(float(row[3])), repr(float(row[4])), *(repr(float(p)) for p in row[6 + c:6 + 2 * c])])
    write_text(directory.path("certification.csv"), buffer.getvalue())
    plot_certified_accuracy({f"σ = {config.sigma:g}": (RADII, accuracy_at)}, directory.path("certified_accuracy.png"),
                            title=f"{config.backbone} / {config.dataset}, n = {config.n}, α = {config.alpha:g}")
    return Outputs(test_logits=np.log(np.clip(mean_probs, 1e-300, None)), test_labels=labels,
                   test_files=[test.files[i] for i in keep],
                   excluded=[(test.files[i], "unreadable image") for i in range(len(test)) if i not in keep],
                   extra={"certification": certification})
