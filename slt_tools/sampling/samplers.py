"""SGMCMC update rules for the localised tempered posterior, acting in place on stacked chains θ ∈ R^{C×D}.

Target (Lau et al. 2023, arXiv 2308.12108):  p(w) ∝ exp(−U(w)),  U(w) = nβ·L_n(w) + (γ/2)‖w − w*‖².
With a minibatch gradient, ∇U(w) ≈ nβ·∇L_B(w) + γ(w − w*)  ("drift").

* SGLD (Welling & Teh 2011):          Δw = −(ε/2)·∇U(w) + N(0, ε·I).
* RMSProp-SGLD (Li et al. 2016, pSGLD without the Γ correction term, as in devinterp):
      V ← αV + (1−α)·g⊙g  (g = ∇L_B, V₀ = 0),  G = 1/(√V + δ),   Δw = −(ε/2)·G⊙∇U(w) + N(0, ε·G).
  δ = 0.1 by default (devinterp's value): at an exact minimum g ≈ 0, and a tiny δ would make G explode.
* SGNHT (Ding et al. 2014, stochastic gradient Nosé–Hoover thermostat), step h = √ε, diffusion A:
      p ← p − h·ξ·p − h·∇U(w) + N(0, 2A·h),   w ← w + h·p,   ξ ← ξ + h·(‖p‖²/D − 1).
  The thermostat ξ (one per chain) really is applied to the momentum — devinterp's SGNHT never applies it.

Each sampler keeps its state as tensors on the chains' device; ``step`` takes the per-chain noise it must use so that
the noise stream is owned by the engine (one generator per chain).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SAMPLERS = ("sgld", "rmsprop_sgld", "sgnht")


@dataclass
class Sampler:
    """Hyperparameters and state of one SGMCMC rule for a block of chains."""

    kind: str
    lr: float
    localization: float
    nbeta: float
    alpha: float = 0.99
    eps: float = 0.1
    diffusion: float = 1.0
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.kind!r}; choose one of {SAMPLERS}")

    def init_state(self, theta: torch.Tensor, noise: torch.Tensor) -> None:
        """Fresh state for chains at θ (SGNHT draws its initial momentum from ``noise``)."""
        if self.kind == "rmsprop_sgld":
            self.state = {"V": torch.zeros_like(theta)}
        elif self.kind == "sgnht":
            self.state = {
                "p": noise.clone(),
                "xi": torch.full((theta.shape[0], 1), self.diffusion, dtype=theta.dtype, device=theta.device),
            }
        else:
            self.state = {}

    def hyperparameters(self) -> dict[str, float]:
        """The numbers :func:`update` needs (floats; pass 0-d tensors instead to keep a compiled graph generic)."""
        return {"lr": self.lr, "localization": self.localization, "nbeta": self.nbeta, "alpha": self.alpha,
                "eps": self.eps, "diffusion": self.diffusion}

    def drift(self, theta: torch.Tensor, theta0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """∇U(w) ≈ nβ·∇L_B(w) + γ·(w − w*)."""
        return drift(theta, theta0, grad, self.hyperparameters())

    def current_preconditioner(self) -> torch.Tensor | None:
        """G = 1/(√V + δ) from the current state, without updating it (None for unpreconditioned rules)."""
        if self.kind != "rmsprop_sgld":
            return None
        return 1.0 / (self.state["V"].sqrt() + self.eps)

    def first_move(self, theta: torch.Tensor, theta0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Per-chain length of the noise-free part of a first step from fresh state at θ:
        (ε/2)‖G⊙∇U‖ (G = 1 for SGLD, the RMSProp preconditioner after one update from V = 0), ε‖∇U‖ for SGNHT."""
        d = self.drift(theta, theta0, grad)
        if self.kind == "sgnht":
            return self.lr * d.norm(dim=1)
        if self.kind == "rmsprop_sgld":
            d = d / (math.sqrt(1.0 - self.alpha) * grad.abs() + self.eps)
        return 0.5 * self.lr * d.norm(dim=1)

    def mala_log_accept(
        self,
        theta: torch.Tensor,
        theta0: torch.Tensor,
        loss: torch.Tensor,
        grad: torch.Tensor,
        prop: torch.Tensor,
        prop_loss: torch.Tensor,
        prop_grad: torch.Tensor,
        G: torch.Tensor | None,
    ) -> torch.Tensor:
        """log of the Metropolis–Hastings ratio a MALA correction would apply to the proposal w → w′ (per chain).

        log α = −U(w′) + U(w) + log q(w | w′) − log q(w′ | w),  q(·|w) = N(w − (ε/2)G∇U(w), εG),
        with the minibatch potential U = nβ·L_B + (γ/2)‖w − w*‖² (Lau et al. use this as an SGLD diagnostic).
        """
        def potential(w: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
            return self.nbeta * L + 0.5 * self.localization * (w - theta0).pow(2).sum(dim=1)

        Gm = torch.ones_like(theta) if G is None else G
        d_fwd = self.drift(theta, theta0, grad)
        d_bwd = self.drift(prop, theta0, prop_grad)
        fwd = (prop - theta + 0.5 * self.lr * Gm * d_fwd).pow(2).div(Gm).sum(dim=1) / (2 * self.lr)
        bwd = (theta - prop + 0.5 * self.lr * Gm * d_bwd).pow(2).div(Gm).sum(dim=1) / (2 * self.lr)
        return potential(theta, loss) - potential(prop, prop_loss) - bwd + fwd


Scalar = float | torch.Tensor


def drift(theta: torch.Tensor, theta0: torch.Tensor, grad: torch.Tensor, hp: dict[str, Scalar]) -> torch.Tensor:
    """∇U(w) ≈ nβ·∇L_B(w) + γ·(w − w*)."""
    return hp["nbeta"] * grad + hp["localization"] * (theta - theta0)


def update(
    kind: str,
    theta: torch.Tensor,
    theta0: torch.Tensor,
    grad: torch.Tensor,
    noise: torch.Tensor,
    state: dict[str, torch.Tensor],
    hp: dict[str, Scalar],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step of rule ``kind`` for all chains, out of place: (θ, state) ↦ (θ′, state′) (formulas in the module
    docstring). Pure tensor arithmetic, so the same code runs eagerly (``hp`` floats) and inside the compiled step
    (``hp`` 0-d tensors: one graph serves every step size)."""
    lr = hp["lr"]
    if kind == "sgld":  # θ′ = (1 − εγ/2)·θ + (εγ/2)·w* − (εnβ/2)·g + √ε·ξ: four kernels, one allocation when eager
        pull = 0.5 * lr * hp["localization"]
        new = theta * (1.0 - pull)
        for coef, x in ((pull, theta0), (-0.5 * lr * hp["nbeta"], grad), (lr**0.5, noise)):
            new = new.add_(x, alpha=coef) if not isinstance(coef, torch.Tensor) else new.addcmul_(x, coef)
        return new, state
    d = drift(theta, theta0, grad, hp)
    if kind == "rmsprop_sgld":
        V = hp["alpha"] * state["V"] + (1.0 - hp["alpha"]) * grad * grad
        G = 1.0 / (V.sqrt() + hp["eps"])
        return theta - (0.5 * lr) * G * d + lr**0.5 * G.sqrt() * noise, {"V": V}
    if kind == "sgnht":
        h = lr**0.5
        p, xi = state["p"], state["xi"]
        p = p - h * xi * p - h * d + (2.0 * hp["diffusion"] * h) ** 0.5 * noise
        xi = xi + h * (p.pow(2).mean(dim=1, keepdim=True) - 1.0)
        return theta + h * p, {"p": p, "xi": xi}
    raise ValueError(f"unknown sampler {kind!r}; choose one of {SAMPLERS}")
