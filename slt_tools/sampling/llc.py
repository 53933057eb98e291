"""Local learning coefficient (LLC) estimation with batched SGMCMC chains.

Lau, Furman, Wang, Murfet, Wei, "The Local Learning Coefficient: A Singularity-Aware Complexity Measure"
(arXiv 2308.12108). At trained weights w*, sample the localised tempered posterior

    p(w) ∝ exp(−nβ·L_n(w) − (γ/2)‖w − w*‖²)

and estimate  λ̂(w*) = nβ · (E_p[L_n(w)] − L_n(w*)).  As in the authors' code, E_p[L_n] averages the minibatch loss
L_B at each draw and L_n(w*) is the full-data loss. Default inverse temperature nβ = n / log n with n the number of
training samples ("dataset" convention, as in the paper); devinterp's default uses the batch size m instead
(``nbeta_convention="batch"``: nβ = m / log m). Each chain gives its own λ̂_c; we report their mean, standard deviation,
standard error and convergence diagnostics.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from slt_tools.sampling.data import BatchStream
from slt_tools.sampling.diagnostics import summarize_chains
from slt_tools.sampling.engine import ChainOutput, data_seed, run_chains
from slt_tools.sampling.functional import (
    BatchedLossGrad,
    FlatParams,
    LossFn,
    RestrictTo,
    make_loss,
    select_parameters,
)
from slt_tools.sampling.samplers import SAMPLERS, Sampler


class LLCDivergenceError(RuntimeError):
    """Raised when SGMCMC chains diverge (NaN/inf or exploding loss) and the caller asked not to keep going."""


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _as_float_array(x: Any) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in x] if x and isinstance(x[0], list)
                    else [np.nan if v is None else v for v in x], dtype=float)


@dataclass
class LLCResult:
    """An LLC estimate: per-chain values, traces, hyperparameters and diagnostics.

    ``llc_mean``/``llc_std``/``llc_sem`` are over the chains kept (diverged chains are excluded only when the
    caller asked for it; they are listed in ``diagnostics["excluded_chains"]``). ``loss_trace`` holds every chain's
    minibatch loss at each draw (chains × draws); ``llc_per_chain[c] = nβ·(mean_t loss_trace[c, t] − init_loss)``.
    """

    llc_mean: float
    llc_std: float
    llc_sem: float
    llc_per_chain: np.ndarray
    loss_trace: np.ndarray
    init_loss: float
    hyperparameters: dict[str, Any]
    diagnostics: dict[str, Any]
    chain_ids: list[int] = field(default_factory=list)

    @property
    def llc_trace(self) -> np.ndarray:
        """nβ·(L_B(w_t) − L_n(w*)) per chain and draw: the running quantity whose mean is λ̂."""
        return self.hyperparameters["nbeta"] * (self.loss_trace - self.init_loss)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (non-finite floats become None)."""
        return _json_safe(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LLCResult:
        d = dict(d)
        d["llc_per_chain"] = _as_float_array(d["llc_per_chain"])
        d["loss_trace"] = _as_float_array(d["loss_trace"])
        for key in ("llc_mean", "llc_std", "llc_sem", "init_loss"):
            d[key] = float("nan") if d[key] is None else float(d[key])
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> LLCResult:
        return cls.from_dict(json.loads(s))

    def __repr__(self) -> str:
        return (f"LLCResult(llc={self.llc_mean:.4g} ± {self.llc_std:.2g} (sem {self.llc_sem:.2g}), "
                f"chains={len(self.llc_per_chain)}, init_loss={self.init_loss:.4g})")


def summarize(
    loss_trace: np.ndarray,
    init_loss: float,
    hyperparameters: dict[str, Any],
    chain_ids: Sequence[int],
    mala: np.ndarray | None = None,
    on_divergence: str = "raise",
    extra_diagnostics: dict[str, Any] | None = None,
    warn: bool = True,
) -> LLCResult:
    """Turn raw chain traces into an :class:`LLCResult`: per-chain λ̂, diagnostics, divergence policy, warnings."""
    nbeta = float(hyperparameters["nbeta"])
    diag = summarize_chains(loss_trace, init_loss, nbeta, hyperparameters["explode_threshold"], mala)
    diag.update(extra_diagnostics or {})
    diverged = np.array(diag["per_chain"]["diverged"], dtype=bool)
    with np.errstate(invalid="ignore"):
        per_chain = nbeta * (np.nanmean(np.where(np.isfinite(loss_trace), loss_trace, np.nan), axis=1) - init_loss)
    per_chain[diverged] = np.nan
    if diverged.any():
        which = [int(c) for c, d in zip(chain_ids, diverged) if d]
        msg = (f"{len(which)} of {len(diverged)} SGMCMC chains diverged (chains {which}: "
               f"{sum(diag['per_chain']['nonfinite'])} with NaN/inf loss, {sum(diag['per_chain']['exploded'])} with "
               f"loss above L_n(w*) + {hyperparameters['explode_threshold']:g}); lr={hyperparameters['lr']:g} is "
               "probably too large or localization too small")
        if on_divergence == "raise" or diverged.all():
            raise LLCDivergenceError(msg + ("; every chain diverged" if diverged.all() else
                                            "; pass on_divergence='exclude' to drop them"))
        if warn:
            warnings.warn(msg + "; excluded from the estimate", RuntimeWarning, stacklevel=3)
    diag["excluded_chains"] = [int(c) for c, d in zip(chain_ids, diverged) if d]
    kept = per_chain[~diverged]
    mean = float(kept.mean())
    std = float(kept.std(ddof=1)) if len(kept) > 1 else float("nan")
    sem = std / math.sqrt(len(kept)) if len(kept) > 1 else float("nan")
    if warn and mean < 0:
        warnings.warn(f"λ̂ = {mean:.4g} < 0: w* is not a local minimum of the loss (draws fall below L_n(w*) "
                      f"{100 * diag.get('frac_below_init', float('nan')):.0f}% of the time); train further or "
                      "increase localization", RuntimeWarning, stacklevel=3)
    if warn and not diag["stationary"]:
        warnings.warn("LLC trace has not settled: " + "; ".join(diag["not_stationary_reasons"]) +
                      " — use more draws/burn-in or a larger lr; see result.diagnostics", RuntimeWarning, stacklevel=3)
    return LLCResult(mean, std, sem, per_chain, loss_trace, float(init_loss), dict(hyperparameters), diag,
                     [int(c) for c in chain_ids])


def combine_results(parts: Sequence[LLCResult], on_divergence: str = "raise", warn: bool = True) -> LLCResult:
    """Merge results of disjoint chain blocks of one run (same w*, data, hyperparameters) into one result."""
    if not parts:
        raise ValueError("combine_results needs at least one result")
    hp = {k: v for k, v in parts[0].hyperparameters.items() if k != "chain_ids"}
    for p in parts[1:]:
        if {k: v for k, v in p.hyperparameters.items() if k != "chain_ids"} != hp or p.init_loss != parts[0].init_loss:
            raise ValueError("cannot combine LLC results from different runs (hyperparameters or init_loss differ)")
    order = np.argsort(np.concatenate([p.chain_ids for p in parts]), kind="stable")
    ids = list(np.concatenate([p.chain_ids for p in parts])[order])
    if len(set(ids)) != len(ids):
        raise ValueError("cannot combine LLC results: chain ids overlap")
    trace = np.concatenate([p.loss_trace for p in parts])[order]
    mala_parts = [p.diagnostics["per_chain"].get("mala_acceptance") for p in parts]
    mala = None if any(m is None for m in mala_parts) else np.concatenate(mala_parts)[order]
    keep = ("vectorized", "fallback_reason", "device", "compiled")
    extra = {k: parts[0].diagnostics[k] for k in keep if k in parts[0].diagnostics}
    extra["wall_time_s"] = float(sum(p.diagnostics.get("wall_time_s", 0.0) for p in parts))
    return summarize(trace, parts[0].init_loss, {**hp, "num_chains": len(ids)}, ids, mala, on_divergence, extra,
                     warn=warn)


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if v is None or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")


def default_nbeta(num_samples: int, batch_size: int, convention: str = "dataset") -> float:
    """nβ = n / log n (``"dataset"``, n = number of training samples) or m / log m (``"batch"``, devinterp)."""
    if convention not in ("dataset", "batch"):
        raise ValueError(f"nbeta_convention must be 'dataset' or 'batch', got {convention!r}")
    k = num_samples if convention == "dataset" else batch_size
    if k < 2:
        raise ValueError(f"nβ = k/log k needs k ≥ 2 samples, got k = {k} ({convention} convention)")
    return k / math.log(k)


def full_data_loss(loss_at: Any, theta: torch.Tensor, data: BatchStream) -> float:
    """L_n(w) = Σ_batches |B|·L_B(w) / n — the exact mean loss when ``loss_fn`` returns a per-batch mean (evaluated in
    batches of 8× the sampling batch: no gradients are kept, so the memory is that of a forward pass)."""
    with torch.no_grad():
        total = sum(loss_at(theta, batch).double() * size for batch, size in data.full_batches(batch_factor=8))
    return float(total) / data.num_samples


#: scale of the convergence probe's overdispersed start, in units of the localising Gaussian's std γ^{-1/2}.
#: Measured (experiments/calibration_study.py): at 1 the start is so far out that relaxing back takes longer than the
#: run even at healthy points; at 0.1 a rank-cut DLN (4,4,4,4) was passed as converged at λ̂ = 4.0 < Aoyagi's 6.5;
#: 0.3 flags it and the (6,6,6,6,6) point and lets the healthy DLN suite through.
PROBE_SPREAD = 0.3


def _overdispersed_probe(model: nn.Module, loader: Any, loss_fn: LossFn, main: LLCResult, num_chains: int,
                         draws: int, burnin: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run chains from an overdispersed start (``init_spread=PROBE_SPREAD``) with the settings of ``main`` and compare.

    Chains from w* approach the localised posterior from inside (their loss rises), chains from
    w* + N(0, PROBE_SPREAD²·γ⁻¹I) from outside in the flat directions (their loss falls): agreement of the two λ̂
    (within 10 %, or 3 standard errors with the main chains' spread as the noise model) is evidence both reached the
    posterior; disagreement means the run is too short for the slowest directions (Gelman & Rubin 1992).
    """
    k = min(max(2, num_chains // 2), 8)
    ids = [1_000_000 + c for c in range(k)]
    probe_kw = {**kwargs, "num_chains": k, "chain_ids": ids, "on_divergence": "exclude", "chain_chunk_size": None}
    try:
        res = estimate_llc(model, loader, loss_fn, num_draws=draws, num_burnin_steps=burnin, init_spread=PROBE_SPREAD,
                           **probe_kw)
    except LLCDivergenceError as exc:
        return {"llc_mean": float("nan"), "llc_sem": float("nan"), "num_chains": k, "agrees": False,
                "why": f"every overdispersed chain diverged ({exc})"}
    gap = res.llc_mean - main.llc_mean
    # under "both have converged" the probe chains are draws like the main chains: the main chains' spread is the
    # noise model (a probe of 2-4 chains cannot estimate its own spread reliably)
    kept = int(np.isfinite(res.llc_per_chain).sum())
    spread = main.llc_std if math.isfinite(main.llc_std) else 0.0
    tol = max(0.1 * abs(main.llc_mean), 3 * spread * math.sqrt(1 / max(kept, 1) + 1 / len(main.llc_per_chain)))
    agrees = bool(math.isfinite(gap) and abs(gap) <= tol)
    why = (f"difference {gap:+.3g} within tolerance {tol:.3g}" if agrees else
           f"difference {gap:+.3g} exceeds tolerance {tol:.3g}: the slowest directions have not relaxed from either "
           f"side (the two values need not bracket the true λ)")
    return {"llc_mean": res.llc_mean, "llc_sem": res.llc_sem, "llc_per_chain": res.llc_per_chain.tolist(),
            "num_chains": k, "num_diverged": res.diagnostics["num_diverged"],
            "start_distance": res.diagnostics.get("start_distance"), "agrees": agrees, "why": why}


def estimate_llc(
    model: nn.Module,
    loader: Any,
    loss_fn: LossFn,
    *,
    num_chains: int = 8,
    num_draws: int = 200,
    num_burnin_steps: int = 0,
    num_steps_bw_draws: int = 1,
    lr: float | None = None,
    localization: float | None = None,
    nbeta: float | None = None,
    nbeta_convention: str = "dataset",
    sampler: str = "sgld",
    sampler_kwargs: dict[str, float] | None = None,
    restrict_to: RestrictTo = None,
    seed: int = 0,
    chain_ids: Sequence[int] | None = None,
    chain_chunk_size: int | None = None,
    device: str | torch.device | None = None,
    vectorize: bool = True,
    mala_every: int = 20,
    explode_threshold: float | None = None,
    on_divergence: str = "raise",
    progress: bool = False,
    logger: Any = None,
    max_extensions: int = 2,
    init_spread: float = 0.0,
    convergence_probe: bool = True,
    compile: bool = False,
) -> LLCResult:
    """Estimate the LLC λ̂(w*) of ``model`` at its current weights w* (see module docstring for the math).

    Args:
        model: the trained network; it is not modified.
        loader: a DataLoader (or any iterable of batches) over the training data; read once and cached on the
            sampling device when possible.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean minibatch loss L_B.
        num_chains, num_draws, num_burnin_steps, num_steps_bw_draws: chain layout (devinterp's names).
        lr: SGLD step size ε. localization: γ. nbeta: nβ (default n/log n, see ``nbeta_convention``).
        sampler: "sgld", "rmsprop_sgld" or "sgnht"; ``sampler_kwargs`` sets alpha/eps (RMSProp), diffusion (SGNHT).
        restrict_to: parameter names or a predicate on names — only these move (weight-refined LLC); the rest stay
            at w*.
        seed: chain c uses noise seeded by (seed, c); all chains share one seeded minibatch order. Bit-identical on
            CPU for the same seed.
        chain_ids: which chains of the run to compute (default ``range(num_chains)``) — for sharding chains.
        chain_chunk_size: advance at most this many chains at once (bounds memory); default all.
        vectorize: vmap over chains (falls back to a loop, with a warning, for models that cannot be vmapped).
        mala_every: every k steps evaluate the MALA acceptance probability of the SGLD proposal (0 disables).
        explode_threshold: a chain whose minibatch loss exceeds L_n(w*) + this is flagged as diverged
            (default 100·(|L_n(w*)| + 1)).
        on_divergence: "raise" (default) raises :class:`LLCDivergenceError`; "exclude" drops diverged chains and
            reports them in ``diagnostics["excluded_chains"]``.
        logger: optional logger with ``log_llc(result)`` (e.g. ``slt_tools.logging.WandbLogger``).
        max_extensions: with automatic calibration (``lr`` or ``localization`` left as None, see
            :func:`slt_tools.sampling.calibration.calibrate_llc`), how many times an unsettled run is doubled before
            it is reported as not converged (``diagnostics["converged"] = False`` and a warning).
        init_spread: 0 (default) starts every chain at w*. s > 0 starts chain c at w* + s_c·u_c with
            u_c ~ N(0, (s²/γ)·I) and s_c ≤ 1 halved until the first drift step contracts (see
            :func:`slt_tools.sampling.engine.overdispersed_start`): with s = 1 the start is overdispersed relative to
            the localised posterior, so such chains approach it from outside. Use burn-in to let them relax.
        compile: run each whole step (vmapped loss, gradient and update rule) as one ``torch.compile``-d graph (same
            results to float rounding; 2.4–5× faster steps on small models, see docs/benchmarks.md). The first call
            per process, model class and chain count compiles (3–35 s measured here); later calls, on any instance of
            the model and with any hyperparameters, reuse the graph — so it pays for long runs and sweeps. Falls back
            to eager mode if compilation fails.
        convergence_probe: with automatic calibration, also run ``min(max(2, num_chains // 2), 8)`` chains from an
            overdispersed start (``init_spread=PROBE_SPREAD`` = 0.3, independent chain ids) for the same length;
            the estimate counts as converged only if they agree with the chains from w* (within 10 % or 3 standard
            errors). Their result is in ``diagnostics["overdispersed_probe"]``; they are not part of λ̂.
    """
    if lr is None or localization is None:
        from slt_tools.sampling.calibration import calibrate_llc

        calib = calibrate_llc(model, loader, loss_fn, lr=lr, localization=localization, nbeta=nbeta,
                              nbeta_convention=nbeta_convention, sampler=sampler, restrict_to=restrict_to, seed=seed,
                              device=device, vectorize=vectorize, num_chains=num_chains, num_draws=num_draws)
        kwargs = dict(num_chains=num_chains, num_steps_bw_draws=num_steps_bw_draws, lr=calib.lr,
                      localization=calib.localization, nbeta=nbeta, nbeta_convention=nbeta_convention,
                      sampler=sampler, sampler_kwargs=sampler_kwargs, restrict_to=restrict_to, seed=seed,
                      chain_ids=chain_ids, chain_chunk_size=chain_chunk_size, device=device, vectorize=vectorize,
                      mala_every=mala_every, explode_threshold=explode_threshold, on_divergence=on_divergence,
                      progress=progress, compile=compile)
        draws, burnin = max(num_draws, calib.num_draws), max(num_burnin_steps, calib.num_burnin_steps)
        pilot = [c for c in calib.candidates if c["lr"] == calib.lr and c.get("llc_mean") is not None]
        previous = (pilot[-1]["llc_mean"], pilot[-1]["llc_sem"] or 0.0) if pilot else None
        extensions, history, probe_history, step_downs = 0, [], [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            while True:
                try:
                    result = estimate_llc(model, loader, loss_fn, num_draws=draws, num_burnin_steps=burnin, **kwargs)
                except LLCDivergenceError as exc:
                    # the pilots' few chains did not see it, the final run's many did: the chosen step is too large
                    # for rare excursions. Step down the calibration grid and rerun (at most 3 times).
                    if lr is not None or len(step_downs) >= 3:
                        raise
                    step_downs.append({"lr": kwargs["lr"], "error": str(exc)})
                    kwargs["lr"] = kwargs["lr"] / 3.0
                    continue
                history.append(result.llc_mean)
                # relaxation check: a longer run (more diffusion time ε·steps) must not move λ̂ — slowly relaxing
                # flat directions show up as an estimate that keeps growing with run length
                settled = result.diagnostics["stationary"]
                if previous is not None:
                    gap = abs(result.llc_mean - previous[0])
                    settled = settled and gap <= max(0.1 * abs(result.llc_mean),
                                                     3 * math.hypot(result.llc_sem, previous[1]))
                if convergence_probe:
                    probe = _overdispersed_probe(model, loader, loss_fn, result, num_chains, draws, burnin, kwargs)
                    probe_history.append(probe)
                    settled = settled and probe["agrees"]
                if settled or extensions >= max_extensions:
                    break
                extensions += 1
                previous = (result.llc_mean, result.llc_sem)
                draws, burnin = 2 * draws, 2 * burnin + draws
        converged = bool(settled)
        result.diagnostics.update(calibration=calib.to_dict(), extensions=extensions, converged=converged,
                                  llc_by_run_length=history)
        if probe_history:
            result.diagnostics["overdispersed_probe"] = probe_history[-1]
            result.diagnostics["overdispersed_llc_by_run_length"] = [p["llc_mean"] for p in probe_history]
        result.hyperparameters["calibrated"] = True
        if step_downs:
            result.diagnostics["lr_reduced_after_divergence"] = step_downs
        if not converged:
            reasons = list(result.diagnostics["not_stationary_reasons"])
            if len(history) > 1 or pilot:
                reasons.append("λ̂ kept changing as the run got longer: " + " → ".join(
                    f"{v:.3g}" for v in ([pilot[-1]["llc_mean"]] if pilot else []) + history))
            if probe_history and not probe_history[-1]["agrees"]:
                p = probe_history[-1]
                reasons.append(f"chains started away from w* (w* + N(0, {PROBE_SPREAD ** 2:g}·γ⁻¹I)) settle at λ̂ = "
                               f"{p['llc_mean']:.4g} against {result.llc_mean:.4g} from w* — {p['why']}")
            warnings.warn(f"LLC estimate did not converge after {extensions} extension(s) to {draws} draws: "
                          + "; ".join(reasons) + f". λ̂ = {result.llc_mean:.4g} is not a trustworthy answer "
                          "(typical of highly degenerate points whose flat directions relax slowly)",
                          RuntimeWarning, stacklevel=2)
        if logger is not None:
            logger.log_llc(result)
        return result
    _check_positive(lr=lr, localization=localization, num_chains=num_chains, num_draws=num_draws,
                    num_steps_bw_draws=num_steps_bw_draws)
    if nbeta is not None:
        _check_positive(nbeta=nbeta)
    if not isinstance(init_spread, (int, float)) or not math.isfinite(init_spread) or init_spread < 0:
        raise ValueError(f"init_spread must be a non-negative finite number, got {init_spread!r}")
    if not isinstance(num_burnin_steps, int) or num_burnin_steps < 0:
        raise ValueError(f"num_burnin_steps must be a non-negative integer, got {num_burnin_steps!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if on_divergence not in ("raise", "exclude"):
        raise ValueError(f"on_divergence must be 'raise' or 'exclude', got {on_divergence!r}")
    if chain_chunk_size is not None:
        _check_positive(chain_chunk_size=chain_chunk_size)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ids = list(range(num_chains)) if chain_ids is None else [int(c) for c in chain_ids]
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise ValueError(f"chain_ids must be distinct non-negative integers, got {chain_ids!r}")

    names = select_parameters(model, restrict_to)
    first_param = next(model.parameters())
    dev = torch.device(device) if device is not None else first_param.device
    layout = FlatParams.from_model(model, names)
    layout.frozen = {k: v.to(dev) for k, v in layout.frozen.items()}
    theta0 = layout.flatten(model).to(dev)
    data = BatchStream.from_loader(loader, dev)
    loss_at = make_loss(model, layout, loss_fn)

    probe_batch = next(data.full_batches())[0]
    with torch.no_grad():
        probe = loss_at(theta0, probe_batch)
    if not isinstance(probe, torch.Tensor) or probe.ndim != 0 or not probe.is_floating_point():
        shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise ValueError(f"loss_fn must return a scalar floating-point tensor (a mean minibatch loss), got {shape}")
    init_loss = full_data_loss(loss_at, theta0, data)
    if not math.isfinite(init_loss):
        raise ValueError(f"the loss at w* is not finite (L_n(w*) = {init_loss})")
    convention = nbeta_convention if nbeta is None else "given"
    if nbeta is None:
        nbeta = default_nbeta(data.num_samples, data.batch_size, nbeta_convention)
    if explode_threshold is None:
        explode_threshold = 100.0 * (abs(init_loss) + 1.0)
    hp = dict(lr=float(lr), localization=float(localization), nbeta=float(nbeta), nbeta_convention=convention,
              num_samples=data.num_samples, batch_size=data.batch_size, sampler=sampler,
              sampler_kwargs=dict(sampler_kwargs or {}), num_chains=len(ids), num_draws=num_draws,
              num_burnin_steps=num_burnin_steps, num_steps_bw_draws=num_steps_bw_draws, seed=int(seed),
              restrict_to=names if restrict_to is not None else None, num_params=layout.dim,
              explode_threshold=float(explode_threshold), mala_every=mala_every, init_spread=float(init_spread))

    def make_sampler() -> Sampler:
        return Sampler(sampler, float(lr), float(localization), float(nbeta), **(sampler_kwargs or {}))

    loss_grad = BatchedLossGrad(loss_at, vectorize=vectorize, compile=compile)
    chunk = chain_chunk_size or len(ids)
    start = time.perf_counter()
    outputs: list[ChainOutput] = []
    for i in range(0, len(ids), chunk):
        block = ids[i : i + chunk]
        out = run_chains(loss_grad, theta0, data.stream(data_seed(seed)), make_sampler, block, seed, num_draws,
                         num_burnin_steps, num_steps_bw_draws, mala_every, progress=progress,
                         init_spread=init_spread, fixed_shapes=data.cached)
        outputs.append(out)
    trace = torch.cat([o.loss_trace for o in outputs]).double().cpu().numpy()
    wall = time.perf_counter() - start
    if not loss_grad.vectorized and vectorize:
        warnings.warn(f"model could not be vmapped over chains ({loss_grad.fallback_reason}); "
                      "ran chains in a loop instead (slower, same result)", RuntimeWarning, stacklevel=2)
    mala = None
    if outputs[0].mala_count:
        mala = torch.cat([o.mala_sum / max(o.mala_count, 1) for o in outputs]).double().cpu().numpy()
    if compile and not loss_grad.compiled:
        warnings.warn(f"torch.compile failed ({loss_grad.compile_error}); ran eagerly instead (same result)",
                      RuntimeWarning, stacklevel=2)
    extra = dict(vectorized=loss_grad.vectorized, fallback_reason=loss_grad.fallback_reason, device=str(dev),
                 compiled=loss_grad.compiled, compile_error=loss_grad.compile_error,
                 wall_time_s=wall, data_cached=data.cached, steps_run=min(o.steps_run for o in outputs))
    if init_spread > 0:
        extra["start_distance"] = torch.cat([o.start_distance for o in outputs]).double().cpu().tolist()
    result = summarize(trace, init_loss, hp, ids, mala, on_divergence, extra)
    if logger is not None:
        logger.log_llc(result)
    return result
