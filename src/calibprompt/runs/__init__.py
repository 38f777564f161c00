"""The one run machinery: every method -- zero-shot, prompt tuning, the TPT family, the demo --
writes the same kind of run directory through :func:`execute_run`.

* :mod:`~calibprompt.runs.identity` -- what a run is (the hash of everything that determines it)
* :mod:`~calibprompt.runs.directory` -- the directory layout, atomic creation, checkpoints
* :mod:`~calibprompt.runs.execute` -- plan -> skip / resume -> work -> predictions, metrics
* :mod:`~calibprompt.runs.prompt`, :mod:`~calibprompt.runs.tpt`, :mod:`~calibprompt.runs.certify` --
  the kinds of runs
* :mod:`~calibprompt.runs.apply` -- finished runs: predict new images, external evaluation
* :mod:`~calibprompt.runs.sweep`, :mod:`~calibprompt.runs.report` -- grids of runs and their tables
* :mod:`~calibprompt.runs.executors` -- where independent units run: serial or Ray
"""

from calibprompt.runs.apply import KINDS, Predictions, Run, collect_images, load_run
from calibprompt.runs.certify import CertifyRunConfig
from calibprompt.runs.common import cached_backbone, package_versions
from calibprompt.runs.execute import RunResult, execute_group, execute_run
from calibprompt.runs.identity import SCHEMA_VERSION, RunIdentity
from calibprompt.runs.prompt import PromptRunConfig, RunConfig
from calibprompt.runs.report import build_report, summarize, write_report
from calibprompt.runs.sweep import execute_runs, load_sweep, run_sweep
from calibprompt.runs.tpt import TPTRunConfig

__all__ = [
    "KINDS",
    "SCHEMA_VERSION",
    "CertifyRunConfig",
    "Predictions",
    "PromptRunConfig",
    "Run",
    "RunConfig",
    "RunIdentity",
    "RunResult",
    "TPTRunConfig",
    "build_report",
    "cached_backbone",
    "collect_images",
    "execute_group",
    "execute_run",
    "execute_runs",
    "load_run",
    "load_sweep",
    "package_versions",
    "run_sweep",
    "summarize",
    "write_report",
]
