"""A sampler = one registered update rule (:mod:`slt_tools.sampling.rules`) + its hyperparameters + chain state.

:class:`Sampler` is what the engine drives for a block of chains; the formulas live with the rules. The MALA
diagnostic of Lau et al. (the Metropolis–Hastings acceptance a MALA correction would apply to an SGLD proposal) is
defined here for every Langevin rule, from the rule's preconditioner.
"""
from __future__ import annotations

import torch

from slt_tools.sampling.rules import RULES, Hyper, Scalar, State, drift, get_rule

#: names of the registered rules (kept for callers that list them)
SAMPLERS = tuple(RULES)


def rule_hyperparameters(kind: str, lr: float, localization: float, nbeta: float,
                         sampler_kwargs: dict[str, float] | None = None) -> dict[str, float]:
    """The numbers rule ``kind`` needs: ε, γ, nβ and the rule's own (defaults overridden by ``sampler_kwargs``).

    Unknown keys are an error naming the rule's keys (a misspelt ``alpha`` must not silently fall back to a default).
    """
    rule = get_rule(kind)
    extra = dict(sampler_kwargs or {})
    unknown = sorted(set(extra) - set(rule.defaults))
    if unknown:
        raise ValueError(f"sampler_kwargs {unknown} are not hyperparameters of sampler {kind!r} "
                         f"(it takes {sorted(rule.defaults) or 'none'})")
    return {"lr": float(lr), "localization": float(localization), "nbeta": float(nbeta),
            **{k: float(v) for k, v in {**rule.defaults, **extra}.items()}}


class Sampler:
    """Hyperparameters and state of one SGMCMC rule for a block of chains."""

    def __init__(self, kind: str, lr: float, localization: float, nbeta: float, **sampler_kwargs: float) -> None:
        self.rule = get_rule(kind)
        self.kind = kind
        self._hp = rule_hyperparameters(kind, lr, localization, nbeta, sampler_kwargs)
        self.state: State = {}

    @property
    def lr(self) -> float:
        return self._hp["lr"]

    @property
    def localization(self) -> float:
        return self._hp["localization"]

    @property
    def nbeta(self) -> float:
        return self._hp["nbeta"]

    def hyperparameters(self) -> dict[str, float]:
        """The numbers :func:`update` needs (floats; pass 0-d tensors instead to keep a compiled graph generic)."""
        return dict(self._hp)

    def init_state(self, theta: torch.Tensor, noise: torch.Tensor) -> None:
        """Fresh state for chains at θ (SGNHT draws its initial momentum from ``noise``)."""
        self.state = self.rule.init(theta, noise, self._hp)

    def drift(self, theta: torch.Tensor, theta0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """∇U(w) ≈ nβ·∇L_B(w) + γ·(w − w*)."""
        return drift(theta, theta0, grad, self._hp)

    def current_preconditioner(self) -> torch.Tensor | None:
        """G from the current state, without updating it (None where G = I or the rule is not Langevin)."""
        return None if self.rule.preconditioner is None else self.rule.preconditioner(self.state, self._hp)

    def first_move(self, theta: torch.Tensor, theta0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Per-chain length of the noise-free part of a first step from fresh state at θ."""
        return self.rule.first_move(theta, theta0, grad, self._hp)

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

        lr = self.lr
        Gm = torch.ones_like(theta) if G is None else G
        fwd = (prop - theta + 0.5 * lr * Gm * self.drift(theta, theta0, grad)).pow(2).div(Gm).sum(dim=1) / (2 * lr)
        bwd = (theta - prop + 0.5 * lr * Gm * self.drift(prop, theta0, prop_grad)).pow(2).div(Gm).sum(dim=1)
        return potential(theta, loss) - potential(prop, prop_loss) - bwd / (2 * lr) + fwd


def update(kind: str, theta: torch.Tensor, theta0: torch.Tensor, grad: torch.Tensor, noise: torch.Tensor,
           state: State, hp: Hyper) -> tuple[torch.Tensor, State]:
    """One step of rule ``kind`` for all chains, out of place: (θ, state) ↦ (θ′, state′)."""
    return get_rule(kind).update(theta, theta0, grad, noise, state, hp)


__all__ = ["SAMPLERS", "Hyper", "Sampler", "Scalar", "State", "rule_hyperparameters", "update"]
