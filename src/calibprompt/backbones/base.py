"""The Backbone interface: one small adapter per model family.

Every method of calibprompt talks to a frozen vision-language model through these calls::

    tokenize(texts) -> TokenBatch(ids, attention_mask, eot_index, lengths)
    embed_tokens(ids) -> word embeddings (no positions, no type embeddings, no layer norm)
    encode_token_embeddings(embeds, batch) -> L2-normalised text features
    encode_texts(texts) -> L2-normalised text features (no gradient)
    encode_images(pixels) -> L2-normalised image features (no gradient)
    logit_scale, image_transform(), fingerprint, context_length, embed_dim, model

Learned prompt context enters as rows of ``embeds`` (replacing placeholder word embeddings);
positions, token types, embedding layer norm and the encoder are applied exactly once inside
``encode_token_embeddings``. Invariant, tested for every family:
``encode_token_embeddings(embed_tokens(b.ids), b) == upstream text features`` (fp32, 1e-5).

Text encoders are causal (CLIP) or masked (BERT), so the sequence is cut after the longest real
prompt (``TokenBatch.real_length``) without changing any feature.

``image_transform()`` is the backbone's own preprocessing (its evaluation transform); augmented
views (training crops, test-time views) are built from it in :mod:`calibprompt.data.views`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PRECISIONS", "Backbone", "BackboneLoadError", "TokenBatch", "refuse_long_prompts"]

#: Encoder precisions: autocast dtype on an accelerator (fp32 = no autocast).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class BackboneLoadError(ValueError):
    """A model could not be loaded: the message names the source, what was expected and how to
    fix it (e.g. the directory layout to create for offline use)."""


@dataclass(frozen=True)
class TokenBatch:
    """Tokenised prompts.

    ``ids`` and ``attention_mask`` are (N, L); ``eot_index`` (N,) is the position the text
    encoder pools from (EOT for causal CLIP, [CLS] = 0 for BERT); ``lengths`` (N,) counts the
    real tokens (specials included), so positions ``>= lengths[i]`` are padding.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    eot_index: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def bidirectional(cls, ids: torch.Tensor, attention_mask: torch.Tensor) -> TokenBatch:
        """A batch for a bidirectional (BERT) encoder: pooled at [CLS] (position 0), real tokens
        up to the last attended position."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        lengths = torch.where(attention_mask.bool(), positions + 1, 0).max(dim=1).values
        return cls(ids, attention_mask, torch.zeros_like(lengths), lengths)

    def __post_init__(self) -> None:
        if self.ids.ndim != 2 or self.attention_mask.shape != self.ids.shape:
            raise ValueError(
                f"TokenBatch: ids and attention_mask must be (N, L) of equal shape, got "
                f"{tuple(self.ids.shape)} and {tuple(self.attention_mask.shape)}"
            )

    @property
    def real_length(self) -> int:
        """Length up to the longest real prompt: the encoder never needs more positions."""
        return int(self.lengths.max())

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device: torch.device | str) -> TokenBatch:
        """The batch on ``device``."""
        return TokenBatch(self.ids.to(device), self.attention_mask.to(device),
                          self.eot_index.to(device), self.lengths.to(device))

    def truncate(self, length: int) -> TokenBatch:
        """The first ``length`` positions (must keep every real token)."""
        if length < self.real_length:
            raise ValueError(f"TokenBatch.truncate: {length} would cut real tokens "
                             f"(longest prompt has {self.real_length})")
        return TokenBatch(self.ids[:, :length], self.attention_mask[:, :length],
                          self.eot_index, self.lengths)

    def select(self, index: torch.Tensor | Sequence[int]) -> TokenBatch:
        """The prompts at ``index``."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.ids.device)
        return TokenBatch(self.ids[index], self.attention_mask[index], self.eot_index[index],
                          self.lengths[index])


def refuse_long_prompts(texts: Sequence[str], lengths: Sequence[int], context_length: int, name: str) -> None:
    """Raise ValueError naming the first prompt whose token count (specials included) exceeds the
    context: prompts are refused, never silently truncated (a cut prompt loses its class name)."""
    too_long = [(t, n) for t, n in zip(texts, lengths, strict=True) if n > context_length]
    if too_long:
        text, n = too_long[0]
        raise ValueError(
            f"{name}: prompt {text[:80]!r} has {n} tokens, more than the context length "
            f"{context_length} ({len(too_long)} prompt(s) too long); shorten the class name or "
            "use fewer context tokens"
        )


def _weights_digest(module: nn.Module) -> str:
    """BLAKE2b of every parameter and buffer (name, dtype, shape, bytes), in name order."""
    h = hashlib.blake2b(digest_size=16)
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def normalized_features(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised features in at least float32 (half precision is promoted; float64, as
    in gradient checks, stays float64)."""
    return F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)


class Backbone(ABC):
    """A frozen vision-language model behind the calibprompt interface.

    Subclasses implement the family-specific pieces (``tokenize``, ``embed_tokens``,
    ``_encode_embeddings``, ``_encode_pixels``, ``_eval_transform``, ``logit_scale``) and set
    ``name``, ``family``, ``context_length``, ``embed_dim`` and ``model``.
    """

    name: str
    family: str
    model: nn.Module
    context_length: int
    embed_dim: int
    #: True for causal (CLIP-style) text encoders; False for bidirectional (BERT) ones.
    causal: bool

    def __init__(self, precision: str = "fp32", source: str | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.source = source

    # -- construction helpers ------------------------------------------------------------------
    def _freeze(self, device: torch.device | str) -> None:
        self.model.to(device)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return next(self.model.parameters()).device

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast to the configured precision on an accelerator; a no-op for fp32 / CPU."""
        dtype = PRECISIONS[self.precision]
        if dtype is None or self.device.type == "cpu":
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=dtype):
            yield

    # -- text ----------------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        """Tokenise to the family's context length (padded), on the backbone's device."""

    @abstractmethod
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings (N, L, W) of token ids: no positions, types or layer norm."""

    @abstractmethod
    def _encode_embeddings(self, embeds: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """Unnormalised text features from word embeddings already cut to ``batch``'s length."""

    def encode_token_embeddings(
        self, embeds: torch.Tensor, batch: TokenBatch, truncate: bool = True
    ) -> torch.Tensor:
        """L2-normalised text features (N, D) from word embeddings (N, L, W).

        Positions (and token types / embedding layer norm for BERT) and the encoder are applied
        once. With ``truncate`` the encoder runs on the first ``batch.real_length`` positions
        only, which leaves every feature unchanged (causal or masked attention).
        """
        if embeds.ndim != 3 or embeds.shape[:2] != batch.ids.shape:
            raise ValueError(
                f"encode_token_embeddings: embeds must be (N, L, W) with (N, L) = "
                f"{tuple(batch.ids.shape)}, got {tuple(embeds.shape)}"
            )
        if truncate and batch.real_length < embeds.shape[1]:
            length = batch.real_length
            embeds, batch = embeds[:, :length], batch.truncate(length)
        with self.autocast():
            features = self._encode_embeddings(embeds, batch)
        return normalized_features(features)

    def encode_shared_prefix(
        self, prefix: torch.Tensor, suffix: torch.Tensor, batch: TokenBatch
    ) -> torch.Tensor | None:
        """Text features of prompts that all start with the same ``prefix`` embeddings (1, P, W)
        followed by per-prompt ``suffix`` embeddings (C, S, W), computing the prefix once. With B
        prefixes (B, P, W), each completes every suffix: features (B * C, D), prefix-major.

        Exact for causal encoders (the prefix never attends to what follows). Returns None when
        the family does not implement it; callers then use :meth:`encode_token_embeddings`.
        """
        return None

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text features (N, D) of ``texts`` (no gradient)."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ValueError("encode_texts: no texts given")
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenize(list(texts[start : start + batch_size]))
            out.append(self.encode_token_embeddings(self.embed_tokens(batch.ids), batch))
        return torch.cat(out)

    # -- images --------------------------------------------------------------------------------
    @abstractmethod
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image features of preprocessed pixels (B, 3, H, W)."""

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features (B, D) of preprocessed pixels (no gradient)."""
        if pixels.ndim != 4:
            raise ValueError(f"encode_images: pixels must be (B, C, H, W), got {tuple(pixels.shape)}")
        pixels = pixels.to(self.device, non_blocking=True)
        with self.autocast():
            features = self._encode_pixels(pixels)
        return normalized_features(features)

    @abstractmethod
    def _eval_transform(self) -> Callable[[Any], torch.Tensor]:
        """The family's evaluation preprocessing (a torchvision ``Compose`` with its resize/crop)."""

    def image_transform(self, train: bool = False) -> Callable[[Any], torch.Tensor]:
        """The backbone's own preprocessing, PIL image -> normalised tensor: its evaluation
        transform (resize/crop to its resolution, its normalisation). Augmentations are built from
        it by :mod:`calibprompt.data.views`; ``train=True`` is refused with that pointer."""
        if train:
            raise ValueError(
                "image_transform(train=True): backbones build only their evaluation transform; the "
                "prompt-tuning augmentation is calibprompt.data.views.train_view_transform("
                "backbone.image_transform())"
            )
        return self._eval_transform()

    # -- identity ------------------------------------------------------------------------------
    @property
    @abstractmethod
    def logit_scale(self) -> float:
        """``exp(logit_scale)`` of the checkpoint (clamped as the family does)."""

    @abstractmethod
    def architecture(self) -> dict[str, Any]:
        """JSON-serialisable description of the architecture and preprocessing."""

    @cached_property
    def fingerprint(self) -> str:
        """Identity of architecture + weights + preprocessing + precision, for cache keys."""
        description = json.dumps(
            {"family": self.family, "name": self.name, "precision": self.precision,
             "architecture": self.architecture(), "weights": _weights_digest(self.model)},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(description.encode()).hexdigest()[:32]

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Scaled logits ``s * F T^T`` of normalised features."""
        return self.logit_scale * image_features @ text_features.T

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, embed_dim={self.embed_dim}, "
                f"context_length={self.context_length}, precision={self.precision!r})")


def warn_random_weights(name: str) -> None:
    """Warn that ``weights='random'`` gives a meaningless model (benchmarks and tests only)."""
    warnings.warn(
        f"{name}: weights='random' builds a randomly initialised model — for benchmarks and "
        "tests only; its features and predictions are meaningless",
        UserWarning, stacklevel=3,
    )
