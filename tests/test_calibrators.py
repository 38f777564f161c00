"""Post-hoc calibrators: optimality, invariants, serialisation and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax

from calibprompt import metrics as M
from calibprompt.calibrators import (
    CALIBRATORS,
    HistogramBinning,
    IsotonicCalibration,
    MatrixScaling,
    TemperatureScaling,
    VectorScaling,
    calibrator_from_dict,
)
from calibprompt.demo.calibration import simulate


def nll_at(z, y, t):
    zt = z / t
    zt = zt - zt.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(zt).sum(1)) - zt[np.arange(len(y)), y]))


def test_temperature_is_the_nll_minimiser():
    z, y = simulate(400, true_temperature=2.5, seed=0)
    ts = TemperatureScaling().fit(z, y)
    grid = np.exp(np.linspace(np.log(0.2), np.log(20), 4001))
    best = grid[np.argmin([nll_at(z, y, t) for t in grid])]
    assert ts.temperature == pytest.approx(best, rel=2e-3)  # grid spacing 0.12% in T
    assert nll_at(z, y, ts.temperature) <= min(nll_at(z, y, t) for t in grid) + 1e-9
    assert ts.nll_after <= ts.nll_before


def test_temperature_recovers_the_true_temperature():
    z, y = simulate(20000, true_temperature=3.0, seed=1)
    assert TemperatureScaling().fit(z, y).temperature == pytest.approx(3.0, rel=0.05)


def test_temperature_scaling_keeps_accuracy_and_improves_calibration():
    z_fit, y_fit = simulate(50, seed=2)
    z, y = simulate(3000, seed=3)
    ts = TemperatureScaling().fit(z_fit, y_fit)
    before, after = softmax(z, axis=1), ts.transform(z)
    assert np.array_equal(before.argmax(1), after.argmax(1))
    assert M.ece(after, y) < M.ece(before, y) / 3
    np.testing.assert_allclose(ts.calibrated_logits(z), z / ts.temperature)


def test_affine_scalings_fit_at_least_as_well_as_temperature_on_the_fit_set():
    z, y = simulate(600, seed=4)
    nll = {name: M.nll(cls().fit(z, y).transform(z), y)
           for name, cls in [("t", TemperatureScaling), ("v", VectorScaling), ("m", MatrixScaling)]}
    assert nll["v"] <= nll["t"] + 1e-6
    assert nll["m"] <= nll["v"] + 1e-6


def test_vector_scaling_gradient_is_exact():
    from scipy.optimize import check_grad

    z, y = simulate(50, n_classes=4, seed=5)
    vs = VectorScaling(l2=0.1)
    captured = {}

    def fake_minimize(fun, x0, jac, method, options):
        captured["fun"] = fun
        from scipy.optimize import minimize

        return minimize(fun, x0, jac=jac, method=method, options=options)

    import calibprompt.calibrators as C

    original = C.minimize
    C.minimize = fake_minimize
    try:
        vs.fit(z, y)
    finally:
        C.minimize = original
    fun = captured["fun"]
    x = np.random.default_rng(0).normal(size=8)
    assert check_grad(lambda t: fun(t)[0], lambda t: fun(t)[1], x) < 1e-5


def test_histogram_binning_maps_each_bin_to_its_frequency():
    z, y = simulate(2000, n_classes=3, seed=6)
    hb = HistogramBinning(n_bins=10).fit(z, y)
    p = softmax(z, axis=1)
    k, b = 1, M.bin_index(p[:, 1], 10)
    for bin_id in np.unique(b):
        mask = b == bin_id
        assert hb.bin_values[k, bin_id] == pytest.approx(np.mean(y[mask] == k))
    q = hb.transform(z)
    np.testing.assert_allclose(q.sum(1), 1.0)


def test_isotonic_is_monotone_per_class():
    z, y = simulate(1000, n_classes=3, seed=7)
    iso = IsotonicCalibration().fit(z, y)
    for x, f in iso.knots:
        assert np.all(np.diff(f) >= -1e-12) and np.all(np.diff(x) > 0)
    q = iso.transform(z)
    np.testing.assert_allclose(q.sum(1), 1.0)
    assert M.nll(q, y) < M.nll(softmax(z, axis=1), y)


@pytest.mark.parametrize("name", sorted(CALIBRATORS))
def test_roundtrip_through_json(name):
    z, y = simulate(300, n_classes=4, seed=8)
    cal = CALIBRATORS[name]().fit(z, y)
    restored = calibrator_from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_allclose(restored.transform(z), cal.transform(z), atol=1e-12)


def test_errors():
    z, y = simulate(30, n_classes=3, seed=9)
    with pytest.raises(RuntimeError, match="fit\\(\\) before transform"):
        TemperatureScaling().transform(z)
    ts = TemperatureScaling().fit(z, y)
    with pytest.raises(ValueError, match="fitted on K = 3"):
        ts.transform(z[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        TemperatureScaling().fit(np.full((3, 3), np.nan), [0, 1, 2])
    with pytest.raises(ValueError, match="expected 30 labels"):
        TemperatureScaling().fit(z, y[:-1])
    with pytest.raises(ValueError, match="class indices"):
        TemperatureScaling().fit(z, y + 5)
    with pytest.raises(ValueError, match="unknown calibrator"):
        calibrator_from_dict({"calibrator": "platt"})


def test_separable_fit_set_warns_about_the_bound():
    z = np.array([[10.0, -10.0], [-10.0, 10.0]])
    with pytest.warns(RuntimeWarning, match="minimal on the search bound"):
        TemperatureScaling().fit(z, [0, 1])
