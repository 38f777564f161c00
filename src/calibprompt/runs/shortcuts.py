"""One call per kind of run, for Python users: ``calibprompt.zeroshot(...)``, ``calibprompt.train(...)``,
``calibprompt.tpt(...)``, ``calibprompt.certify(...)`` -- the library side of the commands of the same names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calibprompt.runs.certify import CertifyRunConfig
from calibprompt.runs.execute import RunResult, execute_run
from calibprompt.runs.prompt import PromptRunConfig
from calibprompt.runs.tpt import TPTRunConfig

__all__ = ["certify", "tpt", "train", "zeroshot"]


def zeroshot(backbone: str, dataset: str, root: str | Path, *, out: str | Path = "runs", force: bool = False,
             **options: Any) -> RunResult:
    """Zero-shot classification with the dataset's template ensemble (Radford et al. 2021), as a run
    under ``out``; ``options`` are fields of :class:`PromptRunConfig` (``seed``, ``weights``, ...)."""
    return execute_run(PromptRunConfig(backbone, dataset, str(root), method="zeroshot", **options), out, force=force)


def train(backbone: str, dataset: str, root: str | Path, method: str | None = None, *, out: str | Path = "runs",
          force: bool = False, **options: Any) -> RunResult:
    """Few-shot prompt tuning (CoOp, Zhou et al. 2022) with an objective preset or expression
    (default: CalibPrompt's LS + SMAC + angular separation), as a run under ``out``; ``options``
    are fields of :class:`PromptRunConfig` (``shots``, ``seed``, ``epochs``, ``alpha``, ...)."""
    if method is not None:
        options["method"] = method
    return execute_run(PromptRunConfig(backbone, dataset, str(root), **options), out, force=force)


def tpt(backbone: str, dataset: str, root: str | Path, method: str | None = None, *, out: str | Path = "runs",
        force: bool = False, **options: Any) -> RunResult:
    """Test-time prompt tuning over the test split (TPT, Shu et al. 2022; C-TPT, O-TPT, SoC by
    ``method``), as a run under ``out``; ``options`` are fields of :class:`TPTRunConfig`."""
    if method is not None:
        options["method"] = method
    return execute_run(TPTRunConfig(backbone, dataset, str(root), **options), out, force=force)


def certify(backbone: str, dataset: str, root: str | Path, sigma: float = 0.25, *, out: str | Path = "runs",
            force: bool = False, **options: Any) -> RunResult:
    """Certify the test split by randomized smoothing at noise level ``sigma`` (Cohen et al. 2019's
    CERTIFY), as a run under ``out``; ``options`` are fields of :class:`CertifyRunConfig` (``n``,
    ``n0``, ``alpha``, ``subset``, ``prompt``, ...)."""
    return execute_run(CertifyRunConfig(backbone, dataset, str(root), sigma=sigma, **options), out, force=force)
