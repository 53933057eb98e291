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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import vmap

from slt_tools.sampling.functional import FlatParams, make_loss
from slt_tools.sampling.result import ObservableStats
from slt_tools.sampling.streaming import CrossMoments, Moments, merge

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


def _chain_list(m: Moments) -> list[Moments]:
    def pick(t: torch.Tensor | None, c: int) -> torch.Tensor | None:
        return None if t is None else t[c:c + 1]

    return [Moments(m.n, m.mean_x[c:c + 1], pick(m.mean_y, c), m.m_xx[c:c + 1], pick(m.m_yy, c), pick(m.m_xy, c))
            for c in range(m.mean_x.shape[0])]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _sem(per_chain: np.ndarray) -> np.ndarray:
    c = per_chain.shape[0]
    return per_chain.std(axis=0, ddof=1) / math.sqrt(c) if c > 1 else np.full(per_chain.shape[1:], np.nan)


def stats_from_chains(name: str, shape: Sequence[int], chains: Sequence[Moments],
                      draws: np.ndarray | None = None) -> ObservableStats:
    """Summarise single-chain moments (one leading axis of size 1 each) into an :class:`ObservableStats`."""
    pooled = chains[0]
    for c in chains[1:]:
        pooled = merge(pooled, c)
    means = np.concatenate([_np(c.mean_x) for c in chains])
    covs = np.concatenate([_np(c.cov_xy()[..., 0]) for c in chains])
    return ObservableStats(name, list(shape), int(pooled.n // len(chains)), means, _np(pooled.mean_x[0]),
                           _sem(means), _np(pooled.var_x()[0]), covs, _np(pooled.cov_xy()[0, :, 0]), _sem(covs),
                           draws, var_per_chain=np.concatenate([_np(c.var_x()) for c in chains]),
                           partner_mean_per_chain=np.concatenate([_np(c.mean_y[:, 0]) for c in chains]),
                           partner_var_per_chain=np.concatenate([_np(c.var_y()[:, 0]) for c in chains]))


def moments_of(stats: ObservableStats) -> list[Moments]:
    """The single-chain moments behind an :class:`ObservableStats` (exact inverse of :func:`stats_from_chains` up to
    float64 rounding): M = (n − 1)·variance, M_xy = (n − 1)·covariance."""
    if stats.var_per_chain is None or stats.partner_mean_per_chain is None or stats.partner_var_per_chain is None:
        raise ValueError(f"observable {stats.name!r} has no per-chain variances (saved by an older version): "
                         "its statistics cannot be merged")
    n, f = stats.num_draws, stats.num_draws - 1
    t = (lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64)))  # noqa: E731
    return [Moments(n, t(stats.mean_per_chain[c])[None], t(stats.partner_mean_per_chain[c:c + 1])[None],
                    t(stats.var_per_chain[c])[None] * f, t(stats.partner_var_per_chain[c:c + 1])[None] * f,
                    t(stats.cov_with_loss_per_chain[c])[None, :, None] * f)
            for c in range(stats.mean_per_chain.shape[0])]


def combine_observables(parts: Sequence[Mapping[str, ObservableStats]], order: Sequence[int]
                        ) -> dict[str, ObservableStats]:
    """Merge the observables of disjoint chain blocks of one run: the blocks' chains concatenated, reordered by
    ``order`` (positions into that concatenation, e.g. by chain id), and pooled by Chan's merge."""
    names = list(parts[0])
    if any(list(p) != names for p in parts):
        raise ValueError(f"cannot combine results with different observables: {[list(p) for p in parts]}")
    out = {}
    for name in names:
        stats = [p[name] for p in parts]
        if len({s.num_draws for s in stats}) != 1 or len({tuple(s.shape) for s in stats}) != 1:
            raise ValueError(f"observable {name!r}: the parts have different numbers of draws or shapes")
        chains = [c for s in stats for c in moments_of(s)]
        draws = None
        if all(s.draws is not None for s in stats):
            draws = np.concatenate([s.draws for s in stats])[list(order)]  # type: ignore[misc]
        out[name] = stats_from_chains(name, stats[0].shape, [chains[i] for i in order], draws)
    return out


def chains_of(acc: CrossMoments, rows: Sequence[int] | None = None) -> tuple[list[Moments], np.ndarray | None]:
    """The single-chain moments of an accumulator (rows ``rows`` only, default all) and their kept draws."""
    chains = _chain_list(acc.result())
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
