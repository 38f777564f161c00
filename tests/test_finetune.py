"""Full fine-tuning (``train --regime full``): fp32 master weights keep the paper's 2e-7 steps, lr 0
is zero-shot, a large lr moves weights and predictions, every tensor on the forward path trains and
the others are frozen and listed, objectives with zero-shot logits use the frozen initial model,
AS reaches the text tower only, runs resume exactly, and weights are saved only when asked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from calibprompt.backbones import load_backbone
from calibprompt.cli import main
from calibprompt.demo.tissue import write_demo_dataset
from calibprompt.methods.coop import TrainConfig
from calibprompt.methods.finetune import finetune, off_path_parameters, trainable_copy
from calibprompt.objective import Objective
from calibprompt.runs import PromptRunConfig, execute_run, load_run
from calibprompt.runs.directory import RunDirectory

TINY = {"epochs": 2, "shots": 2, "val_per_class": 2, "workers": 0, "progress": False}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_data")
    write_demo_dataset(root, per_class={"train": 6, "test": 4})
    return root


def config(root, cache, **kw):
    return PromptRunConfig(**{"backbone": "demo", "dataset": "demo", "root": str(root), "method": "ce",
                              "regime": "full", "cache": str(cache), **TINY, **kw})


def test_a_2e7_step_survives_in_fp32_and_is_lost_in_fp16_storage():
    """SGD's first step at the paper's lr on weights of CLIP's size (|w| ~ 0.02) with gradients of
    order 1 changes every fp32 weight and not a single weight stored in fp16 (spacing ~1.5e-5)."""
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(10_000, generator=g) * 0.02 + 0.01) * torch.sign(torch.randn(10_000, generator=g))
    grad = torch.randn(10_000, generator=g).clamp(-5, 5)
    grad[grad.abs() < 0.1] = 0.1
    p32 = torch.nn.Parameter(w.clone())
    p32.grad = grad.clone()
    torch.optim.SGD([p32], lr=2e-7).step()
    assert (p32.detach() != w).all()  # every fp32 weight moved
    p16 = torch.nn.Parameter(w.half())
    p16.grad = grad.half()
    torch.optim.SGD([p16], lr=2e-7).step()
    assert (p16.detach() == w.half()).all()  # fp16 storage: "fine-tuning" stays zero-shot


def test_trainable_copy_is_fp32_leaves_the_original_frozen_and_freezes_the_logit_scale():
    backbone = load_backbone("demo")
    fingerprint = backbone.fingerprint
    model = trainable_copy(backbone)
    params = dict(model.model.named_parameters())
    assert not params["logit_scale"].requires_grad
    assert all(p.requires_grad and p.dtype == torch.float32 for n, p in params.items() if n != "logit_scale")
    assert not any(p.requires_grad for p in backbone.model.parameters())  # the shared backbone is untouched
    assert "fingerprint" not in model.__dict__ and backbone.fingerprint == fingerprint
    assert dict(trainable_copy(backbone, train_logit_scale=True).model.named_parameters())["logit_scale"].requires_grad


def test_every_tensor_on_the_forward_path_gets_a_gradient_and_the_rest_are_listed(backbones):
    """CLIP towers have no unused tensor; MedCLIP's BERT pooler is off the path (its features pool
    hidden states) and is found by the probe."""
    for case, expected in (("demo", []), ("plip", []), ("quiltnet", []),
                           ("medclip", ["text_model.model.pooler.dense.weight", "text_model.model.pooler.dense.bias"])):
        model = trainable_copy(backbones[case])
        tokens = model.tokenize(["a photo of a cat.", "a photo of a dog."])
        off = off_path_parameters(model, torch.randn(2, 3, 32, 32), tokens)
        assert sorted(off) == sorted(expected), case
        assert all(p.grad is None for p in model.model.parameters())  # the probe leaves no gradient behind


def test_lr_0_gives_the_zero_shot_predictions(demo_root, tmp_path):
    full = execute_run(config(demo_root, tmp_path / "cache", lr=0.0), tmp_path / "runs")
    zs = execute_run(PromptRunConfig("demo", "demo", str(demo_root), method="zeroshot", cache=str(tmp_path / "cache"),
                                     workers=0, progress=False, val_per_class=2), tmp_path / "runs")
    a, b = np.load(full.directory / "predictions.npz"), np.load(zs.directory / "predictions.npz")
    assert (a["test_files"] == b["test_files"]).all()
    assert (a["test_logits"].argmax(1) == b["test_logits"].argmax(1)).all()
    np.testing.assert_allclose(a["test_logits"], b["test_logits"], atol=1e-4)  # one template: same head
    record = json.loads((full.directory / "config.json").read_text())
    assert record["regime"] == "full" and json.loads((zs.directory / "config.json").read_text())["regime"] == "prompt"
    assert record["identity"]["config"]["lr"] == 0.0 and record["identity"]["config"]["regime"] == "full"
    assert "n_ctx" not in record["identity"]["config"]  # no context in this regime
    assert full.directory.parent.name == "full-ce"
    assert not (full.directory / "checkpoint.safetensors").exists()  # removed when the run completed
    info = json.loads((full.directory / "finetune.json").read_text())
    assert info["train_mode"] and info["frozen_off_path"] == [] and not info["logit_scale"]["trained"]


def test_a_large_lr_moves_weights_and_predictions_and_as_reaches_only_the_text_tower(demo_root):
    backbone = load_backbone("demo")
    from calibprompt.data import few_shot, load_dataset
    from calibprompt.data.views import SeededViews, train_view_transform

    train = load_dataset("demo", demo_root, "train")
    shots = few_shot(train, 2, seed=1).subset_of(train)
    views = SeededViews(shots.paths, train_view_transform(backbone.image_transform()), seed=1)
    labels = torch.as_tensor(shots.labels)
    before = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    for objective, moved in (("ce", {"visual", "transformer"}), ("as", {"transformer"})):
        model = trainable_copy(backbone)
        finetune(model, views, labels, train.prompts(), Objective.parse(objective),
                 TrainConfig(epochs=2, lr=0.05, warmup_epochs=0, seed=1))
        changed = {n.split(".")[0] for n, p in model.model.named_parameters() if not torch.equal(p, before[n])}
        assert moved <= changed and (objective != "as" or "visual" not in changed), (objective, changed)
    assert all(torch.equal(p, before[n]) for n, p in backbone.model.named_parameters())  # original untouched


def test_zero_shot_objectives_use_the_frozen_initial_model(demo_root, tmp_path):
    for method in ("zsnorm", "penalty"):
        result = execute_run(config(demo_root, tmp_path / "cache", method=method, lr=0.01), tmp_path / "runs")
        assert np.isfinite(result.metrics["uncalibrated"]["nll"])
        log = json.loads((result.directory / "log.json").read_text())
        assert len(log) == 2 and all(np.isfinite(e["loss"]) for e in log)


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(demo_root, tmp_path, monkeypatch):
    cfg = config(demo_root, tmp_path / "cache", epochs=3, lr=0.02, save_weights=True)
    whole = execute_run(cfg, tmp_path / "a")
    original = RunDirectory.save_checkpoint

    def interrupt(self, tensors, info):
        original(self, tensors, info)
        if info["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDirectory, "save_checkpoint", interrupt)
    with pytest.raises(KeyboardInterrupt):
        execute_run(cfg, tmp_path / "b")
    monkeypatch.undo()
    resumed = execute_run(cfg, tmp_path / "b")
    a, b = np.load(whole.directory / "predictions.npz"), np.load(resumed.directory / "predictions.npz")
    np.testing.assert_allclose(a["test_logits"], b["test_logits"], atol=1e-6)
    from safetensors.torch import load_file

    wa, wb = load_file(str(whole.directory / "weights.safetensors")), load_file(str(resumed.directory / "weights.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-7) for k in wa)


def test_predict_needs_saved_weights_and_then_reproduces_the_run(demo_root, tmp_path):
    without = execute_run(config(demo_root, tmp_path / "cache", lr=0.02), tmp_path / "runs")
    assert not (without.directory / "weights.safetensors").exists()
    with pytest.raises(ValueError, match="did not save its weights"):
        load_run(without.directory).predict([demo_root / "demo" / "images" / "test"], progress=False)
    from calibprompt.runs import TPTRunConfig

    with pytest.raises(ValueError, match="a full fine-tuning run has no prompt"):
        execute_run(TPTRunConfig("demo", "demo", str(demo_root), method="tpt", init_prompt=str(without.directory),
                                 cache=str(tmp_path / "cache"), workers=0, progress=False), tmp_path / "runs")
    saved = execute_run(config(demo_root, tmp_path / "cache", lr=0.02, save_weights=True), tmp_path / "runs")
    preds = np.load(saved.directory / "predictions.npz")
    out = load_run(saved.directory).predict([demo_root / "demo" / "images" / "test"], progress=False)
    test = demo_root / "demo" / "images" / "test"
    by_file = {f: i for i, f in enumerate(preds["test_files"])}
    rows = [by_file[Path(p).relative_to(test).as_posix()] for p in out.paths]
    np.testing.assert_allclose(out.logits, preds["test_logits"][rows], atol=1e-4)


def test_cli_regime_flags_and_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--regime {prompt,full}" in text and "(default: prompt)" in text
    assert "0.002 (prompt regime), 2e-07 (full regime)" in text and "no warm-up epoch" in text
    assert PromptRunConfig("demo", "demo", "r", regime="full").train_config().lr == 2e-7
    assert PromptRunConfig("demo", "demo", "r", regime="full").train_config().warmup_epochs == 0
    assert PromptRunConfig("demo", "demo", "r", regime="full", warmup_lr=1e-5).train_config().warmup_epochs == 1
    assert PromptRunConfig("demo", "demo", "r").train_config().lr == 0.002
    assert PromptRunConfig("medclip", "covid", "r").train_config().warmup_lr == 1e-3
    with pytest.raises(ValueError, match="--regime full only"):
        PromptRunConfig("demo", "demo", "r", save_weights=True).validate()
