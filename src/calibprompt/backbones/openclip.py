"""open_clip models: QuiltNet, BiomedCLIP and any open_clip architecture (``clip:<name>``).

Two text-tower shapes are supported:

- causal CLIP text transformers (``open_clip.CLIP`` and ``TextTransformer``): word embeddings
  + positional embeddings, causal transformer, ``ln_final``, pooled at EOT, projected;
- Hugging Face text towers (``HFTextEncoder``, e.g. BiomedCLIP's PubMedBERT): the BERT model is
  called with ``inputs_embeds`` (it adds positions, token types and its embedding LayerNorm once),
  then open_clip's own pooler and projection.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibprompt.backbones.base import (
    Backbone,
    BackboneLoadError,
    TokenBatch,
    normalized_features,
    refuse_long_prompts,
    warn_random_weights,
)
from calibprompt.backbones.hf_clip import check_prompt_lengths
from calibprompt.backbones.prefix import CausalLayer, pack_suffixes, shared_prefix_forward
from calibprompt.backbones.sources import (
    HUB_IDS,
    HUB_PREFIX,
    assign_state_dict,
    error_summary,
    hub_file,
    hub_mode,
    is_hub_id,
    load_state_dict,
    local_dir,
    pick_file,
    read_json,
)
from calibprompt.backbones.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_transform

__all__ = ["OpenClipBackbone", "load_biomedclip", "load_open_clip", "load_quiltnet"]

CHECKPOINT_NAMES = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin",
)
#: The directory inside a local BiomedCLIP folder that holds the BiomedBERT config + tokenizer.
TEXT_SUBDIR = "text"

OPEN_CLIP_LAYOUT = """  DIR/open_clip_config.json          (the repository's config: model_cfg + preprocess_cfg)
  DIR/open_clip_pytorch_model.bin    (or open_clip_model.safetensors)"""
BIOMEDCLIP_LAYOUT = OPEN_CLIP_LAYOUT + f"""
  DIR/{TEXT_SUBDIR}/config.json                 (BiomedBERT config: {HUB_IDS['biomedclip.text']})
  DIR/{TEXT_SUBDIR}/vocab.txt, tokenizer_config.json  (its tokenizer)"""


class OpenClipBackbone(Backbone):
    """An open_clip ``CLIP`` / ``CustomTextCLIP`` model behind the Backbone interface."""

    family = "open_clip"

    def __init__(
        self, model: nn.Module, tokenizer: Callable[..., torch.Tensor], name: str,
        preprocess: dict[str, Any], device: str | torch.device = "cpu", precision: str = "fp32",
        source: str | None = None, config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(precision=precision, source=source)
        self.model = model
        self.name = name
        self.tokenizer = tokenizer
        self.preprocess = dict(preprocess)
        self.config = config or {}
        self._freeze(device)

        text = getattr(model, "text", None)
        if text is not None and hasattr(text, "transformer") and hasattr(text, "pooler"):
            self.causal = False
            self._text = text
            self._hf = text.transformer
            self.context_length = int(getattr(tokenizer, "context_length", None) or 256)
            self.embed_dim = int(getattr(text, "output_dim", None) or self._infer_embed_dim())
        else:
            parts = text if text is not None else model
            needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
            if not all(hasattr(parts, n) for n in needed):
                raise BackboneLoadError(f"{name}: unsupported open_clip text tower {type(parts).__name__}")
            if getattr(parts, "cls_emb", None) is not None:
                raise BackboneLoadError(f"{name}: text towers with a class token (CoCa) are not supported")
            self.causal = True
            self._text = parts
            self.context_length = int(parts.positional_embedding.shape[0])
            self.embed_dim = self._infer_embed_dim()
            self._pool = getattr(parts, "text_pool_type", None) or getattr(parts, "pool_type", "argmax")
            self._eos_id = getattr(parts, "text_eos_id", None) or getattr(parts, "eos_id", None)
            if self._pool not in ("argmax", "eos", "first", "last"):
                raise BackboneLoadError(f"{name}: unsupported text pooling {self._pool!r}")

    def _infer_embed_dim(self) -> int:
        output_dim = getattr(getattr(self.model, "visual", None), "output_dim", None)
        if output_dim is not None:
            return int(output_dim)
        with torch.no_grad():
            return int(self.encode_texts(["a"]).shape[-1])

    # -- text ----------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        self._check_lengths(texts)
        ids = self.tokenizer(texts).to(self.device)
        if not self.causal:
            return TokenBatch.bidirectional(ids, (ids != self._hf.config.pad_token_id).long())
        n, length = ids.shape
        positions = torch.arange(length, device=ids.device)
        if self._pool == "argmax":
            eot = ids.argmax(dim=-1)
        elif self._pool == "eos":
            eot = (ids == self._eos_id).int().argmax(dim=-1)
        elif self._pool == "first":
            eot = torch.zeros(n, dtype=torch.long, device=ids.device)
        else:  # "last": the last position is pooled, so nothing can be cut
            eot = torch.full((n,), length - 1, dtype=torch.long, device=ids.device)
        lengths = eot + 1 if self._pool in ("argmax", "eos") else torch.full_like(eot, length)
        mask = (positions[None, :] < lengths[:, None]).long()
        return TokenBatch(ids, mask, eot, lengths)

    def _check_lengths(self, texts: list[str]) -> None:
        """Refuse prompts longer than the context instead of silently truncating them."""
        hf = getattr(self.tokenizer, "tokenizer", None)
        if hf is not None:  # open_clip's HFTokenizer wraps a transformers tokenizer
            check_prompt_lengths(hf, texts, self.context_length, self.name)
            return
        encode = getattr(self.tokenizer, "encode", None)
        if encode is not None:
            lengths = [len(encode(text)) + 2 for text in texts]  # + start and end of text
            refuse_long_prompts(texts, lengths, self.context_length, self.name)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self.causal:
            return self._text.token_embedding(ids)
        return self._hf.get_input_embeddings()(ids)

    def _encode_embeddings(self, embeds: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        if not self.causal:
            out = self._hf(inputs_embeds=embeds, attention_mask=batch.attention_mask)
            return self._text.proj(self._text.pooler(out, batch.attention_mask))
        parts = self._text
        length = embeds.shape[1]
        cast = parts.transformer.get_cast_dtype()
        x = embeds.to(cast) + parts.positional_embedding[:length].to(cast)
        mask = getattr(parts, "attn_mask", None)
        x = parts.transformer(x, attn_mask=None if mask is None else mask[:length, :length])
        x = parts.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), batch.eot_index]
        projection = parts.text_projection
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, nn.Module) else pooled @ projection

    def encode_shared_prefix(
        self, prefix: torch.Tensor, suffix: torch.Tensor, batch: TokenBatch
    ) -> torch.Tensor | None:
        """Causal CLIP towers: the prefix once per layer (per context), the classes' suffixes
        packed without padding (:mod:`calibprompt.backbones.prefix`; exact). With B prefixes
        (B, P, W) every prefix completes every suffix: features (B * C, D), prefix-major."""
        from open_clip.transformer import ResidualAttentionBlock  # heavy optional dependency

        if not self.causal or self._pool not in ("argmax", "eos"):
            return None
        parts = self._text
        blocks = list(parts.transformer.resblocks)
        if not all(type(b) is ResidualAttentionBlock for b in blocks):
            return None
        layers = [CausalLayer.from_multihead(b.attn, norm1=b.ln_1, norm2=b.ln_2, mlp=b.mlp, scale1=b.ls_1,
                                             scale2=b.ls_2) for b in blocks]
        n_prefix = prefix.shape[1]
        if None in layers or batch.real_length <= n_prefix or bool((batch.eot_index < n_prefix).any()):
            return None
        packing = pack_suffixes(batch.eot_index, n_prefix, prefix.device)
        with self.autocast():
            cast = parts.transformer.get_cast_dtype()
            pos = parts.positional_embedding.to(cast)
            packed = suffix[packing.classes, packing.offsets].to(cast) + pos[n_prefix + packing.offsets]
            ends = shared_prefix_forward(layers, prefix.to(cast) + pos[:n_prefix], packed, packing)
            pooled = parts.ln_final(ends).flatten(0, 1)  # (B * C, W)
            projection = parts.text_projection
            if projection is not None:
                pooled = projection(pooled) if isinstance(projection, nn.Module) else pooled @ projection
        return normalized_features(pooled)

    # -- images --------------------------------------------------------------------------------
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _eval_transform(self) -> Callable[[Any], torch.Tensor]:
        p = self.preprocess
        return clip_transform(p["size"], p["mean"], p["std"], interpolation=p.get("interpolation", "bicubic"))

    # -- identity ------------------------------------------------------------------------------
    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().float().reshape(-1)[0])

    def architecture(self) -> dict[str, Any]:
        return {"config": self.config, "preprocess": self.preprocess,
                "model_class": type(self.model).__name__, "text": "causal" if self.causal else "hf"}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _preprocess_from(config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    pre = config.get("preprocess_cfg", {}) or {}
    size = pre.get("size") or config["model_cfg"]["vision_cfg"].get("image_size", 224)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return {
        "size": int(size),
        "mean": list(pre.get("mean", OPENAI_CLIP_MEAN)),
        "std": list(pre.get("std", OPENAI_CLIP_STD)),
        "interpolation": pre.get("interpolation", "bicubic"),
    }


def _build_from_config(
    config: dict[str, Any], checkpoint: Path | None, what: str, text_dir: Path | None,
    quick_gelu: bool | None,
) -> tuple[nn.Module, dict[str, Any]]:
    import open_clip  # heavy optional dependency: imported on use

    model_cfg = copy.deepcopy(config["model_cfg"])
    if quick_gelu is not None:
        model_cfg["quick_gelu"] = bool(quick_gelu)
    text_cfg = model_cfg.get("text_cfg", {})
    hf_text = "hf_model_name" in text_cfg
    if hf_text:
        if text_dir is None:
            raise BackboneLoadError(f"{what}: needs the text model config and tokenizer. "
                                    f"Expected layout:\n{BIOMEDCLIP_LAYOUT}")
        text_cfg["hf_model_name"] = str(text_dir)
        text_cfg["hf_tokenizer_name"] = str(text_dir)
        text_cfg["hf_model_pretrained"] = False
    if "timm_model_name" in model_cfg.get("vision_cfg", {}):
        model_cfg["vision_cfg"]["timm_model_pretrained"] = False
    custom = model_cfg.pop("custom_text", False) or hf_text
    cls = open_clip.CustomTextCLIP if custom else open_clip.CLIP
    try:
        model = cls(**model_cfg)
    except Exception as exc:
        raise BackboneLoadError(f"{what}: could not build the model from its config "
                                f"({type(exc).__name__}: {exc})") from exc
    if checkpoint is not None:
        assign_state_dict(model, load_state_dict(checkpoint, what), what, str(checkpoint))
    return model, model_cfg


def _tokenizer_for(config: dict[str, Any], text_dir: Path | None) -> Callable[..., torch.Tensor]:
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer  # heavy optional dependency

    text_cfg = config["model_cfg"].get("text_cfg", {})
    context = int(text_cfg.get("context_length", 77))
    if "hf_tokenizer_name" in text_cfg or "hf_model_name" in text_cfg:
        kwargs = text_cfg.get("tokenizer_kwargs", {}) or {}
        return HFTokenizer(str(text_dir), context_length=context, **kwargs)
    return SimpleTokenizer(context_length=context)


def _resolve_text_dir(root: Path | None, config: dict[str, Any], source: str, what: str) -> Path | None:
    """The local directory with the HF text model's config + tokenizer, if the model has one."""
    text_cfg = config["model_cfg"].get("text_cfg", {})
    if "hf_model_name" not in text_cfg:
        return None
    candidates = [root / TEXT_SUBDIR] if root is not None else []
    named = Path(str(text_cfg["hf_model_name"])).expanduser()
    if named.is_dir():
        candidates.append(named)
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    if root is None:  # hub source: fetch the text model's config + tokenizer files from the hub
        repo = text_cfg["hf_model_name"]
        files = ["config.json", "vocab.txt", "tokenizer_config.json"]
        paths = [hub_file(repo, f, f"{what} text model", BIOMEDCLIP_LAYOUT) for f in files]
        return paths[0].parent
    raise BackboneLoadError(
        f"{what}: '{source}' has no text model config + tokenizer (looked in "
        f"{[str(c) for c in candidates]}). The open_clip config names "
        f"'{text_cfg['hf_model_name']}'; download its config.json and tokenizer files into "
        f"'{root / TEXT_SUBDIR}'. Expected layout:\n{BIOMEDCLIP_LAYOUT}"
    )


def load_open_clip_dir(
    name: str, source: str, device: str | torch.device = "cpu", precision: str = "fp32",
    quick_gelu: bool | None = None, layout: str = OPEN_CLIP_LAYOUT,
) -> OpenClipBackbone:
    """An open_clip model from a hub repository or a local directory in the hub's layout
    (``open_clip_config.json`` + weights), built without touching the network when local."""
    what = f"backbone '{name}'"
    if is_hub_id(source):
        config_path = hub_file(source, "open_clip_config.json", what, layout)
        checkpoint = None
        for candidate in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            try:
                checkpoint = hub_file(source, candidate, what, layout)
                break
            except BackboneLoadError as exc:
                last_error = exc
        if checkpoint is None:
            raise last_error
        root = None
    else:
        root = local_dir(source, what, layout)
        if root.is_file():
            raise BackboneLoadError(f"{what}: '{root}' is a file; expected a directory:\n{layout}")
        config_path = pick_file(root, ["open_clip_config.json"], what, layout)
        checkpoint = pick_file(root, CHECKPOINT_NAMES, what, layout)
    config = read_json(config_path, what)
    if "model_cfg" not in config:
        raise BackboneLoadError(f"{what}: '{config_path}' has no 'model_cfg'; expected an "
                                f"open_clip hub config. Layout:\n{layout}")
    text_dir = _resolve_text_dir(root, config, source, what)
    model, model_cfg = _build_from_config(config, checkpoint, what, text_dir, quick_gelu)
    return OpenClipBackbone(
        model, _tokenizer_for(config, text_dir), name, _preprocess_from(config, model),
        device=device, precision=precision, source=source,
        config={"model_cfg": model_cfg, "source_config": config.get("model_cfg")},
    )


def load_quiltnet(
    weights: str | None = None, device: str | torch.device = "cpu", precision: str = "fp32",
    quick_gelu: bool | None = None,
) -> OpenClipBackbone:
    """QuiltNet-B-32 (ViT-B/32 fine-tuned on Quilt-1M): hub id, local directory in the hub's
    layout, or a bare checkpoint file (then the built-in ViT-B-32 architecture is used).

    Activation: QuiltNet was fine-tuned from OpenAI's ViT-B/32, which uses QuickGELU. By default
    the model is built as its ``open_clip_config.json`` says -- exactly what
    ``open_clip.create_model_from_pretrained`` (and the CalibPrompt code) does; pass
    ``quick_gelu=True`` / ``False`` to override.
    """
    source = weights or HUB_IDS["quiltnet"]
    path = Path(source).expanduser()
    if not is_hub_id(source) and path.is_file():
        config = {"model_cfg": _builtin_config("ViT-B-32"), "preprocess_cfg": {}}
        if quick_gelu is not None:
            config["model_cfg"]["quick_gelu"] = quick_gelu
        model, model_cfg = _build_from_config(config, path, "backbone 'quiltnet'", None, None)
        return OpenClipBackbone(model, _tokenizer_for(config, None), "quiltnet",
                                _preprocess_from(config, model), device=device,
                                precision=precision, source=str(path),
                                config={"model_cfg": model_cfg})
    return load_open_clip_dir("quiltnet", source, device, precision, quick_gelu)


def load_biomedclip(
    weights: str | None = None, device: str | torch.device = "cpu", precision: str = "fp32",
) -> OpenClipBackbone:
    """BiomedCLIP (ViT-B/16 + PubMedBERT, context 256): hub id or a local directory holding the
    hub files plus the BiomedBERT config and tokenizer in ``text/``."""
    return load_open_clip_dir("biomedclip", weights or HUB_IDS["biomedclip"], device, precision,
                              layout=BIOMEDCLIP_LAYOUT)


def _builtin_config(arch: str) -> dict[str, Any]:
    import open_clip  # heavy optional dependency: imported on use

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        available = ", ".join(sorted(open_clip.list_models())[:20])
        raise BackboneLoadError(f"backbone 'clip:{arch}': unknown open_clip architecture; "
                                f"available include {available}, ... (open_clip.list_models())")
    return copy.deepcopy(cfg)


def load_open_clip(
    arch: str, weights: str | None = None, device: str | torch.device = "cpu",
    precision: str = "fp32", seed: int = 0,
) -> OpenClipBackbone:
    """``clip:<arch>``: any open_clip architecture with a pretrained tag (e.g. ``openai``,
    ``laion2b_s34b_b79k``), a checkpoint file, a hub id / directory in the hub layout, or
    ``weights="random"`` (seeded random initialisation; benchmarks and tests only)."""
    import open_clip  # heavy optional dependency: imported on use

    name = f"clip:{arch}"
    what = f"backbone '{name}'"
    if weights is None:
        tags = open_clip.list_pretrained_tags_by_model(arch) if arch in open_clip.list_models() else []
        raise BackboneLoadError(f"{what}: pass weights= a pretrained tag ({', '.join(tags) or 'none known'}), "
                                "a checkpoint file, a hub id or directory, or 'random'")
    if weights.startswith(HUB_PREFIX) or Path(weights).expanduser().is_dir():
        return load_open_clip_dir(name, weights, device, precision)
    config = {"model_cfg": _builtin_config(arch), "preprocess_cfg": {}}
    if weights == "random":
        warn_random_weights(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, model_cfg = _build_from_config(config, None, what, None, None)
    elif Path(weights).expanduser().is_file():
        model, model_cfg = _build_from_config(config, Path(weights).expanduser(), what, None, None)
    else:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if weights not in tags:
            raise BackboneLoadError(f"{what}: weights '{weights}' is neither a file, a directory, "
                                    f"'random', nor a pretrained tag of {arch} ({', '.join(tags) or 'none'})")
        with hub_mode() as offline:
            try:
                model = open_clip.create_model(arch, pretrained=weights)
            except Exception as exc:
                reason = f"the Hub is not reachable: {offline}; " if offline else ""
                raise BackboneLoadError(
                    f"{what}: could not load pretrained tag '{weights}' ({reason}{error_summary(exc)}). "
                    "Offline: download the checkpoint and pass its path as weights=FILE."
                ) from exc
        pre = open_clip.get_pretrained_cfg(arch, weights)
        config["preprocess_cfg"] = {k: pre[k] for k in ("mean", "std", "interpolation") if k in pre}
        model_cfg = config["model_cfg"]
        model_cfg["quick_gelu"] = bool(pre.get("quick_gelu", model_cfg.get("quick_gelu", False)))
    return OpenClipBackbone(model, _tokenizer_for(config, None), name, _preprocess_from(config, model),
                            device=device, precision=precision, source=weights,
                            config={"model_cfg": model_cfg, "weights": weights})

