"""Test-wide settings: no test may reach the network (the hub is unreachable in CI anyway)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    """A tiny open_clip model (32-px images) loaded from disk like QuiltNet."""
    from calibprompt.backbones import load_backbone
    from calibprompt.backbones.testing import make_open_clip_dir

    directory = make_open_clip_dir(tmp_path_factory.mktemp("tiny_open_clip") / "model")
    return load_backbone("quiltnet", weights=str(directory))
