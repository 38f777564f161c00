"""The work of a full fine-tuning run (``train --regime full``): the prompt run's splits, then
:func:`calibprompt.methods.finetune.finetune` on fresh augmented views of the few-shot images,
checkpointed after every epoch (weights + momentum: resumable mid-training), then the test and
validation splits encoded by the fine-tuned model.

Files besides a prompt run's: ``weights.safetensors`` (the fine-tuned state dict, only with
``save_weights``), ``finetune.json`` (frozen parameters, train mode, logit scale); the resume
checkpoint is removed when the run completes.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from calibprompt.data import FeatureStore
from calibprompt.data.views import SeededViews, train_view_transform
from calibprompt.files import atomic_path, write_json
from calibprompt.methods.finetune import (
    finetune,
    logit_scale_names,
    train_mode_record,
    trainable_copy,
)
from calibprompt.progress import rate_progress
from calibprompt.runs.common import Outputs, classifier_outputs
from calibprompt.runs.directory import RunDirectory

__all__ = ["WEIGHTS_FILE", "load_finetuned", "work_full"]

#: The fine-tuned weights of a run made with ``save_weights`` (the name is fixed for scripts).
WEIGHTS_FILE = "weights.safetensors"


def load_finetuned(backbone: Any, directory: Path) -> Any:
    """The run's fine-tuned model: ``backbone`` with the run's ``weights.safetensors`` (strict)."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: this full fine-tuning run did not save its weights (run it with "
                         "--save-weights), so it cannot classify new images")
    model = trainable_copy(backbone)
    model.model.load_state_dict(load_file(str(path)), strict=True)
    model.model.eval()
    for p in model.model.parameters():
        p.requires_grad_(False)
    model.__dict__.pop("fingerprint", None)
    return model


def work_full(config: Any, directory: RunDirectory, backbone: Any, store: FeatureStore, train: Any, test: Any,
              objective: Any, shots: Any, val: Any, calib: Any) -> Outputs:
    """Fine-tune a copy of ``backbone`` on the few-shot split ``shots`` and classify the test,
    tuning (``val``) and calibration splits with it (the dataset template's class prompts as the
    head)."""
    kw = {"num_workers": config.workers, "progress": config.progress}
    train_config = config.train_config()
    model = trainable_copy(backbone, config.train_logit_scale)
    shot_set = shots.subset_of(train)
    views = SeededViews(shot_set.paths, train_view_transform(backbone.image_transform()), config.seed)
    labels = torch.as_tensor(shot_set.labels)
    prompts = train.prompts()
    needs_reference = "zs_logits" in objective.required_inputs
    logs: list[dict[str, Any]] = []
    start_epoch, optimizer_state = 0, None
    checkpoint = directory.load_checkpoint()
    if checkpoint is not None:
        tensors, info = checkpoint
        params = dict(model.model.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                if name.startswith("model."):
                    params[name[len("model."):]].copy_(value)
        momentum = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("momentum.")}
        optimizer_state = {"state": {i: {"momentum_buffer": m} for i, m in momentum.items()},
                           "param_groups": info["param_groups"]}
        start_epoch, logs = info["epoch"] + 1, info["logs"]

    def on_epoch(log: Any, optimizer: torch.optim.Optimizer) -> None:
        logs.append(asdict(log))
        state = optimizer.state_dict()
        tensors = {f"model.{n}": p for n, p in model.model.named_parameters() if p.requires_grad}
        tensors.update({f"momentum.{i}": s["momentum_buffer"] for i, s in state["state"].items()
                        if s.get("momentum_buffer") is not None})
        directory.save_checkpoint(tensors, {"epoch": log.epoch, "logs": logs, "param_groups": state["param_groups"]})
        bar.update(task, advance=1, rate=f"{log.loss:.4f}")

    with rate_progress(config.progress, rate_label="loss") as bar:  # one bar for the epochs
        task = bar.add_task(f"fine-tuning {config.method}", total=config.epochs, completed=start_epoch, rate="-")
        result = finetune(model, views, labels, prompts, objective, train_config,
                          reference=backbone if needs_reference else None, on_epoch=on_epoch,
                          start_epoch=start_epoch, optimizer_state=optimizer_state)
    model.model.eval()
    for p in model.model.parameters():
        p.requires_grad_(False)
    scales = logit_scale_names(model.model)
    write_json(directory.path("finetune.json"), {
        "frozen_off_path": result.frozen,
        "logit_scale": {"parameters": scales, "trained": bool(config.train_logit_scale),
                        "final": float(model.logit_scale)},
        "trained_parameters": sum(p.numel() for n, p in model.model.named_parameters()
                                  if n not in result.frozen and (config.train_logit_scale or n not in scales)),
        **train_mode_record(model.model),
    })
    write_json(directory.path("log.json"), logs)
    if config.save_weights:
        with atomic_path(directory.path(WEIGHTS_FILE)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.model.state_dict().items()}, str(tmp))
    with torch.no_grad():
        text = model.encode_texts(prompts)
    test_feats = store.features(model, test.paths, **kw)
    config.check_readable(test_feats.excluded, f"the test split ({test.root})")
    labelled = {prefix: (m.subset_of(train), store.features(model, m.subset_of(train).paths, **kw))
                for prefix, m in (("val", val), ("calib", calib))}
    tables = {*test_feats.tables, *(t for _, feats in labelled.values() for t in feats.tables)}
    return classifier_outputs(directory, text, model.logit_scale, test, test_feats, labelled, tables,
                              (shots, val, calib), logs, extra={"frozen_off_path": len(result.frozen)})
