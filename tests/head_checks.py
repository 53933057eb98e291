"""Functional checks that a head restriction selects exactly that head, shared by the per-architecture tests.

An architecture is described by a ``capture(model, tokens, layer, ablate=None)`` function returning, for that layer's
attention module, ``pattern`` [batch, head, query, key], ``z`` [batch, pos, head, d_head] (the per-head mixed values
before the output projection, or None where the model exposes no hook for it) and ``out`` [batch, pos, d_model] (the
module's output); ``ablate=h`` zeroes head h's z through the model's own hooks before the output projection.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

import slt_tools as slt

Capture = Callable[..., dict]


def perturbed(model: nn.Module, masks: dict[str, torch.Tensor], how: str = "noise", seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose masked coordinates got Gaussian noise (``how="noise"``) or were zeroed."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mask in masks.items():
            p = params[name]
            if how == "zero":
                p[mask] = 0.0
            else:
                p[mask] += 0.5 * torch.randn(int(mask.sum()), generator=gen)
    return out


def complement(model: nn.Module, r: slt.restrictions.Restriction, prefix: str) -> dict[str, torch.Tensor]:
    """Every coordinate of the parameters under ``prefix`` (one attention module) that ``r`` does not select."""
    return {n: ~r.masks[n] if n in r.masks else torch.ones(p.shape, dtype=torch.bool)
            for n, p in model.named_parameters() if n.startswith(prefix + ".")}


def split(masks: dict[str, torch.Tensor], out_proj: tuple[str, ...]) -> tuple[dict, dict]:
    """(Q/K/V part, output-projection part) of a head's masks."""
    o = {n: m for n, m in masks.items() if n.endswith(out_proj)}
    return {n: m for n, m in masks.items() if n not in o}, o


def _heads_equal(a: torch.Tensor, b: torch.Tensor, dim: int, keep: set[int]) -> None:
    for h in keep:
        torch.testing.assert_close(a.select(dim, h), b.select(dim, h), rtol=1e-5, atol=1e-6)


def _changed(a: torch.Tensor, b: torch.Tensor, dim: int, h: int) -> bool:
    return (a.select(dim, h) - b.select(dim, h)).abs().max().item() > 1e-4


def check_heads(model: nn.Module, tokens: torch.Tensor, capture: Capture, out_proj: tuple[str, ...],
                prefix: Callable[[int], str], causal: bool = True, group: int = 1) -> int:
    """All the functional checks on every head of every layer; returns how many heads were checked.

    ``prefix(layer)`` is the attention module's path; ``group`` = query heads per K/V head (1 without GQA).
    """
    model.eval()
    heads = slt.restrictions.heads(model)
    own = slt.restrictions.heads(model, shared_kv=False)
    layers = sorted({int(k[1:].split("h")[0]) for k in heads})
    n_heads = len(heads) // len(layers)
    for layer in layers:
        base = capture(model, tokens, layer)
        for h in range(n_heads):
            r, key = heads[f"l{layer}h{h}"], f"l{layer}h{h}"
            _check_inside(model, tokens, capture, layer, h, own[key], set(range(n_heads)) - {h}, base)
            if group > 1:  # the shared K/V slice moves the whole group, and nothing outside it
                first = h // group * group
                outside = set(range(n_heads)) - set(range(first, first + group))
                _check_inside(model, tokens, capture, layer, h, r, outside, base)
            _check_outside(model, tokens, capture, layer, h, r, prefix(layer), base)
            _check_ablation(model, tokens, capture, layer, h, own[key] if group > 1 else r, out_proj, base,
                            causal, full=group == 1)
    return len(heads)


def _check_inside(model, tokens, capture, layer, h, r, others, base) -> None:
    """Perturbing head h's coordinates changes head h and none of the heads ``others``."""
    after = capture(perturbed(model, r.masks), tokens, layer)
    _heads_equal(after["pattern"], base["pattern"], 1, others)
    if base["z"] is not None:
        _heads_equal(after["z"], base["z"], 2, others)
        assert _changed(after["z"], base["z"], 2, h), f"l{layer}h{h}: perturbing the head left its output unchanged"
    assert _changed(after["pattern"], base["pattern"], 1, h), f"l{layer}h{h}: its attention pattern did not move"
    assert not torch.allclose(after["out"], base["out"], atol=1e-4)


def _check_outside(model, tokens, capture, layer, h, r, prefix, base) -> None:
    """Perturbing every other coordinate of the attention module leaves head h's pattern and z unchanged: the
    restriction holds everything head h computes from."""
    after = capture(perturbed(model, complement(model, r, prefix), seed=1), tokens, layer)
    _heads_equal(after["pattern"], base["pattern"], 1, {h})
    if base["z"] is not None:
        _heads_equal(after["z"], base["z"], 2, {h})


def _check_ablation(model, tokens, capture, layer, h, r, out_proj, base, causal, full: bool = True) -> None:
    """Zeroing the head's Q/K/V coordinates zeroes its z and makes its pattern uniform; zeroing its output-projection
    coordinates, or its Q/K/V ones, gives the module output of zeroing head h's z through the model's own hook.
    With GQA (``full=False``, ``r`` without the shared K/V) zeroing its Q only makes its pattern uniform."""
    qkv, o = split(r.masks, out_proj)
    assert qkv and o, f"l{layer}h{h}: expected both Q/K/V and output-projection coordinates, got {list(r.masks)}"
    hooked = capture(model, tokens, layer, ablate=h) if base["z"] is not None else None
    no_o = capture(perturbed(model, o, "zero"), tokens, layer)
    no_qkv = capture(perturbed(model, qkv, "zero"), tokens, layer)
    n = tokens.shape[-1]
    uniform = (torch.ones(n, n).tril() if causal else torch.ones(n, n))
    uniform = uniform / uniform.sum(-1, keepdim=True)
    torch.testing.assert_close(no_qkv["pattern"][:, h], uniform.expand_as(no_qkv["pattern"][:, h]))
    if full:
        torch.testing.assert_close(no_qkv["out"], no_o["out"], rtol=1e-5, atol=1e-6)
    if hooked is not None:
        if full:
            assert no_qkv["z"][:, :, h].abs().max() == 0
        torch.testing.assert_close(no_o["out"], hooked["out"], rtol=1e-5, atol=1e-6)
