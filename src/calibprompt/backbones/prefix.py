"""The shared-prefix pass of causal text towers (open_clip and transformers CLIP alike).

Prompts ``[start] ctx_1 .. ctx_n  class-name tokens . [end] [pad] ...`` share their first
``P = 1 + n`` tokens. In a causal encoder those tokens never see what follows, so their hidden
states are the same in every class's prompt: they are computed once per layer (per context, when
B contexts are encoded together), and their keys and values serve every class. The classes'
suffixes -- from the first class-name token to the class's own end token, without the padding
after it -- are packed into one sequence per context: a token attends to the prefix and to the
earlier tokens of its own class only (a block-diagonal causal mask), at its own position. In the
last layer only the end tokens are computed. The result equals the full prompts' features
(floating-point rounding aside); nothing is approximated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CausalLayer", "Packing", "pack_suffixes", "shared_prefix_forward"]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class CausalLayer:
    """One pre-norm transformer layer as the shared-prefix pass uses it:
    ``h + s1(out(attention(q(n1(h)), k(n1(h)), v(n1(h)))))``, then ``h + s2(mlp(n2(h)))``."""

    norm1: Callable[[torch.Tensor], torch.Tensor]
    q: Callable[[torch.Tensor], torch.Tensor]
    k: Callable[[torch.Tensor], torch.Tensor]
    v: Callable[[torch.Tensor], torch.Tensor]
    heads: int
    out: Callable[[torch.Tensor], torch.Tensor]
    norm2: Callable[[torch.Tensor], torch.Tensor]
    mlp: Callable[[torch.Tensor], torch.Tensor]
    scale1: Callable[[torch.Tensor], torch.Tensor] = _identity
    scale2: Callable[[torch.Tensor], torch.Tensor] = _identity

    @classmethod
    def from_multihead(cls, attn: nn.MultiheadAttention, **parts: Callable[[torch.Tensor], torch.Tensor]
                       ) -> CausalLayer | None:
        """A layer whose attention is a standard ``nn.MultiheadAttention`` (one packed input
        projection with bias, no extra key/value biases); None for any other kind."""
        if not (isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim
                and attn.in_proj_bias is not None and attn.bias_k is None and not attn.add_zero_attn):
            return None

        def projection(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
            width = attn.embed_dim
            return lambda x: F.linear(x, attn.in_proj_weight[i * width:(i + 1) * width],
                                      attn.in_proj_bias[i * width:(i + 1) * width])

        return cls(q=projection(0), k=projection(1), v=projection(2), heads=attn.num_heads, out=attn.out_proj,
                   **parts)


@dataclass(frozen=True)
class Packing:
    """Where each class's suffix tokens sit in the packed sequence."""

    classes: torch.Tensor  # (T,) the class of each packed token
    offsets: torch.Tensor  # (T,) its position after the prefix
    ends: torch.Tensor  # (C,) the packed index of each class's end token
    suffix_mask: torch.Tensor  # (T, P + T) bool: the keys each packed token sees
    prefix_mask: torch.Tensor  # (P, P) bool: causal


def pack_suffixes(eot_index: torch.Tensor, n_prefix: int, device: torch.device) -> Packing:
    """The packing of suffixes that end at ``eot_index`` (C,) after a prefix of ``n_prefix``."""
    spans = (eot_index.to(device) - n_prefix + 1).tolist()
    lengths = torch.tensor(spans, device=device)
    classes = torch.repeat_interleave(torch.arange(len(spans), device=device), lengths)
    offsets = torch.cat([torch.arange(n, device=device) for n in spans])
    own = (classes[:, None] == classes[None, :]) & (offsets[None, :] <= offsets[:, None])
    suffix_mask = torch.cat([torch.ones(len(classes), n_prefix, dtype=torch.bool, device=device), own], dim=1)
    prefix_mask = torch.ones(n_prefix, n_prefix, dtype=torch.bool, device=device).tril_()
    return Packing(classes, offsets, lengths.cumsum(0) - 1, suffix_mask, prefix_mask)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (N, L, W) -> (N, H, L, W / H)


def _layer(layer: CausalLayer, h_p: torch.Tensor, h_s: torch.Tensor, packing: Packing,
           last: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    x_p, x_s = layer.norm1(h_p), layer.norm1(h_s)
    keys = torch.cat([_heads(layer.k(x_p), layer.heads), _heads(layer.k(x_s), layer.heads)], dim=2)
    values = torch.cat([_heads(layer.v(x_p), layer.heads), _heads(layer.v(x_s), layer.heads)], dim=2)
    mask = packing.suffix_mask
    if last:  # only the end tokens feed the features
        h_s, x_s, mask = h_s[:, packing.ends], x_s[:, packing.ends], mask[packing.ends]
    pairs = [(h_s, F.scaled_dot_product_attention(_heads(layer.q(x_s), layer.heads), keys, values, attn_mask=mask))]
    if not last:
        n = h_p.shape[1]
        pairs.append((h_p, F.scaled_dot_product_attention(_heads(layer.q(x_p), layer.heads), keys[:, :, :n],
                                                          values[:, :, :n], attn_mask=packing.prefix_mask)))
    outputs = []
    for h, attended in pairs:
        h = h + layer.scale1(layer.out(attended.transpose(1, 2).flatten(2)))
        outputs.append(h + layer.scale2(layer.mlp(layer.norm2(h))))
    return (None if last else outputs[1]), outputs[0]


def shared_prefix_forward(layers: list[CausalLayer], prefix: torch.Tensor, suffix: torch.Tensor,
                          packing: Packing) -> torch.Tensor:
    """The end tokens' hidden states (B, C, W) after ``layers``, from B prefixes (B, P, W) and the
    classes' packed suffix tokens (T, W), both with their position embeddings added."""
    h_p, h_s = prefix, suffix.expand(prefix.shape[0], -1, -1)
    for i, layer in enumerate(layers):
        h_p, h_s = _layer(layer, h_p, h_s, packing, last=i == len(layers) - 1)
    return h_s
