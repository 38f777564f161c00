"""Every backbone family against its upstream model, loaded from tiny checkpoints on disk."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from calibprompt.backbones import BackboneLoadError, list_backbones, load_backbone
from calibprompt.backbones import testing as MF
from calibprompt.backbones.hf_clip import output_tensor
from calibprompt.backbones.transforms import clip_transform, medclip_transform
from calibprompt.data.views import train_view_transform
from tests.conftest import FAMILIES

PROMPTS = [
    "An H&E image of colorectal adenocarcinoma epithelium.",
    "A chest X-ray image of no lung opacity, not normal patient",
    "x x x x x x x x x x x x x x x x covid.",
    "a",
]


def upstream_text_features(backbone, texts):
    """The upstream model's own text features for ``texts`` (normalised)."""
    if backbone.family == "hf_clip":
        enc = backbone.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
        feats = output_tensor(backbone.model.get_text_features(**enc))
    elif backbone.family == "open_clip":
        feats = backbone.model.encode_text(backbone.tokenizer(texts))
    else:
        return MF.medclip_reference_text(backbone.model, backbone.tokenizer, texts)
    return F.normalize(feats, dim=-1)


def upstream_image_features(backbone, pixels):
    if backbone.family == "hf_clip":
        feats = output_tensor(backbone.model.get_image_features(pixel_values=pixels))
    elif backbone.family == "open_clip":
        feats = backbone.model.encode_image(pixels)
    else:
        pooled = output_tensor(backbone.model.vision_model.model(pixel_values=pixels))
        feats = backbone.model.vision_model.projection_head(pooled)
    return F.normalize(feats, dim=-1)


def test_every_registered_family_has_a_tiny_model():
    """As timm does for its models, the invariants below run for every entry of list_backbones():
    each registered family needs a tiny model in its real on-disk format."""
    missing = [entry for entry in list_backbones() if entry not in MF.TINY_MODELS]
    assert not missing, f"no tiny test model in calibprompt.backbones.testing.TINY_MODELS for {missing}"
    assert set(list_backbones()) <= set(FAMILIES)


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_injection_reproduces_upstream_text_features(backbones, case):
    b = backbones[case]
    batch = b.tokenize(PROMPTS)
    with torch.no_grad():
        ours = b.encode_token_embeddings(b.embed_tokens(batch.ids), batch)
        upstream = upstream_text_features(b, PROMPTS)
    assert ours.shape == (len(PROMPTS), b.embed_dim)
    assert (ours - upstream).abs().max().item() <= 1e-5
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(PROMPTS)), atol=1e-6)
    assert torch.allclose(b.encode_texts(PROMPTS), ours, atol=1e-6)


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_truncation_leaves_features_unchanged(backbones, case):
    b = backbones[case]
    batch = b.tokenize(PROMPTS[:2])
    assert batch.real_length < batch.ids.shape[1]  # something is actually cut
    with torch.no_grad():
        short = b.encode_token_embeddings(b.embed_tokens(batch.ids), batch, truncate=True)
        full = b.encode_token_embeddings(b.embed_tokens(batch.ids), batch, truncate=False)
    assert (short - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_replaced_embeddings_change_features_and_carry_gradients(backbones, case):
    """Context vectors enter as word embeddings: gradients reach them, never the model."""
    b = backbones[case]
    batch = b.tokenize(["x x x x covid.", "x x x x normal."])
    embeds = b.embed_tokens(batch.ids).detach()
    ctx = torch.randn(4, embeds.shape[-1], requires_grad=True)
    start = 1  # after [CLS] / start-of-text
    embeds = torch.cat([embeds[:, :start], ctx.expand(2, -1, -1), embeds[:, start + 4:]], dim=1)
    feats = b.encode_token_embeddings(embeds, batch)
    feats.sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in b.model.parameters())
    assert not b.model.training


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_image_features_match_upstream(backbones, case):
    b = backbones[case]
    transform = b.image_transform(train=False)
    pixels = torch.stack([transform(random_image(seed=s)) for s in range(2)])
    with torch.no_grad():
        assert (b.encode_images(pixels) - upstream_image_features(b, pixels)).abs().max() <= 1e-5


def test_logit_scales(backbones):
    for case in ("plip", "quiltnet", "biomedclip"):
        b = backbones[case]
        assert b.logit_scale == pytest.approx(float(b.model.logit_scale.exp()), rel=1e-6)
    med = backbones["medclip"]
    assert med.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        med.model.logit_scale.fill_(6.0)
    try:
        assert med.logit_scale == pytest.approx(100.0, rel=1e-5)  # clamped as MedCLIP does
    finally:
        with torch.no_grad():
            med.model.logit_scale.fill_(float(np.log(1 / 0.07)))


def test_token_batches(backbones):
    clip = backbones["quiltnet"].tokenize(PROMPTS)
    assert clip.ids.shape == (4, 77)
    assert torch.equal(clip.eot_index, clip.ids.argmax(-1))
    assert torch.equal(clip.lengths, clip.eot_index + 1)
    bert = backbones["biomedclip"].tokenize(PROMPTS)
    assert bert.ids.shape == (4, 256) and backbones["biomedclip"].context_length == 256
    assert torch.equal(bert.lengths, bert.attention_mask.sum(1))
    plip = backbones["plip"].tokenize(PROMPTS)
    assert plip.ids.shape == (4, 77)
    eos = backbones["hf_clip_eos"].tokenize(PROMPTS)
    assert torch.equal(eos.ids[torch.arange(4), eos.eot_index], torch.full((4,), 49407))


def test_long_prompts_are_refused_not_truncated(backbones):
    for b in backbones.values():
        long_name = " ".join(["adenocarcinoma"] * b.context_length)
        with pytest.raises(ValueError, match=f"more than the context length {b.context_length}"):
            b.tokenize(["x x covid.", f"x x {long_name}."])
        b.tokenize([" ".join(["x"] * (b.context_length - 2))])  # exactly full: accepted, case


def test_fingerprints_identify_weights(checkpoints, backbones):
    fp = {case: b.fingerprint for case, b in backbones.items()}
    assert len(set(fp.values())) == len(fp)
    again = load_backbone("quiltnet", weights=str(checkpoints["quiltnet"]))
    assert again.fingerprint == fp["quiltnet"]
    with torch.no_grad():
        again.model.logit_scale.add_(1.0)
    again.__dict__.pop("fingerprint", None)
    assert again.fingerprint != fp["quiltnet"]


def test_quick_gelu_follows_the_config_unless_overridden(checkpoints):
    b = load_backbone("quiltnet", weights=str(checkpoints["quiltnet"]))
    gelu = load_backbone("quiltnet", weights=str(checkpoints["quiltnet"]), quick_gelu=False)
    act = type(b.model.transformer.resblocks[0].mlp.gelu).__name__
    assert act == "QuickGELU"
    assert type(gelu.model.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"
    with torch.no_grad():
        assert (b.encode_texts(PROMPTS) - gelu.encode_texts(PROMPTS)).abs().max() > 1e-4


def test_quiltnet_from_a_bare_checkpoint_file(tmp_path):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "epoch_10.pt")
    b = load_backbone("quiltnet", weights=str(tmp_path / "epoch_10.pt"))
    assert b.embed_dim == 512 and b.context_length == 77
    assert torch.equal(b.model.visual.conv1.weight, model.visual.conv1.weight)


def test_random_open_clip_warns_and_is_seeded():
    with pytest.warns(UserWarning, match="benchmarks and tests only"):
        a = load_backbone("clip:RN50", weights="random")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = load_backbone("clip:RN50", weights="random")
    assert a.fingerprint == b.fingerprint


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------


def random_image(w=50, h=40, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_clip_eval_transform_equals_open_clip():
    import open_clip

    ours = clip_transform(32)(random_image())
    theirs = open_clip.image_transform(32, is_train=False)(random_image())
    assert torch.equal(ours, theirs)


def test_train_transform_is_seeded_random_resized_crop():
    t = train_view_transform(clip_transform(32))
    torch.manual_seed(1)
    a = t(random_image())
    torch.manual_seed(1)
    b = t(random_image())
    torch.manual_seed(2)
    c = t(random_image())
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert "scale=(0.08, 1.0)" in repr(t.transforms[0]) and "bicubic" in repr(t.transforms[0])


def test_medclip_transform_pads_grays_and_normalises():
    from calibprompt.backbones.transforms import MEDCLIP_MEAN, MEDCLIP_STD

    image = Image.new("RGB", (40, 20), (255, 255, 255))
    out = medclip_transform(32)(image)
    assert out.shape == (3, 32, 32)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    black = (0 - MEDCLIP_MEAN) / MEDCLIP_STD
    white = (1 - MEDCLIP_MEAN) / MEDCLIP_STD
    assert out[0, 0, 0].item() == pytest.approx(black, abs=1e-5)  # padded border
    assert out[0, 16, 16].item() == pytest.approx(white, abs=1e-5)  # image centre


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_registry():
    names = list_backbones()
    for expected in ("plip", "quiltnet", "biomedclip", "medclip", "demo"):
        assert expected in names
    with pytest.raises(BackboneLoadError, match=r"(?s)unknown; available: plip"):
        load_backbone("clipp")
    with pytest.raises(BackboneLoadError, match=r"(?s)unknown open_clip architecture"):
        load_backbone("clip:ViT-Z-99", weights="random")
    with pytest.raises(BackboneLoadError, match=r"(?s)pass weights="):
        load_backbone("clip:ViT-B-32")


def test_missing_local_files_name_the_layout(tmp_path):
    with pytest.raises(BackboneLoadError, match=r"(?s)does not exist.*open_clip_config.json"):
        load_backbone("quiltnet", weights=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneLoadError, match=r"(?s)open_clip_config.json.*found in"):
        load_backbone("quiltnet", weights=str(tmp_path / "empty"))
    with pytest.raises(BackboneLoadError, match=r"(?s)lacks.*config.json.*Expected"):
        load_backbone("plip", weights=str(tmp_path / "empty"))
    with pytest.raises(BackboneLoadError, match=r"(?s)pytorch_model.bin.*tokenizer"):
        load_backbone("medclip", weights=str(tmp_path / "empty"))
    with pytest.raises(BackboneLoadError, match=r"(?s)not on the Hugging Face Hub.*Expected layout"):
        load_backbone("medclip")


def test_biomedclip_without_text_model_says_where_to_put_it(checkpoints, tmp_path):
    import shutil

    target = tmp_path / "biomed"
    shutil.copytree(checkpoints["biomedclip"], target)
    shutil.rmtree(target / "text")
    with pytest.raises(BackboneLoadError, match=r"(?s)text model config \+ tokenizer.*text/config.json"):
        load_backbone("biomedclip", weights=str(target))


def test_wrong_architecture_and_unexpected_keys(checkpoints, tmp_path):
    import shutil

    target = tmp_path / "wrong"
    shutil.copytree(checkpoints["quiltnet"], target)
    cfg = json.loads((target / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"]["width"] = 64
    (target / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BackboneLoadError, match=r"(?s)does not match the expected architecture.*other shapes"):
        load_backbone("quiltnet", weights=str(target))
    state = torch.load(checkpoints["medclip"] / "pytorch_model.bin", weights_only=True)
    state["text_model.extra.weight"] = torch.zeros(2)
    del state["logit_scale"]
    shutil.copytree(checkpoints["medclip"], tmp_path / "med")
    torch.save(state, tmp_path / "med" / "pytorch_model.bin")
    with pytest.raises(BackboneLoadError, match=r"(?s)1 missing: logit_scale; 1 unexpected: text_model.extra.weight"):
        load_backbone("medclip", weights=str(tmp_path / "med"))


class PicklePayload:
    """An arbitrary object: only a full unpickler could rebuild it."""


def test_pickled_objects_are_refused(tmp_path, checkpoints):
    import shutil

    target = tmp_path / "pickled"
    shutil.copytree(checkpoints["quiltnet"], target)

    torch.save({"state_dict": PicklePayload()}, target / "open_clip_pytorch_model.bin")
    with pytest.raises(BackboneLoadError, match=r"(?s)weights_only=True"):
        load_backbone("quiltnet", weights=str(target))


def test_hub_ids_fail_offline_with_instructions(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(BackboneLoadError, match=r"(?s)QuiltNet-B-32.*offline.*weights=DIR.*open_clip_config.json"):
        load_backbone("quiltnet")
    with pytest.raises(BackboneLoadError, match=r"(?s)vinid/plip.*offline.*preprocessor_config.json"):
        load_backbone("plip")
    with pytest.raises(BackboneLoadError, match=r"(?s)BiomedCLIP.*text/config.json"):
        load_backbone("biomedclip")
