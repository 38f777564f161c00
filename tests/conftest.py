"""Test-wide settings: no test may reach the network (the hub is unreachable in CI anyway)."""

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from collections.abc import Iterator, Mapping

import pytest

from calibprompt.backbones import list_backbones, load_backbone
from calibprompt.backbones import testing as MF

#: Other on-disk variants of registered families: case -> (registered entry, writer options).
VARIANTS = {
    "hf_clip_eos": ("plip", {"eos_token_id": 49407, "seed": 1}),
    "quiltnet_safetensors": ("quiltnet", {"quick_gelu": False, "seed": 2, "safetensors": True}),
}

#: Backbone test cases: every entry of list_backbones() -- a newly registered family is tested
#: (and fails until it has a tiny model in MF.TINY_MODELS) -- plus the VARIANTS.
FAMILIES = {**{entry: (entry, {}) for entry in list_backbones()}, **VARIANTS}


class _Cases(Mapping):
    """A mapping over the FAMILIES cases whose values are made on first use."""

    def __iter__(self) -> Iterator[str]:
        return iter(FAMILIES)

    def __len__(self) -> int:
        return len(FAMILIES)


class TinyModels(_Cases):
    """case -> its tiny model's directory, written on first use (the real on-disk format)."""

    def __init__(self, root):
        self.root, self._paths = root, {}

    def name(self, case: str) -> str:
        """The name the case's tiny model loads by."""
        return self._tiny(case)[0]

    def _tiny(self, case: str):
        entry = FAMILIES[case][0]
        if entry not in MF.TINY_MODELS:
            raise LookupError(f"registered backbone {entry!r} has no tiny test model: add one to "
                              "calibprompt.backbones.testing.TINY_MODELS")
        return MF.TINY_MODELS[entry]

    def __getitem__(self, case: str):
        if case not in self._paths:
            _, write = self._tiny(case)
            self._paths[case] = write(self.root / re.sub(r"\W+", "_", case), **FAMILIES[case][1])
        return self._paths[case]


class TinyBackbones(_Cases):
    """case -> the backbone loaded from its tiny model through ``load_backbone``, on first use."""

    def __init__(self, models: TinyModels):
        self.models, self._loaded = models, {}

    def __getitem__(self, case: str):
        if case not in self._loaded:
            self._loaded[case] = load_backbone(self.models.name(case), weights=str(self.models[case]))
        return self._loaded[case]


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    """A tiny open_clip model (32-px images) loaded from disk like QuiltNet."""
    directory = MF.make_open_clip_dir(tmp_path_factory.mktemp("tiny_open_clip") / "model")
    return load_backbone("quiltnet", weights=str(directory))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """case -> the directory of its tiny model (written on first use)."""
    return TinyModels(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def backbones(checkpoints):
    """case -> its tiny backbone (loaded on first use)."""
    return TinyBackbones(checkpoints)


@pytest.fixture
def progress_bars(monkeypatch):
    """``record(module)`` makes ``module.rate_progress`` record every bar it creates; returns the list."""
    def record(module):
        bars, real = [], module.rate_progress

        def recording(*args, **kwargs):
            bar = real(*args, **kwargs)
            bars.append(bar)
            return bar

        monkeypatch.setattr(module, "rate_progress", recording)
        return bars
    return record
