"""SGMCMC update rules as a registry: name → (update, state init, preconditioner, MALA support, defaults).

Target (Lau et al. 2023, arXiv 2308.12108):  p(w) ∝ exp(−U(w)),  U(w) = nβ·L_n(w) + (γ/2)‖w − w*‖².
With a minibatch gradient, ∇U(w) ≈ nβ·∇L_B(w) + γ(w − w*)  ("drift").

* SGLD (Welling & Teh 2011):          Δw = −(ε/2)·∇U(w) + N(0, ε·I).
* RMSProp-SGLD (Li et al. 2016, pSGLD without the Γ correction term, as in devinterp):
      V ← αV + (1−α)·g⊙g  (g = ∇L_B, V₀ = 0),  G = 1/(√V + δ),   Δw = −(ε/2)·G⊙∇U(w) + N(0, ε·G).
  δ = 0.1 by default (devinterp's value): at an exact minimum g ≈ 0, and a tiny δ would make G explode.
* SGNHT (Ding et al. 2014, stochastic gradient Nosé–Hoover thermostat), step h = √ε, diffusion A:
      p ← p − h·ξ·p − h·∇U(w) + N(0, 2A·h),   w ← w + h·p,   ξ ← ξ + h·(‖p‖²/D − 1).
  The thermostat ξ (one per chain) really is applied to the momentum — devinterp's SGNHT never applies it.
* Underdamped Langevin ("uld"; BAOAB splitting, Leimkuhler & Matthews 2013, Appl. Math. Res. Express, with the two
  half kicks of consecutive steps merged so one gradient serves one step), step h = √ε, friction ζ:
      p ← p − h·∇U(w),  w ← w + (h/2)·p,  p ← c·p + √(1−c²)·ξ  (c = e^{−ζh}),  w ← w + (h/2)·p.
  Its invariant measure is exp(−U(w) − ½‖p‖²) up to O(h²) (BAOAB's configurational error; exact gradients).
  Mixing along a soft mode of stiffness κ takes time ~ 1/√κ at ζ ~ 2√κ instead of 2/κ for SGLD, so on an
  ill-conditioned posterior (stiff directions of curvature ~nβ·H, flat ones held only by γ) it relaxes the flat
  directions in ~√(nβ·H_max/γ) steps instead of ~nβ·H_max/γ (see :mod:`slt_tools.sampling.degenerate`).

Every rule acts on stacked chains θ ∈ R^{C×D} out of place, as pure tensor arithmetic: the same code runs eagerly
(hyperparameters as floats) and inside the compiled step (hyperparameters as 0-d tensors, so one graph serves every
step size). Adding a rule is one :func:`register` call: nothing else in the package names rules.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

Scalar = float | torch.Tensor
State = dict[str, torch.Tensor]
Hyper = Mapping[str, Scalar]


def drift(theta: torch.Tensor, theta0: torch.Tensor, grad: torch.Tensor, hp: Hyper) -> torch.Tensor:
    """∇U(w) ≈ nβ·∇L_B(w) + γ·(w − w*)."""
    return hp["nbeta"] * grad + hp["localization"] * (theta - theta0)


@dataclass(frozen=True)
class Rule:
    """One SGMCMC update rule.

    ``update(θ, w*, g, ξ, state, hp) -> (θ′, state′)`` with ξ ~ N(0, I) the step's noise; ``init(θ, ξ, hp)`` the state
    of fresh chains; ``preconditioner(state, hp)`` the diagonal G of the proposal N(θ − (ε/2)G∇U, εG) if the rule is
    a (preconditioned) Langevin step — then the MALA acceptance of its proposals is a meaningful diagnostic — or None;
    ``first_move(θ, w*, g, hp)`` the per-chain length of the noise-free part of a first step from fresh state (for the
    contraction rule of overdispersed starts); ``defaults`` the rule's own hyperparameters (``sampler_kwargs``).
    """

    name: str
    update: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, State, Hyper],
                     tuple[torch.Tensor, State]]
    init: Callable[[torch.Tensor, torch.Tensor, Hyper], State]
    first_move: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Hyper], torch.Tensor]
    preconditioner: Callable[[State, Hyper], torch.Tensor | None] | None
    defaults: Mapping[str, float]

    @property
    def langevin(self) -> bool:
        """Whether proposals are (preconditioned) Langevin steps, so MALA acceptance applies."""
        return self.preconditioner is not None


_RULES: dict[str, Rule] = {}
#: read-only view of the registry: name → :class:`Rule`
RULES: Mapping[str, Rule] = MappingProxyType(_RULES)


def register(rule: Rule) -> Rule:
    """Add ``rule`` to the registry (a name may be registered once)."""
    if rule.name in _RULES:
        raise ValueError(f"a sampler rule named {rule.name!r} is already registered")
    _RULES[rule.name] = rule
    return rule


def get_rule(name: str) -> Rule:
    """The registered rule ``name``; ValueError naming the known rules otherwise."""
    try:
        return _RULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; choose one of {tuple(_RULES)}") from None


# ------------------------------------------------------------------------------------------------------------- SGLD
def _sgld_update(theta: torch.Tensor, theta0: torch.Tensor, grad: torch.Tensor, noise: torch.Tensor, state: State,
                 hp: Hyper) -> tuple[torch.Tensor, State]:
    """θ′ = (1 − εγ/2)·θ + (εγ/2)·w* − (εnβ/2)·g + √ε·ξ: four kernels, one allocation when eager."""
    lr = hp["lr"]
    pull = 0.5 * lr * hp["localization"]
    new = theta * (1.0 - pull)
    for coef, x in ((pull, theta0), (-0.5 * lr * hp["nbeta"], grad), (lr**0.5, noise)):
        new = new.add_(x, alpha=coef) if not isinstance(coef, torch.Tensor) else new.addcmul_(x, coef)
    return new, state


def _sgld_first_move(theta: torch.Tensor, theta0: torch.Tensor, grad: torch.Tensor, hp: Hyper) -> torch.Tensor:
    return 0.5 * hp["lr"] * drift(theta, theta0, grad, hp).norm(dim=1)


register(Rule("sgld", _sgld_update, lambda theta, noise, hp: {}, _sgld_first_move,
              lambda state, hp: None, MappingProxyType({})))
# the preconditioner of plain SGLD is the identity: ``lambda → None`` marks "Langevin, G = I"


# ----------------------------------------------------------------------------------------------------- RMSProp-SGLD
def _rmsprop_update(theta: torch.Tensor, theta0: torch.Tensor, grad: torch.Tensor, noise: torch.Tensor,
                    state: State, hp: Hyper) -> tuple[torch.Tensor, State]:
    lr = hp["lr"]
    V = hp["alpha"] * state["V"] + (1.0 - hp["alpha"]) * grad * grad
    G = 1.0 / (V.sqrt() + hp["eps"])
    return theta - (0.5 * lr) * G * drift(theta, theta0, grad, hp) + lr**0.5 * G.sqrt() * noise, {"V": V}


def _rmsprop_first_move(theta: torch.Tensor, theta0: torch.Tensor, grad: torch.Tensor, hp: Hyper) -> torch.Tensor:
    """After one update from V = 0: G = 1/(√(1−α)·|g| + δ)."""
    d = drift(theta, theta0, grad, hp) / (math.sqrt(1.0 - float(hp["alpha"])) * grad.abs() + hp["eps"])
    return 0.5 * hp["lr"] * d.norm(dim=1)


register(Rule("rmsprop_sgld", _rmsprop_update, lambda theta, noise, hp: {"V": torch.zeros_like(theta)},
              _rmsprop_first_move, lambda state, hp: 1.0 / (state["V"].sqrt() + hp["eps"]),
              MappingProxyType({"alpha": 0.99, "eps": 0.1})))


# ------------------------------------------------------------------------------------------------------------ SGNHT
def _sgnht_update(theta: torch.Tensor, theta0: torch.Tensor, grad: torch.Tensor, noise: torch.Tensor, state: State,
                  hp: Hyper) -> tuple[torch.Tensor, State]:
    h = hp["lr"] ** 0.5
    p, xi = state["p"], state["xi"]
    p = p - h * xi * p - h * drift(theta, theta0, grad, hp) + (2.0 * hp["diffusion"] * h) ** 0.5 * noise
    xi = xi + h * (p.pow(2).mean(dim=1, keepdim=True) - 1.0)
    return theta + h * p, {"p": p, "xi": xi}


def _sgnht_init(theta: torch.Tensor, noise: torch.Tensor, hp: Hyper) -> State:
    """Momentum from the noise, thermostat ξ₀ = A."""
    return {"p": noise.clone(),
            "xi": torch.full((theta.shape[0], 1), float(hp["diffusion"]), dtype=theta.dtype, device=theta.device)}


register(Rule("sgnht", _sgnht_update, _sgnht_init,
              lambda theta, theta0, grad, hp: hp["lr"] * drift(theta, theta0, grad, hp).norm(dim=1),
              None, MappingProxyType({"diffusion": 1.0})))


# ------------------------------------------------------------------------------------- underdamped Langevin (BAOAB)
def _exp(x: Scalar) -> Scalar:
    return torch.exp(x) if isinstance(x, torch.Tensor) else math.exp(x)


def _uld_update(theta: torch.Tensor, theta0: torch.Tensor, grad: torch.Tensor, noise: torch.Tensor, state: State,
                hp: Hyper) -> tuple[torch.Tensor, State]:
    """Merged BAOAB: B(h) A(h/2) O A(h/2) with h = √ε and c = exp(−ζh) (one gradient per step)."""
    h = hp["lr"] ** 0.5
    c = _exp(-hp["friction"] * h)
    p = state["p"] - h * drift(theta, theta0, grad, hp)
    theta = theta + (0.5 * h) * p
    p = c * p + (1.0 - c * c) ** 0.5 * noise
    return theta + (0.5 * h) * p, {"p": p}


def _uld_first_move(theta: torch.Tensor, theta0: torch.Tensor, grad: torch.Tensor, hp: Hyper) -> torch.Tensor:
    """The drift part of the first position change, (ε/2)·(1 + c)·‖∇U‖ (the momentum part is noise)."""
    c = _exp(-hp["friction"] * hp["lr"] ** 0.5)
    return 0.5 * hp["lr"] * (1.0 + c) * drift(theta, theta0, grad, hp).norm(dim=1)


register(Rule("uld", _uld_update, lambda theta, noise, hp: {"p": noise.clone()}, _uld_first_move, None,
              MappingProxyType({"friction": 1.0})))
