"""calibprompt: calibration-aware prompt tuning for medical vision-language models.

The public API -- everything a user needs, importable from the top level::

    from calibprompt import load_backbone, load_dataset, few_shot, FeatureStore, Objective
    from calibprompt import zeroshot, train, tpt, certify, load_run, run_sweep, write_report
    from calibprompt import evaluate, bootstrap, TemperatureScaling

=================  =====================================================================
backbones          ``load_backbone``, ``list_backbones``
data               ``load_dataset``, ``list_datasets``, ``few_shot``, ``validation_split``,
                   ``FeatureStore``
objectives         ``Objective`` (presets and expressions of loss terms)
runs               ``zeroshot``, ``train``, ``tpt``, ``certify`` (one run each), ``execute_run``
                   with ``PromptRunConfig`` / ``TPTRunConfig`` / ``CertifyRunConfig``, ``run_sweep``, ``load_run``
                   (predict, external evaluation), ``write_report``, ``summarize``
measuring          ``evaluate`` (every metric at once), ``bootstrap``, the ``metrics`` module
post-hoc           ``TemperatureScaling`` and the ``calibrators`` module
decisions          ``fit_referral`` (referral thresholds with a guarantee), ``fit_conformal``
                   (prediction sets) and the ``decisions`` module
=================  =====================================================================

Names are imported on first use (PEP 562), so ``import calibprompt.metrics`` -- NumPy only --
does not pull in torch and the model libraries that the run machinery needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it (``None``: the name is a submodule).
_EXPORTS: dict[str, str | None] = {
    "load_backbone": "calibprompt.backbones",
    "list_backbones": "calibprompt.backbones",
    "load_dataset": "calibprompt.data",
    "list_datasets": "calibprompt.data",
    "few_shot": "calibprompt.data",
    "validation_split": "calibprompt.data",
    "FeatureStore": "calibprompt.data",
    "Objective": "calibprompt.objective",
    "zeroshot": "calibprompt.runs.shortcuts",
    "train": "calibprompt.runs.shortcuts",
    "tpt": "calibprompt.runs.shortcuts",
    "certify": "calibprompt.runs.shortcuts",
    "CertifyRunConfig": "calibprompt.runs",
    "execute_run": "calibprompt.runs",
    "PromptRunConfig": "calibprompt.runs",
    "TPTRunConfig": "calibprompt.runs",
    "run_sweep": "calibprompt.runs",
    "load_run": "calibprompt.runs",
    "write_report": "calibprompt.runs",
    "summarize": "calibprompt.runs",
    "evaluate": "calibprompt.metrics",
    "bootstrap": "calibprompt.metrics",
    "TemperatureScaling": "calibprompt.calibrators",
    "fit_referral": "calibprompt.decisions",
    "fit_conformal": "calibprompt.decisions",
    "metrics": None,
    "calibrators": None,
    "decisions": None,
}

__all__ = [  # the names of _EXPORTS (a test keeps the two equal)
    "CertifyRunConfig", "FeatureStore", "Objective", "PromptRunConfig", "TPTRunConfig", "TemperatureScaling", "__version__",
    "bootstrap", "calibrators", "certify", "decisions", "evaluate", "execute_run", "few_shot", "fit_conformal",
    "fit_referral", "list_backbones", "list_datasets",
    "load_backbone", "load_dataset", "load_run", "metrics", "run_sweep", "summarize", "tpt", "train",
    "validation_split", "write_report", "zeroshot",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use
    from calibprompt import calibrators, decisions, metrics
    from calibprompt.backbones import list_backbones, load_backbone
    from calibprompt.calibrators import TemperatureScaling
    from calibprompt.data import (
        FeatureStore,
        few_shot,
        list_datasets,
        load_dataset,
        validation_split,
    )
    from calibprompt.decisions import fit_conformal, fit_referral
    from calibprompt.metrics import bootstrap, evaluate
    from calibprompt.objective import Objective
    from calibprompt.runs import (
        CertifyRunConfig,
        PromptRunConfig,
        TPTRunConfig,
        execute_run,
        load_run,
        run_sweep,
        summarize,
        write_report,
    )
    from calibprompt.runs.shortcuts import certify, tpt, train, zeroshot


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'calibprompt' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = importlib.import_module(f"calibprompt.{name}") if module is None else getattr(
        importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
