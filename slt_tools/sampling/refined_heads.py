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
rounding. What lies downstream of the layer is per pair either way.

The chains' state stays u ∈ R^{d_r}; the step's lift appends keep_r to it (:func:`append_lift`), and the loss splits
the two again, so the engine and the samplers are unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slt_tools.models.transformer import HEAD_SHAPES, Attention, moving_head
from slt_tools.sampling.functional import FlatParams

LossAt = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass
class HeadFactoring:
    """The factored loss (θ_ext = [u, keep], batch) ↦ L_B and each restriction's keep row (R_g, n_heads)."""

    loss_at: LossAt
    keep: torch.Tensor
    heads: list[int]


def append_lift(theta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[u_c, keep_c] per pair: (C, d) and (C, n_heads) → (C, d + n_heads); the gradient flows to u only."""
    return torch.cat([theta, keep.to(theta.dtype)], dim=1)


def _layer(model: nn.Module, layout: FlatParams) -> tuple[str, Attention] | None:
    """The one :class:`Attention` module (exact class) all of ``layout``'s parameters belong to, or None."""
    prefixes = {n.rsplit(".", 1)[0] for n in layout.names}
    if len(prefixes) != 1:
        return None
    prefix = prefixes.pop()
    try:
        module = model.get_submodule(prefix)
    except AttributeError:
        return None
    if type(module) is not Attention or any(n.rsplit(".", 1)[1] not in HEAD_SHAPES for n in layout.names):
        return None
    return prefix, module


def _head_index(layout: FlatParams, h: int) -> torch.Tensor:
    """Flat positions (in ``layout``) of head h's slices of every layout parameter, in layout order."""
    out, offset = [], 0
    for shape, numel in zip(layout.shapes, layout.numels):
        per = numel // shape[0]
        out.append(torch.arange(offset + h * per, offset + (h + 1) * per))
        offset += numel
    return torch.cat(out)


def head_factoring(model: nn.Module, layout: FlatParams, theta0: torch.Tensor, index: torch.Tensor,
                   loss_at: LossAt) -> HeadFactoring | None:
    """The factored loss for a group whose every restriction (row of ``index``) is exactly head h's slices of the
    layout's parameters of one :class:`Attention` layer; None for any other group (it runs the plain lift)."""
    found = _layer(model, layout)
    if found is None:
        return None
    _, attn = found
    n_heads, first = attn.cfg.n_heads, layout.numels[0] // layout.shapes[0][0]
    heads = []
    for row in index.cpu():
        h = int(row[0]) // first
        if not (0 <= h < n_heads and torch.equal(row, _head_index(layout, h))):
            return None
        heads.append(h)
    keep = 1.0 - torch.nn.functional.one_hot(torch.tensor(heads), n_heads).to(theta0.device, theta0.dtype)
    names = [n.rsplit(".", 1)[1] for n in layout.names]
    numels = [n // n_heads for n in layout.numels]
    star = {k: getattr(attn, k).detach().to(theta0.device) for k in HEAD_SHAPES if k not in names}
    d, e = attn.cfg.d_model, attn.cfg.d_head
    shapes = {"d e": (d, e), "e d": (e, d), "e": (e,)}

    def factored(theta_ext: torch.Tensor, batch: Any) -> torch.Tensor:
        u, keep_r = theta_ext[:sum(numels)], theta_ext[sum(numels):].detach()
        head = {k: p.reshape(shapes[HEAD_SHAPES[k]]) for k, p in zip(names, torch.split(u, numels))}
        for k, w in star.items():   # a slice the restrictions leave at w*: head h's, picked by 1 − keep
            head[k] = torch.tensordot(1.0 - keep_r, w, dims=1)
        with moving_head(attn, keep_r, head):
            return loss_at(theta0, batch)

    return HeadFactoring(factored, keep, heads)
