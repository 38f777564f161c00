"""The embedded demo model: a small CLIP (open_clip architecture) with a word-level tokenizer.

Trained by ``scripts/train_demo_model.py`` on procedurally generated tissue patches (the demo's
tissue generator) and shipped inside this package as ``demo_model.safetensors`` +
``demo_model.json`` (architecture, vocabulary, preprocessing, training record). Loaded with
``load_backbone("demo")``; it goes through the same :class:`~calibprompt.backbones.openclip.OpenClipBackbone`
adapter as QuiltNet.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from calibprompt.backbones.base import BackboneLoadError
from calibprompt.backbones.openclip import OpenClipBackbone
from calibprompt.backbones.sources import assign_state_dict, load_state_dict

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "DemoTokenizer", "build_demo_clip", "demo_vocabulary",
           "load_demo_backbone"]

WEIGHTS_FILE = "demo_model.safetensors"
CONFIG_FILE = "demo_model.json"
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|&|[^\sa-z0-9]")


class DemoTokenizer:
    """Lower-cased words and punctuation; id 0 = padding, 1 = unknown, the two largest ids are
    start and end of text (so EOT pooling by argmax works as in CLIP)."""

    def __init__(self, vocab: Sequence[str], context_length: int = 24) -> None:
        self.vocab = list(vocab)
        self.context_length = int(context_length)
        self.index = {w: i + 2 for i, w in enumerate(self.vocab)}
        self.sot = len(self.vocab) + 2
        self.eot = len(self.vocab) + 3
        self.vocab_size = len(self.vocab) + 4

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start / end of text (unknown words are 1)."""
        return [self.index.get(w, 1) for w in _WORD.findall(text.lower())]

    def __call__(self, texts: Sequence[str] | str, context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [*[self.sot, *self.encode(text)][:length - 1], self.eot]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def demo_vocabulary(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every word of the class names and caption templates, plus prompt-tuning words."""
    words: dict[str, None] = {}
    for text in [*classnames, *templates, "a photo of a x x x", "an image patch tissue the , ."]:
        for w in _WORD.findall(text.lower().replace("{}", " ")):
            words[w] = None
    return list(words)


def build_demo_clip(config: dict[str, Any]) -> torch.nn.Module:
    """The demo model's open_clip ``CLIP`` from ``config["model_cfg"]`` (randomly initialised)."""
    import open_clip  # heavy optional dependency: imported on use

    return open_clip.CLIP(**config["model_cfg"])


def _packaged(name: str) -> Path:
    return Path(str(resources.files(__package__).joinpath(name)))


def load_demo_backbone(weights: str | None = None, device: str | torch.device = "cpu",
                       precision: str = "fp32") -> OpenClipBackbone:
    """The demo model from the package (or from a directory with the same two files)."""
    directory = Path(weights).expanduser() if weights else None
    config_path = directory / CONFIG_FILE if directory else _packaged(CONFIG_FILE)
    weights_path = directory / WEIGHTS_FILE if directory else _packaged(WEIGHTS_FILE)
    if directory is not None and not directory.is_dir():
        raise BackboneLoadError(f"backbone 'demo': weights directory '{directory}' does not exist (expected a "
                                f"directory with {CONFIG_FILE} and {WEIGHTS_FILE}, or no --weights for the "
                                "packaged model)")
    if not config_path.is_file() or not weights_path.is_file():
        where = ("the installed package is incomplete; reinstall calibprompt" if directory is None
                 else "the demo training script writes both")
        raise BackboneLoadError(
            f"backbone 'demo': expected {CONFIG_FILE} and {WEIGHTS_FILE} in {config_path.parent} ({where})"
        )
    config = json.loads(config_path.read_text())
    model = build_demo_clip(config)
    state = {k: v.float() for k, v in load_state_dict(weights_path, "backbone 'demo'").items()}
    assign_state_dict(model, state, "backbone 'demo'", str(weights_path))
    tokenizer = DemoTokenizer(config["vocab"], config["model_cfg"]["text_cfg"]["context_length"])
    return OpenClipBackbone(model, tokenizer, "demo", config["preprocess"], device=device,
                            precision=precision, source=str(weights_path),
                            config={"model_cfg": config["model_cfg"], "training": config.get("training")})
