"""Where weights come from: a local file or directory, or a Hugging Face Hub repository.

Every failure is a :class:`BackboneLoadError` naming the source, what was expected and -- for
offline use -- the files to put where.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from calibprompt.backbones.base import BackboneLoadError

__all__ = ["HUB_PREFIX", "hub_file", "is_hub_id", "load_state_dict", "local_dir", "pick_file"]

HUB_PREFIX = "hf-hub:"


def is_hub_id(source: str) -> bool:
    """``hf-hub:org/name`` or a bare ``org/name`` that is not an existing path."""
    if source.startswith(HUB_PREFIX):
        return True
    return (source.count("/") == 1 and not source.startswith((".", "/", "~"))
            and not Path(source).exists())


def hub_repo(source: str) -> str:
    return source[len(HUB_PREFIX):] if source.startswith(HUB_PREFIX) else source


def hub_file(source: str, filename: str, what: str, layout: str) -> Path:
    """Download (or take from the local Hugging Face cache) ``filename`` of a hub repository."""
    repo = hub_repo(source)
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as exc:  # network, missing file, auth: all end the same way for the user
        offline = os.environ.get("HF_HUB_OFFLINE") or "connect" in str(exc).lower()
        reason = "no network access" if offline else type(exc).__name__
        raise BackboneLoadError(
            f"{what}: could not get '{filename}' from the Hugging Face Hub repository '{repo}' "
            f"({reason}: {str(exc).splitlines()[0][:200]}).\n"
            f"To use it offline, download the files once and pass the directory as weights=DIR "
            f"(CLI: --weights DIR). Expected layout:\n{layout}"
        ) from exc


def local_dir(source: str | os.PathLike[str], what: str, layout: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise BackboneLoadError(f"{what}: '{path}' does not exist. Expected a directory:\n{layout}")
    return path


def pick_file(directory: Path, candidates: Sequence[str], what: str, layout: str) -> Path:
    """The first of ``candidates`` present in ``directory``."""
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    present = sorted(p.name for p in directory.iterdir())[:12] if directory.is_dir() else []
    raise BackboneLoadError(
        f"{what}: none of {list(candidates)} found in '{directory}' (it holds: {present or 'nothing'}). "
        f"Expected layout:\n{layout}"
    )


def load_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch checkpoint with ``weights_only=True``
    (no pickle of arbitrary objects). Unwraps ``{"state_dict": ...}`` and DDP ``module.``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneLoadError(
            f"{what}: could not read checkpoint '{path}' ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}). Expected a safetensors file or a torch state dict "
            "loadable with weights_only=True."
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneLoadError(f"{what}: '{path}' does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def assign_state_dict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, source: str,
    ignore: Sequence[str] = ("position_ids",),
) -> None:
    """Load ``state`` strictly, ignoring obsolete buffers whose names end with ``ignore``;
    a mismatch raises :class:`BackboneLoadError` listing missing / unexpected keys."""
    state = {k: v for k, v in state.items() if not k.endswith(tuple(ignore))}
    expected = {k for k in module.state_dict() if not k.endswith(tuple(ignore))}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in module.state_dict().items() if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        details = []
        if missing:
            details.append(f"{len(missing)} missing: {head(missing)}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected: {head(unexpected)}")
        if shapes:
            details.append(f"{len(shapes)} with other shapes: {head(shapes)}")
        raise BackboneLoadError(
            f"{what}: the checkpoint '{source}' does not match the expected architecture "
            f"({'; '.join(details)}). Is it a checkpoint of this model family and size?"
        )
    module.load_state_dict(state, strict=False)
