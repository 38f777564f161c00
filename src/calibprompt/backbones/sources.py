"""Where weights come from: a local file or directory, or a Hugging Face Hub repository.

Every failure is a :class:`BackboneLoadError` naming the source, what was expected and -- for
offline use -- the files to put where. :data:`HUB_IDS` is the one table of the hub ids calibprompt
knows; the adapters' Hugging Face loading (hub files, ``from_pretrained``, configs, checkpoints)
goes through the helpers here.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file

from calibprompt.backbones.base import BackboneLoadError

__all__ = [
    "HUB_IDS",
    "HUB_PREFIX",
    "assign_state_dict",
    "error_summary",
    "hub_file",
    "hub_mode",
    "hub_offline_reason",
    "hub_repo",
    "is_hub_id",
    "load_state_dict",
    "local_dir",
    "pick_file",
    "pretrained",
    "read_json",
]

HUB_PREFIX = "hf-hub:"

#: Every Hugging Face Hub id calibprompt names, in one place: the default weights of the
#: registered families (``load_backbone(name)`` without ``weights``) and the text models and
#: tokenizers that go with them. MedCLIP and the demo model have no default hub id.
HUB_IDS: dict[str, str] = {
    "plip": "vinid/plip",
    "quiltnet": f"{HUB_PREFIX}wisdomik/QuiltNet-B-32",
    "biomedclip": f"{HUB_PREFIX}microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    "biomedclip.text": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
    "medclip.tokenizer": "emilyalsentzer/Bio_ClinicalBERT",
}

_T = TypeVar("_T")


def error_summary(exc: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"`` (cut to ``limit`` characters) for error messages."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit] if lines else ''}"


def is_hub_id(source: str) -> bool:
    """``hf-hub:org/name`` or a bare ``org/name`` that is not an existing path."""
    if source.startswith(HUB_PREFIX):
        return True
    return (source.count("/") == 1 and not source.startswith((".", "/", "~"))
            and not Path(source).exists())


def hub_repo(source: str) -> str:
    """The repository id of a hub source (without the ``hf-hub:`` prefix)."""
    return source[len(HUB_PREFIX):] if source.startswith(HUB_PREFIX) else source


#: Seconds to wait for the Hub's host before treating the machine as offline.
HUB_PROBE_TIMEOUT = 3.0


@cache
def hub_offline_reason() -> str | None:
    """Why the Hugging Face Hub cannot be reached (``None`` if it can), decided once per process:
    ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) set by the user, or no TCP connection to
    the endpoint's host (``HF_ENDPOINT``, default huggingface.co) within
    :data:`HUB_PROBE_TIMEOUT` seconds. Offline, hub ids are served from the local Hugging Face
    cache only -- without the library's retries, which take 30-60 s before giving up."""
    from huggingface_hub import constants  # heavy optional dependency: imported on use

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
    except OSError as exc:
        return f"{host} cannot be reached: {type(exc).__name__}: {exc}"
    return None


@contextmanager
def hub_mode() -> Iterator[str | None]:
    """Inside: the Hub libraries in offline mode (local cache only) when the Hub cannot be
    reached; yields the reason (``None`` online)."""
    from huggingface_hub import constants

    reason = hub_offline_reason()
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or reason is not None
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE = saved


def _offline_message(what: str, repo: str, reason: str, layout: str) -> str:
    from huggingface_hub import constants

    return (f"{what}: '{repo}' is a Hugging Face Hub id, but the Hub is not reachable ({reason}) and the "
            f"repository is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}).\n"
            f"Either download it once on a machine with access (`hf download {repo}`, then copy the cache "
            f"folder, or set HF_HOME to it), or place its files in a directory and pass it as weights=DIR "
            f"(CLI: --weights DIR). Expected layout:\n{layout}")


def hub_file(source: str, filename: str, what: str, layout: str) -> Path:
    """Download (or take from the local Hugging Face cache) ``filename`` of a hub repository;
    offline (:func:`hub_offline_reason`) only the cache is consulted, and a miss fails at once."""
    from huggingface_hub import hf_hub_download  # heavy optional dependency: imported on use

    repo = hub_repo(source)
    with hub_mode() as offline:
        try:
            return Path(hf_hub_download(repo_id=repo, filename=filename))
        except Exception as exc:  # network, missing file, auth: all end the same way for the user
            if offline is not None:
                raise BackboneLoadError(_offline_message(what, repo, offline, layout)) from exc
            raise BackboneLoadError(
                f"{what}: could not get '{filename}' from the Hugging Face Hub repository '{repo}' "
                f"({error_summary(exc)}).\n"
                f"To use it offline, download the files once and pass the directory as weights=DIR "
                f"(CLI: --weights DIR). Expected layout:\n{layout}"
            ) from exc


def local_dir(source: str | os.PathLike[str], what: str, layout: str) -> Path:
    """``source`` as an existing local path (a directory or a file), else an error showing ``layout``."""
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
            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneLoadError(
            f"{what}: could not read checkpoint '{path}' ({error_summary(exc)}). Expected a "
            "safetensors file or a torch state dict loadable with weights_only=True."
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


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON config file as a dict; unreadable or malformed files raise :class:`BackboneLoadError`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BackboneLoadError(f"{what}: could not parse '{path}' ({exc})") from exc
    if not isinstance(data, dict):
        raise BackboneLoadError(f"{what}: '{path}' holds {type(data).__name__}, expected a JSON object")
    return data


def pretrained(load: Callable[[str], _T], location: str, what: str, thing: str, hint: str,
               layout: str) -> _T:
    """``load(location)`` -- a transformers ``from_pretrained`` -- with any failure raised as a
    :class:`BackboneLoadError` naming ``thing``, the location, ``hint`` and the expected layout.
    A hub id while the Hub is unreachable is served from the local cache or fails at once."""
    if is_hub_id(location):
        with hub_mode() as offline:
            try:
                return load(location)
            except Exception as exc:
                if offline is None:
                    raise BackboneLoadError(f"{what}: could not load {thing} from '{location}' "
                                            f"({error_summary(exc, 300)}). {hint} Expected layout:\n{layout}") from exc
                raise BackboneLoadError(_offline_message(what, hub_repo(location), offline, layout)) from exc
    try:
        return load(location)
    except BackboneLoadError:
        raise
    except Exception as exc:
        raise BackboneLoadError(
            f"{what}: could not load {thing} from '{location}' ({error_summary(exc, 300)}). {hint} "
            f"Expected layout:\n{layout}"
        ) from exc
