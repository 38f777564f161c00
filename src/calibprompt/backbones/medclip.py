"""MedCLIP-ViT (Wang et al. 2022) in plain transformers modules, without the ``medclip`` package.

Architecture of the released ``pytorch_model.bin`` (keys in brackets):

- vision [``vision_model.model.*``]: ``SwinModel`` (swin-tiny-patch4-window7-224), pooled
  output -> ``vision_model.projection_head`` Linear(768, 512, bias=False);
- text [``text_model.model.*``]: ``BertModel`` (Bio_ClinicalBERT), pooled as the token mean of
  hidden states 1, 2 and the last, averaged over the three -> ``text_model.projection_head``
  Linear(768, 512, bias=False);
- ``logit_scale``, clamped to [0, ln 100] as MedCLIP's ``compute_logits`` does.

Text pooling: MedCLIP averages over *all* positions of its padded batch, so its features depend
on how much padding a batch has. calibprompt averages over the real tokens of each prompt, which
equals MedCLIP's output for every prompt tokenised on its own (no padding) -- the case of its
zero-shot classifier with one prompt per class -- and makes features independent of batching.
``position_ids`` (and Swin's ``relative_position_index``) buffers of older transformers are
dropped. Class names are never truncated: a prompt longer than 77 tokens is an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibprompt.backbones.base import Backbone, BackboneLoadError, TokenBatch
from calibprompt.backbones.hf_clip import hf_tokenize, output_tensor
from calibprompt.backbones.sources import (
    HUB_IDS,
    assign_state_dict,
    hub_file,
    is_hub_id,
    load_state_dict,
    local_dir,
    pick_file,
    pretrained,
    read_json,
)
from calibprompt.backbones.transforms import medclip_transform

__all__ = ["MEDCLIP_LAYOUT", "MedCLIPBackbone", "MedCLIPModel", "load_medclip"]

BERT_TYPE = HUB_IDS["medclip.tokenizer"]
CONTEXT_LENGTH = 77
MAX_LOG_SCALE = math.log(100.0)  # 4.6052: MedCLIP clamps logit_scale to [0, this]

#: swin-tiny-patch4-window7-224, as MedCLIP's vision tower.
SWIN_TINY = {
    "model_type": "swin", "image_size": 224, "patch_size": 4, "num_channels": 3, "embed_dim": 96,
    "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7, "mlp_ratio": 4.0,
    "qkv_bias": True, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "drop_path_rate": 0.1,
}
#: Bio_ClinicalBERT (bert-base-cased vocabulary).
BIO_CLINICAL_BERT = {
    "model_type": "bert", "vocab_size": 28996, "hidden_size": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
    "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}

MEDCLIP_LAYOUT = f"""  DIR/pytorch_model.bin      (MedCLIP-ViT weights from the medclip release, 'medclip-vit-pretrained' zip)
  DIR/tokenizer/vocab.txt, DIR/tokenizer/tokenizer_config.json   (tokenizer of {BERT_TYPE})
  optional: DIR/vision_config.json, DIR/text_config.json   (override the built-in Swin-tiny / Bio_ClinicalBERT configs)"""
IGNORED_KEYS = ("position_ids", "relative_position_index")


class _Tower(nn.Module):
    """An encoder ``model`` plus a bias-free ``projection_head`` (MedCLIP's key layout)."""

    def __init__(self, model: nn.Module, width: int, proj_dim: int) -> None:
        super().__init__()
        self.model = model
        self.projection_head = nn.Linear(width, proj_dim, bias=False)


class MedCLIPModel(nn.Module):
    """MedCLIP's module tree, built from transformers configs."""

    def __init__(self, vision_config: dict[str, Any], text_config: dict[str, Any],
                 proj_dim: int = 512) -> None:
        super().__init__()
        # transformers is a heavy optional dependency: imported on use
        from transformers import BertConfig, BertModel, SwinConfig, SwinModel

        swin = SwinModel(SwinConfig(**{k: v for k, v in vision_config.items() if k != "model_type"}))
        bert = BertModel(BertConfig(**{k: v for k, v in text_config.items() if k != "model_type"}))
        self.vision_model = _Tower(swin, swin.num_features, proj_dim)
        self.text_model = _Tower(bert, bert.config.hidden_size, proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


class MedCLIPBackbone(Backbone):
    """MedCLIP-ViT behind the Backbone interface."""

    family = "medclip"
    causal = False

    def __init__(self, model: MedCLIPModel, tokenizer: Any, device: str | torch.device = "cpu",
                 precision: str = "fp32", source: str | None = None,
                 configs: dict[str, Any] | None = None) -> None:
        super().__init__(precision=precision, source=source)
        self.model = model
        self.name = "medclip"
        self.tokenizer = tokenizer
        self.context_length = CONTEXT_LENGTH
        self.embed_dim = int(model.text_model.projection_head.out_features)
        self.configs = configs or {}
        self._bert = model.text_model.model
        self._freeze(device)

    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        ids, mask = hf_tokenize(self.tokenizer, texts, self.context_length, self.name, self.device)
        return TokenBatch.bidirectional(ids, mask)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self._bert.get_input_embeddings()(ids)

    def _encode_embeddings(self, embeds: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        out = self._bert(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                         output_hidden_states=True)
        hidden = out.hidden_states if not isinstance(out, tuple) else out[2]
        layers = torch.stack([hidden[1], hidden[2], hidden[-1]])  # (3, N, L, W)
        weights = batch.attention_mask.to(layers.dtype)[None, :, :, None]
        token_mean = (layers * weights).sum(dim=2) / weights.sum(dim=2)  # (3, N, W)
        return self.model.text_model.projection_head(token_mean.mean(dim=0))

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[1] == 1:
            pixels = pixels.repeat(1, 3, 1, 1)
        out = self.model.vision_model.model(pixel_values=pixels)
        return self.model.vision_model.projection_head(output_tensor(out))

    def _eval_transform(self) -> Callable[[Any], torch.Tensor]:
        size = int(self.configs.get("vision", {}).get("image_size", 224))
        return medclip_transform(size)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().clamp(0.0, MAX_LOG_SCALE).exp())

    def architecture(self) -> dict[str, Any]:
        return {"configs": self.configs, "pooling": "masked mean of hidden states 1, 2, -1",
                "context_length": self.context_length}


def _read_config(path: Path, default: dict[str, Any]) -> dict[str, Any]:
    """``default`` overridden by the JSON file at ``path``, when there is one."""
    return {**default, **read_json(path, "backbone 'medclip'")} if path.is_file() else dict(default)


def load_medclip(
    weights: str | None = None, device: str | torch.device = "cpu", precision: str = "fp32",
    tokenizer: str | None = None,
) -> MedCLIPBackbone:
    """MedCLIP-ViT from a local directory (see :data:`MEDCLIP_LAYOUT`), a ``pytorch_model.bin``
    file, or a hub repository holding ``pytorch_model.bin``. The tokenizer comes from
    ``DIR/tokenizer``, from ``tokenizer=`` (directory or hub id), or from the hub."""
    from transformers import AutoTokenizer  # heavy optional dependency: imported on use

    what = "backbone 'medclip'"
    if weights is None:
        raise BackboneLoadError(
            f"{what}: MedCLIP's weights are not on the Hugging Face Hub under an official id. "
            "Download 'medclip-vit-pretrained' from the MedCLIP release (the URL in the medclip "
            "package's constants.PRETRAINED_URL_MEDCLIP_VIT), unzip it and pass the directory as "
            f"weights=DIR (CLI: --weights DIR). Expected layout:\n{MEDCLIP_LAYOUT}"
        )
    root: Path | None = None
    if is_hub_id(weights):
        checkpoint = hub_file(weights, "pytorch_model.bin", what, MEDCLIP_LAYOUT)
    else:
        path = local_dir(weights, what, MEDCLIP_LAYOUT)
        if path.is_file():
            checkpoint = path
        else:
            root = path
            checkpoint = pick_file(root, ["pytorch_model.bin", "model.safetensors",
                                          "medclip.safetensors"], what, MEDCLIP_LAYOUT)
    vision = _read_config(root / "vision_config.json", SWIN_TINY) if root else dict(SWIN_TINY)
    text = _read_config(root / "text_config.json", BIO_CLINICAL_BERT) if root else dict(BIO_CLINICAL_BERT)
    tokenizer_source = tokenizer or (str(root / "tokenizer") if root and (root / "tokenizer").is_dir()
                                     else BERT_TYPE)
    tok = pretrained(AutoTokenizer.from_pretrained, tokenizer_source, what, "the tokenizer",
                     f"Offline, put the {BERT_TYPE} tokenizer files in DIR/tokenizer.", MEDCLIP_LAYOUT)
    try:
        model = MedCLIPModel(vision, text)
    except Exception as exc:
        raise BackboneLoadError(f"{what}: could not build Swin/BERT from the configs ({exc})") from exc
    assign_state_dict(model, load_state_dict(checkpoint, what), what, str(checkpoint),
                      ignore=IGNORED_KEYS)
    return MedCLIPBackbone(model, tok, device=device, precision=precision, source=weights,
                           configs={"vision": vision, "text": text})
