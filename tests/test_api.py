"""The public API as a user imports it, and the CLI generated from the config schema: one place
for every default and its help."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

import calibprompt
from calibprompt.cli import build_parser
from calibprompt.cli.options import config_from_args, default_of
from calibprompt.demo.pipeline import run_demo
from calibprompt.runs import CertifyRunConfig, PromptRunConfig, TPTRunConfig, write_report
from calibprompt.runs.prompt import TRAINING_FIELDS

BASE = ["--backbone", "b", "--dataset", "d", "--root", "r"]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_name_of_the_public_api_imports_from_the_top_level():
    assert set(calibprompt.__all__) == {"__version__", *calibprompt._EXPORTS}
    for name in calibprompt.__all__:
        assert getattr(calibprompt, name) is not None, name
    from calibprompt import Objective, TemperatureScaling, evaluate, load_dataset, metrics, train  # noqa: F401

    assert calibprompt.evaluate is calibprompt.metrics.evaluate and callable(train)
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        _ = calibprompt.nonsense


def test_the_metrics_need_no_torch():
    code = "import sys, calibprompt.metrics as M; print(M.ece([[0.9, 0.1]], [0]), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) == pytest.approx(0.1) and out[1] == "False"


def test_a_run_from_the_top_level_api(tmp_path):
    from calibprompt.demo.tissue import write_demo_dataset

    root = write_demo_dataset(tmp_path / "data", per_class={"train": 6, "test": 3}).parent
    kw = {"out": tmp_path / "runs", "cache": str(tmp_path / "cache"), "workers": 0, "progress": False}
    zs = calibprompt.zeroshot("demo", "demo", root, val_per_class=2, **kw)
    tuned = calibprompt.train("demo", "demo", root, "ce", shots=2, epochs=1, views=1, val_per_class=2, **kw)
    assert json.loads((zs.directory / "config.json").read_text())["method"] == "zeroshot"
    assert json.loads((tuned.directory / "config.json").read_text())["method"] == "ce"
    run = calibprompt.load_run(tuned.directory)
    probs = run.predict([root / "demo" / "images" / "test"], cache=str(tmp_path / "cache"), workers=0,
                        progress=False).probs
    assert np.allclose(probs.sum(1), 1.0) and probs.shape == (12, 4)


def test_cli_defaults_equal_the_config_schema():
    train = subparsers()["train"].parse_args(BASE)
    assert config_from_args(PromptRunConfig, train, method=train.objective or train.method) == PromptRunConfig("b", "d", "r")
    zeroshot = subparsers()["zeroshot"].parse_args(BASE)
    assert config_from_args(PromptRunConfig, zeroshot, method="zeroshot") == PromptRunConfig("b", "d", "r", method="zeroshot")
    tpt = subparsers()["tpt"].parse_args(BASE)
    assert tpt.method == [TPTRunConfig.__dataclass_fields__["method"].default]
    assert config_from_args(TPTRunConfig, tpt, method=tpt.method[0]) == TPTRunConfig("b", "d", "r")
    certify = subparsers()["certify"].parse_args(BASE)
    assert certify.sigma == [CertifyRunConfig.__dataclass_fields__["sigma"].default]
    assert config_from_args(CertifyRunConfig, certify, sigma=certify.sigma[0]) == CertifyRunConfig("b", "d", "r")
    # every field of the schema has its flag (or is declared without one)
    for name, cls, skip in (("train", PromptRunConfig, ()), ("zeroshot", PromptRunConfig, ("method", *TRAINING_FIELDS)),
                            ("tpt", TPTRunConfig, ()), ("certify", CertifyRunConfig, ())):
        dests = {a.dest for a in subparsers()[name]._actions}
        for f in dataclasses.fields(cls):
            if f.name not in skip and f.metadata.get("cli", True):
                assert f.name in dests, (name, f.name)
    # commands without a config take their defaults from the function they call
    commands = subparsers()
    assert commands["report"].parse_args(["x"]).n_bins == default_of(write_report, "n_bins")
    assert commands["report"].parse_args(["x"]).bootstrap == default_of(write_report, "n_resamples")
    assert commands["demo"].parse_args([]).epochs == default_of(run_demo, "epochs")
    assert commands["demo"].parse_args([]).seeds == list(default_of(run_demo, "seeds"))


def test_every_flag_has_help_and_shows_its_default():
    for name, parser in subparsers().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            assert action.help, (name, action.option_strings)
            if not action.required and not isinstance(action, argparse._StoreTrueAction) and action.default is not None \
                    and action.default is not argparse.SUPPRESS:
                assert "default" in action.help, (name, action.option_strings, action.help)



def test_a_connection_error_is_not_reported_as_a_disk_problem(monkeypatch, capsys):
    """ConnectionError is an OSError; the command line names it as what it is."""
    import calibprompt.cli.results as results
    from calibprompt.cli import main

    def unreachable(args):
        raise ConnectionError("could not connect to ray://10.0.0.1:10001")

    monkeypatch.setattr(results, "cmd_report", unreachable)
    assert main(["report", "somewhere"]) == 2
    err = capsys.readouterr().err
    assert "could not connect" in err and "check --address" in err and "free space" not in err
