"""Test-wide settings: no test may reach the network (the hub is unreachable in CI anyway)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest

from calibprompt.backbones import load_backbone
from calibprompt.backbones import testing as MF


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    """A tiny open_clip model (32-px images) loaded from disk like QuiltNet."""
    directory = MF.make_open_clip_dir(tmp_path_factory.mktemp("tiny_open_clip") / "model")
    return load_backbone("quiltnet", weights=str(directory))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "plip": MF.make_hf_clip_dir(root / "plip", eos_token_id=2),
        "hf_clip_eos": MF.make_hf_clip_dir(root / "hf_clip_eos", eos_token_id=49407, seed=1),
        "quiltnet": MF.make_open_clip_dir(root / "quiltnet", quick_gelu=True),
        "quiltnet_st": MF.make_open_clip_dir(root / "quiltnet_st", quick_gelu=False, seed=2,
                                             safetensors=True),
        "biomedclip": MF.make_biomedclip_dir(root / "biomedclip"),
        "medclip": MF.make_medclip_dir(root / "medclip"),
    }


FAMILIES = {  # case -> (registered name, checkpoint key)
    "plip": ("plip", "plip"),
    "hf_clip_eos": ("plip", "hf_clip_eos"),
    "quiltnet": ("quiltnet", "quiltnet"),
    "quiltnet_safetensors": ("quiltnet", "quiltnet_st"),
    "biomedclip": ("biomedclip", "biomedclip"),
    "medclip": ("medclip", "medclip"),
}


@pytest.fixture(scope="session")
def backbones(checkpoints):
    return {case: load_backbone(name, weights=str(checkpoints[key])) for case, (name, key) in FAMILIES.items()}


