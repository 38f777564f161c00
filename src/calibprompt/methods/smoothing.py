"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): certified L2 robustness of any
base classifier, as PromptSmooth (Hussein et al., MICCAI 2024) applies it to prompted VLMs.

The smoothed classifier is ``g(x) = argmax_c P_{δ ~ N(0, σ² I)}[f(x + δ) = c]``. ``x`` is the image
in [0, 1] *at the backbone's input resolution* (after its resize and centre crop, before its
mean/std normalisation), so σ and the certified radii are in that pixel space -- adding the
noise after normalisation would scale σ by 1/std (≈ 3.7 for CLIP). MedCLIP's input is a grey
image repeated to three channels: its noise is drawn on the one grey channel (then repeated).

- :func:`certify` (Cohen et al.'s CERTIFY): ``n0`` selection draws give the candidate ĉA (most
  frequent class); ``n`` *fresh* estimation draws give nA; ``p̲A`` is the one-sided
  Clopper-Pearson lower bound at level α, ``Beta⁻¹(α; nA, n − nA + 1)``; ``p̲A < 1/2`` abstains
  (radius 0), else the certified radius is ``R = σ · Φ⁻¹(p̲A)``.
- :func:`predict` (PREDICT): counts of ``n`` draws, the top two ``n1 ≥ n2``; abstain when the
  two-sided binomial test of ``n1`` out of ``n1 + n2`` at p = 1/2 has a p-value above α.
- Noise: draw ``k`` of image ``key`` at σ comes from a generator seeded by ``(seed, key, σ, k)``
  on the CPU, so results do not depend on batch size, order, worker or device; selection draws
  are ``k < n0``, estimation draws ``n0 ≤ k < n0 + n`` (disjoint by construction).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm

__all__ = [
    "ABSTAIN",
    "Certificate",
    "ImageCertificate",
    "PixelTransform",
    "certified_accuracy",
    "certify",
    "certify_image",
    "clopper_pearson_lower",
    "max_certifiable_radius",
    "noise",
    "noisy_counts",
    "pixel_transform",
    "predict",
    "prompted_classifier",
]

#: The prediction of an abstaining smoothed classifier.
ABSTAIN = -1


def clopper_pearson_lower(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper-Pearson lower bound of a binomial proportion with ``n_a``
    successes in ``n`` trials: ``Beta⁻¹(α; n_a, n − n_a + 1)`` (0 when ``n_a = 0``)."""
    if not 0 <= n_a <= n or n < 1:
        raise ValueError(f"clopper_pearson_lower: expected 0 <= n_a <= n and n >= 1, got n_a={n_a}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: expected a level in (0, 1), got {alpha!r}")
    return 0.0 if n_a == 0 else float(beta.ppf(alpha, n_a, n - n_a + 1))


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with ``n`` estimation draws (all of them votes for
    ĉA): ``σ · Φ⁻¹(α^{1/n})`` -- 3.20σ at n = 10⁴, 3.81σ at 10⁵, α = 0.001."""
    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's result for one image at one σ."""

    prediction: int  # ĉA, or ABSTAIN
    n_a: int  # estimation votes for the candidate ĉA
    n: int
    p_lower: float
    radius: float  # 0 when abstaining
    candidate: int  # ĉA (also when abstaining)


def certify(selection_counts: np.ndarray, estimation_counts: np.ndarray, sigma: float, alpha: float) -> Certificate:
    """CERTIFY from the class counts of the ``n0`` selection draws and of the ``n`` estimation
    draws (two disjoint sets of noise draws): ĉA = argmax of the selection counts (lowest index
    on ties), nA = its estimation count, ``p̲A`` = :func:`clopper_pearson_lower`, abstain when
    ``p̲A < 1/2``, else ``R = σ Φ⁻¹(p̲A)``."""
    selection_counts, estimation_counts = np.asarray(selection_counts), np.asarray(estimation_counts)
    if selection_counts.shape != estimation_counts.shape or selection_counts.ndim != 1:
        raise ValueError("certify: selection and estimation counts must be 1-D and of one length (the classes)")
    candidate = int(np.argmax(selection_counts))
    n = int(estimation_counts.sum())
    n_a = int(estimation_counts[candidate])
    p_lower = clopper_pearson_lower(n_a, n, alpha)
    if p_lower < 0.5:
        return Certificate(ABSTAIN, n_a, n, p_lower, 0.0, candidate)
    return Certificate(candidate, n_a, n, p_lower, float(sigma * norm.ppf(p_lower)), candidate)


def predict(counts: np.ndarray, alpha: float) -> int:
    """PREDICT from the class counts of ``n`` draws: the most frequent class, or :data:`ABSTAIN`
    when the two-sided binomial test of the top count n1 against the runner-up n2 (n1 out of
    n1 + n2 at p = 1/2) has a p-value above α."""
    counts = np.asarray(counts)
    order = np.argsort(-counts, kind="stable")
    n1, n2 = int(counts[order[0]]), int(counts[order[1]]) if len(counts) > 1 else 0
    if n1 + n2 == 0 or binomtest(n1, n1 + n2, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(order[0])


def certified_accuracy(radii: Sequence[float], correct: Sequence[bool], grid: Sequence[float]) -> np.ndarray:
    """Certified accuracy at each radius r of ``grid``: the fraction of images that are correct
    (abstentions count as wrong) with a certified radius ``R ≥ r``. (PromptSmooth's script counts
    ``R > r`` and divides by the number of images requested rather than certified.)"""
    radii, correct = np.asarray(radii, dtype=np.float64), np.asarray(correct, dtype=bool)
    if radii.shape != correct.shape or radii.ndim != 1 or len(radii) == 0:
        raise ValueError("certified_accuracy: radii and correct must be 1-D, non-empty and of one length")
    return np.array([float(np.mean(correct & (radii >= r))) for r in grid])


# -- noise and the base classifier's votes ---------------------------------------------------------


def _draw_seed(seed: int, key: str, sigma: float, draw: int) -> int:
    digest = hashlib.blake2b(f"{seed}|{key}|{sigma!r}|{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def noise(shape: Sequence[int], seed: int, key: str, sigma: float, draws: Sequence[int]) -> torch.Tensor:
    """Gaussian noise N(0, σ²) of ``shape`` for each of the ``draws`` (indices) of image ``key``:
    (len(draws), *shape), each draw from its own CPU generator seeded by (seed, key, σ, draw)."""
    out = torch.empty(len(draws), *shape)
    for i, k in enumerate(draws):
        generator = torch.Generator().manual_seed(_draw_seed(seed, key, sigma, k))
        out[i] = torch.randn(*shape, generator=generator)
    return out * sigma


@dataclass(frozen=True)
class PixelTransform:
    """A backbone's evaluation transform split at the pixel space of smoothing: ``to_pixels``
    (PIL image -> [0, 1] tensor at the input resolution: resize, crop, to-tensor) and
    ``normalize`` (what follows: mean/std, MedCLIP's channel repeat)."""

    to_pixels: Callable[[Any], torch.Tensor]
    normalize: Callable[[torch.Tensor], torch.Tensor]


def pixel_transform(eval_transform: Any) -> PixelTransform:
    """Split ``backbone.image_transform()`` (a torchvision ``Compose``) after its ``ToTensor``."""
    from torchvision import transforms as T  # imported on use (~1.5 s)

    ops = list(getattr(eval_transform, "transforms", []))
    cut = [i for i, op in enumerate(ops) if isinstance(op, T.ToTensor)]
    if not cut:
        raise ValueError(f"pixel_transform: no ToTensor in {eval_transform!r}; cannot find the [0, 1] pixel space")
    before, after = T.Compose(ops[: cut[0] + 1]), ops[cut[0] + 1:]

    def normalize(pixels: torch.Tensor) -> torch.Tensor:
        for op in after:
            pixels = torch.stack([op(p) for p in pixels]) if pixels.ndim == 4 else op(pixels)
        return pixels

    return PixelTransform(before, normalize)


def noisy_counts(classify: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, normalize: Callable,
                 num_classes: int, seed: int, key: str, sigma: float, draws: Sequence[int],
                 batch_size: int = 100) -> tuple[np.ndarray, torch.Tensor]:
    """Class counts of the base classifier over the noisy copies ``pixels + noise(draw)`` for
    ``draws`` (in batches of ``batch_size`` copies, any size giving the same result), and the
    summed softmax of the copies. ``classify(normalised batch) -> logits (B, C)``."""
    counts = np.zeros(num_classes, dtype=np.int64)
    prob_sum = torch.zeros(num_classes, dtype=torch.float64)
    draws = list(draws)
    for start in range(0, len(draws), batch_size):
        chunk = draws[start:start + batch_size]
        noisy = pixels[None] + noise(pixels.shape, seed, key, sigma, chunk)
        logits = classify(normalize(noisy)).double().cpu()
        counts += np.bincount(logits.argmax(1).numpy(), minlength=num_classes)
        prob_sum += torch.softmax(logits, dim=1).sum(0)
    return counts, prob_sum


@dataclass(frozen=True)
class ImageCertificate:
    """One image at one σ: CERTIFY's result, the estimation draws' class counts and their mean
    softmax (the smoothed probabilities p̄(x) that calibration is measured on)."""

    certificate: Certificate
    counts: np.ndarray
    mean_probs: np.ndarray


def certify_image(classify: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, normalize: Callable,
                  num_classes: int, *, key: str, sigma: float, n0: int = 100, n: int = 10_000,
                  alpha: float = 0.001, seed: int = 0, batch_size: int = 100) -> ImageCertificate:
    """CERTIFY one image: ``n0`` selection draws (indices 0..n0−1), then ``n`` estimation draws
    (n0..n0+n−1) of noise on ``pixels`` (its [0, 1] pixel space), ``batch_size`` noisy copies per
    forward of ``classify`` (normalised batch -> logits). Independent of every other image: the
    draws depend only on (seed, key, σ), so images can be spread over processes and machines."""
    for name, value in (("n0", n0), ("n", n), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if not sigma > 0:
        raise ValueError(f"sigma: expected a positive noise level, got {sigma!r}")
    selection, _ = noisy_counts(classify, pixels, normalize, num_classes, seed, key, sigma, range(n0), batch_size)
    estimation, prob_sum = noisy_counts(classify, pixels, normalize, num_classes, seed, key, sigma,
                                        range(n0, n0 + n), batch_size)
    return ImageCertificate(certify(selection, estimation, sigma, alpha), estimation, (prob_sum / n).numpy())


def prompted_classifier(backbone: Any, text_features: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The base classifier of a prompted VLM: logits ``s · f(x) · Tᵀ`` of normalised pixels, with
    the class text features ``T`` computed once (never per batch)."""
    text = text_features.to(backbone.device)

    def classify(pixels: torch.Tensor) -> torch.Tensor:
        return backbone.logit_scale * backbone.encode_images(pixels).float() @ text.float().T

    return classify
