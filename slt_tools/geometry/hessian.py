"""The Hessian of the loss at w* through Hessian-vector products — never materialised.

* HVPs by double backward, Hv = ∇(∇L(w*)·v), averaged over the data (batch-size weighted) or over the first
  ``num_batches`` batches; optionally restricted to a parameter subset (weight-refined, like the restricted LLC).
* Extreme eigenvalues: Lanczos (Lanczos 1950; Golub & Van Loan §10.1) with full reorthogonalisation. Ritz values of
  the tridiagonal T_m converge first at both ends of the spectrum, so one run gives the largest *and* smallest
  algebraic eigenvalues (signed, unlike power iteration on |λ|). With m = dim the result is exact.
* Trace: Hutchinson (E[vᵀHv] = tr H for Rademacher v) and Hutch++ (Meyer, Musco, Musco, Woodruff 2021: exact trace on
  the sketched top subspace + Hutchinson on the deflated rest), each with a standard error.
* Spectral density: stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017; Ghorbani et al. 2019). For a unit start
  vector v, m Lanczos steps give nodes θ_i and weights τ_i (squared first components of T's eigenvectors) with
  Σ τ_i θ_i^k = vᵀH^k v exactly for k ≤ 2m − 1; averaging over random v and broadening with a Gaussian gives a density.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy  # submodules load on first use (keeps `import slt_tools` fast)
import torch
from torch import nn

from slt_tools.sampling.data import BatchStream
from slt_tools.sampling.functional import FlatParams, RestrictTo, make_loss, select_parameters


class HessianOperator:
    """v ↦ H v for the (full-data or few-batch) loss at the model's current weights, as a flat-vector operator."""

    def __init__(self, model: nn.Module, loader: Any, loss_fn: Callable[[Any, Any], torch.Tensor],
                 restrict_to: RestrictTo = None, num_batches: int | None = None, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> None:
        names = select_parameters(model, restrict_to)
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        self.layout = FlatParams.from_model(model, names)
        self.dtype = dtype or next(model.parameters()).dtype
        self.layout.frozen = {k: v.to(dev) for k, v in self.layout.frozen.items()}
        self.theta = self.layout.flatten(model).to(dev, self.dtype)
        data = BatchStream.from_loader(loader, dev)
        self.batches = list(data.full_batches())
        if num_batches is not None:
            if num_batches < 1:
                raise ValueError(f"num_batches must be positive, got {num_batches}")
            self.batches = self.batches[:num_batches]
        self.total = sum(size for _, size in self.batches)
        loss_at = make_loss(model, self.layout, loss_fn)
        probe = loss_at(self.theta, self.batches[0][0])
        if not isinstance(probe, torch.Tensor) or probe.ndim != 0:
            raise ValueError("loss_fn must return a scalar tensor (a mean minibatch loss)")
        self._loss_at = loss_at
        self.dim = self.theta.numel()
        self.count = 0  # number of HVPs evaluated

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape != (self.dim,):
            raise ValueError(f"vector of shape {tuple(v.shape)} does not match the {self.dim} parameters")
        self.count += 1
        out = torch.zeros_like(self.theta)
        v = v.to(self.theta)
        for batch, size in self.batches:
            with torch.enable_grad():
                theta = self.theta.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self._loss_at(theta, batch), theta, create_graph=True)
                (hv,) = torch.autograd.grad(g, theta, grad_outputs=v)
            out += hv * (size / self.total)
        return out


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, m: int
            ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """m steps of Lanczos with full reorthogonalisation from v0: (α, β, Q) with T = tridiag(β, α, β)."""
    a, b, q, _ = lanczos_with_residual(matvec, v0, m)
    return a, b, q


def lanczos_with_residual(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, m: int
                          ) -> tuple[np.ndarray, np.ndarray, torch.Tensor, float]:
    """:func:`lanczos` and the norm β_m of its last residual, which bounds the Ritz pairs' residuals
    (:func:`ritz_residuals`); 0 when the Krylov space became invariant (β below 1e-10·|α₀|: exact Ritz values)."""
    Q = torch.empty(m + 1, v0.numel(), dtype=v0.dtype, device=v0.device)  # preallocated Krylov basis
    Q[0] = v0 / v0.norm()
    alphas, betas, last = [], [], 0.0
    for j in range(m):
        w = matvec(Q[j])
        alphas.append(float(torch.dot(w, Q[j])))
        basis = Q[: j + 1]
        w = w - basis.T @ (basis @ w)  # full reorthogonalisation (twice is enough)
        w = w - basis.T @ (basis @ w)
        b = float(w.norm())
        if b < 1e-10 * max(1.0, abs(alphas[0])):
            break
        if j == m - 1:
            last = b
            break
        betas.append(b)
        Q[j + 1] = w / b
    return np.array(alphas), np.array(betas), Q[: len(alphas)], last


def ritz_residuals(alphas: np.ndarray, betas: np.ndarray, last: float) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values θ_i of T = tridiag(β, α, β) (ascending) and their residual norms ‖H y_i − θ_i y_i‖ = β_m·|s_{m,i}|
    (β_m = ``last``, s_{m,i} the last component of T's i-th eigenvector).

    For symmetric H an eigenvalue lies within the residual of each Ritz value (Parlett, *The Symmetric Eigenvalue
    Problem*, Thm 4.5.1; with full reorthogonalisation the bound is not spoilt by lost orthogonality), so a Ritz value
    whose residual is small against the spectrum's scale is converged; the bottom of an indefinite, clustered spectrum
    converges last."""
    if len(alphas) == 1:
        return alphas.copy(), np.abs(np.array([last]))
    theta, vecs = scipy.linalg.eigh_tridiagonal(alphas, betas)
    return theta, np.abs(last * vecs[-1])


@dataclass
class Spectrum:
    """Extreme Hessian eigenvalues with their Lanczos residual bounds (an eigenvalue lies within ``*_residual``)."""

    top: np.ndarray  # largest algebraic eigenvalues, descending
    bottom: np.ndarray  # smallest algebraic eigenvalues, ascending
    num_hvps: int
    top_residual: np.ndarray | None = None
    bottom_residual: np.ndarray | None = None
    tol: float = 0.0  # residual below which a value counts as converged
    num_iter: int = 0

    @property
    def converged(self) -> bool:
        """Whether every reported eigenvalue is within ``tol`` of an eigenvalue of H."""
        res = [r for r in (self.top_residual, self.bottom_residual) if r is not None]
        return all(bool(np.all(r <= self.tol)) for r in res)


class HessianConvergenceWarning(RuntimeWarning):
    """Lanczos stopped before the reported extreme eigenvalues converged (their residual bounds are large)."""


def hessian_eigenvalues(model: nn.Module, loader: Any, loss_fn: Callable, k: int = 10, num_iter: int | None = None,
                        seed: int = 0, op: HessianOperator | None = None, rtol: float = 1e-3,
                        max_iter: int | None = None, **op_kwargs: Any) -> Spectrum:
    """Top-k largest and smallest (signed) Hessian eigenvalues by Lanczos, with residual bounds.

    ``num_iter`` given: exactly that many steps. Default: start at min(dim, max(3k, k + 30)) steps and double (up to
    ``max_iter``, default min(dim, 16·start)) until every reported value's residual β_m|s_{m,i}| is at most
    ``rtol``·max|θ| (:func:`ritz_residuals`); values still above it are reported with a
    :class:`HessianConvergenceWarning` naming them — the bottom of the spectrum (near-zero and negative eigenvalues,
    the ones that say whether w* is a minimum) converges last, and unconverged ones can have the wrong sign."""
    op = op or HessianOperator(model, loader, loss_fn, **op_kwargs)
    if not 1 <= k <= op.dim:
        raise ValueError(f"k must be between 1 and the number of parameters {op.dim}, got {k}")
    m = min(op.dim, num_iter or max(3 * k, k + 30))
    cap = m if num_iter else min(op.dim, max_iter or 16 * m)
    gen = torch.Generator().manual_seed(seed)
    v0 = torch.randn(op.dim, generator=gen, dtype=op.theta.dtype).to(op.theta.device)
    start = op.count
    while True:
        a, b, _, last = lanczos_with_residual(op, v0, m)
        ritz, res = ritz_residuals(a, b, last)
        tol = rtol * float(np.max(np.abs(ritz)))
        kk = min(k, len(ritz))
        spec = Spectrum(top=ritz[::-1][:kk].copy(), bottom=ritz[:kk].copy(), num_hvps=op.count - start,
                        top_residual=res[::-1][:kk].copy(), bottom_residual=res[:kk].copy(), tol=tol,
                        num_iter=len(a))
        if spec.converged or m >= cap:
            break
        m = min(cap, 2 * m)
    if not spec.converged:
        bad = [f"{v:.3g} (± {r:.2g})" for v, r in zip(np.r_[spec.bottom, spec.top],
                                                       np.r_[spec.bottom_residual, spec.top_residual]) if r > tol]
        warnings.warn(f"Lanczos after {spec.num_iter} steps: eigenvalue(s) {', '.join(bad[:6])} not converged "
                      f"(residual > {rtol:g}·max|θ| = {tol:.2g}); raise num_iter/max_iter", HessianConvergenceWarning,
                      stacklevel=2)
    return spec


@dataclass
class TraceEstimate:
    trace: float
    stderr: float
    num_hvps: int
    method: str


def hessian_trace(model: nn.Module, loader: Any, loss_fn: Callable, num_samples: int = 60, method: str = "hutch++",
                  seed: int = 0, op: HessianOperator | None = None, **op_kwargs: Any) -> TraceEstimate:
    """tr H by Hutchinson or Hutch++ with ``num_samples`` HVPs, with a standard error."""
    op = op or HessianOperator(model, loader, loss_fn, **op_kwargs)
    gen = torch.Generator().manual_seed(seed)

    def rademacher(n: int) -> torch.Tensor:
        return (torch.randint(0, 2, (n, op.dim), generator=gen) * 2 - 1).to(op.theta)

    start = op.count
    if method == "hutchinson":
        if num_samples < 2:
            raise ValueError("Hutchinson needs at least 2 samples for a standard error")
        vals = torch.stack([torch.dot(v, op(v)) for v in rademacher(num_samples)])
        return TraceEstimate(float(vals.mean()), float(vals.std() / math.sqrt(num_samples)), op.count - start,
                             method)
    if method != "hutch++":
        raise ValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}")
    if num_samples < 6:
        raise ValueError("Hutch++ needs at least 6 HVPs")
    s = min(num_samples // 3, op.dim)
    S = rademacher(s)
    Qm, _ = torch.linalg.qr(torch.stack([op(v) for v in S]).T)
    exact = float(sum(torch.dot(q, op(q)) for q in Qm.T))
    G = rademacher(max(2, num_samples - 2 * s))
    G = G - (G @ Qm) @ Qm.T
    vals = torch.stack([torch.dot(g, op(g)) for g in G])
    return TraceEstimate(exact + float(vals.mean()), float(vals.std() / math.sqrt(len(vals))), op.count - start,
                         method)


@dataclass
class SpectralDensity:
    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray  # (num_vectors, m) Ritz values
    weights: np.ndarray  # (num_vectors, m) quadrature weights (sum to 1 per vector)


def hessian_spectral_density(model: nn.Module, loader: Any, loss_fn: Callable, num_vectors: int = 5,
                             num_iter: int = 60, sigma: float | None = None, grid_size: int = 400, seed: int = 0,
                             op: HessianOperator | None = None, **op_kwargs: Any) -> SpectralDensity:
    """Stochastic Lanczos quadrature: Gaussian-broadened spectral density of H (integrates to 1)."""
    op = op or HessianOperator(model, loader, loss_fn, **op_kwargs)
    gen = torch.Generator().manual_seed(seed)
    m = min(num_iter, op.dim)
    nodes, weights = [], []
    for _ in range(num_vectors):
        v = (torch.randint(0, 2, (op.dim,), generator=gen) * 2 - 1).to(op.theta)
        a, b, _ = lanczos(op, v, m)
        if len(a) > 1:
            theta, vecs = scipy.linalg.eigh_tridiagonal(a, b[: len(a) - 1])
        else:
            theta, vecs = a, np.ones((1, 1))
        nodes.append(np.pad(theta, (0, m - len(theta)), constant_values=np.nan))
        weights.append(np.pad(vecs[0] ** 2, (0, m - len(theta))))
    nodes_a, weights_a = np.array(nodes), np.array(weights)
    finite = nodes_a[np.isfinite(nodes_a)]
    lo, hi = finite.min(), finite.max()
    width = sigma or max((hi - lo) / 100, 1e-12)
    grid = np.linspace(lo - 5 * width, hi + 5 * width, grid_size)
    dens = np.zeros_like(grid)
    for t, w in zip(nodes_a.ravel(), weights_a.ravel()):
        if np.isfinite(t) and w > 0:
            dens += w * np.exp(-0.5 * ((grid - t) / width) ** 2) / (width * math.sqrt(2 * math.pi))
    return SpectralDensity(grid, dens / num_vectors, nodes_a, weights_a)


def hessian_summary(model: nn.Module, loader: Any, loss_fn: Callable, k: int = 5, trace_samples: int = 30,
                    canonical: bool = False, **op_kwargs: Any) -> dict[str, float]:
    """Plain-dict statistics for a checkpoint sweep: top/bottom eigenvalues, trace ± stderr, HVPs used.

    ``canonical=True`` evaluates in the canonical gauge of :func:`slt_tools.symmetry.canonicalize` (sharpness is not
    invariant under ReLU rescaling: a rescaled copy of the same function has a different Hessian)."""
    if canonical:
        from slt_tools.symmetry.canonical import canonical_copy

        model = canonical_copy(model)
    op = HessianOperator(model, loader, loss_fn, **op_kwargs)
    spec = hessian_eigenvalues(model, loader, loss_fn, k=min(k, op.dim), op=op)
    tr = hessian_trace(model, loader, loss_fn, num_samples=trace_samples, op=op)
    out = {f"hessian/top_{i}": float(v) for i, v in enumerate(spec.top)}
    out.update({f"hessian/bottom_{i}": float(v) for i, v in enumerate(spec.bottom)})
    out.update({f"hessian/bottom_{i}_residual": float(r) for i, r in enumerate(spec.bottom_residual)})
    out.update({"hessian/trace": tr.trace, "hessian/trace_stderr": tr.stderr, "hessian/num_hvps": op.count,
                "hessian/converged": float(spec.converged)})
    return out
