"""Training objectives as explicit weighted sums of registered loss terms.

``Objective.parse("ls(alpha=0.1) + smac(alpha=0.1) + 3*as")`` builds
``L = 1 * LS_0.1 + 1 * SMAC_0.1 + 3 * AS``. Grammar::

    objective := term (("+" | "-") term)*
    term      := [number "*"] name ["(" [kwarg ("," kwarg)*] ")"]
    kwarg     := name "=" (number | name | quoted string | true | false)

Each term is fed the inputs its loss declares (``logits``, ``labels``, ``text_features``,
``zs_logits``); calling the objective returns the total and every term's value for logging.
A term whose loss is declared ``maximize`` (C-TPT's ``atfd``) contributes ``-weight * value``.
Composition is always explicit: MMCE, DCA, Penalty, SMAC and AS contain no CE, so a preset adds
the likelihood term it needs.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from calibprompt.losses import INPUT_NAMES, LOSSES, LossSpec

__all__ = ["CALIBPROMPT_HYPERPARAMETERS", "PRESETS", "PRESET_SEARCH", "Objective", "ObjectiveResult", "Term"]


@dataclass(frozen=True)
class Term:
    """One weighted loss term with its keyword arguments."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> LossSpec:
        return LOSSES[self.name]

    @property
    def label(self) -> str:
        """The term as written, without weight, e.g. ``smac(alpha=0.1)``."""
        if not self.kwargs:
            return self.name
        args = ", ".join(f"{k}={_format_value(v)}" for k, v in self.kwargs.items())
        return f"{self.name}({args})"

    def __str__(self) -> str:
        return self.label if self.weight == 1.0 else f"{_format_value(self.weight)}*{self.label}"


def _format_value(value: Any) -> str:
    """Shortest text that parses back to the same value (``3.0`` -> ``3``, ``0.1`` -> ``0.1``)."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class ObjectiveResult:
    """Total loss (a differentiable scalar) and each term's *unweighted* value."""

    total: torch.Tensor
    terms: dict[str, float]


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<string>'[^']*'|\"[^\"]*\")"
    r"|(?P<op>[-+*(),=]))"
)


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            placeholder = re.match(r"\s*(\?[A-Za-z_][A-Za-z0-9_]*)", text[pos:])
            if placeholder:
                raise ValueError(f"objective {text!r}: the placeholder {placeholder.group(1)} has no value; "
                                 "placeholders are for hyperparameter search (train --tune auto --search NAME=RANGE)")
            raise ValueError(f"objective {text!r}: unexpected character {text[pos:].lstrip()[:1]!r} "
                             f"at position {pos}")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def error(self, msg: str) -> ValueError:
        where = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)
        return ValueError(f"objective {self.text!r}: {msg} at position {where}")

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, kind: str, value: str | None = None) -> str:
        tok = self.peek()
        if tok is None or tok[0] != kind or (value is not None and tok[1] != value):
            want = value or kind
            got = "end of input" if tok is None else repr(tok[1])
            raise self.error(f"expected {want}, got {got}")
        self.i += 1
        return tok[1]

    def accept(self, kind: str, value: str) -> bool:
        tok = self.peek()
        if tok is not None and tok[0] == kind and tok[1] == value:
            self.i += 1
            return True
        return False

    def parse(self) -> list[Term]:
        if not self.tokens:
            raise ValueError("objective: empty expression; e.g. 'ls(alpha=0.1) + smac(alpha=0.1) + 3*as'")
        terms = [self.term(1.0)]
        while self.peek() is not None:
            if self.accept("op", "-"):
                terms.append(self.term(-1.0))
            else:
                self.take("op", "+")
                terms.append(self.term(1.0))
        return terms

    def term(self, sign: float) -> Term:
        weight = 1.0
        if self.accept("op", "-"):
            sign = -sign
        tok = self.peek()
        if tok is not None and tok[0] == "number":
            weight = float(self.take("number"))
            self.take("op", "*")
        name = self.take("name")
        kwargs: dict[str, Any] = {}
        if self.accept("op", "("):
            if not self.accept("op", ")"):
                while True:
                    key = self.take("name")
                    self.take("op", "=")
                    if key in kwargs:
                        raise self.error(f"keyword {key!r} given twice")
                    kwargs[key] = self.value()
                    if self.accept("op", ")"):
                        break
                    self.take("op", ",")
        return Term(name=name, weight=sign * weight, kwargs=kwargs)

    def value(self) -> Any:
        negative = self.accept("op", "-")
        tok = self.peek()
        if tok is None:
            raise self.error("expected a value")
        kind, text, _ = tok
        self.i += 1
        if kind == "number":
            number = float(text) if re.search(r"[.eE]", text) else int(text)
            return -number if negative else number
        if negative:
            raise self.error("'-' must be followed by a number")
        if kind == "string":
            return text[1:-1]
        if kind == "name":
            return {"true": True, "false": False, "True": True, "False": False}.get(text, text)
        self.i -= 1
        raise self.error(f"expected a value, got {text!r}")


def _validate_term(term: Term, source: str) -> None:
    if term.name not in LOSSES:
        raise ValueError(
            f"objective {source!r}: unknown loss {term.name!r}; available: {', '.join(LOSSES)}"
        )
    spec = LOSSES[term.name]
    allowed = spec.hyperparameters
    for key, value in term.kwargs.items():
        if key not in allowed:
            options = ", ".join(f"{k}={v!r}" for k, v in allowed.items()) or "none"
            raise ValueError(
                f"objective {source!r}: loss {term.name!r} has no keyword {key!r}; "
                f"its keywords (with defaults): {options}"
            )
        default = allowed[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            continue
        if default is not None and not isinstance(value, type(default)):
            raise ValueError(
                f"objective {source!r}: {term.name}({key}=...) expects a "
                f"{type(default).__name__}, got {value!r}"
            )


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

#: CalibPrompt's per-backbone / per-dataset (alpha for LS and SMAC, AS weight), as published with CalibPrompt (BMVC 2025).
#: Tuned against test results in the published work.
CALIBPROMPT_HYPERPARAMETERS: dict[tuple[str, str], tuple[float, float]] = {
    ("medclip", "covid"): (0.2, 1.0),
    ("medclip", "rsna18"): (0.2, 1.0),
    ("biomedclip", "covid"): (0.1, 3.0),
    ("biomedclip", "rsna18"): (0.1, 3.0),
    ("plip", "kather"): (0.05, 0.01),
    ("plip", "pannuke"): (0.2, 0.1),
    ("plip", "digestpath"): (0.03, 0.001),
    ("quiltnet", "kather"): (0.01, 1.0),
    ("quiltnet", "pannuke"): (0.1, 0.001),
    ("quiltnet", "digestpath"): (0.05, 0.001),
}
#: Used when the pair is not in the table (our choice, not the paper's): moderate smoothing and
#: a unit AS weight.
CALIBPROMPT_DEFAULT = (0.1, 1.0)

#: Baseline objectives compared in CalibPrompt (each with its likelihood term made explicit).
PRESETS: dict[str, str] = {
    "ce": "ce",
    "ls": "ls(alpha=0.1)",
    "focal": "focal(gamma=3.0)",
    "mdca": "ce + 1*mdca",
    "dca": "ce + 1*dca",
    "mmce": "ce + 2*mmce",
    "mbls": "mbls(margin=10.0, alpha=0.1)",
    "logitnorm": "logitnorm(temperature=1.0)",
    "zsnorm": "zsnorm",
    "penalty": "ce + 1*penalty",
    "smac": "ls(alpha={alpha}) + smac(alpha={alpha})",
    "calibprompt": "ls(alpha={alpha}) + smac(alpha={alpha}) + {weight}*as",
}


#: ``--tune auto`` on a preset: the preset with its hyperparameters as placeholders, and their
#: ranges (our choice, wide enough to hold every published value: CalibPrompt's alpha 0.01-0.2
#: and AS weight 0.001-3; a user's ``--search`` replaces a range). Presets without free
#: hyperparameters (ce, zsnorm) are absent.
PRESET_SEARCH: dict[str, tuple[str, tuple[str, ...]]] = {
    "ls": ("ls(alpha=?alpha)", ("alpha=0.01:0.3:log",)),
    "smac": ("ls(alpha=?alpha) + smac(alpha=?alpha)", ("alpha=0.01:0.3:log",)),
    "calibprompt": ("ls(alpha=?alpha) + smac(alpha=?alpha) + ?weight*as", ("alpha=0.01:0.3:log",
                                                                           "weight=0.001:10:log")),
    "focal": ("focal(gamma=?gamma)", ("gamma=0.5:5",)),
    "mdca": ("ce + ?weight*mdca", ("weight=0.1:10:log",)),
    "dca": ("ce + ?weight*dca", ("weight=0.1:10:log",)),
    "mmce": ("ce + ?weight*mmce", ("weight=0.1:10:log",)),
    "mbls": ("mbls(margin=?margin, alpha=0.1)", ("margin=1:20:log",)),
    "logitnorm": ("logitnorm(temperature=?temperature)", ("temperature=0.01:1:log",)),
    "penalty": ("ce + ?weight*penalty", ("weight=0.1:10:log",)),
}


# --------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------


class Objective:
    """A weighted sum of registered loss terms (see the module docstring for the grammar)."""

    def __init__(self, terms: list[Term], source: str | None = None) -> None:
        if not terms:
            raise ValueError("objective: needs at least one term")
        self.source = source or " + ".join(str(t) for t in terms)
        for term in terms:
            _validate_term(term, self.source)
        self.terms = list(terms)
        self._keys = self._unique_keys()

    @classmethod
    def parse(cls, text: str) -> Objective:
        """Parse ``"ls(alpha=0.1) + smac(alpha=0.1) + 3*as"`` (see the module docstring)."""
        if not isinstance(text, str):
            raise ValueError(f"objective: expected a string, got {type(text).__name__}")
        return cls(_Parser(text).parse(), source=text.strip())

    @classmethod
    def preset(
        cls, name: str, backbone: str | None = None, dataset: str | None = None,
        **overrides: float,
    ) -> Objective:
        """A named objective of :data:`PRESETS`.

        ``calibprompt`` (and ``smac``) take ``alpha`` and ``weight`` from
        :data:`CALIBPROMPT_HYPERPARAMETERS` for the (backbone, dataset) pair, falling back to
        :data:`CALIBPROMPT_DEFAULT`; ``overrides`` replace either.
        """
        if name not in PRESETS:
            raise ValueError(f"objective preset {name!r} is unknown; available: {', '.join(PRESETS)}")
        template = PRESETS[name]
        if "{" not in template:
            if overrides:
                raise ValueError(f"objective preset {name!r} takes no overrides, got {sorted(overrides)}")
            return cls.parse(template)
        key = ((backbone or "").lower(), (dataset or "").lower())
        alpha, weight = CALIBPROMPT_HYPERPARAMETERS.get(key, CALIBPROMPT_DEFAULT)
        unknown = set(overrides) - {"alpha", "weight"}
        if unknown:
            raise ValueError(f"objective preset {name!r}: unknown overrides {sorted(unknown)}; "
                             "expected alpha and/or weight")
        values = {"alpha": float(overrides.get("alpha", alpha)),
                  "weight": float(overrides.get("weight", weight))}
        return cls.parse(template.format(**{k: repr(v) for k, v in values.items()}))

    @classmethod
    def from_any(cls, spec: str | Objective) -> Objective:
        """An objective from a preset name, an expression, or an Objective."""
        if isinstance(spec, Objective):
            return spec
        return cls.preset(spec) if spec in PRESETS else cls.parse(spec)

    def _unique_keys(self) -> list[str]:
        keys, seen = [], {}
        for term in self.terms:
            key = term.label
            seen[key] = seen.get(key, 0) + 1
            keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
        return keys

    @property
    def required_inputs(self) -> tuple[str, ...]:
        """Inputs some term reads, in canonical order."""
        needed = {name for t in self.terms for name in t.spec.inputs}
        return tuple(n for n in INPUT_NAMES if n in needed)

    @property
    def includes_likelihood(self) -> bool:
        return any(t.spec.includes_ce for t in self.terms)

    def __call__(self, **inputs: torch.Tensor | None) -> ObjectiveResult:
        """Evaluate every term on the inputs it declares; returns the total and term values."""
        unknown = set(inputs) - set(INPUT_NAMES)
        if unknown:
            raise ValueError(f"objective: unknown inputs {sorted(unknown)}; expected some of {INPUT_NAMES}")
        available = {k for k, v in inputs.items() if v is not None}
        total: torch.Tensor | None = None
        values: dict[str, float] = {}
        for key, term in zip(self._keys, self.terms, strict=True):
            missing = [n for n in term.spec.inputs if n not in available]
            if missing:
                raise ValueError(
                    f"objective {self.source!r}: term {term.label!r} needs {missing} but only "
                    f"{sorted(available) or 'nothing'} was given"
                )
            value = term.spec.fn(*(inputs[n] for n in term.spec.inputs), **term.kwargs)
            sign = -1.0 if term.spec.maximize else 1.0
            contribution = (sign * term.weight) * value
            total = contribution if total is None else total + contribution
            values[key] = float(value.detach())
        assert total is not None
        return ObjectiveResult(total=total, terms=values)

    def check_values(self) -> None:
        """Evaluate every term once on tiny fixed inputs (4 images, 3 classes), so that a
        hyperparameter out of its loss's range (a label-smoothing alpha outside [0, 1], a negative
        focal gamma) fails here, before any work, with the loss's own message."""
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(4, 3, generator=g, dtype=torch.float64)
        text = torch.nn.functional.normalize(torch.randn(3, 8, generator=g, dtype=torch.float64), dim=-1)
        self(logits=logits, labels=torch.tensor([0, 1, 2, 0]), text_features=text,
             zs_logits=torch.randn(4, 3, generator=g, dtype=torch.float64))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (stored in run configs)."""
        return {
            "expression": str(self),
            "terms": [{"name": t.name, "weight": t.weight, "kwargs": dict(t.kwargs)} for t in self.terms],
        }

    def __str__(self) -> str:
        out = ""
        for i, term in enumerate(self.terms):
            body = term.label if abs(term.weight) == 1.0 else f"{_format_value(abs(term.weight))}*{term.label}"
            if i == 0:
                out = body if term.weight >= 0 else f"-{body}"
            else:
                out += (" + " if term.weight >= 0 else " - ") + body
        return out

    def __repr__(self) -> str:
        return f"Objective({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Objective) and self.terms == other.terms

    def __hash__(self) -> int:
        return hash(str(self))


def describe_losses() -> list[dict[str, Any]]:
    """One row per registered loss (name, inputs, keywords, summary) for help texts."""
    return [
        {
            "name": spec.name,
            "inputs": list(spec.inputs),
            "keywords": dict(spec.hyperparameters),
            "includes_ce": spec.includes_ce,
            "maximize": spec.maximize,
            "summary": spec.summary,
            "signature": str(inspect.signature(spec.fn)),
        }
        for spec in LOSSES.values()
    ]
