"""The metric registry: every metric that :func:`~calibprompt.metrics.evaluate` reports and
:func:`~calibprompt.metrics.bootstrap` accepts by name, mapped to its public function
(``METRICS``) and to its kernel on already-validated arrays (``_KERNELS``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from calibprompt.metrics.binned import (
    _classwise,
    _ece_top,
    _mce_top,
    _top_label_equal_mass,
    ace,
    classwise_ece,
    ece,
    mce,
    top_label_equal_mass_ece,
)
from calibprompt.metrics.scores import (
    _accuracy,
    _auroc,
    _brier,
    _macro_f1,
    _nll,
    accuracy,
    auroc,
    brier,
    macro_f1,
    nll,
)
from calibprompt.metrics.selective import _aurc, aurc
from calibprompt.metrics.smooth import _smooth_ece, smooth_ece

__all__ = ["METRICS"]


@dataclass(frozen=True)
class _MetricKernel:
    """An already-validated computation: on top-label (conf, correct) or on (probs, labels)."""

    fn: Callable[..., float]
    top_label: bool
    binned: bool = False


_KERNELS: dict[str, _MetricKernel] = {
    "accuracy": _MetricKernel(_accuracy, top_label=False),
    "macro_f1": _MetricKernel(_macro_f1, top_label=False),
    "ece": _MetricKernel(_ece_top, top_label=True, binned=True),
    "mce": _MetricKernel(_mce_top, top_label=True, binned=True),
    "ace": _MetricKernel(lambda p, y, b: _classwise(p, y, b, "equal_mass"), False, binned=True),
    "classwise_ece": _MetricKernel(
        lambda p, y, b: _classwise(p, y, b, "equal_width"), False, binned=True
    ),
    "top_label_equal_mass_ece": _MetricKernel(_top_label_equal_mass, True, binned=True),
    "smooth_ece": _MetricKernel(lambda c, k: _smooth_ece(c, k, 2000)[0], top_label=True),
    "brier": _MetricKernel(_brier, top_label=False),
    "nll": _MetricKernel(_nll, top_label=False),
    "aurc": _MetricKernel(_aurc, top_label=True),
    "auroc": _MetricKernel(_auroc, top_label=False),
}

#: Public metric functions by name (those ``evaluate`` reports and ``bootstrap`` accepts by name).
METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "macro_f1": macro_f1,
    "ece": ece,
    "mce": mce,
    "ace": ace,
    "classwise_ece": classwise_ece,
    "top_label_equal_mass_ece": top_label_equal_mass_ece,
    "smooth_ece": smooth_ece,
    "brier": brier,
    "nll": nll,
    "aurc": aurc,
    "auroc": auroc,
}


def _run_kernel(
    kernel: _MetricKernel, p: np.ndarray, y: np.ndarray, conf: np.ndarray, correct: np.ndarray,
    n_bins: int,
) -> float:
    args: tuple = (conf, correct) if kernel.top_label else (p, y)
    return kernel.fn(*args, n_bins) if kernel.binned else kernel.fn(*args)
