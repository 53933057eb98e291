"""Bayesian influence functions from the localised posterior (Kreer, Wu, Adam, Furman, Hoogland, "Bayesian Influence
Functions for Hessian-Free Data Attribution", arXiv 2509.26544).

The local BIF of a training sample z_i on an observable φ is minus their posterior covariance,

    BIF(z_i, φ) = −Cov_p(ℓ_i(w), φ(w)),   p(w) ∝ exp(−nβ·L_n(w) − (γ/2)‖w − w*‖²),

and with φ = ℓ_q, the loss of a query sample z_q, it is a Hessian-free data attribution: up-weighting z_i in the
tempered posterior by δ (nβ·L_n → nβ·L_n + δ·ℓ_i) moves E_p[ℓ_q] by −δ·Cov_p(ℓ_i, ℓ_q) + O(δ²), i.e. the BIF is
dE_p[ℓ_q]/dδ: a *negative* BIF (losses that rise and fall together) means training more on z_i lowers z_q's
expected loss — z_i helps z_q, as a sample helps itself (BIF(z_q, z_q) = −Var ℓ_q); a positive one means it hurts
(tested against the closed-form derivative for linear regression). Here the covariance is reported unscaled (no
factor of nβ or n; multiply by nβ/n for the per-sample weight of the tempered loss), with the posterior correlation
ρ_iq = Cov(ℓ_i, ℓ_q)/√(Var ℓ_i · Var ℓ_q), which is free of that convention.

The chains are the LLC's (:func:`slt_tools.sample_llc`): at each draw the per-sample losses of a chunk of training
samples and of all query samples are evaluated for every chain (vmapped) and fed into a streaming cross-covariance
accumulator (:mod:`slt_tools.sampling.streaming`), so nothing of size draws × samples is stored. Memory per chunk is
O(C·chunk·Q); a training set larger than ``train_chunk_size`` is covered by re-running the same chains (same seed:
the same trajectories, since a chain's trajectory is a function of (seed, c) alone) once per chunk. The estimate
pools all chains' draws; its standard error is the spread of the per-chain covariances over √C.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from slt_tools.sampling.config import LLCConfig
from slt_tools.sampling.estimate import LLCProblem, model_mode, sample
from slt_tools.sampling.functional import FlatParams, make_loss
from slt_tools.sampling.observables import ChainEvaluator
from slt_tools.sampling.result import LLCResult
from slt_tools.sampling.streaming import CrossMoments, Moments, merge

PerSampleLossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class BIFResult:
    """BIF(z_i, z_q) = −Cov_p(ℓ_i, ℓ_q) for training samples i (rows) and query samples q (columns).

    ``bif``/``bif_sem`` (N, Q), ``correlation`` (N, Q), ``mean_train``/``var_train`` (N,), ``mean_query``/
    ``var_query`` (Q,) pooled over every chain's draws; ``llc`` is the LLC run of the (first) chunk."""

    bif: np.ndarray
    bif_sem: np.ndarray
    correlation: np.ndarray
    mean_train: np.ndarray
    var_train: np.ndarray
    mean_query: np.ndarray
    var_query: np.ndarray
    num_chains: int
    num_draws: int
    num_runs: int
    llc: LLCResult

    def top_influences(self, q: int, k: int = 5) -> np.ndarray:
        """Indices of the k training samples of most negative BIF on query q: the most helpful first (up-weighting
        them lowers E_p[ℓ_q] the most; module docstring)."""
        return np.argsort(self.bif[:, q], kind="stable")[:k]

    def top_harmful(self, q: int, k: int = 5) -> np.ndarray:
        """Indices of the k training samples of largest positive BIF on query q (up-weighting them raises E_p[ℓ_q])."""
        return np.argsort(-self.bif[:, q], kind="stable")[:k]


def in_order(loader: Any) -> Any:
    """``loader`` itself, or, for a :class:`torch.utils.data.DataLoader` that shuffles (any sampler but the
    sequential one), the same dataset, batch size and collate function without shuffling: row i of the
    concatenation is then sample i of the dataset (a shuffled loader would give a new permutation per pass)."""
    from torch.utils.data import DataLoader, SequentialSampler

    if not isinstance(loader, DataLoader) or isinstance(loader.sampler, SequentialSampler):
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size or 1, shuffle=False,
                      collate_fn=loader.collate_fn, num_workers=0)


def concat_batches(loader: Any) -> Any:
    """All batches of ``loader`` concatenated along the leading axis (tensor leaves; other leaves from batch 0), in
    dataset order for a shuffling DataLoader (:func:`in_order`)."""
    batches = list(in_order(loader))
    if not batches:
        raise ValueError("the training loader is empty")
    flat = [tree_flatten(b)[0] for b in batches]
    spec = tree_flatten(batches[0])[1]
    leaves = [torch.cat([f[j] for f in flat]) if isinstance(flat[0][j], torch.Tensor) and flat[0][j].ndim > 0
              else flat[0][j] for j in range(len(flat[0]))]
    return tree_unflatten(leaves, spec)


def slice_batch(batch: Any, sl: slice) -> Any:
    return tree_map(lambda x: x[sl] if isinstance(x, torch.Tensor) and x.ndim > 0 else x, batch)


def batch_size(batch: Any) -> int:
    sizes = {x.shape[0] for x in tree_flatten(batch)[0] if isinstance(x, torch.Tensor) and x.ndim > 0}
    if len(sizes) != 1:
        raise ValueError(f"cannot tell the number of samples of a batch with leading sizes {sorted(sizes)}")
    return sizes.pop()


class _CrossHook:
    """Per-draw hook: per-sample losses of the training chunk (x) and the queries (y) into a cross accumulator."""

    def __init__(self, train_fn: ChainEvaluator, query_fn: ChainEvaluator, block: int) -> None:
        self.train_fn, self.query_fn, self.acc = train_fn, query_fn, CrossMoments(block)

    def __call__(self, theta: torch.Tensor, losses: torch.Tensor) -> None:
        self.acc.add(self.train_fn(theta), self.query_fn(theta))


def _evaluator(model: nn.Module, layout: FlatParams, fn: PerSampleLossFn, batch: Any, eval_batch: int
               ) -> ChainEvaluator:
    """θ ↦ (ℓ(z_1; θ), …, ℓ(z_P; θ)) for the samples of ``batch``, ``eval_batch`` samples per forward pass."""
    at = make_loss(model, layout, fn)
    size = batch_size(batch)
    parts = [slice_batch(batch, slice(i, i + eval_batch)) for i in range(0, size, eval_batch)]
    return ChainEvaluator(lambda theta: torch.cat([at(theta, p).reshape(-1) for p in parts]))


def _stats(m: Moments) -> tuple[np.ndarray, ...]:
    """(pooled cov, per-chain SE, correlation, means and variances) of a cross accumulator's per-chain state."""
    chains = [Moments(m.n, m.mean_x[c:c + 1], m.mean_y[c:c + 1], m.m_xx[c:c + 1], m.m_yy[c:c + 1], m.m_xy[c:c + 1])
              for c in range(m.mean_x.shape[0])]  # type: ignore[index]
    pooled = chains[0]
    for c in chains[1:]:
        pooled = merge(pooled, c)
    per_chain = m.cov_xy().cpu().numpy()
    C = per_chain.shape[0]
    sem = per_chain.std(axis=0, ddof=1) / math.sqrt(C) if C > 1 else np.full(per_chain.shape[1:], np.nan)
    cov = pooled.cov_xy()[0]
    vx, vy = pooled.var_x()[0], pooled.var_y()[0]
    corr = cov / torch.sqrt(vx[:, None] * vy[None, :]).clamp_min(1e-300)
    return (cov.cpu().numpy(), sem, corr.cpu().numpy(), pooled.mean_x[0].cpu().numpy(), vx.cpu().numpy(),
            pooled.mean_y[0].cpu().numpy(), vy.cpu().numpy())  # type: ignore[index]


def bif(model: nn.Module, train_loader: Any, query_samples: Any, loss_per_sample_fn: PerSampleLossFn,
        config: LLCConfig, *, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        train_chunk_size: int | None = None, eval_batch_size: int = 1024, block: int = 32,
        device: str | torch.device | None = None) -> BIFResult:
    """Local BIF(z_i, z_q) = −Cov_p(ℓ_i, ℓ_q) of every training sample z_i of ``train_loader`` on every query sample
    z_q of the batch ``query_samples`` (module docstring for the definition and normalisation). Row i is sample i of
    the loader's dataset, also when the loader shuffles (the chains still sample with the loader as given).

    Args:
        loss_per_sample_fn: ``fn(model, batch) -> (B,)`` unreduced per-sample losses.
        config: the sampling settings (``lr`` and ``localization`` set), as for :func:`slt_tools.sample_llc`.
        loss_fn: the mean minibatch loss the chains sample with (default: the mean of ``loss_per_sample_fn``).
        train_chunk_size: training samples per run (default: all in one run); memory O(chains·chunk·Q) float64.
        eval_batch_size: samples per forward pass when evaluating per-sample losses at a draw.
    """
    if loss_fn is None:
        def loss_fn(m: Any, b: Any) -> torch.Tensor:
            return loss_per_sample_fn(m, b).mean()
    with model_mode(model, config.model_mode):
        problem = LLCProblem.build(model, train_loader, loss_fn, config.restrict_to, device)
        move = (lambda x: x.to(problem.device) if isinstance(x, torch.Tensor) else x)  # noqa: E731
        train = tree_map(move, concat_batches(train_loader))
        query = tree_map(move, query_samples)
        n_train = batch_size(train)
        chunk = min(train_chunk_size or n_train, n_train)
        query_fn = _evaluator(model, problem.layout, loss_per_sample_fn, query, eval_batch_size)
        pieces, first = [], None
        for start in range(0, n_train, chunk):
            train_fn = _evaluator(model, problem.layout, loss_per_sample_fn,
                                  slice_batch(train, slice(start, start + chunk)), eval_batch_size)
            res, moments = _run_cross(problem, config, train_fn, query_fn, block)
            first = first or res
            pieces.append(_stats(moments))
    cat = [np.concatenate([p[j] for p in pieces], axis=0) for j in range(5)]
    assert first is not None
    return BIFResult(-cat[0], cat[1], cat[2], cat[3], cat[4], pieces[0][5], pieces[0][6],
                     len(first.chain_ids), int(first.loss_trace.shape[1]), len(pieces), first)


def _run_cross(problem: LLCProblem, config: LLCConfig, train_fn: ChainEvaluator, query_fn: ChainEvaluator,
               block: int) -> tuple[LLCResult, Moments]:
    """One sampling run with the cross hook on every chain block; the blocks' accumulators joined along chains."""
    hooks: list[_CrossHook] = []

    def make_hook() -> _CrossHook:
        hooks.append(_CrossHook(train_fn, query_fn, block))
        return hooks[-1]

    res = sample(problem, config, draw_hook=make_hook)
    states = [h.acc.result() for h in hooks]
    if len({s.n for s in states}) != 1:
        raise RuntimeError("chain blocks recorded different numbers of draws (a block stopped early)")
    cat = (lambda name: torch.cat([getattr(s, name) for s in states]))  # noqa: E731
    return res, Moments(states[0].n, cat("mean_x"), cat("mean_y"), cat("m_xx"), cat("m_yy"), cat("m_xy"))
