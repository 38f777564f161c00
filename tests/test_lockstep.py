"""Lockstep training: several prompt-tuning runs share one text-encoder pass per step and still
follow, each, the trajectory they follow alone (to floating-point rounding) -- in the trainer, in
the run machinery and in sweeps."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from calibprompt.backbones import load_backbone
from calibprompt.cli import main
from calibprompt.demo.tissue import CLASSES, write_demo_dataset
from calibprompt.methods import coop
from calibprompt.methods.coop import (
    MAX_LOCKSTEP,
    PromptJob,
    TrainConfig,
    lockstep_capacity,
    train_prompt,
    train_prompts,
)
from calibprompt.objective import Objective
from calibprompt.prompts import PromptLearner
from calibprompt.runs import PromptRunConfig
from calibprompt.runs.directory import read_predictions
from calibprompt.runs.sweep import lockstep_groups

NAMES = list(CLASSES.values())


@pytest.fixture(scope="module")
def demo():
    return load_backbone("demo")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_data")
    write_demo_dataset(root, per_class={"train": 8, "test": 10})
    return root


def bank(seed, n=12, views=3, dim=None, backbone=None):
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(n, views, backbone.embed_dim, generator=g), dim=-1)
    return feats, torch.arange(n) % len(NAMES)


CONFIG = TrainConfig(epochs=3, batch_size=4, lr=0.05, warmup_epochs=1)


def jobs_for(demo, specs, config=CONFIG):
    """One job per (seed, objective): its own learner, features and seed."""
    zs = torch.nn.functional.normalize(torch.randn(len(NAMES), demo.embed_dim,
                                                   generator=torch.Generator().manual_seed(9)), dim=-1)
    out = []
    for seed, objective in specs:
        feats, labels = bank(seed, backbone=demo)
        learner = PromptLearner(demo, NAMES, n_ctx=4, seed=seed)
        out.append(PromptJob(learner, feats, labels, Objective.parse(objective),
                             dataclasses.replace(config, seed=seed), zs))
    return out


SPECS = [(1, "ce"), (2, "ls(alpha=0.1) + smac(alpha=0.1) + as"), (3, "penalty"), (4, "mdca")]


def test_group_equals_each_run_alone_with_one_encoder_pass_per_step(demo, monkeypatch):
    alone = jobs_for(demo, SPECS)
    logs_alone = [train_prompt(j.learner, j.views, j.labels, j.objective, j.config, j.zs_text_features) for j in alone]
    together = jobs_for(demo, SPECS)
    calls = []
    real = type(demo).encode_shared_prefix

    def counting(self, prefix, suffix, batch):
        calls.append(prefix.shape[0])
        return real(self, prefix, suffix, batch)

    monkeypatch.setattr(type(demo), "encode_shared_prefix", counting)
    logs_together = train_prompts(together)
    # 12 images / batch 4 = 3 steps per epoch, 3 epochs: 9 passes, each with the 4 runs' contexts
    assert calls == [4] * 9
    for a, b, la, lb in zip(alone, together, logs_alone, logs_together, strict=True):
        assert (a.learner.ctx - b.learner.ctx).abs().max().item() < 1e-5
        assert (a.learner.ctx - PromptLearner(demo, NAMES, n_ctx=4, seed=a.config.seed).ctx).abs().max() > 1e-3
        for x, y in zip(la, lb, strict=True):
            assert x.epoch == y.epoch and x.lr == y.lr and x.accuracy == y.accuracy
            assert abs(x.loss - y.loss) < 1e-5 and x.terms.keys() == y.terms.keys()


def test_group_with_runs_at_different_epochs_and_schedules(demo):
    """A run resumed at epoch 2 trains beside one that starts at 0 and one with more epochs: each
    equals its own uninterrupted run (a step batches the runs that take it)."""
    reference = jobs_for(demo, SPECS[:3])
    reference[2] = dataclasses.replace(reference[2], config=dataclasses.replace(reference[2].config, epochs=5))
    for j in reference:
        train_prompts([j])
    saved = {}
    first = jobs_for(demo, SPECS[:1])[0]

    def keep(log, learner, optimizer):
        if log.epoch == 1:
            saved.update(ctx=learner.ctx.detach().clone(), opt=optimizer.state_dict())

    train_prompts([dataclasses.replace(first, on_epoch=keep,
                                       config=dataclasses.replace(first.config, epochs=2))])
    group = jobs_for(demo, SPECS[:3])
    with torch.no_grad():
        group[0].learner.ctx.copy_(saved["ctx"])
    group[0] = dataclasses.replace(group[0], start_epoch=2, optimizer_state=saved["opt"])
    group[2] = dataclasses.replace(group[2], config=dataclasses.replace(group[2].config, epochs=5))
    logs = train_prompts(group)
    assert [len(x) for x in logs] == [1, 3, 5]
    for a, b in zip(reference, group, strict=True):
        assert (a.learner.ctx - b.learner.ctx).abs().max().item() < 1e-5


def test_class_specific_runs_step_together_without_a_shared_pass(demo):
    config = TrainConfig(epochs=2, batch_size=4, lr=0.05)
    alone, together = [], []
    for target in (alone, together):
        for seed in (1, 2):
            feats, labels = bank(seed, backbone=demo)
            learner = PromptLearner(demo, NAMES, n_ctx=2, class_specific=True, seed=seed)
            target.append(PromptJob(learner, feats, labels, Objective.parse("ce"), dataclasses.replace(config, seed=seed)))
    for j in alone:
        train_prompts([j])
    train_prompts(together)
    assert not coop.shares_text_pass([j.learner for j in together])
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a.learner.ctx, b.learner.ctx)  # the same arithmetic, one run at a time


def test_lockstep_capacity_follows_the_memory_budget(demo):
    learner = PromptLearner(demo, NAMES, n_ctx=4)
    per_run = coop._saved_bytes(learner, 3) - coop._saved_bytes(learner, 2)
    assert per_run > 0
    # linear in the contexts; the first pass also saves what every pass shares (the weights)
    assert coop._saved_bytes(learner, 5) - coop._saved_bytes(learner, 3) == 2 * per_run
    assert per_run < coop._saved_bytes(learner, 2) - per_run
    assert lockstep_capacity(learner, budget=2 * per_run * 7 + 1) == 7
    assert lockstep_capacity(learner, budget=1) == 1
    assert lockstep_capacity(learner, budget=1 << 50) == MAX_LOCKSTEP
    assert 1 <= lockstep_capacity(learner) <= MAX_LOCKSTEP


def test_sweep_groups_compatible_runs_and_equals_runs_alone(demo_root, tmp_path, capsys):
    spec = {"backbones": ["demo"], "datasets": [{"name": "demo", "root": str(demo_root)}],
            "methods": ["zeroshot", "ce", "calibprompt", "ls(alpha=0.05) + 2*as"], "seeds": [1, 2], "shots": 2,
            "epochs": 2, "views": 2, "cache": str(tmp_path / "cache"), "workers": 0, "progress": False,
            "grid": {"n_ctx": [4, 8]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    from calibprompt.runs.sweep import load_sweep

    configs, _ = load_sweep(path)
    groups = lockstep_groups(configs)
    # zero-shot runs alone (4: 2 seeds x 2 n_ctx values, the same run twice each), the 12 trained
    # runs in two groups of 6, one per n_ctx
    assert sorted(len(g) for g in groups) == [1, 1, 1, 1, 6, 6]
    assert all(len({configs[i].n_ctx for i in g}) == 1 for g in groups)
    assert main(["sweep", str(path), "--out", str(tmp_path / "together")]) == 0
    assert main(["sweep", str(path), "--out", str(tmp_path / "alone"), "--lockstep", "1"]) == 0
    assert main(["sweep", str(path), "--out", str(tmp_path / "pairs"), "--lockstep", "2"]) == 0
    capsys.readouterr()
    runs = sorted(p.parent for p in (tmp_path / "alone").rglob("metrics.json"))
    assert len(runs) == 14  # 12 trained + 2 zero-shot
    for run in runs:
        relative = run.relative_to(tmp_path / "alone")
        a = json.loads((run / "metrics.json").read_text())
        pa = read_predictions(run)
        for other in ("together", "pairs"):
            b = json.loads((tmp_path / other / relative / "metrics.json").read_text())
            pb = read_predictions(tmp_path / other / relative)
            assert np.array_equal(pa["test_logits"].argmax(1), pb["test_logits"].argmax(1))
            assert np.abs(pa["test_logits"] - pb["test_logits"]).max() < 1e-4
            for key in ("accuracy", "ece", "nll", "brier"):
                assert abs(a["uncalibrated"][key] - b["uncalibrated"][key]) < 1e-6, (relative, key)
    assert main(["sweep", str(path), "--out", str(tmp_path / "together"), "--lockstep", "0"]) == 2
    assert "lockstep" in capsys.readouterr().err


def test_a_group_interrupted_resumes_each_run_from_its_checkpoint(demo_root, tmp_path, monkeypatch):
    from calibprompt.runs.execute import execute_group

    configs = [PromptRunConfig("demo", "demo", str(demo_root), method=m, seed=s, shots=2, epochs=3, views=2,
                               cache=str(tmp_path / "cache"), workers=0, progress=False)
               for m, s in (("ce", 1), ("calibprompt", 2), ("ce", 3))]
    reference = execute_group(configs, tmp_path / "a")
    original = coop.train_prompts

    def interrupted(jobs):
        def hook(log, learner, optimizer, job):
            job.on_epoch(log, learner, optimizer)
            if log.epoch == 1 and job is jobs[-1]:
                raise KeyboardInterrupt("killed after epoch 1")
        return original([dataclasses.replace(j, on_epoch=lambda *a, j=j: hook(*a, j)) for j in jobs])

    monkeypatch.setattr(coop, "train_prompts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        execute_group(configs, tmp_path / "b")
    monkeypatch.setattr(coop, "train_prompts", original)
    assert not list((tmp_path / "b").rglob("metrics.json"))
    resumed = execute_group(configs, tmp_path / "b")
    for a, b in zip(reference, resumed, strict=True):
        assert not b.skipped
        for key in ("accuracy", "ece", "nll"):
            assert abs(a.metrics["uncalibrated"][key] - b.metrics["uncalibrated"][key]) < 1e-6
    again = execute_group(configs, tmp_path / "b")
    assert all(r.skipped for r in again)
