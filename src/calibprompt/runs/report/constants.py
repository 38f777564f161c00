"""The report's fixed vocabulary: metric and variant names, the method's identity keys, the
fixed table columns and the shared markers (no logic beyond :func:`_is_method_key`)."""

from __future__ import annotations

#: Metrics of the main table, in column order.
METRICS = ("accuracy", "ece", "mce", "ace", "brier", "nll")
#: Metrics shown in percent in the Markdown and LaTeX tables (fractions in the CSV files).
PERCENT = frozenset({"accuracy", "ece", "mce", "ace"})
#: Probability variants: softmax of the logits, and of the logits divided by the run's temperature.
VARIANTS = ("uncalibrated", "temperature_scaled")
VARIANT_LABELS = {"uncalibrated": "uncalibrated", "temperature_scaled": "+ TS"}
#: Identity keys that belong to the method: ignored when a row is matched with its baseline, and
#: shown as columns only where the method name does not already determine them.
METHOD_KEYS = ("config.method", "config.objective", "config.alpha", "config.weight", "config.lam",
               "config.delta")
#: Keys the fixed backbone / dataset columns already show.
NAME_KEYS = ("config.backbone", "config.dataset")
#: Coverage of every bootstrap interval.
CONFIDENCE = 0.95
#: Resample indices are generated in blocks of at most this many entries (bounded memory).
_BLOCK = 2_000_000
_MISSING = "—"
#: Columns of the CSV files that precede the varying keys (a varying key of the same name is
#: labelled ``identity.<key>``, or left out where it repeats the fixed column).
_FIXED_CSV = ("backbone", "dataset", "method", "kind", "experiment_id")
#: Columns of the Markdown and LaTeX tables that precede the varying keys.
_FIXED_TABLE = ("backbone", "dataset", "method")
_OLD_SCHEMA = "written by an older calibprompt (re-run them)"


def _is_method_key(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in METHOD_KEYS)
