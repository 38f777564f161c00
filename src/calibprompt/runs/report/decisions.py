"""The decisions of a report's rows: for every row whose runs were given a referral rule
(``calibprompt referral``) or conformal sets (``calibprompt conformal``) with the same settings,
their test outcome as mean ± std over seeds -- so a sweep shows which method gives the most
useful decisions (the most cases accepted at the target error, the smallest sets at the target
coverage), not only the lowest ECE."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

__all__ = ["decision_lines"]


def _value(record: dict[str, Any], key: str) -> Any:
    if key == "raps":  # RAPS's penalty (other scores: none)
        fitted = record.get("fitted") or {}
        return [fitted.get("raps_lambda"), fitted.get("raps_k")] if record.get("score") == "raps" else None
    return record.get(key)


def _settings(record: dict[str, Any], keys: tuple[str, ...]) -> str:
    return json.dumps({k: _value(record, k) for k in keys}, sort_keys=True)


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def decision_lines(rows: list[Any], groups: list[Any]) -> list[dict[str, Any]]:
    """One line per row and rule kind whose seeds all carry the rule with equal settings:
    referral -- test coverage and error among accepted (seeds where no threshold was certified
    count as coverage 0 and are counted in ``unreachable``); conformal -- test coverage and mean
    set size. Rows whose seeds disagree in settings, or lack the rule in some seed, are listed
    with a ``note`` instead of numbers."""
    out = []
    for row, group in zip(rows, groups, strict=True):
        for name, keys in (("referral", ("max_error", "confidence", "probabilities")),
                           ("conformal", ("score", "coverage", "mondrian", "probabilities"))):
            if name == "conformal":  # RAPS's penalty is a setting too (stored in the fitted rule)
                keys = (*keys, "raps")
            records = [r.decisions.get(name) for r in group.runs]
            if not any(records):
                continue
            line = {"backbone": row.backbone, "dataset": row.dataset, "method": row.method, "rule": name,
                    "seeds": [r.seed for r in group.runs]}
            if not all(records) or len({_settings(r, keys) for r in records}) > 1:
                line["note"] = f"{name} settings differ between seeds (or some seeds have none); refit them alike"
                out.append(line)
                continue
            line["settings"] = {k: _value(records[0], k) for k in keys}
            tests = [r["test"] for r in records]
            line["coverage"] = _mean_std([t["coverage"] for t in tests])
            if name == "referral":
                errors = [t["selective_error"] for t in tests if t["selective_error"] is not None]
                line["selective_error"] = _mean_std(errors) if errors else None
                line["unreachable"] = sum(not r["reachable"] for r in records)
            else:
                line["mean_size"] = _mean_std([t["mean_size"] for t in tests])
            out.append(line)
    return out
