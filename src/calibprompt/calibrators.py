"""Post-hoc calibrators with the scikit-learn shape: ``fit(logits, labels)`` then
``transform(logits) -> probabilities``.

- :class:`TemperatureScaling` (Guo et al. 2017): one scalar T minimising the NLL of
  ``softmax(z / T)``; accuracy unchanged. Tu et al. (ICML 2024) show 40–50 labelled images
  suffice for vision-language models and that T transfers across label sets.
- :class:`VectorScaling` / :class:`MatrixScaling`: ``softmax(z * w + b)`` / ``softmax(z W^T + b)``
  by NLL (L-BFGS, analytic gradients, optional L2 pull towards the identity).
- :class:`HistogramBinning` (Zadrozny & Elkan 2001): one-vs-rest, equal-width bins per class.
- :class:`IsotonicCalibration` (Zadrozny & Elkan 2002): one-vs-rest isotonic regression.

All work in float64 on NumPy arrays (torch tensors are accepted) and serialise to JSON with
``to_dict`` / :func:`calibrator_from_dict`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import numpy as np
from scipy.optimize import isotonic_regression, minimize, minimize_scalar
from scipy.special import log_softmax, logsumexp, softmax

from calibprompt.metrics import ArrayLike, bin_index, check_labels, to_numpy

__all__ = [
    "CALIBRATORS",
    "Calibrator",
    "HistogramBinning",
    "IsotonicCalibration",
    "MatrixScaling",
    "TemperatureScaling",
    "VectorScaling",
    "calibrator_from_dict",
    "check_logits",
]


def check_logits(logits: ArrayLike, n_classes: int | None = None) -> np.ndarray:
    """Validate logits: a finite (N, K) array with N >= 1 and K >= 2 (and K = n_classes)."""
    z = to_numpy(logits, np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits: expected shape (N, K), got {z.shape}")
    if z.shape[0] == 0:
        raise ValueError("logits: empty input (N = 0)")
    if z.shape[1] < 2:
        raise ValueError(f"logits: expected at least 2 classes, got K = {z.shape[1]}")
    if n_classes is not None and z.shape[1] != n_classes:
        raise ValueError(f"logits: the calibrator was fitted on K = {n_classes} classes, got K = {z.shape[1]}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits: contain NaN or infinite values")
    return z


def _nll(z: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(z.shape[0]), y]))


class Calibrator:
    """Base class: subclasses implement ``_fit`` and ``_transform`` on validated arrays."""

    name: ClassVar[str] = ""
    n_classes: int | None = None

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> Calibrator:
        z = check_logits(logits)
        y = check_labels(labels, z.shape[1])
        if y.shape[0] != z.shape[0]:
            raise ValueError(f"labels: expected {z.shape[0]} labels to match logits, got {y.shape[0]}")
        self.n_classes = int(z.shape[1])
        self.n_fit_samples = int(z.shape[0])
        self._fit(z, y)
        return self

    def transform(self, logits: ArrayLike) -> np.ndarray:
        """Calibrated probabilities (N, K), rows summing to 1."""
        if self.n_classes is None:
            raise RuntimeError(f"{type(self).__name__}: call fit() before transform()")
        return self._transform(check_logits(logits, self.n_classes))

    def fit_transform(self, logits: ArrayLike, labels: ArrayLike) -> np.ndarray:
        return self.fit(logits, labels).transform(logits)

    def to_dict(self) -> dict[str, Any]:
        if self.n_classes is None:
            raise RuntimeError(f"{type(self).__name__}: not fitted")
        return {"calibrator": self.name, "n_classes": self.n_classes, **self._state()}

    # -- to implement ----------------------------------------------------------------------
    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def _transform(self, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class TemperatureScaling(Calibrator):
    """Temperature scaling: ``p = softmax(z / T)`` with ``T = argmin_T NLL(softmax(z / T), y)``.

    The NLL is convex in ``1/T``, so it is unimodal in ``log T``; T is found by bounded Brent
    search on ``log T`` over ``bounds`` (to ~1e-10 in log T). When a bound is as good as the
    optimum (separable data wants T -> 0; constant logits are indifferent) a warning says so.
    """

    name = "temperature"

    def __init__(self, bounds: tuple[float, float] = (1e-3, 1e3)) -> None:
        if not 0 < bounds[0] < bounds[1]:
            raise ValueError(f"bounds: expected 0 < low < high, got {bounds}")
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.temperature: float | None = None

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        lo, hi = math.log(self.bounds[0]), math.log(self.bounds[1])

        def objective(log_t: float) -> float:
            return _nll(z / math.exp(log_t), y)

        result = minimize_scalar(objective, bounds=(lo, hi), method="bounded",
                                 options={"xatol": 1e-10, "maxiter": 500})
        self.temperature = float(math.exp(result.x))
        self.nll_before = _nll(z, y)
        self.nll_after = float(result.fun)
        # A bound that is as good as the interior optimum means the NLL keeps falling (or is
        # flat) towards it: separable fit data (T -> 0) or uninformative logits.
        tie = 1e-12 * max(1.0, abs(self.nll_after))
        if min(objective(lo), objective(hi)) <= self.nll_after + tie:
            warnings.warn(
                f"TemperatureScaling: the NLL is minimal on the search bound {self.bounds} "
                f"(fitted T = {self.temperature:.4g}); the fit set may be separable or its "
                "logits uninformative, so T is not identified",
                RuntimeWarning, stacklevel=3,
            )

    def calibrated_logits(self, logits: ArrayLike) -> np.ndarray:
        """``z / T``."""
        if self.temperature is None:
            raise RuntimeError("TemperatureScaling: call fit() before calibrated_logits()")
        return check_logits(logits, self.n_classes) / self.temperature

    def _transform(self, z: np.ndarray) -> np.ndarray:
        return softmax(z / self.temperature, axis=1)

    def _state(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "bounds": list(self.bounds)}

    def _load(self, state: dict[str, Any]) -> None:
        self.temperature = float(state["temperature"])
        self.bounds = tuple(state.get("bounds", self.bounds))


class _AffineScaling(Calibrator):
    """``softmax(z W^T + b)``; ``W`` diagonal (vector scaling) or full (matrix scaling)."""

    diagonal: ClassVar[bool] = True

    def __init__(self, l2: float = 0.0, max_iter: int = 1000) -> None:
        if l2 < 0:
            raise ValueError(f"l2: expected a non-negative float, got {l2}")
        self.l2 = float(l2)
        self.max_iter = int(max_iter)
        self.weight: np.ndarray | None = None
        self.bias: np.ndarray | None = None

    def _unpack(self, theta: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.diagonal:
            return np.diag(theta[:k]), theta[k:]
        return theta[: k * k].reshape(k, k), theta[k * k :]

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        n, k = z.shape
        onehot = np.eye(k)[y]
        eye = np.eye(k)

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = self._unpack(theta, k)
            out = z @ w.T + b
            log_p = log_softmax(out, axis=1)
            loss = -float(np.sum(log_p * onehot)) / n + 0.5 * self.l2 * float(np.sum((w - eye) ** 2))
            d_out = (np.exp(log_p) - onehot) / n
            d_w = d_out.T @ z + self.l2 * (w - eye)
            d_b = d_out.sum(axis=0)
            grad_w = np.diag(d_w) if self.diagonal else d_w.ravel()
            return loss, np.concatenate([grad_w, d_b])

        theta0 = np.concatenate([np.ones(k) if self.diagonal else eye.ravel(), np.zeros(k)])
        result = minimize(objective, theta0, jac=True, method="L-BFGS-B",
                          options={"maxiter": self.max_iter})
        w, b = self._unpack(result.x, k)
        self.weight, self.bias = w, b
        self.converged = bool(result.success)

    def _transform(self, z: np.ndarray) -> np.ndarray:
        return softmax(z @ self.weight.T + self.bias, axis=1)

    def _state(self) -> dict[str, Any]:
        w = np.diag(self.weight) if self.diagonal else self.weight
        return {"weight": w.tolist(), "bias": self.bias.tolist(), "l2": self.l2}

    def _load(self, state: dict[str, Any]) -> None:
        w = np.asarray(state["weight"], dtype=np.float64)
        self.weight = np.diag(w) if self.diagonal else w
        self.bias = np.asarray(state["bias"], dtype=np.float64)
        self.l2 = float(state.get("l2", 0.0))


class VectorScaling(_AffineScaling):
    """Vector scaling (Guo et al. 2017): ``softmax(z * w + b)``, w and b in R^K, by NLL."""

    name = "vector"
    diagonal = True


class MatrixScaling(_AffineScaling):
    """Matrix scaling (Guo et al. 2017): ``softmax(z W^T + b)``, W in R^{KxK}, by NLL."""

    name = "matrix"
    diagonal = False


def _renormalise(q: np.ndarray) -> np.ndarray:
    """Rows divided by their sum; rows that sum to 0 become uniform."""
    s = q.sum(axis=1, keepdims=True)
    return np.where(s > 0, q / np.where(s > 0, s, 1.0), 1.0 / q.shape[1])


class HistogramBinning(Calibrator):
    """Histogram binning, one-vs-rest: for class k, ``p_k`` is binned into ``n_bins``
    equal-width bins and replaced by the fraction of class-k labels in its bin on the fit set
    (empty bins keep their midpoint); rows are then renormalised (an all-zero row becomes
    uniform)."""

    name = "histogram"

    def __init__(self, n_bins: int = 15) -> None:
        if n_bins < 1:
            raise ValueError(f"n_bins: expected a positive integer, got {n_bins}")
        self.n_bins = int(n_bins)
        self.bin_values: np.ndarray | None = None

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        p = softmax(z, axis=1)
        k = p.shape[1]
        idx = bin_index(p.T, self.n_bins) + self.n_bins * np.arange(k)[:, None]  # (K, N)
        positives = (y[None, :] == np.arange(k)[:, None]).astype(np.float64)
        counts = np.bincount(idx.ravel(), minlength=k * self.n_bins).reshape(k, self.n_bins)
        hits = np.bincount(idx.ravel(), weights=positives.ravel(),
                           minlength=k * self.n_bins).reshape(k, self.n_bins)
        midpoints = (np.arange(self.n_bins) + 0.5) / self.n_bins
        self.bin_values = np.where(counts > 0, hits / np.maximum(counts, 1), midpoints[None, :])

    def _transform(self, z: np.ndarray) -> np.ndarray:
        p = softmax(z, axis=1)
        idx = bin_index(p, self.n_bins)
        return _renormalise(self.bin_values[np.arange(p.shape[1])[None, :], idx])

    def _state(self) -> dict[str, Any]:
        return {"n_bins": self.n_bins, "bin_values": self.bin_values.tolist()}

    def _load(self, state: dict[str, Any]) -> None:
        self.n_bins = int(state["n_bins"])
        self.bin_values = np.asarray(state["bin_values"], dtype=np.float64)


class IsotonicCalibration(Calibrator):
    """Isotonic regression, one-vs-rest: for class k, the non-decreasing map of ``p_k`` to
    ``1[y = k]`` with least squared error (pool-adjacent-violators on tie-pooled points);
    new values are interpolated linearly between fitted points and clipped outside them.
    Rows are renormalised (an all-zero row becomes uniform)."""

    name = "isotonic"

    def __init__(self) -> None:
        self.knots: list[tuple[np.ndarray, np.ndarray]] | None = None

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        p = softmax(z, axis=1)
        self.knots = []
        for k in range(p.shape[1]):  # one 1-D regression per class
            x, inverse, counts = np.unique(p[:, k], return_inverse=True, return_counts=True)
            mean_y = np.bincount(inverse, weights=(y == k).astype(np.float64)) / counts
            fitted = isotonic_regression(mean_y, weights=counts.astype(np.float64)).x
            self.knots.append((x, fitted))

    def _transform(self, z: np.ndarray) -> np.ndarray:
        p = softmax(z, axis=1)
        q = np.stack([np.interp(p[:, k], x, f) for k, (x, f) in enumerate(self.knots)], axis=1)
        return _renormalise(q)

    def _state(self) -> dict[str, Any]:
        return {"knots": [[x.tolist(), f.tolist()] for x, f in self.knots]}

    def _load(self, state: dict[str, Any]) -> None:
        self.knots = [(np.asarray(x, dtype=np.float64), np.asarray(f, dtype=np.float64))
                      for x, f in state["knots"]]


CALIBRATORS: dict[str, type[Calibrator]] = {
    cls.name: cls
    for cls in (TemperatureScaling, VectorScaling, MatrixScaling, HistogramBinning, IsotonicCalibration)
}


def calibrator_from_dict(state: dict[str, Any]) -> Calibrator:
    """Rebuild a fitted calibrator from :meth:`Calibrator.to_dict` output."""
    name = state.get("calibrator")
    if name not in CALIBRATORS:
        raise ValueError(f"calibrator state: unknown calibrator {name!r}; available: {sorted(CALIBRATORS)}")
    calibrator = CALIBRATORS[name]()
    calibrator.n_classes = int(state["n_classes"])
    calibrator._load(state)
    return calibrator
