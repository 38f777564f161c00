"""Learnable prompt context (CoOp, Zhou et al. 2022) on any Backbone.

The prompt of class c is the token sequence of ``"X X ... X {class}."`` (class at the end), of
``"X ... X {class} X ... X."`` (middle: half the context before, half after) or of
``"{class} X X ... X."`` (front). The word embeddings of the ``n_ctx`` placeholder tokens are
replaced by the context vectors -- shared by all classes (generic) or one set per class
(class-specific) -- and the whole sequence goes through
:meth:`Backbone.encode_token_embeddings`, which applies positions, token types, embedding layer
norm and the encoder exactly once.

Context is stored in float32 ("master parameters") whatever the encoder precision: the
published code trained PLIP/QuiltNet contexts in pure fp16, where an update of 1e-5 is rounded
away.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from calibprompt.backbones.base import Backbone, TokenBatch

__all__ = ["POSITIONS", "TEMPLATE_SETS", "PromptLearner", "check_distinct_prompts", "prefix_words", "template_set"]

POSITIONS = ("end", "middle", "front")
PLACEHOLDER = "X"
#: The shared-prefix path is used from this many classes on. Measured against plain truncation on a
#: CPU (ViT-B/32 text tower, packed suffixes): 1.42x at C = 2, 2.72x at C = 9, 2.96x at C = 100;
#: with one class there is nothing to share.
SHARED_PREFIX_MIN_CLASSES = 2


#: Named template sets of the ensemble setting of test-time tuning: ``tpt4`` -- the 4 templates of
#: the one public ensemble implementation of C-TPT's tables (the TCA repository); ``imagenet80`` --
#: CLIP's 80 ImageNet templates (from open_clip), of which the 78 that end with the class carry a
#: prefix context; ``dataset`` -- the dataset's own templates.
TEMPLATE_SETS = ("tpt4", "imagenet80", "dataset")
TPT4_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "a picture of the {}.")


def prefix_words(template: str) -> str | None:
    """The words a context initialised from ``template`` starts from: ``"a photo of a"`` for
    ``"a photo of a {}."``; None when the template places words after the class (a CoOp context
    is a prefix, the class name and "." end the prompt)."""
    head, sep, tail = template.partition("{}")
    if not sep or tail.strip() not in ("", ".") or not head.strip():
        return None
    return head.strip()


def template_set(name: str, dataset_templates: Sequence[str] = ()) -> list[str]:
    """The templates of a named set (:data:`TEMPLATE_SETS`) that can carry a prefix context
    (:func:`prefix_words`), in their published order; an error when none can."""
    if name == "tpt4":
        templates = list(TPT4_TEMPLATES)
    elif name == "imagenet80":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    elif name == "dataset":
        templates = list(dataset_templates)
    else:
        raise ValueError(f"ensemble: expected one of {', '.join(TEMPLATE_SETS)}, got {name!r}")
    usable = [t for t in templates if prefix_words(t) is not None]
    if not usable:
        raise ValueError(f"ensemble {name}: none of its templates {templates} ends with the class name "
                         "('<words> {}.'), so none can carry a prefix context")
    return usable


def check_distinct_prompts(batch: TokenBatch, classnames: Sequence[str], backbone_name: str) -> None:
    """Refuse prompts that tokenise identically for two classes: the model cannot tell those classes
    apart (e.g. class names outside a small model's vocabulary all become the unknown token)."""
    seen: dict[tuple[int, ...], int] = {}
    for c, ids in enumerate(batch.ids.tolist()):
        key = tuple(ids[: int(batch.lengths[c])])
        if key in seen:
            first = classnames[seen[key]]
            raise ValueError(f"classes {first!r} and {classnames[c]!r} give identical prompts for {backbone_name} "
                             "(their names tokenise the same, e.g. words outside its vocabulary); give the classes "
                             "names the model knows, e.g. in a classnames.txt ('<folder> <class name>' per line)")
        seen[key] = c


class PromptLearner(nn.Module):
    """Context vectors and the prompts they complete.

    Parameters
    ----------
    n_ctx: number of context vectors (CoOp: 16; ignored with ``init="words"``, which uses as
        many vectors as ``init_words`` has tokens).
    init: ``"random"`` -- N(0, 0.02^2) as CoOp, from a generator seeded by ``seed`` -- or
        ``"words"``: the word embeddings of ``init_words`` (e.g. "a photo of a").
    class_specific: one context per class instead of one shared context.
    position: where the class name goes relative to the context (``end`` / ``middle`` / ``front``).
    shared_prefix: encode the start token + generic context once for all classes on causal
        encoders (exact); ``None`` = when there are at least ``SHARED_PREFIX_MIN_CLASSES`` classes.
    """

    def __init__(
        self, backbone: Backbone, classnames: Sequence[str], n_ctx: int = 16,
        init: str = "random", init_words: str = "a photo of a", class_specific: bool = False,
        position: str = "end", seed: int = 0, shared_prefix: bool | None = None,
    ) -> None:
        super().__init__()
        if shared_prefix is None:  # measured: pays off from a handful of classes on (docs/benchmarks.md)
            shared_prefix = len(classnames) >= SHARED_PREFIX_MIN_CLASSES
        self.use_shared_prefix = bool(shared_prefix)
        if position not in POSITIONS:
            raise ValueError(f"position: expected one of {POSITIONS}, got {position!r}")
        if init not in ("random", "words"):
            raise ValueError(f"init: expected 'random' or 'words', got {init!r}")
        if not classnames:
            raise ValueError("classnames: expected at least one class")
        self.backbone = backbone
        self.classnames = [str(c).replace("_", " ") for c in classnames]
        self.position = position
        self.class_specific = bool(class_specific)

        placeholder_id = self._placeholder_id(backbone)
        if init == "words":
            word_batch = backbone.tokenize([init_words])
            n_words = int(word_batch.lengths[0]) - 2  # without start / end tokens
            if n_words < 1:
                raise ValueError(f"init_words: {init_words!r} has no tokens")
            n_ctx = n_words
        if n_ctx < 1:
            raise ValueError(f"n_ctx: expected a positive integer, got {n_ctx}")
        self.n_ctx = int(n_ctx)

        texts = [self._template(name) for name in self.classnames]
        batch = backbone.tokenize(texts)
        check_distinct_prompts(batch, self.classnames, backbone.name)
        self.ctx_positions = self._locate(batch, placeholder_id)
        expected = torch.arange(1, self.n_ctx + 1, device=self.ctx_positions.device)
        self._shares_prefix = (position == "end" and not self.class_specific
                               and bool((self.ctx_positions == expected).all()))
        with torch.no_grad():
            base = backbone.embed_tokens(batch.ids).float()
        self.register_buffer("base_embeddings", base, persistent=False)
        self.batch = batch
        width = base.shape[-1]
        shape = (len(self.classnames), self.n_ctx, width) if self.class_specific else (self.n_ctx, width)
        if init == "words":
            with torch.no_grad():
                words = backbone.embed_tokens(word_batch.ids)[0, 1:1 + self.n_ctx].float()
            ctx = words.expand(shape).clone()
        else:
            generator = torch.Generator().manual_seed(int(seed))
            ctx = torch.randn(shape, generator=generator) * 0.02
        self.ctx = nn.Parameter(ctx.to(base.device))

    # -- construction --------------------------------------------------------------------------
    @staticmethod
    def _placeholder_id(backbone: Backbone) -> int:
        ids = backbone.tokenize([PLACEHOLDER])
        if int(ids.lengths[0]) != 3:
            raise ValueError(f"{backbone.name}: the placeholder {PLACEHOLDER!r} is not a single token")
        return int(ids.ids[0, 1])

    def _template(self, name: str) -> str:
        ctx = " ".join([PLACEHOLDER] * self.n_ctx)
        if self.position == "end":
            return f"{ctx} {name}."
        if self.position == "front":
            return f"{name} {ctx}."
        half = self.n_ctx // 2
        first = " ".join([PLACEHOLDER] * half)
        second = " ".join([PLACEHOLDER] * (self.n_ctx - half))
        return f"{first} {name} {second}.".strip()

    def _locate(self, batch: TokenBatch, placeholder_id: int) -> torch.Tensor:
        """(C, n_ctx) positions of the context tokens in each prompt."""
        rows = []
        for c, ids in enumerate(batch.ids.tolist()):
            hits = [i for i, t in enumerate(ids[: int(batch.lengths[c])]) if t == placeholder_id]
            if self.position == "front":
                hits = hits[-self.n_ctx:]  # the class name may contain the placeholder word
            elif self.position == "end":
                hits = hits[: self.n_ctx]
            if len(hits) < self.n_ctx:
                raise ValueError(f"prompt for class {self.classnames[c]!r}: found {len(hits)} of "
                                 f"{self.n_ctx} context positions")
            if self.position == "middle" and len(hits) > self.n_ctx:
                half = self.n_ctx // 2
                hits = hits[:half] + hits[-(self.n_ctx - half):]
            rows.append(hits)
        return torch.tensor(rows, dtype=torch.long, device=batch.ids.device)

    # -- forward -------------------------------------------------------------------------------
    def prompt_embeddings(self) -> torch.Tensor:
        """(C, L, W) word embeddings with the context in place (float32)."""
        c = len(self.classnames)
        ctx = self.ctx if self.class_specific else self.ctx.expand(c, -1, -1)
        index = self.ctx_positions[:, :, None].expand(-1, -1, ctx.shape[-1])
        return self.base_embeddings.scatter(1, index, ctx)

    @property
    def shares_prefix(self) -> bool:
        """Generic context at the end: every prompt starts with [start] + the same context."""
        return self._shares_prefix

    def forward(self) -> torch.Tensor:
        """L2-normalised class text features (C, D) of this learner's context.

        With a generic context at the end on a causal encoder, the start token and the context
        are encoded once for all classes (:meth:`Backbone.encode_shared_prefix`, exact).
        """
        if self.class_specific:
            dtype = next(self.backbone.model.parameters()).dtype
            return self.backbone.encode_token_embeddings(self.prompt_embeddings().to(dtype), self.batch)
        return self.contexts_features(self.ctx[None])[0]

    def contexts_features(self, ctx: torch.Tensor) -> torch.Tensor:
        """Class text features (B, C, D) of B generic contexts (B, n_ctx, W) in one encoder pass
        -- the runs of a lockstep group, or the images of batched TPT, each with its own context
        completing this learner's prompts. Through the shared prefix where it applies (the B
        prefixes batched, each encoded once), else every prompt in full (truncated)."""
        if self.class_specific:
            raise ValueError("contexts_features: needs a generic (shared) context")
        if ctx.ndim != 3 or ctx.shape[1:] != (self.n_ctx, self.base_embeddings.shape[-1]):
            raise ValueError(f"contexts_features: expected contexts (B, {self.n_ctx}, "
                             f"{self.base_embeddings.shape[-1]}), got {tuple(ctx.shape)}")
        b, c = ctx.shape[0], len(self.classnames)
        dtype = next(self.backbone.model.parameters()).dtype
        if self.use_shared_prefix and self.shares_prefix:
            n = 1 + self.n_ctx
            start = self.base_embeddings[:1, :1].to(ctx.dtype).expand(b, -1, -1)
            prefix = torch.cat([start, ctx], dim=1)
            suffix = self.base_embeddings[:, n:]
            out = self.backbone.encode_shared_prefix(prefix.to(dtype), suffix.to(dtype), self.batch)
            if out is not None:
                return out.view(b, c, -1)
        base = self.base_embeddings.to(ctx.dtype).expand(b, -1, -1, -1)  # (B, C, L, W)
        index = self.ctx_positions[None, :, :, None].expand(b, -1, -1, ctx.shape[-1])
        embeds = base.scatter(2, index, ctx[:, None].expand(-1, c, -1, -1))
        batch = self.batch if b == 1 else self.batch.select(torch.arange(c).repeat(b))
        flat = embeds.reshape(b * c, *embeds.shape[2:]).to(dtype)
        return self.backbone.encode_token_embeddings(flat, batch).view(b, c, -1)

    def extra_repr(self) -> str:
        return (f"n_ctx={self.n_ctx}, classes={len(self.classnames)}, position={self.position!r}, "
                f"class_specific={self.class_specific}")
