"""The empirical neural tangent kernel (eNTK) on a probe set, and how it moves during training.

K(x, x') = J(x) J(x')ᵀ with J(x) = ∂f(x; w)/∂w the Jacobian of the model's outputs with respect to the parameters.
The default is the exact finite-width kernel with per-output blocks: shape (N, N, O, O) for N probe inputs and O
outputs; ``trace_outputs=True`` gives Σ_o K_oo, shape (N, N) (the convention of neural-tangents'
``trace_axes=(-1,)``). Jacobians are computed ``chunk_size`` probe points at a time (``vmap`` of ``jacrev``) and the
kernel is assembled block by block, so memory stays at two Jacobian chunks.

* Kernel distance (Fort et al. 2020): S(K₁, K₂) = 1 − ⟨K₁, K₂⟩_F / (‖K₁‖_F ‖K₂‖_F) ∈ [0, 1] for PSD kernels.
* Kernel velocity along a trajectory: S(K_t, K_{t'}) / (t' − t) (or per unit log-step).
* Centred kernel-target alignment (Cortes, Mohri, Rostamizadeh 2012): A = ⟨K_c, Y_c⟩_F / (‖K_c‖_F ‖Y_c‖_F) with
  K_c = HKH, Y_c = H Y Yᵀ H, H = I − 11ᵀ/N.

Like sharpness, the eNTK is not invariant under ReLU rescaling (rescaling changes J); pass ``canonical=True`` to
evaluate in the canonical gauge of :func:`slt_tools.symmetry.canonicalize`. It *is* invariant under permutations of
hidden units.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from slt_tools.sampling.functional import RestrictTo, select_parameters


def output_jacobian(model: nn.Module, params: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor],
                    x: torch.Tensor) -> torch.Tensor:
    """(n, O, P) Jacobian J[i, o, p] = ∂f_o(x_i; w)/∂w_p of the per-example outputs with respect to the flattened
    ``params`` (``frozen`` held fixed), one ``vmap`` of ``jacrev`` over the examples."""

    def f(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**frozen, **p}, (xi.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    return torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()], dim=-1)


def empirical_ntk(model: nn.Module, probe: torch.Tensor, trace_outputs: bool = False, chunk_size: int = 64,
                  restrict_to: RestrictTo = None, canonical: bool = False) -> torch.Tensor:
    """The eNTK on ``probe`` (see module docstring for shapes and conventions)."""
    if not isinstance(probe, torch.Tensor) or probe.ndim < 1 or probe.shape[0] == 0:
        raise ValueError("probe must be a non-empty tensor of inputs with the batch dimension first")
    if canonical:
        from slt_tools.symmetry.canonical import canonical_copy

        model = canonical_copy(model)
    names = select_parameters(model, restrict_to)
    all_params = dict(model.named_parameters())
    params = {k: all_params[k].detach() for k in names}
    frozen = {k: v.detach() for k, v in all_params.items() if k not in params}
    frozen.update({k: v.detach() for k, v in model.named_buffers()})
    try:
        with torch.no_grad():
            functional_call(model, {**frozen, **params}, (probe[:1],))
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"the model cannot be applied to probe inputs of shape {tuple(probe.shape[1:])}: "
                         f"{exc}") from exc
    chunks = list(torch.split(probe, chunk_size))
    n = probe.shape[0]
    jac0 = output_jacobian(model, params, frozen, chunks[0][:1])
    o = jac0.shape[1]
    K = torch.zeros((n, n) if trace_outputs else (n, n, o, o), dtype=jac0.dtype, device=jac0.device)
    starts = np.cumsum([0] + [len(c) for c in chunks])
    for a, ca in enumerate(chunks):
        ja = output_jacobian(model, params, frozen, ca)
        for b in range(a, len(chunks)):
            jb = ja if b == a else output_jacobian(model, params, frozen, chunks[b])
            if trace_outputs:
                block = torch.einsum("iop,jop->ij", ja, jb)
            else:
                block = torch.einsum("iop,jqp->ijoq", ja, jb)
            sa, sb = slice(starts[a], starts[a + 1]), slice(starts[b], starts[b + 1])
            K[sa, sb] = block
            if b != a:
                K[sb, sa] = block.transpose(0, 1) if trace_outputs else block.permute(1, 0, 3, 2)
    return K


def _flat(K: torch.Tensor) -> torch.Tensor:
    return K.reshape(-1).double()


def kernel_distance(K1: torch.Tensor, K2: torch.Tensor) -> float:
    """S = 1 − ⟨K₁, K₂⟩_F / (‖K₁‖_F ‖K₂‖_F) (Fort et al. 2020)."""
    if K1.shape != K2.shape:
        raise ValueError(f"kernels have different shapes {tuple(K1.shape)} and {tuple(K2.shape)}")
    a, b = _flat(K1), _flat(K2)
    denom = a.norm() * b.norm()
    if denom == 0:
        raise ValueError("kernel distance is undefined for a zero kernel")
    return float(1 - torch.dot(a, b) / denom)


def kernel_velocity(kernels: Sequence[torch.Tensor], steps: Sequence[float], log_steps: bool = False) -> np.ndarray:
    """S(K_i, K_{i+1}) / Δstep (or / Δlog step) for consecutive kernels along a trajectory."""
    if len(kernels) != len(steps) or len(kernels) < 2:
        raise ValueError("need at least two kernels and one step per kernel")
    s = np.log(np.asarray(steps, dtype=float)) if log_steps else np.asarray(steps, dtype=float)
    if np.any(np.diff(s) <= 0):
        raise ValueError("steps must be strictly increasing")
    return np.array([kernel_distance(a, b) for a, b in zip(kernels[:-1], kernels[1:])]) / np.diff(s)


def kernel_target_alignment(K: torch.Tensor, targets: torch.Tensor) -> float:
    """Centred kernel-target alignment of an (N, N) kernel (trace the outputs first) with targets (N,) or (N, d)."""
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError("kernel-target alignment needs an (N, N) kernel: use trace_outputs=True")
    y = targets.reshape(len(targets), -1).double()
    if y.shape[0] != K.shape[0]:
        raise ValueError(f"{y.shape[0]} targets for a kernel on {K.shape[0]} points")
    n = K.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    Kc = H @ K.double() @ H
    Yc = H @ (y @ y.T) @ H
    return float((Kc * Yc).sum() / (Kc.norm() * Yc.norm()))


def ntk_summary(model: nn.Module, probe: torch.Tensor, targets: torch.Tensor | None = None,
                reference: torch.Tensor | None = None, canonical: bool = False) -> tuple[dict[str, float],
                                                                                        torch.Tensor]:
    """(statistics dict, traced kernel) for a checkpoint sweep: kernel norm, trace, distance to a reference
    kernel (e.g. the previous checkpoint's) and centred alignment with the targets."""
    K = empirical_ntk(model, probe, trace_outputs=True, canonical=canonical)
    out = {"ntk/frobenius": float(K.norm()), "ntk/trace": float(K.trace())}
    if reference is not None:
        out["ntk/distance_to_reference"] = kernel_distance(K, reference)
    if targets is not None:
        out["ntk/target_alignment"] = kernel_target_alignment(K, targets)
    return out, K
