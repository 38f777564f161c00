"""Reliability and risk-coverage plots, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibprompt import metrics as M
from calibprompt import plots
from calibprompt.files import atomic_path, write_json
from tests.test_metrics import random_predictions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_reliability_diagram_shows_the_metric_values(tmp_path):
    probs, labels = random_predictions(400, 3, 0)
    path = tmp_path / "sub" / "rel.png"
    fig = plots.plot_reliability(probs, labels, n_bins=10, path=path, title="run", bootstrap=50)
    assert path.read_bytes()[:8] == PNG_MAGIC
    title = fig.axes[0].get_title()
    assert f"ECE {100 * M.ece(probs, labels, 10):.2f}%" in title
    assert f"MCE {100 * M.mce(probs, labels, 10):.2f}%" in title
    assert "N=400" in title and "bins=10" in title
    heights = [p.get_height() for p in fig.axes[0].patches[:10]]
    bins = M.reliability_bins(probs, labels, 10)
    np.testing.assert_allclose(heights, np.nan_to_num(bins.accuracy))
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary left behind


def test_bin_accuracy_intervals_cover_the_bin_accuracy():
    probs, labels = random_predictions(3000, 3, 1)
    conf, correct = M.top_label(*M.check_probs_labels(probs, labels))
    low, high = plots._bin_accuracy_intervals(conf, correct, labels, 10, 300, 0, 0.95)
    bins = M.reliability_bins(probs, labels, 10)
    big = bins.counts > 100
    assert np.all(low[big] <= bins.accuracy[big]) and np.all(bins.accuracy[big] <= high[big])


def test_risk_coverage_plot(tmp_path):
    a = random_predictions(300, 3, 2)
    b = random_predictions(300, 3, 3)
    fig = plots.plot_risk_coverage({"a": a, "b": b}, path=tmp_path / "rc.png")
    assert (tmp_path / "rc.png").read_bytes()[:8] == PNG_MAGIC
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[0] == f"a (AURC {100 * M.aurc(*a):.2f}%)"
    with pytest.raises(ValueError, match="at least one"):
        plots.plot_risk_coverage({})


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    probs, labels = random_predictions(50, 2, 4)
    fig = plots.plot_reliability(probs, labels)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", boom)
    with pytest.raises(OSError, match="disk full"):
        plots.save_figure(fig, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "result.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    with pytest.raises(ValueError):
        write_json(tmp_path / "nan.json", {"v": float("nan")})
    assert not (tmp_path / "nan.json").exists()
