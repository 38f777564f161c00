"""Every loss against its formula written as plain loops, plus gradients and identities."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from calibprompt import losses as L


@pytest.fixture(autouse=True)
def float64_by_default():
    """The loop references are float64; restore the default so other test modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def batch(b: int = 12, c: int = 4, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, c, (b,), generator=g)
    return logits, labels


def text(c: int = 5, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, d, generator=g, dtype=torch.float64)


def probs_list(z):
    out = []
    for row in z.tolist():
        m = max(row)
        e = [math.exp(v - m) for v in row]
        s = sum(e)
        out.append([v / s for v in e])
    return out


def unit_rows(t):
    rows = t.tolist()
    return [[v / math.sqrt(sum(x * x for x in r)) for v in r] for r in rows]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------
# Loop references (scalar Python, independent of the vectorised code)
# ---------------------------------------------------------------------------------------------


def ref_ce(z, y):
    p = probs_list(z)
    return sum(-math.log(p[i][y[i]]) for i in range(len(y))) / len(y)


def ref_ls(z, y, alpha):
    p, c = probs_list(z), z.shape[1]
    total = 0.0
    for i in range(len(y)):
        for k in range(c):
            q = 1 - alpha if k == y[i] else alpha / (c - 1)
            total += -q * math.log(p[i][k])
    return total / len(y)


def ref_focal(z, y, gamma):
    p = probs_list(z)
    return sum(-((1 - p[i][y[i]]) ** gamma) * math.log(p[i][y[i]]) for i in range(len(y))) / len(y)


def ref_smac(z, y, alpha):
    p, (b, c) = probs_list(z), z.shape
    total = 0.0
    for k in range(c):
        f = sum(1 for i in range(b) if y[i] == k) / b
        target = f * (1 - alpha) + (1 - f) * alpha / (c - 1)
        total += abs(sum(p[i][k] for i in range(b)) / b - target)
    return total / c


def ref_dca(z, y):
    p = probs_list(z)
    conf = [max(r) for r in p]
    acc = [float(r.index(max(r)) == y[i]) for i, r in enumerate(p)]
    return abs(sum(conf) / len(conf) - sum(acc) / len(acc))


def ref_mmce(z, y, variant="paper"):
    p = probs_list(z)
    r = [max(row) for row in p]
    ok = [row.index(max(row)) == y[i] for i, row in enumerate(p)]
    cor = [i for i in range(len(r)) if ok[i]]
    wr = [i for i in range(len(r)) if not ok[i]]
    m, n = len(cor), len(wr)
    if m == 0 or n == 0:
        return 0.0

    def k(a, b):
        return math.exp(-abs(r[a] - r[b]) / 0.4)

    cc = sum((1 - r[i]) * (1 - r[j]) * k(i, j) for i in cor for j in cor)
    ww = sum(r[i] * r[j] * k(i, j) for i in wr for j in wr)
    cw = sum((1 - r[i]) * r[j] * k(i, j) for i in cor for j in wr)
    if variant == "port":
        cc, ww, cw = cc / m**2, ww / n**2, cw / (m * n)
    return math.sqrt(cc / m**2 + ww / n**2 - 2 * cw / (m * n) + 1e-10)


def ref_mbls(z, y, margin, alpha):
    rows = z.tolist()
    pen = sum(max(0.0, max(r) - v - margin) for r in rows for v in r) / (len(rows) * len(rows[0]))
    return ref_ce(z, y) + alpha * pen


def ref_zs_norm(z, y, zs):
    rows = []
    for r, q in zip(z.tolist(), zs.tolist(), strict=True):
        lo, hi = min(r), max(r)
        rows.append([(v - lo) / max(hi - lo, 1e-6) * (max(q) - min(q)) + min(q) for v in r])
    return ref_ce(torch.tensor(rows), y)


def ref_penalty(z, zs):
    total, count = 0.0, 0
    for r, q in zip(z.tolist(), zs.tolist(), strict=True):
        for v in r:
            total += max(0.0, v - max(q)) + max(0.0, min(q) - v)
            count += 1
    return total / count


def ref_as(t):
    u = unit_rows(t)
    c = len(u)
    return sum(dot(u[i], u[j]) for i in range(c) for j in range(c) if i != j) / (c * (c - 1))


def ref_atfd(t):
    u = unit_rows(t)
    c, d = len(u), len(u[0])
    mu = [sum(u[i][k] for i in range(c)) / c for k in range(d)]
    return sum(math.sqrt(sum((u[i][k] - mu[k]) ** 2 for k in range(d))) for i in range(c)) / c


def ref_ad(t, tau=0.99999):
    """A-TPT: the mean over classes of arccos of the clamped cosine to the nearest other class."""
    u = unit_rows(t)
    c = len(u)
    return sum(math.acos(max(-tau, min(tau, max(dot(u[i], u[j]) for j in range(c) if j != i))))
               for i in range(c)) / c


def ref_orth_fro(t):
    u = unit_rows(t)
    return sum(dot(u[i], u[j]) ** 2 for i in range(len(u)) for j in range(len(u)) if i != j)


def ref_soc(t, delta):
    u = unit_rows(t)
    vals = []
    for i in range(len(u)):
        for j in range(i + 1, len(u)):
            s = dot(u[i], u[j])
            vals.append(s * s / 2 if s <= delta else delta * (s - delta / 2))
    return sum(vals) / len(vals)


def householder_orthogonality(t):
    """The released O-TPT construction: reflect every row S_i of S = T T^T onto ||S_i|| e_i with
    H_i = I - 2 v v^T / (v^T v), v = S_i - ||S_i|| e_i (a C x C x C tensor), and average the
    distances ||H_i S_i - e_i||."""
    u = F.normalize(t, dim=-1)
    s = u @ u.T
    c = s.shape[0]
    eye = torch.eye(c)
    norms = s.norm(dim=1)
    v = s - norms[:, None] * eye  # row i: S_i - ||S_i|| e_i
    vv = (v * v).sum(dim=1).clamp_min(1e-300)
    h = eye[None] - 2 * v[:, :, None] * v[:, None, :] / vv[:, None, None]  # (C, C, C)
    reflected = torch.einsum("ijk,ik->ij", h, s)
    return (reflected - eye).norm(dim=1).mean()


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prediction_losses_match_loops(seed):
    z, y = batch(seed=seed)
    yl = y.tolist()
    zs = batch(seed=seed + 100, scale=1.0)[0]
    assert L.cross_entropy(z, y).item() == pytest.approx(ref_ce(z, yl), rel=1e-12)
    assert L.label_smoothing(z, y, alpha=0.2).item() == pytest.approx(ref_ls(z, yl, 0.2), rel=1e-12)
    assert L.focal(z, y, gamma=3.0).item() == pytest.approx(ref_focal(z, yl, 3.0), rel=1e-12)
    assert L.smac(z, y, alpha=0.1).item() == pytest.approx(ref_smac(z, yl, 0.1), rel=1e-12)
    assert L.mdca(z, y).item() == pytest.approx(ref_smac(z, yl, 0.0), rel=1e-12)
    assert L.dca(z, y).item() == pytest.approx(ref_dca(z, yl), abs=1e-12)
    assert L.mmce(z, y).item() == pytest.approx(ref_mmce(z, yl), rel=1e-10)
    assert L.mmce(z, y, variant="port").item() == pytest.approx(ref_mmce(z, yl, "port"), rel=1e-10)
    assert L.mbls(z, y, margin=2.0, alpha=0.1).item() == pytest.approx(ref_mbls(z, yl, 2.0, 0.1), rel=1e-12)
    assert L.zs_norm(z, y, zs).item() == pytest.approx(ref_zs_norm(z, yl, zs), rel=1e-12)
    assert L.zs_penalty(z, y, zs).item() == pytest.approx(ref_penalty(z, zs), rel=1e-12)
    norm = [math.sqrt(sum(v * v for v in r)) + 1e-7 for r in z.tolist()]
    scaled = torch.tensor([[v / n for v in r] for r, n in zip(z.tolist(), norm, strict=True)])
    assert L.logit_norm(z, y).item() == pytest.approx(ref_ce(scaled, yl), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_text_regularisers_match_loops(seed):
    t = text(seed=seed)
    assert L.angular_separation(t).item() == pytest.approx(ref_as(t), rel=1e-12)
    assert L.atfd(t).item() == pytest.approx(ref_atfd(t), rel=1e-12)
    assert L.orthogonality_fro(t).item() == pytest.approx(ref_orth_fro(t), rel=1e-12)
    assert L.soc(t, delta=0.1).item() == pytest.approx(ref_soc(t, 0.1), rel=1e-12)
    assert L.soc(t, delta=0.9).item() == pytest.approx(ref_soc(t, 0.9), rel=1e-12)
    assert L.angular_diversity(t).item() == pytest.approx(ref_ad(t), rel=1e-12)


def test_angular_diversity_invariances_clamp_and_gradient_direction():
    t = text(c=5, d=7, seed=3)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(0))
    assert L.angular_diversity(t[perm]).item() == pytest.approx(L.angular_diversity(t).item(), rel=1e-12)  # class order
    scale = torch.tensor([[0.5], [2.0], [3.0], [1.0], [7.0]], dtype=t.dtype)
    assert L.angular_diversity(t * scale).item() == pytest.approx(L.angular_diversity(t).item(), rel=1e-12)
    # orthogonal classes: every nearest angle is pi/2; two identical classes: clamped at tau, finite gradient
    assert L.angular_diversity(torch.eye(3, dtype=torch.float64)).item() == pytest.approx(math.pi / 2)
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    L.angular_diversity(same).backward()
    assert torch.isfinite(same.grad).all()
    assert L.angular_diversity(same).item() == pytest.approx((2 * math.acos(0.99999) + math.pi / 2) / 3)
    # a gradient-ascent step on AD (what -lambda * AD descends) opens the nearest angles
    x = t.clone().requires_grad_(True)
    L.angular_diversity(x).backward()
    assert L.angular_diversity(t + 1e-3 * x.grad).item() > L.angular_diversity(t).item()
    assert L.LOSSES["ad"].maximize
    with pytest.raises(ValueError, match="tau"):
        L.angular_diversity(t, tau=1.0)


def test_orthogonality_closed_form_equals_householder_construction():
    for seed, c in [(0, 2), (1, 5), (2, 12)]:
        t = text(c=c, d=16, seed=seed)
        assert L.orthogonality(t).item() == pytest.approx(householder_orthogonality(t).item(), rel=1e-10)
    u = F.normalize(text(c=6, seed=3), dim=-1)
    s = u @ u.T
    closed = ((1 + (s**2).sum(1) - 1).sqrt() - 1).mean()  # (1/C) sum_i sqrt(1 + sum_{j!=i} s_ij^2) - 1
    assert L.orthogonality(u).item() == pytest.approx(closed.item(), rel=1e-12)


def test_angular_separation_identity_and_minimum():
    t = text(c=7)
    u = F.normalize(t, dim=-1)
    identity = ((u.sum(0) ** 2).sum() - 7) / (7 * 6)
    assert L.angular_separation(t).item() == pytest.approx(identity.item(), rel=1e-12)
    # regular simplex: centred one-hot vectors have pairwise cosine -1/(C-1), the minimum
    c = 5
    simplex = torch.eye(c) - 1.0 / c
    assert L.angular_separation(simplex).item() == pytest.approx(-1 / (c - 1), abs=1e-12)
    antipodal = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert L.angular_separation(antipodal).item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least 2"):
        L.angular_separation(torch.randn(1, 4))


def test_smac_reduces_to_mdca():
    z, y = batch(seed=4)
    assert L.smac(z, y, alpha=0.0).item() == pytest.approx(L.mdca(z, y).item(), rel=1e-14)
    # C = 2 and a class-balanced batch: the smoothed target is 0.5 for every alpha
    z2 = torch.randn(8, 2)
    y2 = torch.tensor([0, 1] * 4)
    for alpha in (0.05, 0.2, 0.4):
        assert L.smac(z2, y2, alpha=alpha).item() == pytest.approx(L.mdca(z2, y2).item(), rel=1e-14)


def test_label_smoothing_conventions():
    z, y = batch(seed=5)
    assert L.label_smoothing(z, y, alpha=0.1, convention="pytorch").item() == pytest.approx(
        F.cross_entropy(z, y, label_smoothing=0.1).item(), rel=1e-14)
    paper = L.label_smoothing(z, y, alpha=0.1).item()
    assert paper != pytest.approx(L.label_smoothing(z, y, alpha=0.1, convention="pytorch").item())
    assert L.label_smoothing(z, y, alpha=0.0).item() == pytest.approx(L.cross_entropy(z, y).item())


def test_zero_shot_terms_behave():
    z, y = batch(seed=6)
    # ZS-Norm of the zero-shot logits themselves is their CE
    assert L.zs_norm(z, y, z).item() == pytest.approx(L.cross_entropy(z, y).item(), rel=1e-12)
    # Penalty is zero inside the zero-shot range and positive outside
    assert L.zs_penalty(z, y, z).item() == 0.0
    assert L.zs_penalty(2 * z, y, z).item() > 0.0
    zs = z.clone().requires_grad_(True)  # zero-shot logits are constants: no graph through them
    assert not L.zs_penalty(2 * z, y, zs).requires_grad
    assert not L.zs_norm(2 * z, y, zs).requires_grad


def test_logit_norm_is_scale_invariant_and_mmce_edge_cases():
    z, y = batch(seed=7)
    assert L.logit_norm(5 * z, y).item() == pytest.approx(L.logit_norm(z, y).item(), rel=1e-6)
    all_right = torch.eye(4) * 5
    lab = torch.arange(4)
    assert L.mmce(all_right, lab).item() == 0.0
    assert L.mmce(all_right, (lab + 1) % 4).item() == 0.0  # all wrong


def test_mbls_includes_ce_and_penalises_only_beyond_the_margin():
    z, y = batch(seed=8, scale=0.5)  # all gaps < 10: only CE remains
    assert L.mbls(z, y).item() == pytest.approx(L.cross_entropy(z, y).item(), rel=1e-14)


def test_marginal_entropy_is_entropy_of_mean():
    z = batch(b=6, c=5, seed=9)[0]
    p = F.softmax(z, dim=-1).mean(0)
    assert L.marginal_entropy(z).item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-12)
    per_view = -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1).mean()
    assert L.marginal_entropy(z).item() >= per_view.item()  # concavity


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------

PREDICTION_LOSSES = {
    "ce": lambda z, y, zs: L.cross_entropy(z, y),
    "ls": lambda z, y, zs: L.label_smoothing(z, y, alpha=0.15),
    "focal": lambda z, y, zs: L.focal(z, y, gamma=3.0),
    "smac": lambda z, y, zs: L.smac(z, y, alpha=0.1),
    "mdca": lambda z, y, zs: L.mdca(z, y),
    "dca": lambda z, y, zs: L.dca(z, y),
    "mmce": lambda z, y, zs: L.mmce(z, y),
    "mbls": lambda z, y, zs: L.mbls(z, y, margin=1.0),
    "logitnorm": lambda z, y, zs: L.logit_norm(z, y),
    "zsnorm": lambda z, y, zs: L.zs_norm(z, y, zs),
    "penalty": lambda z, y, zs: L.zs_penalty(z, y, zs),
    "entropy": lambda z, y, zs: L.marginal_entropy(z),
}
TEXT_LOSSES = {
    "as": L.angular_separation,
    "atfd": L.atfd,
    "orth": L.orthogonality,
    "orth_fro": L.orthogonality_fro,
    "soc": lambda t: L.soc(t, delta=0.2),
    "ad": L.angular_diversity,
}


@pytest.mark.parametrize("name", sorted(PREDICTION_LOSSES))
def test_prediction_loss_gradients(name):
    z, y = batch(b=8, c=3, seed=10)
    zs = batch(b=8, c=3, seed=11, scale=1.0)[0]
    z = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: PREDICTION_LOSSES[name](x, y, zs), (z,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TEXT_LOSSES))
def test_text_loss_gradients(name):
    t = text(c=4, d=6, seed=12).requires_grad_(True)
    assert torch.autograd.gradcheck(TEXT_LOSSES[name], (t,), eps=1e-6, atol=1e-5)


def test_dca_gradient_flows_only_through_confidence():
    z, y = batch(seed=13)
    z = z.clone().requires_grad_(True)
    L.dca(z, y).backward()
    conf = F.softmax(z.detach(), -1).max(1).values
    z2 = z.detach().clone().requires_grad_(True)
    sign = torch.sign(conf.mean() - (z.detach().argmax(1) == y).double().mean())
    (sign * F.softmax(z2, -1).max(1).values.mean()).backward()
    assert torch.allclose(z.grad, z2.grad)


# ---------------------------------------------------------------------------------------------
# Registry, devices, errors
# ---------------------------------------------------------------------------------------------


def test_registry_names_and_declared_inputs():
    expected = {"ce", "ls", "focal", "smac", "as", "mdca", "dca", "mmce", "mbls", "logitnorm",
                "zsnorm", "penalty", "atfd", "orth", "orth_fro", "soc", "ad"}
    assert expected <= set(L.LOSSES)
    assert L.LOSSES["as"].inputs == ("text_features",)
    assert L.LOSSES["zsnorm"].inputs == ("logits", "labels", "zs_logits")
    assert L.LOSSES["smac"].hyperparameters == {"alpha": 0.05}
    assert L.LOSSES["atfd"].maximize and not L.LOSSES["orth"].maximize
    assert {n for n, s in L.LOSSES.items() if s.includes_ce} == {"ce", "ls", "focal", "mbls", "logitnorm", "zsnorm"}


def test_source_is_device_agnostic_and_loop_free_over_classes():
    source = Path(inspect.getfile(L)).read_text()
    assert ".cuda(" not in source and "device=\"cuda\"" not in source
    assert "for c in range" not in source and "for k in range" not in source


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_losses_keep_dtype(dtype):
    z, y = batch()
    z = z.to(dtype)
    for name, fn in PREDICTION_LOSSES.items():
        assert fn(z, y, z).dtype == dtype, name
    for name, fn in TEXT_LOSSES.items():
        assert fn(text().to(dtype)).dtype == dtype, name


def test_bad_inputs_raise_clear_errors():
    z, y = batch()
    with pytest.raises(ValueError, match="shape \\(B, C\\)"):
        L.cross_entropy(z[0], y)
    with pytest.raises(ValueError, match="labels must have shape"):
        L.smac(z, y[:-1])
    with pytest.raises(ValueError, match="integer class indices"):
        L.focal(z, y.double())
    with pytest.raises(ValueError, match="needs zs_logits"):
        L.zs_norm(z, y, None)
    with pytest.raises(ValueError, match="shape of logits"):
        L.zs_penalty(z, y, z[:, :2])
    with pytest.raises(ValueError, match="delta"):
        L.soc(text(), delta=1.5)
    with pytest.raises(ValueError, match="convention"):
        L.label_smoothing(z, y, convention="other")
