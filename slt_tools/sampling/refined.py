"""Refined LLCs: every restriction × chain in one batched run (Wang et al., arXiv 2410.02984).

A restriction r (:class:`slt_tools.restrictions.Restriction`) selects d_r coordinates idx_r of the weights; its
weight-refined LLC samples only those, with every other coordinate held at w*:

    p_r(u) ∝ exp(−nβ·L_n(w*[idx_r ← u]) − (γ/2)‖u − w*[idx_r]‖²),   u ∈ R^{d_r},
    λ̂_r = nβ·(E_{p_r}[L_n] − L_n(w*)),

estimated exactly as for the whole model (minibatch losses at the draws, the full-data L_n(w*)).

**One batched run.** Each element of the vmapped batch is a pair (r, c). Its state is the sub-vector u ∈ R^{d_r}
itself (not a masked copy of all weights), lifted into the loss by a scatter (:func:`~slt_tools.sampling.steps.
scatter_lift`): θ_{r,c} = w* with idx_r replaced by u. Drift, noise, localisation pull, sampler state (RMSProp's V,
SGNHT's momentum and thermostat) and the MALA diagnostic are therefore those of a d_r-dimensional run, and the
coordinates outside idx_r are w*'s exactly — they are never touched, not even by a masked update. Restrictions are
grouped by the parameters they touch (the heads of one layer form a group) and by d_r; within a group the flat
vector spans only the group's parameters, so under ``vmap`` everything upstream of the group's layer stays
unbatched and is computed once per step for all its elements, and all elements share the run's minibatches. For
whole heads of a ``slt_tools.models.Transformer`` layer the group goes further (:mod:`~slt_tools.sampling.
refined_heads`): the layer's unmoved heads are computed once per step from the unbatched w* and each pair computes
only its own head (``factor_heads=False`` turns this off; both give the same losses to float rounding).

**Seeding.** Pair (r, c) draws its noise from its own stream seeded by (seed, name of r, c)
(:func:`~slt_tools.sampling.noise.restriction_chain_seed`) and sees the run's minibatch order (seed alone), so its
trajectory does not depend on which restrictions run beside it or how the pairs are chunked: a restriction sampled
alone gives the same λ̂ to float rounding (the only difference is the batch size of the vmapped kernels).

**Memory and speed.** ``LLCConfig.chain_chunk_size`` bounds the pairs advanced at once; activation memory grows
linearly with it (measured in experiments/bench_refined.py). Default: a whole group per block on accelerators, and
:data:`CPU_BLOCK` pairs on the CPU, where larger blocks do not pay (experiments/bench_refined.py's model, all 16
heads × 4 chains, freed host memory kept (:mod:`~slt_tools.sampling.host_memory`): 31.2, 29.0, 29.4 and 30.2 s in
blocks of 4, 8, 16 and 32 pairs; an earlier, compiled 2-layer, 4-head model: 4.2 ms per pair-step in blocks of 4 vs
10.2 ms in blocks of 32, its attention tensors no longer fitting in cache).

**Hyperparameters.** ``lr`` and ``localization`` are either given or calibrated once on the whole model
(:func:`slt_tools.calibrate_llc`) and used for every restriction. That is safe for stability: the Hessian of the
restricted loss is a principal submatrix of the whole model's, so by Cauchy interlacing its largest eigenvalue is
no larger, and a step size stable for the whole model is stable for every restriction.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from slt_tools.restrictions.core import Restriction, collect, flat_masks, group_by_parameters
from slt_tools.sampling.calibration import calibrate
from slt_tools.sampling.config import LLCConfig
from slt_tools.sampling.engine import ChainOutput, data_seed, run_chains
from slt_tools.sampling.estimate import LLCProblem, PreparedObservables, hyperparameters, model_mode, report_paths
from slt_tools.sampling.functional import FlatParams, LossFn, make_loss
from slt_tools.sampling.noise import restriction_chain_seed
from slt_tools.sampling.observables import (
    Observable,
    ObservableFn,
    ObservableHook,
    chains_of,
)
from slt_tools.sampling.observables import prepare as prepare_observables
from slt_tools.sampling.refined_heads import HeadFactoring, factored_lift, head_factoring
from slt_tools.sampling.refined_result import RefinedLLCResult
from slt_tools.sampling.result import (
    LLCDivergenceError,
    LLCResult,
    LLCWarning,
    ObservableStats,
    stats_from_chains,
    summarize,
)
from slt_tools.sampling.samplers import Sampler
from slt_tools.sampling.steps import BatchedLossGrad, scatter_lift

Restrictions = Mapping[str, Restriction] | Sequence[Restriction] | Restriction

#: default (restriction, chain) pairs per block on the CPU (module docstring)
CPU_BLOCK = 8


@dataclass
class RefinedGroup:
    """Restrictions touching the same parameters with the same number d of coordinates: the flat layout of those
    parameters, w* in it (D,), and each restriction's coordinates in it (R_g, d), on the sampling device."""

    names: list[str]
    layout: FlatParams
    theta0: torch.Tensor
    index: torch.Tensor
    loss_at: Any
    factored: HeadFactoring | None = None

    @property
    def numel(self) -> int:
        return int(self.index.shape[1])


def _groups(model: nn.Module, loss_fn: LossFn, rs: dict[str, Restriction], device: torch.device,
            factor: bool = True) -> list[RefinedGroup]:
    """One :class:`RefinedGroup` per (set of touched parameters, d_r): its layout spans only those parameters, so
    everything else of the model is a frozen, unbatched tensor under ``vmap``. With ``factor``, a group of whole
    heads of one ``slt_tools.models.Transformer`` layer gets the head-factored loss
    (:mod:`slt_tools.sampling.refined_heads`)."""
    order = [n for n, _ in model.named_parameters()]
    groups = []
    for params, names in group_by_parameters(rs).items():
        layout = FlatParams.from_model(model, [n for n in order if n in params])
        layout.frozen = {k: v.to(device) for k, v in layout.frozen.items()}
        theta0 = layout.flatten(model).to(device)
        loss_at = make_loss(model, layout, loss_fn)
        masks = flat_masks([rs[n] for n in names], layout.names, layout.shapes, device)
        sizes = [int(k) for k in masks.sum(1).tolist()]
        for d in dict.fromkeys(sizes):
            rows = [i for i, k in enumerate(sizes) if k == d]
            index = torch.stack([masks[i].nonzero().squeeze(1) for i in rows])
            factored = head_factoring(model, layout, theta0, index, loss_at) if factor else None
            groups.append(RefinedGroup([names[i] for i in rows], layout, theta0, index, loss_at, factored))
    return groups


@dataclass
class RefinedProblem:
    """w*, the data, L_n(w*) and the restriction groups, prepared once (every input checked before sampling)."""

    base: LLCProblem
    restrictions: dict[str, Restriction]
    groups: list[RefinedGroup]

    @classmethod
    def build(cls, model: nn.Module, loader: Any, loss_fn: LossFn, restrictions: Restrictions,
              partition: bool = False, device: str | torch.device | None = None, factor_heads: bool = True
              ) -> RefinedProblem:
        """``ValueError`` for an empty, misnamed, overlapping (with ``partition``) or mis-shaped restriction, a
        parameter that is not trainable, or data the estimator cannot use — all before any sampling.
        ``factor_heads``: use the head-factored step where it applies (exact; False = the plain lift)."""
        rs = collect(restrictions, model, disjoint=partition)
        frozen = sorted({n for r in rs.values() for n in r.names} - {n for n, p in model.named_parameters()
                                                                      if p.requires_grad})
        if frozen:
            raise ValueError(f"restrictions select coordinates of parameters that do not require grad: {frozen}")
        touched = [n for n, _ in model.named_parameters() if any(n in r.masks for r in rs.values())]
        base = LLCProblem.build(model, loader, loss_fn, touched, device)
        return cls(base, rs, _groups(model, loss_fn, rs, base.device, factor_heads))


def _pairs(group: RefinedGroup, ids: list[int], seed: int) -> tuple[list[tuple[str, int]], list[int]]:
    pairs = [(name, c) for name in group.names for c in ids]
    return pairs, [restriction_chain_seed(seed, name, c) for name, c in pairs]


def _run_group(problem: RefinedProblem, group: RefinedGroup, config: LLCConfig, hp: dict[str, Any], ids: list[int],
               progress: bool, hooks: list[ObservableHook] | None = None,
               make_hook: Callable[[Any], ObservableHook] | None = None
               ) -> tuple[list[ChainOutput], list[list[tuple[str, int]]], BatchedLossGrad]:
    """Every (restriction, chain) pair of one group, ``chain_chunk_size`` pairs at a time; with ``make_hook``,
    one observable hook per block (given the block's lift context), appended to ``hooks``."""
    def make_sampler() -> Sampler:
        return Sampler(config.sampler, hp["lr"], hp["localization"], hp["nbeta"], **config.sampler_kwargs)

    fac = group.factored
    loss_grad = BatchedLossGrad(group.loss_at if fac is None else fac.loss_at, vectorize=config.vectorize,
                                compile=config.compile, lift=scatter_lift if fac is None else factored_lift)
    pairs, seeds = _pairs(group, ids, config.seed)
    rows = torch.arange(len(group.names), device=group.index.device).repeat_interleave(len(ids))
    chunk = config.chain_chunk_size or (CPU_BLOCK if group.theta0.device.type == "cpu" else len(pairs))
    outputs, chunks = [], []
    for i in range(0, len(pairs), chunk):
        index = group.index[rows[i:i + chunk]]
        context = (index, group.theta0)
        step_context = context if fac is None else (*context, fac.keep[rows[i:i + chunk]])

        def batches(context: Any = step_context) -> Iterator[Any]:
            for batch in problem.base.data.stream(data_seed(config.seed)):
                yield context, batch

        hook = make_hook(context) if make_hook is not None else None
        if hook is not None and hooks is not None:
            hooks.append(hook)

        outputs.append(run_chains(loss_grad, group.theta0[index], batches(), make_sampler,
                                  [c for _, c in pairs[i:i + chunk]], config.seed, config.num_draws,
                                  config.num_burnin_steps, config.num_steps_bw_draws, config.mala_every,
                                  progress=progress, init_spread=config.init_spread,
                                  fixed_shapes=problem.base.data.cached, noise_seeds=seeds[i:i + chunk],
                                  on_draw=hook))
        chunks.append(pairs[i:i + chunk])
    return outputs, chunks, loss_grad


def _gather(outputs: list[ChainOutput], chunks: list[list[tuple[str, int]]]
            ) -> dict[str, dict[str, list[Any]]]:
    """Per restriction: its chains' loss traces, MALA acceptances, start distances and steps run."""
    out: dict[str, dict[str, list[Any]]] = {}
    for o, pairs in zip(outputs, chunks):
        trace = o.loss_trace.double().cpu().numpy()
        mala = (o.mala_sum / max(o.mala_count, 1)).double().cpu().numpy() if o.mala_count else None
        dist = o.start_distance.double().cpu().tolist() if o.start_distance is not None else None
        for j, (name, _) in enumerate(pairs):
            rec = out.setdefault(name, {"trace": [], "mala": [], "dist": [], "steps": []})
            rec["trace"].append(trace[j])
            rec["mala"].append(None if mala is None else mala[j])
            rec["dist"].append(None if dist is None else dist[j])
            rec["steps"].append(o.steps_run)
    return out


def _summarize_one(name: str, rec: dict[str, list[Any]], problem: RefinedProblem, hp: dict[str, Any],
                   ids: list[int], config: LLCConfig, run: dict[str, Any]) -> LLCResult:
    r = problem.restrictions[name]
    hp_r = {**hp, "restrict_to": list(r.names), "restriction": name, "num_params": r.numel}
    mala = None if any(m is None for m in rec["mala"]) else np.array(rec["mala"])
    extra = {**run, "steps_run": min(rec["steps"])}
    if config.init_spread > 0:
        extra["start_distance"] = rec["dist"]
    try:
        return summarize(np.stack(rec["trace"]), problem.base.init_loss, hp_r, ids, mala, config.on_divergence,
                         extra)
    except LLCDivergenceError as exc:
        raise LLCDivergenceError(f"restriction {name!r}: {exc}") from None


def _summarize_all(per: dict[str, dict[str, list[Any]]], problem: RefinedProblem, hp: dict[str, Any],
                   ids: list[int], config: LLCConfig, runs: dict[str, dict[str, Any]]) -> dict[str, LLCResult]:
    """One :class:`LLCResult` per restriction; its warnings are re-issued once per kind, naming the restrictions."""
    results: dict[str, LLCResult] = {}
    seen: dict[tuple[type, str], list[str]] = {}
    for name in problem.restrictions:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results[name] = _summarize_one(name, per[name], problem, hp, ids, config, runs[name])
        for w in caught:
            if issubclass(w.category, LLCWarning):
                seen.setdefault(w.category, []).append((name, str(w.message)))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for category, hits in seen.items():
        names = [n for n, _ in hits]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        warnings.warn(f"restriction(s) {shown}: {hits[0][1]} (for {names[0]}; see each result's diagnostics)",
                      category, stacklevel=4)
    return results


def _group_observables(per_group: list[tuple[list[ChainOutput], list[ObservableHook], list[list[tuple[str, int]]]]],
                       shapes: dict[str, list[int]], names: Sequence[str]) -> dict[str, dict[str, ObservableStats]]:
    """Per restriction and observable: the statistics of that restriction's chains, picked out of the blocks."""
    out: dict[str, dict[str, ObservableStats]] = {}
    for _, hooks, chunks in per_group:
        for obs in shapes:
            picked: dict[str, list[tuple[list[Any], Any]]] = {}
            for hook, pairs in zip(hooks, chunks):
                for name in dict.fromkeys(n for n, _ in pairs):
                    picked.setdefault(name, []).append(
                        chains_of(hook.acc[obs], [j for j, (n, _) in enumerate(pairs) if n == name]))
            for name, got in picked.items():
                draws = np.concatenate([d for _, d in got]) if got[0][1] is not None else None
                out.setdefault(name, {})[obs] = stats_from_chains(obs, shapes[obs], [c for cs, _ in got for c in cs],
                                                                  draws)
    return {n: out.get(n, {}) for n in names}


def sample_refined(problem: RefinedProblem, config: LLCConfig, *, chain_ids: Sequence[int] | None = None,
                   progress: bool = False, observables: list[PreparedObservables] | None = None,
                   keep_draws: bool = False, reference: str | None = None) -> RefinedLLCResult:
    """One batched run of every (restriction, chain) pair with the fixed settings ``config``. ``observables``: one
    prepared set per group of ``problem.groups`` (bound to that group's layout), evaluated at every draw of every
    pair; ``result[name].observables`` holds restriction ``name``'s statistics (covariances with the minibatch loss,
    or with the scalar observable ``reference``)."""
    if config.lr is None or config.localization is None:
        raise ValueError("sample_refined needs lr and localization; slt_tools.estimate_refined_llc calibrates them "
                         "on the whole model when unset")
    if config.restrict_to is not None:
        raise ValueError("pass the restrictions as restrictions=..., not restrict_to, for a refined run")
    config.warn_if_risky()
    ids = list(range(config.num_chains)) if chain_ids is None else [int(c) for c in chain_ids]
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise ValueError(f"chain_ids must be distinct non-negative integers, got {chain_ids!r}")
    hp = {**hyperparameters(config, problem.base, len(ids)), "num_restrictions": len(problem.restrictions)}
    start = time.perf_counter()
    per: dict[str, dict[str, list[Any]]] = {}
    runs: dict[str, dict[str, Any]] = {}
    per_group = []
    for g, group in enumerate(problem.groups):
        t0 = time.perf_counter()
        hooks: list[ObservableHook] = []
        make_hook = None
        if observables:
            def make_hook(context: Any, bound: Any = observables[g][0]) -> ObservableHook:
                return ObservableHook(bound, keep_draws=keep_draws, lift=scatter_lift, context=context,
                                      reference=reference)
        outputs, chunks, loss_grad = _run_group(problem, group, config, hp, ids, progress, hooks, make_hook)
        per_group.append((outputs, hooks, chunks))
        gathered = _gather(outputs, chunks)
        report_paths(loss_grad, config, over="(restriction, chain) pairs")
        facts = dict(vectorized=loss_grad.vectorized, fallback_reason=loss_grad.fallback_reason,
                     device=str(problem.base.device), compiled=loss_grad.compiled,
                     compile_error=loss_grad.compile_error, wall_time_s=time.perf_counter() - t0,
                     data_cached=problem.base.data.cached, batched_with=list(group.names),
                     head_factored=group.factored is not None)
        per.update(gathered)
        runs.update(dict.fromkeys(group.names, facts))
    results = _summarize_all(per, problem, hp, ids, config, runs)
    if observables:
        for name, stats in _group_observables(per_group, observables[0][1], list(results)).items():
            results[name].observables = stats
    shared = {k: v for k, v in hp.items() if k not in ("restrict_to", "num_params")}
    return RefinedLLCResult(results, {n: r.to_dict() for n, r in problem.restrictions.items()},
                            problem.base.init_loss, shared, time.perf_counter() - start)


def estimate_refined_llc(model: nn.Module, loader: Any, loss_fn: LossFn, restrictions: Restrictions,
                         config: LLCConfig | None = None, *, partition: bool = False,
                         chain_ids: Sequence[int] | None = None, device: str | torch.device | None = None,
                         progress: bool = False,
                         observables: Mapping[str, ObservableFn] | Sequence[Observable] | None = None,
                         keep_draws: bool = False, factor_heads: bool = True, **settings: Any) -> RefinedLLCResult:
    """Refined LLC λ̂_r of every restriction r, all (restriction, chain) pairs in one batched run (module docstring).

    Args:
        model, loader, loss_fn: as for :func:`slt_tools.estimate_llc` (the model is not modified).
        restrictions: ``{name: Restriction}`` (e.g. :func:`slt_tools.restrictions.heads`), a list of them, or one.
        config / settings: an :class:`LLCConfig` and/or its fields as keywords (``num_chains``, ``num_draws``,
            ``lr``, ``localization``, ``nbeta``, ``sampler``, ``seed``, ``compile``, ``chain_chunk_size`` = the
            (restriction, chain) pairs advanced at once: default a whole group, :data:`CPU_BLOCK` on the CPU,
            …). ``restrict_to`` is not allowed here. ``lr`` or ``localization`` left unset are calibrated once on
            the whole model (:func:`slt_tools.calibrate_llc`) and used for every restriction; the record is
            ``result.calibration``.
        partition: require the restrictions to be pairwise disjoint (``ValueError`` naming an overlapping pair).
        chain_ids: which chains of every restriction to compute (default ``range(num_chains)``).
        observables / keep_draws: as for :func:`slt_tools.sample_llc`, evaluated at every draw of every
            (restriction, chain) pair, at the full weights (w* outside the restriction); ``res[name].observables``.
        factor_heads: for whole heads of a ``slt_tools.models.Transformer`` layer, compute the layer's unmoved
            heads once per step and one head per pair (:mod:`slt_tools.sampling.refined_heads`; the same loss to
            float rounding). False: the plain lift into the layer's tensors (every head per pair).

    Returns a :class:`RefinedLLCResult`: ``res["l1h3"]`` is that restriction's :class:`LLCResult`, ``res.table()``
    a tidy table. Chain c of restriction r depends on (seed, r's name, c) alone: sampling r by itself gives the same
    numbers to float rounding.
    """
    config = LLCConfig.from_kwargs(config, **settings)
    if config.restrict_to is not None:
        raise ValueError("pass the restrictions as restrictions=..., not restrict_to, for a refined run")
    with model_mode(model, config.model_mode):
        problem = RefinedProblem.build(model, loader, loss_fn, restrictions, partition, device, factor_heads)
        calibration = None
        if config.calibrated:
            calibration = calibrate(LLCProblem.build(model, loader, loss_fn, None, device), config)
            config = config.replace(lr=calibration.lr, localization=calibration.localization,
                                    num_draws=max(config.num_draws, calibration.num_draws),
                                    num_burnin_steps=max(config.num_burnin_steps or 0, calibration.num_burnin_steps))
        prepared = None
        if observables:
            prepared = [prepare_observables(model, g.layout, g.theta0, observables) for g in problem.groups]
        result = sample_refined(problem, config, chain_ids=chain_ids, progress=progress, observables=prepared,
                                keep_draws=keep_draws)
    result.calibration = calibration.to_dict() if calibration is not None else None
    return result
