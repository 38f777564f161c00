"""Training losses and test-time regularisers, as plain torch functions (formulas in each docstring).

Every function is vectorised over samples and classes, runs on whatever device its inputs live
on, and returns a scalar tensor. ``logits`` are the *scaled* logits ``z = s * f_img @ T.T``
(B × C), ``labels`` integer class indices (B,), ``text_features`` the class text features
(C × D; normalised inside the function), ``zs_logits`` zero-shot logits of the same images
(B × C; treated as constants).

Notation: ``p = softmax(z)``, ``conf_i = max_c p_ic``, ``f_c = (1/B) sum_i 1[y_i = c]``.
Only ``cross_entropy``, ``label_smoothing``, ``focal``, ``mbls``, ``logit_norm`` and ``zs_norm``
contain a likelihood term; the calibration regularisers (``smac``, ``angular_separation``,
``mdca``, ``dca``, ``mmce``, ``zs_penalty``) do not and are meant to be added to one.

:data:`LOSSES` maps the short names used by :mod:`calibprompt.objective` to these functions and
declares the inputs each needs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "LossSpec",
    "angular_diversity",
    "angular_separation",
    "atfd",
    "cross_entropy",
    "dca",
    "focal",
    "label_smoothing",
    "logit_norm",
    "marginal_entropy",
    "mbls",
    "mdca",
    "mmce",
    "orthogonality",
    "orthogonality_fro",
    "smac",
    "soc",
    "tca_dispersion",
    "zs_norm",
    "zs_penalty",
]


# --------------------------------------------------------------------------------------------
# Input checks (cheap: shapes only, never a device sync)
# --------------------------------------------------------------------------------------------


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, fn: str) -> int:
    if logits.ndim != 2:
        raise ValueError(f"{fn}: logits must have shape (B, C), got {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{fn}: labels must have shape ({logits.shape[0]},) to match logits, "
            f"got {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError(f"{fn}: empty batch")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{fn}: labels must be integer class indices, got dtype {labels.dtype}")
    return int(logits.shape[1])


def _check_zs(logits: torch.Tensor, zs_logits: torch.Tensor | None, fn: str) -> torch.Tensor:
    if zs_logits is None:
        raise ValueError(f"{fn}: needs zs_logits (zero-shot logits of the same images)")
    if zs_logits.shape != logits.shape:
        raise ValueError(
            f"{fn}: zs_logits must have the shape of logits {tuple(logits.shape)}, "
            f"got {tuple(zs_logits.shape)}"
        )
    return zs_logits.detach().to(logits.dtype)


def _normalized_text(text_features: torch.Tensor, fn: str, min_classes: int = 2) -> torch.Tensor:
    if text_features.ndim != 2:
        raise ValueError(f"{fn}: text_features must have shape (C, D), got {tuple(text_features.shape)}")
    c = text_features.shape[0]
    if c < min_classes:
        raise ValueError(
            f"{fn}: needs at least {min_classes} class text features, got C = {c} "
            "(the pairwise term is undefined for a single class)"
        )
    return F.normalize(text_features, dim=-1)


# --------------------------------------------------------------------------------------------
# Likelihood-based losses
# --------------------------------------------------------------------------------------------


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy ``mean_i -log p_{i, y_i}``."""
    _check_logits_labels(logits, labels, "cross_entropy")
    return F.cross_entropy(logits, labels)


def label_smoothing(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.1, convention: str = "paper"
) -> torch.Tensor:
    """Label smoothing ``mean_i sum_c -q_ic log p_ic``.

    ``convention="paper"`` (CalibPrompt, Müller et al.): ``q_ic = 1 - alpha`` for the true class
    and ``alpha / (C - 1)`` elsewhere. ``convention="pytorch"``: PyTorch's
    ``label_smoothing=alpha``, i.e. ``q_ic = (1 - alpha) 1[c = y_i] + alpha / C``.
    """
    c = _check_logits_labels(logits, labels, "label_smoothing")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"label_smoothing: alpha must be in [0, 1], got {alpha}")
    if convention == "pytorch":
        return F.cross_entropy(logits, labels, label_smoothing=alpha)
    if convention != "paper":
        raise ValueError(f"label_smoothing: convention must be 'paper' or 'pytorch', got {convention!r}")
    if c < 2:
        raise ValueError("label_smoothing: needs C >= 2 classes")
    log_p = F.log_softmax(logits, dim=-1)
    nll_true = -log_p.gather(1, labels[:, None]).squeeze(1)
    nll_rest = -(log_p.sum(dim=1)) - nll_true  # sum over c != y of -log p_ic
    return ((1.0 - alpha) * nll_true + alpha / (c - 1) * nll_rest).mean()


def focal(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 3.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017; Mukhoti et al. 2020): ``mean_i -(1 - p_iy)^gamma log p_iy``."""
    _check_logits_labels(logits, labels, "focal")
    if not gamma >= 0:
        raise ValueError(f"focal: gamma must be >= 0, got {gamma}")
    log_pt = F.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    return (-((1.0 - log_pt.exp()) ** gamma) * log_pt).mean()


def mbls(
    logits: torch.Tensor, labels: torch.Tensor, margin: float = 10.0, alpha: float = 0.1
) -> torch.Tensor:
    """Margin-based label smoothing (Liu et al. 2022):
    ``CE + alpha * mean_{i,c} ReLU(max_c z_ic - z_ic - margin)`` (includes CE)."""
    _check_logits_labels(logits, labels, "mbls")
    if not (margin >= 0 and alpha >= 0):
        raise ValueError(f"mbls: margin and alpha must be >= 0, got {margin} and {alpha}")
    gaps = logits.max(dim=1, keepdim=True).values - logits
    return F.cross_entropy(logits, labels) + alpha * F.relu(gaps - margin).mean()


def logit_norm(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """LogitNorm (Wei et al. 2022): ``CE(z / (tau (||z_i||_2 + 1e-7)))``.

    With ``tau = 1`` (as in the CalibPrompt runs) the logit scale is removed entirely.
    """
    _check_logits_labels(logits, labels, "logit_norm")
    if not temperature > 0:
        raise ValueError(f"logit_norm: temperature must be > 0, got {temperature}")
    norms = torch.linalg.vector_norm(logits, dim=-1, keepdim=True) + 1e-7
    return F.cross_entropy(logits / (temperature * norms), labels)


def zs_norm(logits: torch.Tensor, labels: torch.Tensor, zs_logits: torch.Tensor) -> torch.Tensor:
    """ZS-Norm (Murugesan et al., ECCV 2024): min–max normalise each row of ``z`` to [0, 1]
    (range clamped >= 1e-6), rescale it into ``[min_c z^zs_ic, max_c z^zs_ic]``, then CE."""
    _check_logits_labels(logits, labels, "zs_norm")
    zs = _check_zs(logits, zs_logits, "zs_norm")
    lo = logits.min(dim=1, keepdim=True).values
    hi = logits.max(dim=1, keepdim=True).values
    unit = (logits - lo) / (hi - lo).clamp_min(1e-6)
    zs_lo = zs.min(dim=1, keepdim=True).values
    zs_hi = zs.max(dim=1, keepdim=True).values
    return F.cross_entropy(unit * (zs_hi - zs_lo) + zs_lo, labels)


# --------------------------------------------------------------------------------------------
# Calibration regularisers on predictions (no CE inside)
# --------------------------------------------------------------------------------------------


def _class_frequency(labels: torch.Tensor, c: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.bincount(labels, minlength=c)[:c].to(dtype) / labels.shape[0]


def smac(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.05) -> torch.Tensor:
    """SMAC, smoothed multi-class accuracy calibration (CalibPrompt):
    ``(1/C) sum_c |mean_i p_ic - f~_c|`` with ``f~_c = f_c (1 - alpha) + (1 - f_c) alpha/(C-1)``,
    the batch mean of the label-smoothing targets. ``alpha = 0`` gives MDCA."""
    c = _check_logits_labels(logits, labels, "smac")
    if c < 2:
        raise ValueError("smac: needs C >= 2 classes")
    if not 0 <= alpha <= 1:
        raise ValueError(f"smac: alpha must be in [0, 1], got {alpha}")
    f = _class_frequency(labels, c, logits.dtype)
    target = f * (1.0 - alpha) + (1.0 - f) * (alpha / (c - 1))
    return (F.softmax(logits, dim=-1).mean(dim=0) - target).abs().mean()


def mdca(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MDCA (Hebbalaguppe et al. 2022): ``(1/C) sum_c |mean_i p_ic - f_c|`` (no CE inside)."""
    c = _check_logits_labels(logits, labels, "mdca")
    f = _class_frequency(labels, c, logits.dtype)
    return (F.softmax(logits, dim=-1).mean(dim=0) - f).abs().mean()


def dca(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DCA (Liang et al. 2020): ``|mean_i conf_i - mean_i 1[pred_i = y_i]|``; the gradient flows
    through the confidences only (no CE inside)."""
    _check_logits_labels(logits, labels, "dca")
    conf, pred = F.softmax(logits, dim=-1).max(dim=1)
    acc = (pred == labels).to(logits.dtype).mean()
    return (conf.mean() - acc).abs()


def mmce(
    logits: torch.Tensor, labels: torch.Tensor, bandwidth: float = 0.4, variant: str = "paper"
) -> torch.Tensor:
    """Weighted MMCE (Kumar, Sarawagi & Jain, ICML 2018), on ``r_i = conf_i``.

    With the m correctly and n wrongly classified samples, ``k(a, b) = exp(-|a - b| / 0.4)``::

        MMCE_w^2 = sum_{i,j in correct} (1-r_i)(1-r_j) k_ij / m^2
                 + sum_{i,j in wrong}   r_i r_j k_ij / n^2
                 - 2 sum_{i in correct, j in wrong} (1-r_i) r_j k_ij / (m n)

    and the loss is ``sqrt(MMCE_w^2 + 1e-10)``; 0 when either group is empty. No CE inside
    (the paper weights it 2 next to CE). ``variant="port"`` reproduces the widely copied
    PyTorch port, which takes the *mean* over pairs and then divides by m^2, n^2, mn again.
    """
    _check_logits_labels(logits, labels, "mmce")
    if variant not in ("paper", "port"):
        raise ValueError(f"mmce: variant must be 'paper' or 'port', got {variant!r}")
    conf, pred = F.softmax(logits, dim=-1).max(dim=1)
    correct = (pred == labels).to(logits.dtype)
    wrong = 1.0 - correct
    m, n = correct.sum(), wrong.sum()
    kernel = torch.exp(-(conf[:, None] - conf[None, :]).abs() / bandwidth)
    a = correct * (1.0 - conf)  # weight of a correct sample, 0 for wrong ones
    b = wrong * conf  # weight of a wrong sample, 0 for correct ones
    cc = a @ kernel @ a
    ww = b @ kernel @ b
    cw = a @ kernel @ b
    if variant == "port":
        cc, ww, cw = cc / m.clamp_min(1) ** 2, ww / n.clamp_min(1) ** 2, cw / (m * n).clamp_min(1)
    sq = cc / m.clamp_min(1) ** 2 + ww / n.clamp_min(1) ** 2 - 2.0 * cw / (m * n).clamp_min(1)
    both = (m > 0) & (n > 0)
    return torch.where(both, torch.sqrt(sq.clamp_min(0.0) + 1e-10), logits.sum() * 0.0)


def zs_penalty(logits: torch.Tensor, labels: torch.Tensor, zs_logits: torch.Tensor) -> torch.Tensor:
    """Penalty (Murugesan et al., ECCV 2024): keep tuned logits inside the zero-shot range,
    ``mean_{i,c} ReLU(z_ic - max_c z^zs_ic) + mean_{i,c} ReLU(min_c z^zs_ic - z_ic)``
    (no CE inside; ``labels`` are accepted for a uniform signature and not used)."""
    _check_logits_labels(logits, labels, "zs_penalty")
    zs = _check_zs(logits, zs_logits, "zs_penalty")
    upper = zs.max(dim=1, keepdim=True).values
    lower = zs.min(dim=1, keepdim=True).values
    return F.relu(logits - upper).mean() + F.relu(lower - logits).mean()


# --------------------------------------------------------------------------------------------
# Regularisers on class text features
# --------------------------------------------------------------------------------------------


def angular_separation(text_features: torch.Tensor) -> torch.Tensor:
    """Angular separation (CalibPrompt): mean off-diagonal cosine similarity of the class text
    features, ``1/(C(C-1)) sum_{i != j} t_i . t_j = (||sum_i t_i||^2 - C) / (C (C - 1))``.

    Minimum ``-1/(C-1)`` (a regular simplex: antipodal for C = 2). Undefined for C = 1.
    """
    t = _normalized_text(text_features, "angular_separation")
    c = t.shape[0]
    s = t.sum(dim=0)
    diag = (t * t).sum()  # = C up to rounding; keeps the identity exact in floating point
    return (s.dot(s) - diag) / (c * (c - 1))


#: SoC's Huber threshold chosen by the demo sweep (docs/tpt.md, docs/results/tpt_demo.json;
#: the sweep is flat, so this is a default, not a finding).
SOC_DELTA = 0.3


def atfd(text_features: torch.Tensor) -> torch.Tensor:
    """Average text feature dispersion (C-TPT, Yoon et al. ICLR 2024):
    ``ATFD = (1/C) sum_c ||t_c - mu||_2`` with ``mu = (1/C) sum_c t_c`` (not renormalised).

    Returns ATFD itself (>= 0). C-TPT *maximises* it: its loss term is ``-lambda * ATFD``;
    the registry entry ``atfd`` is declared ``maximize=True`` so ``50*atfd`` in an objective
    contributes ``-50 * ATFD``.
    """
    t = _normalized_text(text_features, "atfd", min_classes=1)
    return torch.linalg.vector_norm(t - t.mean(dim=0, keepdim=True), dim=-1).mean()


def orthogonality(text_features: torch.Tensor) -> torch.Tensor:
    """O-TPT orthogonality as released (Sharifdeen et al., CVPR 2025), in closed form:
    with ``S = T T^T``, ``(1/C) sum_i (||S_i||_2 - 1) = (1/C) sum_i (sqrt(1 + sum_{j!=i} s_ij^2) - 1)``.

    The released code reflects every row S_i onto ``||S_i|| e_i`` with a Householder matrix
    (a C × C × C tensor) and penalises the distance to ``e_i``; that distance is
    ``||S_i|| - 1``, so the closed form costs O(C^2 D) instead of O(C^3) memory.
    """
    t = _normalized_text(text_features, "orthogonality", min_classes=1)
    sim = t @ t.T
    return (torch.linalg.vector_norm(sim, dim=-1) - 1.0).mean()


def orthogonality_fro(text_features: torch.Tensor) -> torch.Tensor:
    """O-TPT orthogonality as later papers describe it: ``||S - I||_F^2 = sum_{i != j} s_ij^2``
    (diagonal excluded exactly rather than subtracted)."""
    t = _normalized_text(text_features, "orthogonality_fro", min_classes=1)
    sim = t @ t.T
    off = ~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    return (sim[off] ** 2).sum()


def soc(text_features: torch.Tensor, delta: float = SOC_DELTA) -> torch.Tensor:
    """SoC, Semantic Orthogonal Calibration (arXiv 2601.08617): Huber penalty on pairwise
    cosine similarities, ``mean_{i<j} H_delta(s_ij)`` with ``H_delta(s) = s^2/2`` if
    ``s <= delta`` else ``delta (s - delta/2)``.

    Beyond ``delta`` the gradient is constant, so semantically close classes (large s_ij) are
    not pushed apart harder than others. The paper publishes neither delta nor lambda; the
    default ``delta = 0.3`` (with lambda 50 in ``tpt``) is what the documented sweep on the demo
    model picked -- a sweep in which every setting scored within noise of the others.
    """
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"soc: delta must lie in [0, 1], got {delta}")
    t = _normalized_text(text_features, "soc")
    sim = t @ t.T
    iu = torch.triu_indices(sim.shape[0], sim.shape[0], offset=1, device=sim.device)
    s = sim[iu[0], iu[1]]
    huber = torch.where(s <= delta, 0.5 * s * s, delta * (s - 0.5 * delta))
    return huber.mean()


#: A-TPT's clamp of the nearest-neighbour cosine before arccos (keeps the gradient finite).
ATPT_TAU = 0.99999


def angular_diversity(text_features: torch.Tensor, tau: float = ATPT_TAU) -> torch.Tensor:
    """Angular diversity (A-TPT, ICLR 2026): ``AD = (1/C) sum_i theta_i`` with
    ``theta_i = arccos(clamp(max_{j != i} t_i^T t_j, -tau, tau))`` over L2-normalised class
    features -- the mean angle (radians) from each class to its nearest other class.

    Returns AD itself (in [0, pi]). A-TPT *maximises* it: its loss is ``L_TPT - lambda * AD``
    (the paper's sign; one commit of its repository's fine-grained script added ``+lambda * AD``);
    the registry entry ``ad`` is declared ``maximize=True`` so ``80*ad`` contributes ``-80 * AD``.
    The gradient of each theta_i flows through its nearest neighbour only (the max).
    """
    if not 0.0 < tau < 1.0:
        raise ValueError(f"angular_diversity: tau must lie in (0, 1), got {tau}")
    t = _normalized_text(text_features, "angular_diversity")
    sim = t @ t.T
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    nearest = sim.masked_fill(eye, float("-inf")).max(dim=1).values
    return torch.arccos(nearest.clamp(-tau, tau)).mean()


def tca_dispersion(text_features: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TCA's inter- and intra-class dispersion (attribute-aware prompts, ECML-PKDD 2025) of the
    L2-normalised features t_{c,a} of the prompts "a photo of a {attr} {class}." (``groups[k]`` =
    the class of prompt k): with ``mu_c`` the mean of class c's prompts and ``mu`` the mean of
    the ``mu_c``, ``Inter = (1/C) sum_c ||mu_c - mu||`` and ``Intra = (1/K) sum_{c,a} ||t_{c,a} -
    mu_c||`` (K prompts; (1/CA) with A attributes per class). TCA's loss is
    ``L_TPT - alpha * Inter + beta * Intra``: classes apart, each class's prompts together."""
    t = _normalized_text(text_features, "tca_dispersion")
    groups = groups.to(t.device).long()
    if groups.shape != (t.shape[0],):
        raise ValueError(f"tca_dispersion: groups must have shape ({t.shape[0]},), got {tuple(groups.shape)}")
    c = int(groups.max()) + 1
    counts = torch.bincount(groups, minlength=c).to(t.dtype)
    if (counts == 0).any() or c < 2:
        raise ValueError("tca_dispersion: every class 0 .. C-1 needs at least one prompt, and C >= 2")
    means = torch.zeros(c, t.shape[1], dtype=t.dtype, device=t.device).index_add_(0, groups, t) / counts[:, None]
    inter = torch.linalg.vector_norm(means - means.mean(dim=0, keepdim=True), dim=-1).mean()
    intra = torch.linalg.vector_norm(t - means[groups], dim=-1).mean()
    return inter, intra


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """TPT objective: entropy of the averaged distribution ``H(mean_v softmax(z_v))`` over the
    rows (views) of ``logits`` (not the mean of per-view entropies)."""
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"marginal_entropy: logits must have shape (V, C), got {tuple(logits.shape)}")
    log_p = F.log_softmax(logits, dim=-1)
    log_mean = torch.logsumexp(log_p, dim=0) - torch.log(
        torch.tensor(float(logits.shape[0]), dtype=logits.dtype, device=logits.device)
    )
    return -(log_mean.exp() * log_mean).sum()


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

#: The inputs a loss may declare, in the order of its positional parameters.
INPUT_NAMES = ("logits", "labels", "text_features", "zs_logits")


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the function, the inputs it reads, and how it enters an objective.

    ``maximize=True`` means the quantity is to be increased, so a term ``w * name``
    contributes ``-w * value`` (used by C-TPT's ATFD).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    inputs: tuple[str, ...]
    includes_ce: bool = False
    maximize: bool = False
    hyperparameters: dict[str, object] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else self.name


def _spec(name: str, fn: Callable[..., torch.Tensor], **kw: bool) -> LossSpec:
    params = inspect.signature(fn).parameters
    inputs = tuple(p for p in params if p in INPUT_NAMES)
    hyper = {
        p.name: p.default for p in params.values() if p.name not in INPUT_NAMES
    }
    return LossSpec(name=name, fn=fn, inputs=inputs, hyperparameters=hyper, **kw)


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        _spec("ce", cross_entropy, includes_ce=True),
        _spec("ls", label_smoothing, includes_ce=True),
        _spec("focal", focal, includes_ce=True),
        _spec("smac", smac),
        _spec("as", angular_separation),
        _spec("mdca", mdca),
        _spec("dca", dca),
        _spec("mmce", mmce),
        _spec("mbls", mbls, includes_ce=True),
        _spec("logitnorm", logit_norm, includes_ce=True),
        _spec("zsnorm", zs_norm, includes_ce=True),
        _spec("penalty", zs_penalty),
        _spec("atfd", atfd, maximize=True),
        _spec("orth", orthogonality),
        _spec("orth_fro", orthogonality_fro),
        _spec("soc", soc),
        _spec("ad", angular_diversity, maximize=True),
        _spec("entropy", marginal_entropy),
    )
}
