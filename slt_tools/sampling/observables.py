"""Observables: functions of the weights evaluated at every draw of the LLC chains, with streaming statistics.

An observable φ is a function of the (functionally called) model returning a tensor — e.g. the per-sample losses
ℓ_j(w) of a fixed probe batch (:func:`per_sample_loss`). At each draw w_t of each chain c the engine evaluates
φ(w_t) for all chains at once (``vmap`` over chains, as for the loss; a loop if the function cannot be vmapped)
and feeds it, with the draw's minibatch loss L_B(w_t), into float64 streaming accumulators
(:mod:`slt_tools.sampling.streaming`): per chain the mean E_c[φ], the variance Var_c[φ] and the covariance
Cov_c(φ, L_B). Memory is O(chains × probe size), not O(draws); raw draws are kept only with ``keep_draws=True``.

The results (:class:`ObservableStats`, ``LLCResult.observables[name]``) report per-chain means, the pooled mean
over all chains' draws and its standard error (spread of the chain means / √C), the pooled variance and the pooled
covariance with the minibatch loss, with the SE of that covariance from the spread of the per-chain covariances.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import vmap

from slt_tools.sampling.functional import FlatParams, make_loss
from slt_tools.sampling.result import (
    ObservableStats,
    chain_list,
    stats_from_chains,
)
from slt_tools.sampling.streaming import CrossMoments, Moments

#: φ(model) → tensor (any shape; flattened to K values)
ObservableFn = Callable[[Any], torch.Tensor]
#: θ (D,) → φ(w(θ)) (K,)
BoundFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Observable:
    """A named function of the model, evaluated at each draw (``fn(model) -> tensor``)."""

    name: str
    fn: ObservableFn


def per_sample_loss(probe_batch: Any, loss_per_sample_fn: Callable[[Any, Any], torch.Tensor],
                    name: str = "per_sample_loss") -> Observable:
    """φ(w) = (ℓ(z_1; w), …, ℓ(z_P; w)): the per-sample losses of the P samples of ``probe_batch``, where
    ``loss_per_sample_fn(model, batch)`` returns the unreduced (P,) losses (e.g. ``reduction='none'``)."""
    return Observable(name, lambda model: loss_per_sample_fn(model, probe_batch))


def as_observables(observables: Mapping[str, ObservableFn] | Sequence[Observable] | None) -> list[Observable]:
    """Normalise ``{name: fn}`` or a list of :class:`Observable` to a list with distinct names."""
    if observables is None:
        return []
    items = ([Observable(k, v) for k, v in observables.items()] if isinstance(observables, Mapping)
             else list(observables))
    for o in items:
        if not isinstance(o, Observable) or not callable(o.fn):
            raise TypeError(f"observables must be {{name: fn(model)}} or Observable objects, got {o!r}")
    names = [o.name for o in items]
    if len(set(names)) != len(names):
        raise ValueError(f"observable names must be distinct, got {names}")
    return items


def bind(model: nn.Module, layout: FlatParams, observable: Observable) -> BoundFn:
    """θ ↦ φ(w(θ)) flattened, through the same parameter swap as the loss (:func:`make_loss`)."""
    at = make_loss(model, layout, lambda m, _batch: observable.fn(m))
    return lambda theta: at(theta, None).reshape(-1)


class ChainEvaluator:
    """φ at every chain's θ (C, D) → (C, K), vmapped over chains (a loop if vmap fails; same values)."""

    def __init__(self, fn: BoundFn) -> None:
        self.fn = fn
        self.batched: Callable[[torch.Tensor], torch.Tensor] | None = vmap(fn, randomness="different")
        self.fallback_reason: str | None = None

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.batched is not None:
                try:
                    return self.batched(theta)
                except Exception as exc:  # noqa: BLE001 - any vmap failure means "loop over chains"
                    self.batched, self.fallback_reason = None, f"{type(exc).__name__}: {exc}"
            return torch.stack([self.fn(theta[c]) for c in range(theta.shape[0])])


class ObservableHook:
    """The engine's ``on_draw`` hook: each observable into its own :class:`CrossMoments` with the minibatch loss
    (or, with ``reference``, with that scalar observable: ``cov_with_loss`` is then the covariance with it).

    With ``lift`` (and its ``context``) the chains' θ are sub-vectors, lifted to the observables' flat vector first
    (a refined run: :func:`slt_tools.sampling.steps.scatter_lift`)."""

    def __init__(self, bound: Sequence[tuple[str, BoundFn]], block: int = 32, keep_draws: bool = False,
                 lift: Callable[[torch.Tensor, Any], torch.Tensor] | None = None, context: Any = None,
                 reference: str | None = None) -> None:
        self.evaluators = {name: ChainEvaluator(fn) for name, fn in bound}
        self.acc = {name: CrossMoments(block, keep_draws) for name, _ in bound}
        self.lift, self.context = lift, context
        if reference is not None and reference not in self.evaluators:
            raise ValueError(f"reference observable {reference!r} is not among {list(self.evaluators)}")
        self.reference = reference

    def __call__(self, theta: torch.Tensor, losses: torch.Tensor) -> None:
        """Each observable at the draw, with its covariance partner: the minibatch loss or the scalar reference."""
        if self.lift is not None:
            theta = self.lift(theta, self.context)
        values = {name: ev(theta) for name, ev in self.evaluators.items()}
        partner = losses[:, None] if self.reference is None else values[self.reference][:, :1]
        for name, v in values.items():
            self.acc[name].add(v, partner)


def chains_of(acc: CrossMoments, rows: Sequence[int] | None = None) -> tuple[list[Moments], np.ndarray | None]:
    """The single-chain moments of an accumulator (rows ``rows`` only, default all) and their kept draws."""
    chains = chain_list(acc.result())
    rows = list(range(len(chains))) if rows is None else list(rows)
    draws = np.concatenate(acc.draws_x, axis=1)[rows] if acc.keep_draws else None
    return [chains[r] for r in rows], draws


def stats_from_moments(name: str, shape: Sequence[int], parts: Sequence[CrossMoments]) -> ObservableStats:
    """Summarise the accumulators of the run's chain blocks (concatenated along chains)."""
    got = [chains_of(acc) for acc in parts]
    draws = np.concatenate([d for _, d in got]) if parts[0].keep_draws else None  # type: ignore[misc]
    return stats_from_chains(name, shape, [c for cs, _ in got for c in cs], draws)


def summarize_observables(hooks: Sequence[ObservableHook], shapes: Mapping[str, Sequence[int]]
                          ) -> dict[str, ObservableStats]:
    """One :class:`ObservableStats` per observable from the hooks of a run's chain blocks."""
    if not hooks:
        return {}
    return {name: stats_from_moments(name, shapes[name], [h.acc[name] for h in hooks])
            for name in hooks[0].acc}


def prepare(model: nn.Module, layout: FlatParams, theta0: torch.Tensor,
            observables: Mapping[str, ObservableFn] | Sequence[Observable] | None
            ) -> tuple[list[tuple[str, BoundFn]], dict[str, list[int]]]:
    """Bind each observable to θ and evaluate it once at w* (a clear error before sampling; its shape)."""
    bound, shapes = [], {}
    for o in as_observables(observables):
        fn = bind(model, layout, o)
        with torch.no_grad():
            value = make_loss(model, layout, lambda m, _b, o=o: o.fn(m))(theta0, None)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"observable {o.name!r} must return a floating-point tensor, got {type(value).__name__}")
        bound.append((o.name, fn))
        shapes[o.name] = list(value.shape)
    return bound, shapes
