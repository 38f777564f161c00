"""Published numbers to show beside measured ones (``report --published``), each with its source.

Only values that a paper states for a setting calibprompt runs are here: CalibPrompt's 8-shot
prompt-tuning results (Basu et al., "Calibration-Aware Prompt Learning for Medical
Vision-Language Models", BMVC 2025, arXiv 2509.15226): ECE of CE prompt tuning and of
CalibPrompt for the ten backbone x dataset pairs of its main table, and the one accuracy the
paper's text states. A published value is never averaged with or mistaken for a measured one:
reports put it in its own column, marked "published".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from calibprompt.objective import CALIBPROMPT_HYPERPARAMETERS
from calibprompt.runs.prompt import PromptRunConfig

__all__ = ["PUBLISHED", "Published", "paper_hyperparameters", "published_for", "published_lines", "tuning_lines"]

CALIBPROMPT_PAPER = ("Basu et al., Calibration-Aware Prompt Learning for Medical Vision-Language Models, "
                     "BMVC 2025 (arXiv 2509.15226), main results, 8 shots")


@dataclass(frozen=True)
class Published:
    """One published value: ``metric`` in percent for (backbone, dataset, method) at ``shots``."""

    backbone: str
    dataset: str
    method: str
    metric: str
    value: float  # percent
    source: str
    shots: int = 8


def _ece(backbone: str, dataset: str, ce: float, calibprompt: float) -> list[Published]:
    return [Published(backbone, dataset, "ce", "ece", ce, CALIBPROMPT_PAPER),
            Published(backbone, dataset, "calibprompt", "ece", calibprompt, CALIBPROMPT_PAPER)]


#: Every published value calibprompt knows (ECE in %: CE prompt tuning, then CalibPrompt).
PUBLISHED: tuple[Published, ...] = (
    *_ece("plip", "kather", 5.92, 3.11),
    *_ece("plip", "pannuke", 17.82, 2.19),
    *_ece("plip", "digestpath", 9.50, 3.08),
    *_ece("quiltnet", "kather", 2.49, 3.58),
    *_ece("quiltnet", "pannuke", 19.70, 2.47),
    *_ece("quiltnet", "digestpath", 11.27, 0.77),
    *_ece("biomedclip", "covid", 6.61, 4.69),
    *_ece("biomedclip", "rsna18", 7.02, 5.74),
    *_ece("medclip", "covid", 27.51, 27.41),
    *_ece("medclip", "rsna18", 17.21, 17.14),
    Published("quiltnet", "kather", "calibprompt", "accuracy", 87.52, CALIBPROMPT_PAPER),
)


def published_for(backbone: str, dataset: str, method: str, config: Mapping[str, Any]) -> list[Published]:
    """The published values of a prompt-tuning experiment run with the published protocol: its
    effective ``config`` (the run identity's ``config``) equals the protocol's defaults at the
    published shots -- 16 generic context vectors, the paper's alpha / AS weight, SGD 0.002, 50
    epochs, ... (the seed, the validation size and the data set-up aside). Other settings have
    no published counterpart."""
    out = []
    for p in PUBLISHED:
        if (p.backbone, p.dataset, p.method) != (backbone, dataset, method):
            continue
        reference = PromptRunConfig(backbone, dataset, "", method=method, shots=p.shots).effective()
        ignore = ("seed", "val_per_class", "calib_per_class", "test_fraction")
        if all(config.get(k) == v for k, v in reference.items() if k not in ignore):
            out.append(p)
    return out


def published_lines(rows: list[Any], groups: list[Any]) -> list[dict[str, Any]]:
    """For every report row with a published counterpart: backbone, dataset, method, metric, the
    measured mean and std over seeds (percent, uncalibrated), the number of seeds, the published
    value and its source."""
    out = []
    for row, group in zip(rows, groups, strict=True):
        if row.kind != "prompt":
            continue
        config = {k[len("config."):]: v for k, v in group.first.flat.items() if k.startswith("config.")}
        for p in published_for(row.backbone, row.dataset, row.method, config):
            stat = row.stats.get(f"uncalibrated.{p.metric}")
            if stat is None:
                continue
            out.append({"backbone": row.backbone, "dataset": row.dataset, "method": row.method, "metric": p.metric,
                        "measured_mean": 100 * stat["mean"], "measured_std": 100 * stat["std"],
                        "seeds": len(row.seeds), "published": p.value, "source": p.source})
    return out


#: Where the paper's hyperparameters come from, and how they were chosen.
CALIBPROMPT_HYPERPARAMETERS_SOURCE = "CalibPrompt paper (BMVC 2025), chosen against test results"


def paper_hyperparameters(backbone: str, dataset: str, method: str) -> dict[str, float]:
    """The hyperparameters a paper published for this backbone x dataset, by the names ``--tune
    auto`` gives them: CalibPrompt's alpha (LS = SMAC) and AS weight for its ten pairs. None for
    other methods: the TPT family's lambdas were published for CLIP on natural images only."""
    if method != "calibprompt" or (backbone, dataset) not in CALIBPROMPT_HYPERPARAMETERS:
        return {}
    alpha, weight = CALIBPROMPT_HYPERPARAMETERS[(backbone, dataset)]
    return {"alpha": alpha, "weight": weight}


def tuning_lines(rows: list[Any], groups: list[Any]) -> list[dict[str, Any]]:
    """For every report row whose runs chose hyperparameters (``--tune auto``): one line per
    hyperparameter with its search range and the row's experiment id (rows with other search
    spaces differ there), the value chosen for each seed, what the choice was scored on and by which
    metric, and the paper's value for this backbone x dataset where one exists
    (:func:`paper_hyperparameters`; None elsewhere)."""
    out = []
    for row, group in zip(rows, groups, strict=True):
        tuned = [(r.seed, r.tuning) for r in group.runs if r.tuning]
        if not tuned:
            continue
        first = tuned[0][1]
        paper = paper_hyperparameters(row.backbone, row.dataset, str(group.first.flat.get("config.method")))
        where = (f"{first['folds']}-fold cross-validation" if first.get("split") == "cross-validation"
                 else "tuning split")
        for name in first["chosen"]:
            space = group.first.flat.get("config.search") or []
            out.append({"backbone": row.backbone, "dataset": row.dataset, "method": row.method, "slug": row.slug,
                        "experiment": row.experiment_id[:12], "hyperparameter": name,
                        "search": " ".join(str(d) for d in space if str(d).startswith(f"{name}=")),
                        "trials": group.first.flat.get("config.trials"), "seeds": [s for s, _ in tuned],
                        "chosen": [t["chosen"].get(name) for _, t in tuned], "scored_on": where,
                        "metric": first["metric"], "paper": paper.get(name),
                        "paper_source": CALIBPROMPT_HYPERPARAMETERS_SOURCE if name in paper else ""})
    return out
