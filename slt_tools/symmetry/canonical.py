"""Reference-free canonical forms and Git Re-Basin weight matching.

``canonicalize`` maps every parameter vector to a fixed representative of its symmetry orbit, in forward order:

1. **Scale gauge** (ReLU/LeakyReLU units): divide each unit's incoming weights and bias by their joint L2 norm α and
   multiply its outgoing weights by α. Units with α = 0 (dead) are left as they are.
2. **Sign gauge** (tanh units): flip the unit (incoming and outgoing) so that the incoming entry of largest magnitude
   is positive (the first such entry on exact ties).
3. **Within-head gauges** (attention): with W̃ = [W; b] the bias-augmented maps, M = W̃_Q W̃_Kᵀ and N = W̃_V W_O are
   gauge-invariant. Write M = U S Vᵀ (top d_head singular triplets) and set W̃_Q = U√S, W̃_K = V√S; likewise
   W̃_V = U'√S', W_O = √S' V'ᵀ from N. Each singular pair's sign is fixed by making the largest-|·| entry of the left
   vector positive. (Degenerate singular values leave a rotation inside their eigenspace: a measure-zero tie.)
4. **Sort**: hidden units by the lexicographic order of their gauge-fixed incoming vectors (bias first), rounded to
   6 significant digits so that float noise from step 1 does not reorder them; attention heads by decreasing ‖M‖_F,
   then ‖N‖_F. Exact ties keep their current relative order (stable sort), so the result is deterministic.

The map is function-preserving (each step is a symmetry), idempotent, and sends every permuted / rescaled /
sign-flipped / head-regauged copy of a network to the same parameters up to those ties and float round-off.

``align`` implements weight matching (Ainsworth, Hayase, Srinivasa 2022, "Git Re-Basin"): maximise
Σ_params ⟨θ_A, π(θ_B)⟩ over the permutation groups by coordinate descent — each step a linear assignment problem
(``scipy.optimize.linear_sum_assignment``) for one group with the others fixed, groups visited in random order, until
no group changes. Both models are gauge-fixed (steps 1–3) first, since matching alone cannot undo a rescaling.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from slt_tools.symmetry.spec import HeadGroup, SymmetrySpec, UnitGroup, symmetry_spec

StateDict = dict[str, torch.Tensor]


def _state(model_or_sd: nn.Module | Mapping[str, torch.Tensor]) -> StateDict:
    if isinstance(model_or_sd, nn.Module):
        return {k: v.detach().clone() for k, v in model_or_sd.state_dict().items()}
    return {k: v.detach().clone() for k, v in model_or_sd.items()}


def _resolve(model_or_sd: Any, spec: SymmetrySpec | None) -> SymmetrySpec:
    if spec is not None:
        return spec
    if not isinstance(model_or_sd, nn.Module):
        raise ValueError("a state dict carries no architecture: pass spec= (see slt_tools.symmetry.symmetry_spec)")
    return symmetry_spec(model_or_sd)


def _check(sd: StateDict, axes: list[tuple[str, int]], size: int, block: int, what: str) -> None:
    for name, axis in axes:
        if name not in sd:
            raise ValueError(f"{what}: parameter {name!r} is not in the state dict")
        if sd[name].shape[axis] != size * block:
            raise ValueError(f"{what}: {name} has {sd[name].shape[axis]} entries on axis {axis}, expected "
                             f"{size} × {block}")


def permute(sd: StateDict, axes: list[tuple[str, int]], perm: torch.Tensor | np.ndarray, block: int = 1) -> None:
    """In place: new unit j ← old unit perm[j] along every (param, axis), in blocks of ``block``."""
    perm = torch.as_tensor(np.asarray(perm), dtype=torch.long)
    idx = (perm[:, None] * block + torch.arange(block)[None, :]).reshape(-1)
    for name, axis in axes:
        sd[name] = sd[name].index_select(axis, idx.to(sd[name].device))


def _unit_matrix(sd: StateDict, items: list[tuple[str, int]], block: int = 1) -> torch.Tensor:
    """Concatenate the slices of each unit along the listed axes into rows: (num_units, features)."""
    parts = []
    for name, axis in items:
        t = torch.movedim(sd[name], axis, 0)
        parts.append(t.reshape(t.shape[0] // block, -1))
    return torch.cat(parts, dim=1)


def _scale_units(sd: StateDict, u: UnitGroup, factor: torch.Tensor) -> None:
    """Multiply incoming slices of unit j by factor[j] and outgoing slices by 1/factor[j]."""
    for items, f in ((u.incoming, factor), (u.outgoing, 1.0 / factor)):
        for name, axis in items:
            shape = [1] * sd[name].ndim
            shape[axis] = -1
            sd[name] = sd[name] * f.repeat_interleave(u.block).reshape(shape).to(sd[name].dtype)


def _fix_unit_gauge(sd: StateDict, u: UnitGroup) -> None:
    if u.gauge is None:
        return
    rows = _unit_matrix(sd, u.incoming, u.block).double()
    if u.gauge == "scale":
        norms = rows.norm(dim=1)
        factor = torch.where(norms > 0, 1.0 / norms, torch.ones_like(norms))
    elif u.gauge == "sign":
        pick = rows.abs().argmax(dim=1)
        signs = torch.sign(rows.gather(1, pick[:, None]).squeeze(1))
        factor = torch.where(signs == 0, torch.ones_like(signs), signs)
    else:
        raise ValueError(f"unknown gauge {u.gauge!r} for unit group {u.name}")
    _scale_units(sd, u, factor)


def _round_sig(x: np.ndarray, digits: int = 6) -> np.ndarray:
    scale = np.max(np.abs(x)) if x.size and np.max(np.abs(x)) > 0 else 1.0
    return np.round(x / scale, digits)


def _sort_units(sd: StateDict, u: UnitGroup) -> np.ndarray:
    rows = _round_sig(_unit_matrix(sd, u.incoming, u.block).double().cpu().numpy())
    order = np.lexsort(rows.T[::-1], axis=0) if rows.shape[1] else np.arange(rows.shape[0])
    permute(sd, u.axes, order, u.block)
    return order


def _svd_factor(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    u, s, v = u[:, :k], s[:k], vh[:k].T
    pick = u.abs().argmax(dim=0)
    signs = torch.sign(u.gather(0, pick[None, :]).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, s, v * signs


def _fix_head_gauges(sd: StateDict, g: HeadGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD canonical factorisation of every head's QK and OV circuits; returns per-head ‖M‖_F and ‖N‖_F."""
    wq, wk, wv, wo = (sd[g.p(k)] for k in ("W_Q", "W_K", "W_V", "W_O"))
    bq, bk, bv = (sd[g.p(k)] for k in ("b_Q", "b_K", "b_V"))
    dtype, d_head = wq.dtype, wq.shape[-1]
    aq = torch.cat([wq, bq[:, None, :]], dim=1).double()  # (h, d_model + 1, d_head)
    ak = torch.cat([wk, bk[:, None, :]], dim=1).double()
    av = torch.cat([wv, bv[:, None, :]], dim=1).double()
    qk_norm, ov_norm = [], []
    new = {k: [] for k in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")}
    for h in range(wq.shape[0]):
        m = aq[h] @ ak[h].T
        u, s, v = _svd_factor(m, d_head)
        q, k = u * s.sqrt(), v * s.sqrt()
        n = av[h] @ wo[h].double()
        u2, s2, v2 = _svd_factor(n, d_head)
        vv, o = u2 * s2.sqrt(), (v2 * s2.sqrt()).T
        new["W_Q"].append(q[:-1]), new["b_Q"].append(q[-1]), new["W_K"].append(k[:-1]), new["b_K"].append(k[-1])
        new["W_V"].append(vv[:-1]), new["b_V"].append(vv[-1]), new["W_O"].append(o)
        qk_norm.append(torch.linalg.norm(m)), ov_norm.append(torch.linalg.norm(n))
    for key, parts in new.items():
        sd[g.p(key)] = torch.stack(parts).to(dtype)
    return torch.stack(qk_norm), torch.stack(ov_norm)


def _sort_heads(sd: StateDict, g: HeadGroup, qk: torch.Tensor, ov: torch.Tensor) -> np.ndarray:
    keys = np.stack([-_round_sig(qk.cpu().numpy()), -_round_sig(ov.cpu().numpy())])
    order = np.lexsort(keys[::-1])
    permute(sd, g.axes, order)
    return order


def fix_gauges(model_or_sd: nn.Module | Mapping[str, torch.Tensor], spec: SymmetrySpec | None = None) -> StateDict:
    """Steps 1–3 of :func:`canonicalize` (scale, sign and within-head gauges) without sorting."""
    spec = _resolve(model_or_sd, spec)
    sd = _state(model_or_sd)
    for u in spec.units:
        _check(sd, u.axes, u.size, u.block, u.name)
        _fix_unit_gauge(sd, u)
    for g in spec.heads:
        _check(sd, g.axes, g.n_heads, 1, g.name)
        _fix_head_gauges(sd, g)
    return sd


def canonicalize(model_or_sd: nn.Module | Mapping[str, torch.Tensor], spec: SymmetrySpec | None = None
                 ) -> StateDict:
    """The canonical representative of the parameters' symmetry orbit (see module docstring). Returns a new state
    dict; load it with ``model.load_state_dict``."""
    spec = _resolve(model_or_sd, spec)
    sd = _state(model_or_sd)
    for g in spec.heads:
        _check(sd, g.axes, g.n_heads, 1, g.name)
        _sort_heads(sd, g, *_fix_head_gauges(sd, g))
    for u in spec.units:  # forward order: a unit's incoming columns are already canonical when it is sorted
        _check(sd, u.axes, u.size, u.block, u.name)
        _fix_unit_gauge(sd, u)
        _sort_units(sd, u)
    return sd


def align(reference: nn.Module | Mapping[str, torch.Tensor], other: nn.Module | Mapping[str, torch.Tensor],
          spec: SymmetrySpec | None = None, method: str = "weight_matching", max_iter: int = 100, seed: int = 0
          ) -> tuple[StateDict, dict[str, np.ndarray]]:
    """Permute ``other`` to match ``reference`` (Git Re-Basin weight matching after gauge fixing).

    Returns (aligned state dict — the same function as ``other`` —, {group name: permutation}), where
    ``perm[j]`` is the unit of (gauge-fixed) ``other`` placed at position j.
    """
    if method != "weight_matching":
        raise ValueError(f"unknown alignment method {method!r}; available: 'weight_matching'")
    spec = _resolve(reference if isinstance(reference, nn.Module) else other, spec)
    a, b = fix_gauges(reference, spec), fix_gauges(other, spec)
    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        raise ValueError("reference and other have different parameter names or shapes")
    groups = spec.permutation_groups()
    perms = {name: np.arange(size) for name, size, _, _ in groups}
    rng = np.random.default_rng(seed)

    def permuted_b(skip: str | None) -> StateDict:
        out = dict(b)
        for name, _, axes, block in groups:
            if name != skip:
                permute(out, axes, perms[name], block)
        return out

    for _ in range(max_iter):
        changed = False
        for gi in rng.permutation(len(groups)):
            name, size, axes, block = groups[gi]
            pb = permuted_b(name)
            cost = (_unit_matrix(a, axes, block).double() @ _unit_matrix(pb, axes, block).double().T).cpu().numpy()
            _, col = linear_sum_assignment(cost, maximize=True)
            old = cost[np.arange(size), perms[name]].sum()
            if cost[np.arange(size), col].sum() > old + 1e-12 * max(1.0, abs(old)):
                perms[name] = col
                changed = True
        if not changed:
            break
    return permuted_b(None), perms
