"""Head-factored refined steps: a per-head restriction of ``slt_tools.models.Transformer`` computes one head per pair.

A group of refined (restriction, chain) pairs whose restrictions are whole heads of one attention layer
(:func:`slt_tools.restrictions.heads`, or any same subset of a head's W_Q/W_K/W_V/W_O/b_Q/b_K/b_V slices) shares
everything but one head: the layer's input x is the same for every pair (all weights upstream are at w*), and so
are the other heads' outputs. With :func:`slt_tools.models.transformer.moving_head` the layer output of pair
(r, c), moving head h_r to u_{r,c}, is

    attn(x) = Σ_k keep_{r,k} · z_k(x; w*) · W_O*[k] + z(x; u_{r,c}) · W_O(u_{r,c}) + b_O,   keep_r = 1 − onehot(h_r),

whose first sum is unbatched under ``vmap`` (computed once per step for all pairs, its weighting by keep_r a cheap
contraction) and whose second term is one head per pair. It is the same function of u as the plain lift
(:func:`~slt_tools.sampling.steps.scatter_lift` into the layer's tensors), summed in another order: equal to float
rounding. Downstream of the layer, a model without LayerNorm carries the pair's residual stream as the shared one
plus a rank-2·d_head term into the next linear maps and the unembedding (:class:`slt_tools.models.transformer.
LowRank`); after the next attention layer (all of whose heads see the change) it is per pair and full.

The chains' state stays u ∈ R^{d_r}; the step's lift (:func:`factored_lift`) hands the loss the layer's tensors at
the pair's weights (as the plain lift does: a loss reading the weights directly sees the sampled ones), u itself and
keep_r; the forward computes the layer from u and the unbatched w*. The engine and the samplers are unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slt_tools.models.transformer import HEAD_SHAPES, Attention, moving_head
from slt_tools.sampling.functional import FlatParams
from slt_tools.sampling.steps import scatter_lift

LossAt = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass
class HeadFactoring:
    """The factored loss (θ_ext, batch) ↦ L_B, its lift (:func:`factored_lift`) and each restriction's head and
    keep row (R_g, n_heads)."""

    loss_at: LossAt
    keep: torch.Tensor
    heads: list[int]


def factored_lift(theta: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """θ_ext = [scatter_lift(u, (idx, w*)), u, keep] per pair: (C, D + d + n_heads) from u (C, d), ``context`` =
    (idx (C, d), w* (D,), keep (C, n_heads)). The first part is the layer's tensors at the pair's weights (for a
    loss that reads them directly); the forward takes the moved head from u and the others from w*."""
    index, base, keep = context
    return torch.cat([scatter_lift(theta, (index, base)), theta, keep.to(theta.dtype)], dim=1)


def _layer(model: nn.Module, layout: FlatParams) -> Attention | None:
    """The one :class:`Attention` module (exact class) all of ``layout``'s parameters belong to, or None."""
    prefixes = {n.rsplit(".", 1)[0] for n in layout.names}
    if len(prefixes) != 1:
        return None
    try:
        module = model.get_submodule(prefixes.pop())
    except AttributeError:
        return None
    if type(module) is not Attention or any(n.rsplit(".", 1)[1] not in HEAD_SHAPES for n in layout.names):
        return None
    return module


def _head_index(layout: FlatParams, h: int) -> torch.Tensor:
    """Flat positions (in ``layout``) of head h's slices of every layout parameter, in layout order."""
    out, offset = [], 0
    for shape, numel in zip(layout.shapes, layout.numels):
        per = numel // shape[0]
        out.append(torch.arange(offset + h * per, offset + (h + 1) * per))
        offset += numel
    return torch.cat(out)


def _heads_of(layout: FlatParams, index: torch.Tensor, n_heads: int) -> list[int] | None:
    """Per row of ``index``: the head h whose slices of every layout parameter it is, exactly; else None."""
    first, heads = layout.numels[0] // layout.shapes[0][0], []
    for row in index.cpu():
        h = int(row[0]) // first
        if not (0 <= h < n_heads and torch.equal(row, _head_index(layout, h))):
            return None
        heads.append(h)
    return heads


def head_factoring(model: nn.Module, layout: FlatParams, theta0: torch.Tensor, index: torch.Tensor,
                   loss_at: LossAt) -> HeadFactoring | None:
    """The factored loss for a group whose every restriction (row of ``index``) is exactly head h's slices of the
    layout's parameters of one :class:`Attention` layer; None for any other group (it runs the plain lift)."""
    attn = _layer(model, layout)
    heads = None if attn is None else _heads_of(layout, index, attn.cfg.n_heads)
    if attn is None or heads is None:
        return None
    n_heads, D = attn.cfg.n_heads, theta0.numel()
    keep = 1.0 - torch.nn.functional.one_hot(torch.tensor(heads), n_heads).to(theta0.device, theta0.dtype)
    names = [n.rsplit(".", 1)[1] for n in layout.names]
    numels = [n // n_heads for n in layout.numels]
    unpacked = dict(zip(names, (t.view(s) for t, s in zip(torch.split(theta0, layout.numels), layout.shapes))))
    own = {k: unpacked[k] if k in unpacked else getattr(attn, k).detach().to(theta0.device) for k in HEAD_SHAPES}
    d, e = attn.cfg.d_model, attn.cfg.d_head
    shapes = {"d e": (d, e), "e d": (e, d), "e": (e,)}

    def factored(theta_ext: torch.Tensor, batch: Any) -> torch.Tensor:
        full, u, keep_r = theta_ext[:D], theta_ext[D:D + sum(numels)], theta_ext[D + sum(numels):].detach()
        head = {k: p.reshape(shapes[HEAD_SHAPES[k]]) for k, p in zip(names, torch.split(u, numels))}
        for k in HEAD_SHAPES:   # a slice the restrictions leave at w*: head h's, picked by 1 − keep
            if k not in head:
                head[k] = torch.tensordot(1.0 - keep_r, own[k], dims=1)
        with moving_head(attn, keep_r, head, own):
            return loss_at(full, batch)

    return HeadFactoring(factored, keep, heads)
