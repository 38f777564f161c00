"""Random models written in the real on-disk formats of each family (for tests and benchmarks).

Each builder writes a directory exactly as a user would download it (config + weights +
tokenizer files) and returns the path; tests load it through ``load_backbone`` like a real
checkpoint. Sizes are tiny (width 32, 2 layers, 32-px images) so the suite stays fast.
:data:`TINY_MODELS` names the builder of every registered family: the backbone tests run for
each entry of :func:`~calibprompt.backbones.registry.list_backbones` and fail for a family
without one.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from calibprompt.backbones.demo import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    DemoTokenizer,
    build_demo_clip,
    demo_vocabulary,
)
from calibprompt.backbones.medclip import MedCLIPModel
from calibprompt.backbones.openclip import OpenClipBackbone
from calibprompt.backbones.registry import OPEN_CLIP_ENTRY
from calibprompt.backbones.sources import HUB_IDS
from calibprompt.backbones.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = [
    "TINY_MODELS",
    "make_biomedclip_dir",
    "make_demo_dir",
    "make_hf_clip_dir",
    "make_medclip_dir",
    "make_open_clip_dir",
    "medclip_reference_text",
    "random_biomedclip_backbone",
    "tiny_bert_config",
    "tiny_open_clip_cfg",
    "tiny_swin_config",
    "write_bert_tokenizer",
    "write_clip_tokenizer",
]

#: The preprocessing entry of an open_clip hub config (OpenAI's mean / std).
CLIP_PREPROCESS = {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)}

TEXT_WORDS = (
    "a photo of an h&e image patch tissue chest x-ray patient lung opacity no not normal "
    "covid benign malignant skin adipose background debris lymphocytes mucus smooth muscle "
    "colon mucosa cancer-associated stroma colorectal adenocarcinoma epithelium x"
).split()


def _bert_vocab(lowercase: bool) -> list[str]:
    chars = string.ascii_lowercase + (string.ascii_uppercase if not lowercase else "")
    chars += string.digits + string.punctuation
    words = sorted({w.strip(string.punctuation) for w in TEXT_WORDS} - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [*chars, *(f"##{c}" for c in chars), *words]
    return list(dict.fromkeys(vocab))


def write_bert_tokenizer(directory: Path, lowercase: bool = True) -> int:
    """A WordPiece tokenizer (vocab.txt + tokenizer_config.json) that can spell any ASCII text."""
    from transformers import BertTokenizer  # heavy optional dependency: imported on use

    directory.mkdir(parents=True, exist_ok=True)
    vocab = _bert_vocab(lowercase)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(directory / "vocab.txt"), do_lower_case=lowercase).save_pretrained(directory)
    return len(vocab)


def tiny_bert_config(vocab_size: int, max_positions: int = 256) -> dict:
    """A 2-layer, width-32 BERT config (transformers keys plus ``model_type``)."""
    return {"model_type": "bert", "vocab_size": vocab_size, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": max_positions, "type_vocab_size": 2, "pad_token_id": 0,
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


def write_clip_tokenizer(directory: Path) -> None:
    """The real CLIP BPE tokenizer (vocab.json + merges.txt) from open_clip's bundled vocabulary."""
    from open_clip.tokenizer import SimpleTokenizer  # heavy optional dependencies: imported on use
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in simple.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tok.save_pretrained(directory)


def make_hf_clip_dir(directory: Path, eos_token_id: int = 2, seed: int = 0) -> Path:
    """A transformers CLIPModel directory like PLIP's hub repository (safetensors weights)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel  # heavy: imported on use

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "eos_token_id": eos_token_id,
                     "bos_token_id": 49406 if eos_token_id != 2 else 0,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    write_clip_tokenizer(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def tiny_open_clip_cfg(quick_gelu: bool = True) -> dict:
    """A 2-layer, width-32 open_clip ``CLIP`` config (32-px images, CLIP's vocabulary)."""
    return {"embed_dim": 16, "quick_gelu": quick_gelu,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                         "layers": 2}}


def make_open_clip_dir(directory: Path, quick_gelu: bool = True, seed: int = 0,
                       safetensors: bool = False) -> Path:
    """An open_clip hub-layout directory like QuiltNet's hub repository."""
    import open_clip  # heavy optional dependency: imported on use

    torch.manual_seed(seed)
    cfg = tiny_open_clip_cfg(quick_gelu)
    model = open_clip.CLIP(**cfg).eval()
    directory.mkdir(parents=True, exist_ok=True)
    _write_open_clip_config(directory, cfg)
    state = model.state_dict()
    if safetensors:
        save_file({k: v.contiguous() for k, v in state.items()}, directory / "open_clip_model.safetensors")
    else:
        torch.save(state, directory / "open_clip_pytorch_model.bin")
    return directory


def make_biomedclip_dir(directory: Path, seed: int = 0) -> Path:
    """An open_clip BERT-text model in BiomedCLIP's layout, with the BERT config + tokenizer
    in ``text/`` and an obsolete ``position_ids`` buffer in the checkpoint (as the real one)."""
    import open_clip  # heavy optional dependencies: imported on use
    from transformers import BertConfig

    text_dir = directory / "text"
    vocab_size = write_bert_tokenizer(text_dir, lowercase=True)
    BertConfig(**{k: v for k, v in tiny_bert_config(vocab_size).items() if k != "model_type"}).save_pretrained(text_dir)
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": HUB_IDS["biomedclip.text"], "hf_tokenizer_name": HUB_IDS["biomedclip.text"],
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": 256},
    }
    build_cfg = json.loads(json.dumps(cfg))
    build_cfg["text_cfg"]["hf_model_name"] = str(text_dir)
    build_cfg["text_cfg"]["hf_tokenizer_name"] = str(text_dir)
    build_cfg["text_cfg"]["hf_model_pretrained"] = False
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**build_cfg).eval()
    state = dict(model.state_dict())
    state["text.transformer.embeddings.position_ids"] = torch.arange(256)[None]
    torch.save(state, directory / "open_clip_pytorch_model.bin")
    _write_open_clip_config(directory, cfg)
    return directory


def _write_open_clip_config(directory: Path, model_cfg: dict) -> None:
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                                 "preprocess_cfg": CLIP_PREPROCESS}))


def tiny_swin_config() -> dict:
    """A 2-stage Swin config for 32-px images (transformers keys plus ``model_type``)."""
    return {"model_type": "swin", "image_size": 32, "patch_size": 4, "num_channels": 3,
            "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4,
            "mlp_ratio": 2.0, "drop_path_rate": 0.0}


def make_medclip_dir(directory: Path, seed: int = 0) -> Path:
    """MedCLIP's released layout: ``pytorch_model.bin`` with ``vision_model.*``, ``text_model.*``,
    ``logit_scale`` (and the obsolete ``position_ids``), plus tokenizer and tiny configs."""
    vocab_size = write_bert_tokenizer(directory / "tokenizer", lowercase=False)
    vision, text = tiny_swin_config(), tiny_bert_config(vocab_size, max_positions=128)
    (directory / "vision_config.json").write_text(json.dumps(vision))
    (directory / "text_config.json").write_text(json.dumps(text))
    torch.manual_seed(seed)
    model = MedCLIPModel(vision, text)
    state = dict(model.state_dict())
    state["text_model.model.embeddings.position_ids"] = torch.arange(128)[None]
    torch.save(state, directory / "pytorch_model.bin")
    return directory


def medclip_reference_text(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """MedCLIP's MedCLIPTextModel.forward as published (BertModel with output_hidden_states,
    stack hidden states 1, 2, -1, mean over tokens then layers, projection), on each prompt
    tokenised alone, then normalised as MedCLIPModel.encode_text."""
    out = []
    for text in texts:
        enc = tokenizer([text], return_tensors="pt")
        hs = model.text_model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                    output_hidden_states=True).hidden_states
        stacked = torch.stack([hs[1], hs[2], hs[-1]])
        embed = stacked.permute(1, 0, 2, 3).mean(2).mean(1)
        embed = model.text_model.projection_head(embed)
        out.append(embed / embed.norm(dim=-1, keepdim=True))
    return torch.cat(out)


def random_biomedclip_backbone(directory: Path, real_size: bool = True, seed: int = 0):
    """A randomly initialised BiomedCLIP-architecture backbone built in memory (no checkpoint
    written): ViT-B/16 + BERT-base text tower, context 256, with a small WordPiece vocabulary in
    ``directory``. For benchmarks; ``real_size=False`` gives the tiny test version."""
    import open_clip  # heavy optional dependencies: imported on use
    from open_clip.tokenizer import HFTokenizer
    from transformers import BertConfig

    text_dir = directory / "text"
    vocab_size = write_bert_tokenizer(text_dir, lowercase=True)
    bert = tiny_bert_config(vocab_size)
    if real_size:
        bert.update(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, vocab_size=30522)
    BertConfig(**{k: v for k, v in bert.items() if k != "model_type"}).save_pretrained(text_dir)
    cfg = {
        "embed_dim": 512 if real_size else 16,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224" if real_size else "vit_tiny_patch16_224",
                       "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear",
                       "image_size": 224},
        "text_cfg": {"hf_model_name": str(text_dir), "hf_tokenizer_name": str(text_dir),
                     "hf_model_pretrained": False, "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
    }
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**cfg)
    return OpenClipBackbone(model, HFTokenizer(str(text_dir), context_length=256), "biomedclip-random",
                            {"size": 224, **CLIP_PREPROCESS}, config={"model_cfg": cfg, "weights": "random"})


def make_demo_dir(directory: Path, seed: int = 0) -> Path:
    """A directory in the embedded demo model's format (``demo_model.json`` with architecture,
    word vocabulary and preprocessing + float16 ``demo_model.safetensors``), randomly initialised."""
    vocab = demo_vocabulary(TEXT_WORDS, ["An H&E image of {}."])
    config = {
        "model_cfg": {"embed_dim": 16,
                      "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
                      "text_cfg": {"context_length": 24, "vocab_size": DemoTokenizer(vocab).vocab_size,
                                   "width": 32, "heads": 2, "layers": 2}},
        "vocab": vocab,
        "preprocess": {"size": 32, **CLIP_PREPROCESS, "interpolation": "bicubic"},
    }
    torch.manual_seed(seed)
    model = build_demo_clip(config)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
              str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    return directory


#: A tiny model of every entry of ``list_backbones()``, written in that family's real on-disk
#: format: entry -> (the name to load it by, ``write(directory) -> weights``).
TINY_MODELS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "plip": ("plip", make_hf_clip_dir),
    "quiltnet": ("quiltnet", make_open_clip_dir),
    "biomedclip": ("biomedclip", make_biomedclip_dir),
    "medclip": ("medclip", make_medclip_dir),
    "demo": ("demo", make_demo_dir),
    OPEN_CLIP_ENTRY: ("clip:tiny", partial(make_open_clip_dir, quick_gelu=False, seed=3)),
}
