"""Transformers ``CLIPModel`` checkpoints: PLIP (``HUB_IDS["plip"]``) and any other Hugging Face CLIP.

The text path runs the model's own modules -- ``embeddings`` (adds position embeddings to the
given word embeddings), every ``encoder`` layer under a causal mask, ``final_layer_norm``, EOT
pooling, ``text_projection`` -- and works on transformers 4.x and 5.x (5.x passes the causal mask
as ``attention_mask`` and returns plain tensors from encoder layers; 4.x takes it as
``causal_attention_mask`` and returns tuples).
"""

from __future__ import annotations

import inspect
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
)
from calibprompt.backbones.prefix import CausalLayer, pack_suffixes, shared_prefix_forward
from calibprompt.backbones.sources import (
    HUB_IDS,
    hub_file,
    hub_repo,
    is_hub_id,
    pretrained,
    read_json,
)
from calibprompt.backbones.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_transform

__all__ = ["HFClipBackbone", "check_prompt_lengths", "hf_tokenize", "load_hf_clip", "load_plip", "output_tensor"]

HF_CLIP_LAYOUT = """  DIR/config.json                    (CLIPConfig)
  DIR/model.safetensors              (or pytorch_model.bin)
  DIR/vocab.json, DIR/merges.txt, DIR/tokenizer_config.json, DIR/special_tokens_map.json
  DIR/preprocessor_config.json       (CLIPImageProcessor: size, crop_size, image_mean, image_std)"""


def output_tensor(output: Any, attribute: str = "pooler_output") -> torch.Tensor:
    """A tensor from a transformers call that returns either a tensor (4.x ``get_*_features``)
    or an output object (5.x)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[1] if attribute == "pooler_output" else output[0]
    return getattr(output, attribute)


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (1, 1, L, L) mask: 0 on and below the diagonal, the dtype's minimum above."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.triu_(1)[None, None]


class HFClipBackbone(Backbone):
    """A transformers ``CLIPModel`` behind the Backbone interface."""

    family = "hf_clip"
    causal = True

    def __init__(
        self, model: nn.Module, tokenizer: Any, name: str, preprocess: dict[str, Any],
        device: str | torch.device = "cpu", precision: str = "fp32", source: str | None = None,
        context_length: int = 77,
    ) -> None:
        super().__init__(precision=precision, source=source)
        self.model = model
        self.name = name
        self.tokenizer = tokenizer
        self.preprocess = dict(preprocess)
        self.context_length = int(context_length)
        self.embed_dim = int(model.config.projection_dim)
        self._text = model.text_model
        self._eos_id = int(model.config.text_config.eos_token_id)
        layer = self._text.encoder.layers[0]
        self._legacy_layers = "causal_attention_mask" in inspect.signature(layer.forward).parameters
        self._freeze(device)

    # -- text ----------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        ids, _ = hf_tokenize(self.tokenizer, texts, self.context_length, self.name, self.device)
        if self._eos_id == 2:  # legacy configs: EOT is the largest id (what CLIPTextModel does)
            eot = ids.argmax(dim=-1)
        else:
            eot = (ids == self._eos_id).int().argmax(dim=-1)
        positions = torch.arange(ids.shape[1], device=ids.device)
        mask = (positions[None, :] <= eot[:, None]).long()
        return TokenBatch(ids, mask, eot, eot + 1)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self._text.embeddings.token_embedding(ids)

    def _encode_embeddings(self, embeds: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        hidden = self._text.embeddings(inputs_embeds=embeds)
        mask = causal_mask(hidden.shape[1], hidden.dtype, hidden.device)
        for layer in self._text.encoder.layers:
            out = layer(hidden, None, mask) if self._legacy_layers else layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = self._text.final_layer_norm(hidden)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.eot_index]
        return self.model.text_projection(pooled)

    def encode_shared_prefix(
        self, prefix: torch.Tensor, suffix: torch.Tensor, batch: TokenBatch
    ) -> torch.Tensor | None:
        """The prefix once per layer (per context), the classes' suffixes packed without padding
        (:mod:`calibprompt.backbones.prefix`; exact). With B prefixes (B, P, W) every prefix
        completes every suffix: features (B * C, D), prefix-major."""
        layers = []
        for layer in self._text.encoder.layers:
            attn = layer.self_attn
            if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads")) or \
                    abs(float(getattr(attn, "scale", 0.0)) - (attn.q_proj.out_features // attn.num_heads) ** -0.5) > 1e-9:
                return None  # an attention other than CLIP's: the full prompts
            layers.append(CausalLayer(norm1=layer.layer_norm1, q=attn.q_proj, k=attn.k_proj, v=attn.v_proj,
                                      heads=attn.num_heads, out=attn.out_proj, norm2=layer.layer_norm2,
                                      mlp=layer.mlp))
        n_prefix = prefix.shape[1]
        if batch.real_length <= n_prefix or bool((batch.eot_index < n_prefix).any()):
            return None
        packing = pack_suffixes(batch.eot_index, n_prefix, prefix.device)
        positions = self._text.embeddings.position_embedding.weight
        with self.autocast():
            packed = suffix[packing.classes, packing.offsets] + positions[n_prefix + packing.offsets]
            ends = shared_prefix_forward(layers, prefix + positions[:n_prefix], packed, packing)
            pooled = self._text.final_layer_norm(ends).flatten(0, 1)
            features = self.model.text_projection(pooled)
        return normalized_features(features)

    # -- images --------------------------------------------------------------------------------
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model.vision_model(pixel_values=pixels)
        return self.model.visual_projection(output_tensor(out))

    def _eval_transform(self) -> Callable[[Any], torch.Tensor]:
        p = self.preprocess
        return clip_transform(p["size"], p["mean"], p["std"])

    # -- identity ------------------------------------------------------------------------------
    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().float())

    def architecture(self) -> dict[str, Any]:
        return {"config": self.model.config.to_dict(), "preprocess": self.preprocess,
                "context_length": self.context_length}


def hf_tokenize(
    tokenizer: Any, texts: Sequence[str] | str, context_length: int, name: str,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) of a transformers tokenizer, padded to ``context_length``; prompts
    that do not fit are refused (:func:`check_prompt_lengths`)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    check_prompt_lengths(tokenizer, texts, context_length, name)
    enc = tokenizer(texts, padding="max_length", max_length=context_length, truncation=True,
                    return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def check_prompt_lengths(tokenizer: Any, texts: list[str], context_length: int, name: str) -> None:
    """Refuse prompts longer than the context instead of silently truncating them."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    refuse_long_prompts(texts, lengths, context_length, name)


def _preprocess_config(path: Path | None, what: str) -> dict[str, Any]:
    data = read_json(path, what) if path is not None and path.is_file() else {}

    def edge(value: Any, default: int = 224) -> int:
        if isinstance(value, dict):
            return int(value.get("shortest_edge") or value.get("height") or default)
        return int(value or default)

    return {
        "size": edge(data.get("crop_size", data.get("size"))),
        "resize": edge(data.get("size")),
        "mean": list(data.get("image_mean", OPENAI_CLIP_MEAN)),
        "std": list(data.get("image_std", OPENAI_CLIP_STD)),
    }


def load_hf_clip(
    name: str, source: str, device: str | torch.device = "cpu", precision: str = "fp32",
    context_length: int = 77,
) -> HFClipBackbone:
    """A transformers CLIPModel + CLIPTokenizer from a hub id or a local directory."""
    from transformers import AutoTokenizer, CLIPModel  # heavy optional dependency: imported on use

    what = f"backbone '{name}'"
    hub = is_hub_id(source)
    location = hub_repo(source) if hub else str(Path(source).expanduser())
    if not hub:
        root = Path(location)
        if not root.is_dir():
            raise BackboneLoadError(f"{what}: '{root}' is not a directory. Expected:\n{HF_CLIP_LAYOUT}")
        missing = [f for f in ("config.json", "vocab.json", "merges.txt") if not (root / f).is_file()]
        if not any((root / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
            missing.append("model.safetensors (or pytorch_model.bin)")
        if missing:
            raise BackboneLoadError(f"{what}: '{root}' lacks {missing}. Expected:\n{HF_CLIP_LAYOUT}")
    hint = ("To use it offline, download the repository once and pass the directory as "
            "weights=DIR (CLI: --weights DIR)." if hub else "Is it a CLIPModel checkpoint?")
    model = pretrained(CLIPModel.from_pretrained, location, what, "a CLIPModel", hint, HF_CLIP_LAYOUT)
    tokenizer = pretrained(AutoTokenizer.from_pretrained, location, what, "its tokenizer", hint, HF_CLIP_LAYOUT)
    pre_path: Path | None = Path(location) / "preprocessor_config.json"
    if hub:
        try:
            pre_path = hub_file(location, "preprocessor_config.json", what, HF_CLIP_LAYOUT)
        except BackboneLoadError:
            pre_path = None  # fall back to CLIP's defaults (224, OpenAI mean/std)
    return HFClipBackbone(model, tokenizer, name, _preprocess_config(pre_path, what), device=device,
                          precision=precision, source=source, context_length=context_length)


def load_plip(weights: str | None = None, device: str | torch.device = "cpu",
              precision: str = "fp32") -> HFClipBackbone:
    """PLIP (Huang et al. 2023): a transformers CLIPModel, always tokenised to 77 tokens (its
    tokenizer sets no maximum length)."""
    return load_hf_clip("plip", weights or HUB_IDS["plip"], device, precision, context_length=77)
