"""The LLC estimator proper: one run of batched SGMCMC chains with fixed settings → :class:`LLCResult`.

Lau, Furman, Wang, Murfet, Wei, "The Local Learning Coefficient: A Singularity-Aware Complexity Measure"
(arXiv 2308.12108). At trained weights w*, sample the localised tempered posterior

    p(w) ∝ exp(−nβ·L_n(w) − (γ/2)‖w − w*‖²)

and estimate  λ̂(w*) = nβ · (E_p[L_n(w)] − L_n(w*)).  As in the authors' code, E_p[L_n] averages the minibatch loss
L_B at each draw and L_n(w*) is the full-data loss. Default inverse temperature nβ = n / log n with n the number of
training samples ("dataset" convention, as in the paper); devinterp's default uses the batch size m instead
(``nbeta_convention="batch"``: nβ = m / log m). Each chain gives its own λ̂_c; we report their mean, standard deviation,
standard error and convergence diagnostics.

:func:`sample_llc` never calibrates, extends or calls itself: that is the driver's job
(:mod:`slt_tools.sampling.auto`). :class:`LLCProblem` holds what does not depend on the sampler settings (the
flattened w*, the cached data, L_n(w*)), so a driver running many short runs prepares it once.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from slt_tools.sampling.config import LLCConfig
from slt_tools.sampling.data import BatchStream
from slt_tools.sampling.engine import ChainOutput, data_seed, run_chains
from slt_tools.sampling.functional import (
    FlatParams,
    LossFn,
    RestrictTo,
    full_data_loss,
    make_loss,
    select_parameters,
)
from slt_tools.sampling.observables import (
    BoundFn,
    Observable,
    ObservableFn,
    ObservableHook,
    summarize_observables,
)
from slt_tools.sampling.observables import prepare as prepare_observables
from slt_tools.sampling.result import CompileFallbackWarning, LLCResult, VmapFallbackWarning, summarize
from slt_tools.sampling.samplers import Sampler
from slt_tools.sampling.steps import BatchedLossGrad

#: observables bound to θ, and their shapes (:func:`slt_tools.sampling.observables.prepare`)
PreparedObservables = tuple[list[tuple[str, BoundFn]], dict[str, list[int]]]
#: the engine's per-draw hook: (θ (C, D), minibatch losses (C,)) ↦ None
DrawHook = Callable[[torch.Tensor, torch.Tensor], None]


def default_nbeta(num_samples: int, batch_size: int, convention: str = "dataset") -> float:
    """nβ = n / log n (``"dataset"``, n = number of training samples) or m / log m (``"batch"``, devinterp)."""
    if convention not in ("dataset", "batch"):
        raise ValueError(f"nbeta_convention must be 'dataset' or 'batch', got {convention!r}")
    k = num_samples if convention == "dataset" else batch_size
    if k < 2:
        raise ValueError(f"nβ = k/log k needs k ≥ 2 samples, got k = {k} ({convention} convention)")
    return k / math.log(k)


def check_loss_fn(loss_fn: Any) -> None:
    """``loss_fn`` must be ``loss_fn(model, batch) -> scalar``; a bare PyTorch loss (``F.mse_loss``, ``nn.MSELoss()``)
    takes (input, target) and would fail deep inside the model with an unrelated message."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    module = getattr(loss_fn, "__module__", "") or ""
    if module.startswith("torch.nn.functional") or isinstance(loss_fn, nn.modules.loss._Loss):
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise ValueError(f"loss_fn is PyTorch's {name}, which takes (input, target); slt_tools calls "
                         f"loss_fn(model, batch) — wrap it, e.g. lambda model, batch: {name}(model(batch[0]), "
                         "batch[1])")


def check_mean_reduced(loss_at: Any, theta0: torch.Tensor, batch: Any) -> None:
    """λ̂ = nβ·(E[L] − L(w*)) needs a *mean* minibatch loss. A sum-reduced loss is additive over a split of the batch,
    L_B = L_{B1} + L_{B2} (a mean loss satisfies L_B = (L_{B1} + L_{B2})/2 instead, for equal halves): detected on the
    first batch and refused, before it is misread as "w* is not a local minimum". Batches whose tensor leaves do not
    share a leading size of at least 4 are not checked."""
    leaves, spec = tree_flatten(batch)
    sizes = {x.shape[0] for x in leaves if isinstance(x, torch.Tensor) and x.ndim > 0}
    if len(sizes) != 1 or next(iter(sizes)) < 4 or next(iter(sizes)) % 2:
        return
    half = next(iter(sizes)) // 2

    def part(sl: slice) -> Any:
        return tree_unflatten([x[sl] if isinstance(x, torch.Tensor) and x.ndim > 0 else x for x in leaves], spec)

    with torch.no_grad():
        whole, a, b = (float(loss_at(theta0, bt)) for bt in (batch, part(slice(0, half)), part(slice(half, None))))
    scale = max(abs(whole), 1e-30)
    if abs(whole) > 1e-12 and abs(whole - (a + b)) <= 1e-4 * scale and abs(whole - (a + b) / 2) > 1e-3 * scale:
        raise ValueError(f"loss_fn looks sum-reduced: on the first batch L_B = {whole:.6g} equals the sum of its two "
                         f"halves' losses ({a:.6g} + {b:.6g}); the LLC estimator needs the mean minibatch loss "
                         "(reduction='mean', or divide by the batch size)")


@dataclass
class LLCProblem:
    """w*, the data and the loss, prepared once: flat layout of the moving parameters, cached minibatch stream,
    θ ↦ L_B(θ), and L_n(w*)."""

    layout: FlatParams
    theta0: torch.Tensor
    data: BatchStream
    loss_at: Any
    init_loss: float
    restrict_to: tuple[str, ...] | None
    device: torch.device

    @classmethod
    def build(cls, model: nn.Module, loader: Any, loss_fn: LossFn, restrict_to: RestrictTo = None,
              device: str | torch.device | None = None) -> LLCProblem:
        """Validate the inputs and prepare them (clear errors before any sampling)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_loss_fn(loss_fn)
        names = select_parameters(model, restrict_to)
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        layout = FlatParams.from_model(model, names)
        layout.frozen = {k: v.to(dev) for k, v in layout.frozen.items()}
        theta0 = layout.flatten(model).to(dev)
        data = BatchStream.from_loader(loader, dev)
        loss_at = make_loss(model, layout, loss_fn)
        with torch.no_grad():
            probe = loss_at(theta0, next(data.full_batches())[0])
        if not isinstance(probe, torch.Tensor) or probe.ndim != 0 or not probe.is_floating_point():
            shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
            raise ValueError(f"loss_fn must return a scalar floating-point tensor (a mean minibatch loss), got {shape}")
        check_mean_reduced(loss_at, theta0, next(data.full_batches())[0])
        init_loss = full_data_loss(loss_at, theta0, data)
        if not math.isfinite(init_loss):
            raise ValueError(f"the loss at w* is not finite (L_n(w*) = {init_loss})")
        return cls(layout, theta0, data, loss_at, init_loss, tuple(names) if restrict_to is not None else None, dev)


def resolve_nbeta(config: LLCConfig, problem: LLCProblem) -> tuple[float, str]:
    """(nβ, its convention): the config's value ("given") or the default of its convention."""
    if config.nbeta is not None:
        return config.nbeta, "given"
    return default_nbeta(problem.data.num_samples, problem.data.batch_size, config.nbeta_convention), \
        config.nbeta_convention


def hyperparameters(config: LLCConfig, problem: LLCProblem, num_chains: int) -> dict[str, Any]:
    """The settings a result records: the config's, resolved against the problem (nβ, threshold, data facts)."""
    nbeta, convention = resolve_nbeta(config, problem)
    explode = config.explode_threshold if config.explode_threshold is not None else 100.0 * (
        abs(problem.init_loss) + 1.0)
    return dict(lr=config.lr, localization=config.localization, nbeta=float(nbeta), nbeta_convention=convention,
                num_samples=problem.data.num_samples, batch_size=problem.data.batch_size, sampler=config.sampler,
                sampler_kwargs=dict(config.sampler_kwargs), num_chains=num_chains, num_draws=config.num_draws,
                num_burnin_steps=config.num_burnin_steps, num_steps_bw_draws=config.num_steps_bw_draws,
                seed=config.seed, restrict_to=list(problem.restrict_to) if problem.restrict_to is not None else None,
                num_params=problem.layout.dim, explode_threshold=float(explode), mala_every=config.mala_every,
                init_spread=config.init_spread, model_mode=config.model_mode)


def _chain_ids(config: LLCConfig, chain_ids: Sequence[int] | None) -> list[int]:
    ids = list(range(config.num_chains)) if chain_ids is None else [int(c) for c in chain_ids]
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise ValueError(f"chain_ids must be distinct non-negative integers, got {chain_ids!r}")
    return ids


def _run_blocks(problem: LLCProblem, config: LLCConfig, hp: dict[str, Any], ids: list[int], progress: bool,
                make_hook: Callable[[], DrawHook] | None = None, start: torch.Tensor | None = None
                ) -> tuple[list[ChainOutput], BatchedLossGrad]:
    """All chains, ``chain_chunk_size`` at a time, through one step interface; with ``make_hook`` each block gets
    its own per-draw hook (the engine's ``on_draw``); ``start`` (len(ids), D): the chains' starting points."""
    def make_sampler() -> Sampler:
        return Sampler(config.sampler, hp["lr"], hp["localization"], hp["nbeta"], **config.sampler_kwargs)

    loss_grad = BatchedLossGrad(problem.loss_at, vectorize=config.vectorize, compile=config.compile)
    chunk = config.chain_chunk_size or len(ids)
    outputs = []
    for i in range(0, len(ids), chunk):
        hook = make_hook() if make_hook is not None else None
        outputs.append(run_chains(loss_grad, problem.theta0, problem.data.stream(data_seed(config.seed)), make_sampler,
                                  ids[i:i + chunk], config.seed, config.num_draws, config.num_burnin_steps,
                                  config.num_steps_bw_draws, config.mala_every, progress=progress,
                                  init_spread=config.init_spread, fixed_shapes=problem.data.cached, on_draw=hook,
                                  init_theta=None if start is None else start[i:i + chunk]))
    return outputs, loss_grad


def report_paths(loss_grad: BatchedLossGrad, config: LLCConfig, over: str = "chains") -> None:
    """A run that lost its fast path says so (every run: it is a fact about this result); ``over``: what the batch
    holds ("chains", or "(restriction, chain) pairs" for refined runs)."""
    if not loss_grad.vectorized and config.vectorize:
        warnings.warn(f"model could not be vmapped over {over} ({loss_grad.fallback_reason}); ran them in a loop "
                      "instead (slower, same result)", VmapFallbackWarning, stacklevel=4)
    if config.compile and not loss_grad.compiled:
        warnings.warn(f"torch.compile failed ({loss_grad.compile_error}); ran eagerly instead (same result)",
                      CompileFallbackWarning, stacklevel=4)


def sample(problem: LLCProblem, config: LLCConfig, *, chain_ids: Sequence[int] | None = None,
           progress: bool = False, observables: PreparedObservables | None = None,
           keep_draws: bool = False, draw_hook: Callable[[], DrawHook] | None = None) -> LLCResult:
    """One run of the chains ``chain_ids`` (default all) on a prepared problem with the fixed settings ``config``.

    ``observables`` (from :func:`slt_tools.sampling.observables.prepare`) are evaluated at every draw into streaming
    accumulators (``result.observables``; their raw draws too with ``keep_draws``). ``draw_hook`` makes a hook per
    chain block for other per-draw statistics (e.g. :func:`slt_tools.bif`); the caller keeps what it made."""
    if config.lr is None or config.localization is None:
        raise ValueError("sample_llc needs lr and localization; leave them unset only with slt_tools.estimate_llc, "
                         "which calibrates them")
    if config.restrict_to is not None and problem.restrict_to is None:
        raise ValueError("the config restricts sampling but the problem was prepared without restrict_to")
    config.warn_if_risky()
    ids = _chain_ids(config, chain_ids)
    hp = hyperparameters(config, problem, len(ids))
    start = time.perf_counter()
    hooks: list[ObservableHook] = []
    make_hook = draw_hook
    if observables and observables[0]:
        def make_hook() -> DrawHook:
            hooks.append(ObservableHook(observables[0], keep_draws=keep_draws))
            return hooks[-1]
    outputs, loss_grad = _run_blocks(problem, config, hp, ids, progress, make_hook)
    trace = torch.cat([o.loss_trace for o in outputs]).double().cpu().numpy()
    wall = time.perf_counter() - start
    report_paths(loss_grad, config)
    mala = None
    if outputs[0].mala_count:
        mala = torch.cat([o.mala_sum / max(o.mala_count, 1) for o in outputs]).double().cpu().numpy()
    extra: dict[str, Any] = dict(vectorized=loss_grad.vectorized, fallback_reason=loss_grad.fallback_reason,
                                 device=str(problem.device), compiled=loss_grad.compiled,
                                 compile_error=loss_grad.compile_error, wall_time_s=wall,
                                 data_cached=problem.data.cached, steps_run=min(o.steps_run for o in outputs))
    if config.init_spread > 0:
        extra["start_distance"] = torch.cat([o.start_distance for o in outputs]).double().cpu().tolist()
    extra.update(_drift_record(outputs))
    result = summarize(trace, problem.init_loss, hp, ids, mala, config.on_divergence, extra)
    if hooks:
        assert observables is not None
        result.observables = summarize_observables(hooks, observables[1])
    return result


@dataclass
class RawRun:
    """One run's raw output (:func:`run_raw`): losses at the draws (C × draws), MALA acceptance per chain (or None),
    the chains' final state (C × D, to continue them), the resolved hyperparameters and run facts."""

    loss_trace: Any
    mala: Any
    final_theta: torch.Tensor
    hyperparameters: dict[str, Any]
    extra: dict[str, Any]


def run_raw(problem: LLCProblem, config: LLCConfig, chain_ids: Sequence[int], *, start: torch.Tensor | None = None,
            progress: bool = False) -> RawRun:
    """The chains ``chain_ids`` with the fixed settings ``config`` from ``start`` (len(chain_ids) × D; default w*,
    or ``config.init_spread``'s overdispersed start), unsummarised: the caller splits or continues them (the
    self-calibrating driver runs its overdispersed probe chains in the same batch and extends runs by continuing
    their chains, :mod:`slt_tools.sampling.auto`). ``summarize(run.loss_trace[rows], ...)`` gives an
    :class:`LLCResult` of any subset."""
    ids = _chain_ids(config, chain_ids)
    hp = hyperparameters(config, problem, len(ids))
    t0 = time.perf_counter()
    outputs, loss_grad = _run_blocks(problem, config, hp, ids, progress, None, start)
    trace = torch.cat([o.loss_trace for o in outputs]).double().cpu().numpy()
    final = torch.cat([o.final_theta for o in outputs])
    report_paths(loss_grad, config)
    mala = None
    if outputs[0].mala_count:
        mala = torch.cat([o.mala_sum / max(o.mala_count, 1) for o in outputs]).double().cpu().numpy()
    extra = dict(vectorized=loss_grad.vectorized, fallback_reason=loss_grad.fallback_reason,
                 device=str(problem.device), compiled=loss_grad.compiled, compile_error=loss_grad.compile_error,
                 wall_time_s=time.perf_counter() - t0, data_cached=problem.data.cached,
                 steps_run=min(o.steps_run for o in outputs), **_drift_record(outputs))
    return RawRun(trace, mala, final, hp, extra)


def _drift_record(outputs: Sequence[Any]) -> dict[str, Any]:
    """``{"mean_sq_drift": [per chain E‖∇U_B‖² over the draw phase's MALA points]}`` (empty without MALA points):
    the input of :func:`slt_tools.sampling.result.step_bias_bound`."""
    if not all(o.drift_count for o in outputs):
        return {}
    return {"mean_sq_drift": torch.cat([o.drift_sq_sum / o.drift_count for o in outputs]).double().cpu().tolist()}


def overdispersed_starts(problem: LLCProblem, config: LLCConfig, chain_ids: Sequence[int]) -> torch.Tensor:
    """The starting points a run with ``config.init_spread`` > 0 gives chains ``chain_ids``
    (:func:`slt_tools.sampling.engine.overdispersed_start`, directions from each chain's own noise stream), for
    :func:`run_raw`'s ``start`` when only some chains of a batch start overdispersed."""
    from slt_tools.sampling.engine import overdispersed_start
    from slt_tools.sampling.noise import NoisePool

    ids = _chain_ids(config, chain_ids)
    hp = hyperparameters(config, problem, len(ids))
    theta0 = problem.theta0
    sampler = Sampler(config.sampler, hp["lr"], hp["localization"], hp["nbeta"], **config.sampler_kwargs)
    pool = NoisePool(ids, config.seed, theta0.shape[-1], theta0.device, theta0.dtype)
    direction = pool().clone().mul_(config.init_spread / sampler.localization ** 0.5)
    loss_grad = BatchedLossGrad(problem.loss_at, vectorize=config.vectorize)
    batch = next(problem.data.stream(data_seed(config.seed)))
    return overdispersed_start(loss_grad, theta0, batch, sampler, direction)


class ModeWarning(RuntimeWarning):
    """Sampling in train mode with modules whose train-mode loss is not a function of w alone."""


@contextmanager
def model_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Put every module of ``model`` in ``mode`` ("eval"/"train") for the block; restore each module's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(mode == "train")
    if mode == "train":
        kinds = sorted({type(m).__name__ for m in model.modules()
                        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))})
        if kinds:
            warnings.warn(f"sampling in train mode with {', '.join(kinds)}: dropout draws fresh masks per chain and "
                          "step, BatchNorm normalises by each minibatch (and cannot be vmapped: chains then run in a "
                          "loop), so the sampled loss is not L_n(w); the default model_mode='eval' avoids both",
                          ModeWarning, stacklevel=4)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def sample_llc(model: nn.Module, loader: Any, loss_fn: LossFn, config: LLCConfig, *,
               chain_ids: Sequence[int] | None = None, device: str | torch.device | None = None,
               progress: bool = False, logger: Any = None,
               observables: Mapping[str, ObservableFn] | Sequence[Observable] | None = None,
               keep_draws: bool = False) -> LLCResult:
    """λ̂(w*) of ``model`` at its current weights from one run with the fixed settings ``config`` (``lr`` and
    ``localization`` set). The model is not modified. See :func:`slt_tools.estimate_llc` for the arguments.

    ``observables`` (``{name: fn(model) -> tensor}`` or :class:`~slt_tools.sampling.observables.Observable` objects,
    e.g. :func:`~slt_tools.sampling.observables.per_sample_loss`) are evaluated at every draw; their streaming
    statistics are ``result.observables[name]`` (:mod:`slt_tools.sampling.observables`)."""
    with model_mode(model, config.model_mode):
        problem = LLCProblem.build(model, loader, loss_fn, config.restrict_to, device)
        prepared = prepare_observables(model, problem.layout, problem.theta0, observables) if observables else None
        result = sample(problem, config, chain_ids=chain_ids, progress=progress, observables=prepared,
                        keep_draws=keep_draws)
    if logger is not None:
        logger.log_llc(result)
    return result
