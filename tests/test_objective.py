"""Objective parsing, evaluation and presets."""

from __future__ import annotations

import pytest
import torch

from calibprompt import losses as L
from calibprompt.objective import CALIBPROMPT_HYPERPARAMETERS, PRESETS, Objective, Term


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "logits": torch.randn(16, 3, generator=g) * 4,
        "labels": torch.randint(0, 3, (16,), generator=g),
        "text_features": torch.randn(3, 8, generator=g),
        "zs_logits": torch.randn(16, 3, generator=g) * 2,
    }


def test_parse_calibprompt_expression(inputs):
    obj = Objective.parse("ls(alpha=0.1) + smac(alpha=0.1) + 3*as")
    assert obj.terms == [Term("ls", 1.0, {"alpha": 0.1}), Term("smac", 1.0, {"alpha": 0.1}), Term("as", 3.0)]
    assert obj.required_inputs == ("logits", "labels", "text_features")
    result = obj(logits=inputs["logits"], labels=inputs["labels"], text_features=inputs["text_features"])
    expected = (L.label_smoothing(inputs["logits"], inputs["labels"], alpha=0.1)
                + L.smac(inputs["logits"], inputs["labels"], alpha=0.1)
                + 3 * L.angular_separation(inputs["text_features"]))
    assert result.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(result.terms) == {"ls(alpha=0.1)", "smac(alpha=0.1)", "as"}
    assert result.terms["as"] == pytest.approx(L.angular_separation(inputs["text_features"]).item())


def test_weights_signs_numbers_and_roundtrip(inputs):
    obj = Objective.parse("  2.5e-1*ce -0.5 * focal(gamma=2) + mmce(variant='port') + .5*orth")
    assert [t.weight for t in obj.terms] == [0.25, -0.5, 1.0, 0.5]
    assert obj.terms[1].kwargs == {"gamma": 2}
    assert obj.terms[2].kwargs == {"variant": "port"}
    again = Objective.parse(str(obj))
    assert again == obj
    total = obj(**inputs).total
    manual = (0.25 * L.cross_entropy(inputs["logits"], inputs["labels"])
              - 0.5 * L.focal(inputs["logits"], inputs["labels"], gamma=2)
              + L.mmce(inputs["logits"], inputs["labels"], variant="port")
              + 0.5 * L.orthogonality(inputs["text_features"]))
    assert total.item() == pytest.approx(manual.item(), rel=1e-6)


def test_maximised_term_enters_with_negative_sign(inputs):
    obj = Objective.parse("50*atfd")
    result = obj(text_features=inputs["text_features"])
    atfd = L.atfd(inputs["text_features"]).item()
    assert result.terms["atfd"] == pytest.approx(atfd)
    assert result.total.item() == pytest.approx(-50 * atfd, rel=1e-6)


def test_gradients_flow_through_the_total(inputs):
    z = inputs["logits"].clone().requires_grad_(True)
    t = inputs["text_features"].clone().requires_grad_(True)
    Objective.preset("calibprompt")(logits=z, labels=inputs["labels"], text_features=t).total.backward()
    assert z.grad is not None and t.grad is not None and t.grad.abs().sum() > 0


def test_repeated_terms_get_distinct_log_keys(inputs):
    result = Objective.parse("ce + 2*ce")(logits=inputs["logits"], labels=inputs["labels"])
    assert list(result.terms) == ["ce", "ce#2"]
    assert result.total.item() == pytest.approx(3 * result.terms["ce"], rel=1e-6)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("ce +", "expected name"),
        ("foo", "unknown loss 'foo'; available: ce, ls"),
        ("ls(beta=1)", "no keyword 'beta'.*alpha=0.1"),
        ("ls(alpha=x)", "expects a float"),
        ("ls(alpha=0.1, alpha=0.2)", "given twice"),
        ("3 as", "expected \\*"),
        ("ce $ as", "unexpected character"),
        ("ce(", "expected name"),
    ],
)
def test_parse_errors_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        Objective.parse(text)


def test_missing_input_lists_what_was_given(inputs):
    with pytest.raises(ValueError, match="term 'zsnorm' needs \\['zs_logits'\\]"):
        Objective.parse("zsnorm")(logits=inputs["logits"], labels=inputs["labels"])
    with pytest.raises(ValueError, match="unknown inputs"):
        Objective.parse("ce")(logits=inputs["logits"], labels=inputs["labels"], images=inputs["logits"])


def test_every_preset_parses_and_runs(inputs):
    for name in PRESETS:
        obj = Objective.preset(name)
        value = obj(**{k: inputs[k] for k in obj.required_inputs}).total
        assert torch.isfinite(value), name
        assert obj.includes_likelihood, f"{name} must include a likelihood term explicitly"


def test_calibprompt_preset_uses_the_published_table():
    obj = Objective.preset("calibprompt", backbone="QuiltNet", dataset="kather")
    assert obj.terms == [Term("ls", 1.0, {"alpha": 0.01}), Term("smac", 1.0, {"alpha": 0.01}), Term("as", 1.0)]
    assert len(CALIBPROMPT_HYPERPARAMETERS) == 10
    alpha, weight = CALIBPROMPT_HYPERPARAMETERS[("biomedclip", "covid")]
    obj = Objective.preset("calibprompt", backbone="biomedclip", dataset="covid")
    assert obj.terms[0].kwargs["alpha"] == alpha and obj.terms[2].weight == weight
    assert str(Objective.preset("calibprompt", alpha=0.3, weight=2)) == "ls(alpha=0.3) + smac(alpha=0.3) + 2*as"
    with pytest.raises(ValueError, match="unknown overrides"):
        Objective.preset("calibprompt", gamma=1)
    with pytest.raises(ValueError, match="preset 'nope' is unknown"):
        Objective.preset("nope")
    assert Objective.from_any("mmce") == Objective.parse("ce + 2*mmce")
    assert Objective.from_any("ce + as").required_inputs == ("logits", "labels", "text_features")


def test_to_dict_is_json_ready():
    import json

    d = Objective.parse("ls(alpha=0.1) + 3*as").to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["expression"] == "ls(alpha=0.1) + 3*as"
