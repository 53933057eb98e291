"""Reference-free canonical forms and Git Re-Basin weight matching.

``canonicalize`` maps every parameter vector to a fixed representative of its symmetry orbit:

1. **Scale gauge** (ReLU/LeakyReLU units, in forward order): divide each unit's incoming weights and bias by their
   joint L2 norm α and multiply its outgoing weights by α, so ‖[w_j; b_j]‖ = 1. Dead units (α = 0) are fixed points of
   the rescaling and are left as they are (their outgoing weights are unidentifiable).
2. **Sign gauge** (tanh units): flip the unit (incoming and outgoing) so that the incoming entry (bias included) of
   largest magnitude is positive. Tie rule: among entries of exactly equal magnitude the first in storage order wins.
3. **Within-head gauges** (attention): with W̃ = [W; b] the bias-augmented maps, M = W̃_Q W̃_Kᵀ and N = W̃_V W_O
   ((d_model+1)×(d_model+1) and (d_model+1)×d_model, rank ≤ d_head) are gauge-invariant. Write M = U S Vᵀ (thin SVD,
   computed from QR factors of W̃_Q and W̃_K, so O(d_model·d_head²)) and set W̃_Q = U√S, W̃_K = V√S; likewise
   W̃_V = U'√S', W_O = √S'V'ᵀ from N. Columns come in decreasing singular value; each singular pair's sign makes the
   largest-|·| entry of its left vector positive (first on exact ties). Degenerate singular values leave a rotation
   inside their eigenspace (a measure-zero tie). Zero singular values give zero columns.
4. **Sort** (after all gauges are fixed; residual stream first, then heads and units in forward order): hidden units
   lexicographically by their incoming vector (bias last), ties broken by the sorted multiset of their outgoing
   weights; attention heads by decreasing ‖M‖_F, then ‖N‖_F, then lexicographically by the canonical W̃_Q, W̃_V;
   residual coordinates lexicographically by their embedding column (W_E, then W_pos), ties by the sorted W_U row.
   Keys are rounded to 6 decimals relative to their largest entry so that float round-off from steps 1–3 cannot
   reorder units; remaining exact ties keep their current order (stable sort) — they only occur for units identical
   in every key, e.g. duplicated units.

Every step is a symmetry, so the map is function-preserving; it is idempotent and sends every permuted / rescaled /
sign-flipped / head-regauged copy of a network to the same parameters, up to the ties above and float round-off.

``align`` implements weight matching (Ainsworth, Hayase, Srinivasa 2022, "Git Re-Basin"): maximise
Σ_params ⟨θ_A, g·θ_B⟩ over the symmetry group by coordinate ascent — each step solves one group exactly with the
others fixed, groups visited in a random order each sweep, until a sweep brings no improvement. Unit groups are linear
assignment problems (``scipy.optimize.linear_sum_assignment``). Attention layers are a two-level problem (cf. Verma &
Elbayad 2024): for every pair (head i of A, head j of B) the best within-head orthogonal gauge G is the orthogonal
Procrustes solution of ⟨[W̃_Q;W̃_K]_A, [W̃_Q;W̃_K]_B G⟩ (value: the nuclear norm of W̃_Q,BᵀW̃_Q,A + W̃_K,BᵀW̃_K,A; the
same for V/O), and the head permutation is the linear assignment over those values. Both models are gauge-fixed
(steps 1–3) first, since permutations alone cannot undo a rescaling, and orthogonal maps are exactly the gauges that
keep the balanced SVD factorisation balanced.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy  # submodules load on first use (keeps `import slt_tools` fast)
import torch
from torch import nn

from slt_tools.symmetry.spec import Axes, HeadGroup, SymmetrySpec, UnitGroup, symmetry_spec

StateDict = dict[str, torch.Tensor]
_HEAD_KEYS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")


def state_of(model_or_sd: nn.Module | Mapping[str, torch.Tensor]) -> StateDict:
    if isinstance(model_or_sd, nn.Module):
        return {k: v.detach().clone() for k, v in model_or_sd.state_dict().items()}
    if not isinstance(model_or_sd, Mapping):
        raise TypeError(f"expected an nn.Module or a state dict, got {type(model_or_sd).__name__}")
    return {k: v.detach().clone() for k, v in model_or_sd.items()}


def _resolve(model_or_sd: Any, spec: SymmetrySpec | None) -> SymmetrySpec:
    if spec is not None:
        if not isinstance(spec, SymmetrySpec):
            raise TypeError(f"spec must be a SymmetrySpec, got {type(spec).__name__}")
        return spec
    if not isinstance(model_or_sd, nn.Module):
        raise ValueError("a state dict carries no architecture: pass spec= (see slt_tools.symmetry.symmetry_spec)")
    return symmetry_spec(model_or_sd)


def _check(sd: StateDict, axes: Axes, size: int, block: int, what: str) -> None:
    for name, axis in axes:
        if name not in sd:
            raise ValueError(f"{what}: parameter {name!r} is not in the state dict")
        if sd[name].ndim <= axis:
            raise ValueError(f"{what}: {name} has {sd[name].ndim} dims, the spec names axis {axis}")
        if sd[name].shape[axis] != size * block:
            raise ValueError(f"{what}: {name} has {sd[name].shape[axis]} entries on axis {axis}, expected "
                             f"{size} × {block}")


def _check_spec(sd: StateDict, spec: SymmetrySpec) -> None:
    for u in spec.residual + spec.units:
        _check(sd, u.axes, u.size, u.block, u.name)
    for g in spec.heads:
        _check(sd, g.axes, g.n_heads, 1, g.name)


def permute(sd: StateDict, axes: Axes, perm: torch.Tensor | np.ndarray, block: int = 1) -> None:
    """In place: new unit j ← old unit perm[j] along every (param, axis), in blocks of ``block``."""
    perm = torch.as_tensor(np.asarray(perm), dtype=torch.long)
    idx = (perm[:, None] * block + torch.arange(block)[None, :]).reshape(-1)
    for name, axis in axes:
        sd[name] = sd[name].index_select(axis, idx.to(sd[name].device))


def _unit_matrix(sd: StateDict, items: Axes, block: int = 1) -> torch.Tensor:
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
            t = sd[name]
            sd[name] = (t.double() * f.repeat_interleave(u.block).reshape(shape).to(t.device)).to(t.dtype)


def _fix_unit_gauge(sd: StateDict, u: UnitGroup) -> torch.Tensor | None:
    """Apply the scale/sign gauge in place; returns the per-unit factor applied to the incoming slices."""
    if u.gauge is None:
        return None
    rows = _unit_matrix(sd, u.incoming, u.block).double()
    if u.gauge == "scale":
        norms = rows.norm(dim=1)
        factor = torch.where(norms > 0, 1.0 / norms, torch.ones_like(norms))
    else:  # "sign" (validated by UnitGroup)
        pick = rows.abs().argmax(dim=1)
        signs = torch.sign(rows.gather(1, pick[:, None]).squeeze(1))
        factor = torch.where(signs == 0, torch.ones_like(signs), signs)
    _scale_units(sd, u, factor)
    return factor


def _round_rel(x: np.ndarray, digits: int = 6) -> np.ndarray:
    top = float(np.max(np.abs(x))) if x.size else 0.0
    return np.round(x / (top if top > 0 else 1.0), digits) + 0.0  # + 0.0 turns -0.0 into 0.0


def _stable_lexsort(*keys: np.ndarray) -> np.ndarray:
    """Row order by the concatenated key columns (first column most significant); stable on exact ties."""
    cols = np.concatenate([_round_rel(k.reshape(len(k), -1)) for k in keys], axis=1)
    if cols.shape[1] == 0:
        return np.arange(cols.shape[0])
    lead = cols[:, :8]  # the leading columns almost always decide; fall back to all columns on a tie among them
    order = np.lexsort(lead.T[::-1])  # np.lexsort is stable: exact ties keep their current order
    if len(order) > 1 and np.any(np.all(lead[order[1:]] == lead[order[:-1]], axis=1)):
        order = np.array(sorted(range(len(cols)), key=lambda i: tuple(cols[i])), dtype=np.int64)  # stable
    return order


def _sort_units(sd: StateDict, u: UnitGroup) -> np.ndarray:
    incoming = _unit_matrix(sd, u.incoming, u.block).double().cpu().numpy()
    outgoing = np.sort(_unit_matrix(sd, u.outgoing, u.block).double().cpu().numpy(), axis=1)
    order = _stable_lexsort(incoming, outgoing)
    permute(sd, u.axes, order, u.block)
    return order


def _head_tensors(sd: StateDict, g: HeadGroup) -> tuple[torch.Tensor, ...]:
    """Bias-augmented (h, d_model+1, d_head) maps W̃_Q, W̃_K, W̃_V and W_O (h, d_head, d_model), in float64."""
    wq, wk, wv, wo, bq, bk, bv = (sd[g.p(k)].double() for k in _HEAD_KEYS)
    aug = [torch.cat([w, b[:, None, :]], dim=1) for w, b in ((wq, bq), (wk, bk), (wv, bv))]
    return aug[0], aug[1], aug[2], wo


def _set_heads(sd: StateDict, g: HeadGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor
               ) -> None:
    dtype = sd[g.p("W_Q")].dtype
    new = {"W_Q": q[:, :-1], "b_Q": q[:, -1], "W_K": k[:, :-1], "b_K": k[:, -1], "W_V": v[:, :-1],
           "b_V": v[:, -1], "W_O": o}
    for key, t in new.items():
        sd[g.p(key)] = t.to(dtype).contiguous()


def _balanced_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched canonical factorisation of M = a bᵀ (a, b: (h, n, e)): returns (U√S, V√S, S) with M = U S Vᵀ,
    singular values decreasing, signs fixed by the largest-|·| entry of each left singular vector."""
    e = a.shape[-1]
    qa, ra = torch.linalg.qr(a)  # a = qa ra, qa (h, n, r), r = min(n, e)
    qb, rb = torch.linalg.qr(b)
    u, s, vh = torch.linalg.svd(ra @ rb.transpose(-1, -2))
    left, right = qa @ u, qb @ vh.transpose(-1, -2)
    pick = left.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(left.gather(-2, pick))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    root = s.sqrt()[:, None, :]
    left, right = left * signs * root, right * signs * root
    if left.shape[-1] < e:  # d_model + 1 < d_head: pad with zero columns
        pad = (0, e - left.shape[-1])
        left, right, s = (torch.nn.functional.pad(t, pad) for t in (left, right, s))
    return left, right, s


def _fix_head_gauges(sd: StateDict, g: HeadGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD canonical factorisation of every head's QK and OV circuits; returns per-head ‖M‖_F and ‖N‖_F."""
    q, k, v, o = _head_tensors(sd, g)
    q, k, s_qk = _balanced_factors(q, k)
    v, o_t, s_ov = _balanced_factors(v, o.transpose(-1, -2))
    _set_heads(sd, g, q, k, v, o_t.transpose(-1, -2))
    return s_qk.norm(dim=-1), s_ov.norm(dim=-1)


def _product_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a bᵀ‖_F per head without forming the product: ‖abᵀ‖_F² = tr((aᵀa)(bᵀb))."""
    return ((a.transpose(-1, -2) @ a) * (b.transpose(-1, -2) @ b)).sum(dim=(-1, -2)).clamp_min(0).sqrt()


def _sort_heads(sd: StateDict, g: HeadGroup, qk: torch.Tensor, ov: torch.Tensor) -> np.ndarray:
    q, _, v, _ = _head_tensors(sd, g)
    order = _stable_lexsort(-qk.cpu().numpy(), -ov.cpu().numpy(), q.flatten(1).cpu().numpy(),
                            v.flatten(1).cpu().numpy())
    permute(sd, g.axes, order)
    return order


def _gauge_back(raw: torch.Tensor, can: torch.Tensor) -> torch.Tensor:
    """Per head, H with raw = can·H (least squares); identity where it is not well determined (rank-deficient)."""
    h = torch.linalg.lstsq(can, raw).solution
    ok = torch.linalg.cond(h) < 1e8
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device).expand_as(h)
    ok = ok & ((can @ h - raw).flatten(1).norm(dim=1) <= 1e-6 * raw.flatten(1).norm(dim=1).clamp_min(1e-30))
    return torch.where(ok[:, None, None], h, eye)


def _fix_gauges_recorded(sd: StateDict, spec: SymmetrySpec) -> list[tuple[Any, ...]]:
    """fix_gauges in place, returning what was applied so that :func:`_undo_gauges` can map another network of the
    same architecture into this one's original gauge."""
    record: list[tuple[Any, ...]] = []
    for u in spec.units:  # forward order: a unit's outgoing weights are the next layer's incoming ones
        factor = _fix_unit_gauge(sd, u)
        if factor is not None:
            record.append(("unit", u, factor))
    for g in spec.heads:
        q0, k0, v0, o0 = _head_tensors(sd, g)
        _fix_head_gauges(sd, g)
        q1, _, v1, _ = _head_tensors(sd, g)
        record.append(("head", g, _gauge_back(q0, q1), _gauge_back(v0, v1)))
    return record


def _undo_gauges(sd: StateDict, record: list[tuple[Any, ...]]) -> None:
    """Apply the inverse of a recorded gauge fixing to ``sd`` (in place, in reverse order). Every step is a
    symmetry, so the function of ``sd`` is unchanged."""
    for entry in reversed(record):
        if entry[0] == "unit":
            _, u, factor = entry
            _scale_units(sd, u, 1.0 / factor)
        else:
            _, g, h_qk, h_ov = entry
            q, k, v, o = _head_tensors(sd, g)
            _set_heads(sd, g, q @ h_qk, k @ torch.linalg.inv(h_qk).transpose(-1, -2), v @ h_ov,
                       torch.linalg.solve(h_ov, o))


def fix_gauges(model_or_sd: nn.Module | Mapping[str, torch.Tensor], spec: SymmetrySpec | None = None) -> StateDict:
    """Steps 1–3 of :func:`canonicalize` (scale, sign and within-head gauges) without sorting. Commutes with
    permutations (up to the documented ties), which is why :func:`align` matches gauge-fixed parameters."""
    spec = _resolve(model_or_sd, spec)
    sd = state_of(model_or_sd)
    _check_spec(sd, spec)
    _fix_gauges_recorded(sd, spec)
    return sd


def canonicalize(model_or_sd: nn.Module | Mapping[str, torch.Tensor], spec: SymmetrySpec | None = None
                 ) -> StateDict:
    """The canonical representative of the parameters' symmetry orbit (see the module docstring for the gauges,
    sort keys and tie rules). Returns a new state dict; load it with ``model.load_state_dict``."""
    spec = _resolve(model_or_sd, spec)
    sd = fix_gauges(model_or_sd, spec)
    for u in spec.residual:  # the residual basis is read by every other group: sort it first
        _sort_units(sd, u)
    for g in spec.heads:
        q, k, v, o = _head_tensors(sd, g)
        _sort_heads(sd, g, _product_norm(q, k), _product_norm(v, o.transpose(-1, -2)))
    for u in spec.units:  # forward order: a unit's incoming columns are already canonical when it is sorted
        _sort_units(sd, u)
    return sd


# ----------------------------------------------------------------------------------------------- weight matching

def _procrustes(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax over orthogonal G of tr(Gᵀ m) (batched): G = U Vᵀ for m = U S Vᵀ, value Σ S."""
    u, s, vh = torch.linalg.svd(m)
    return u @ vh, s.sum(dim=-1)


def _head_pair_terms(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """For head i of A and head j of B: Mqk[i, j] = Q̃_BjᵀQ̃_Ai + K̃_BjᵀK̃_Ai, Mov[i, j] = Ṽ_BjᵀṼ_Ai + O_Bj O_Aiᵀ, so
    that ⟨A_i, B_j·G⟩ = tr(Gᵀ M) for the gauge Q̃G, K̃G, ṼG, GᵀO (G orthogonal)."""
    qa, ka, va, oa = a
    qb, kb, vb, ob = b
    mqk = torch.einsum("jne,inf->ijef", qb, qa) + torch.einsum("jne,inf->ijef", kb, ka)
    mov = torch.einsum("jne,inf->ijef", vb, va) + torch.einsum("jen,ifn->ijef", ob, oa)
    return mqk, mov


def _apply_head_transform(sd: StateDict, g: HeadGroup, perm: np.ndarray, g_qk: torch.Tensor, g_ov: torch.Tensor
                          ) -> None:
    permute(sd, g.axes, perm)
    q, k, v, o = _head_tensors(sd, g)
    _set_heads(sd, g, q @ g_qk, k @ g_qk, v @ g_ov, g_ov.transpose(-1, -2) @ o)


def align(reference: nn.Module | Mapping[str, torch.Tensor], other: nn.Module | Mapping[str, torch.Tensor],
          spec: SymmetrySpec | None = None, method: str = "weight_matching", max_iter: int = 100, seed: int = 0,
          frame: str = "reference") -> tuple[StateDict, dict[str, np.ndarray]]:
    """Move ``other`` along its symmetry orbit to match ``reference`` (Git Re-Basin weight matching after gauge
    fixing; two-level head matching for attention — see the module docstring).

    Returns (aligned state dict — the same function as ``other`` —, {group name: permutation}), where ``perm[j]`` is
    the unit (head) of gauge-fixed ``other`` placed at position j.

    ``frame="reference"`` (default): the matched parameters are mapped back into the reference's own gauge (the
    inverse of the scale/sign/within-head gauge fixing applied to the reference), so ``interpolate(reference,
    aligned)`` compares like with like. ``frame="canonical"``: they are left in the gauge-fixed frame; compare them
    with ``fix_gauges(reference)``. Either way the result is the same function as ``other``.
    """
    if method != "weight_matching":
        raise ValueError(f"unknown alignment method {method!r}; available: 'weight_matching'")
    if frame not in ("reference", "canonical"):
        raise ValueError(f"frame must be 'reference' or 'canonical', got {frame!r}")
    spec = _resolve(reference if isinstance(reference, nn.Module) else other, spec)
    a, b = state_of(reference), fix_gauges(other, spec)
    _check_spec(a, spec)
    record = _fix_gauges_recorded(a, spec)
    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        raise ValueError("reference and other have different parameter names or shapes")
    groups = spec.permutation_groups()
    heads = {g.name: g for g in spec.heads}
    perms = {name: np.arange(size) for name, size, _, _ in groups}
    rots = {}
    for g in spec.heads:
        e, dev = a[g.p("W_Q")].shape[-1], a[g.p("W_Q")].device
        eye = torch.eye(e, dtype=torch.float64, device=dev).expand(g.n_heads, e, e)
        rots[g.name] = (eye, eye)
    rng = np.random.default_rng(seed)

    def transformed_b(skip: str | None) -> StateDict:
        out = dict(b)
        for name, _, axes, block in groups:
            if name == skip:
                continue
            if name in heads:
                _apply_head_transform(out, heads[name], perms[name], *rots[name])
            else:
                permute(out, axes, perms[name], block)
        return out

    for _ in range(max_iter):
        improved = False
        for gi in rng.permutation(len(groups)):
            name, size, axes, block = groups[gi]
            tb = transformed_b(name)
            if name in heads:
                g = heads[name]
                mqk, mov = _head_pair_terms(_head_tensors(a, g), _head_tensors(tb, g))
                gqk, vqk = _procrustes(mqk)
                gov, vov = _procrustes(mov)
                cost = (vqk + vov).cpu().numpy()
                cur_qk, cur_ov = rots[name]
                idx = torch.as_tensor(perms[name], device=mqk.device)
                diag = torch.arange(size, device=mqk.device)
                old = float((mqk[diag, idx] * cur_qk).sum() + (mov[diag, idx] * cur_ov).sum())
            else:
                cost = (_unit_matrix(a, axes, block).double()
                        @ _unit_matrix(tb, axes, block).double().T).cpu().numpy()
                old = float(cost[np.arange(size), perms[name]].sum())
            _, col = scipy.optimize.linear_sum_assignment(cost, maximize=True)
            new = float(cost[np.arange(size), col].sum())
            if new > old + 1e-9 * max(1.0, abs(old)):
                improved = True
                perms[name] = col
                if name in heads:
                    sel = torch.as_tensor(col, device=gqk.device)
                    rots[name] = (gqk[diag, sel], gov[diag, sel])
        if not improved:
            break
    out = transformed_b(None)
    if frame == "reference":
        _undo_gauges(out, record)
    return out, perms


def canonical_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its weights in canonical form (same function)."""
    import copy

    out = copy.deepcopy(model)
    out.load_state_dict(canonicalize(model))
    return out
