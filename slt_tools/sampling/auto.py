"""``estimate_llc``: the user-facing LLC estimate — calibrate → run → checks → extend, on top of the estimator.

The estimator (:func:`slt_tools.sampling.estimate.sample`) runs chains with fixed settings. This driver adds what a
user who does not want to hand-tune needs (docs/calibration.md):

1. **Calibration** of the unset ε/γ (:mod:`slt_tools.sampling.calibration`), with the burn-in and number of draws
   its pilots' autocorrelation time asks for.
2. **Step-down on divergence**: pilots see few chains; if the final run's many chains diverge, ε is divided by 3 and
   the run repeated (at most 3 times, only for a calibrated ε).
3. **Relaxation checks**: the trace must be stationary, λ̂ must not move when the run is doubled (more diffusion time
   ε·steps), and chains from an overdispersed start w* + N(0, s²γ⁻¹I) (s = :data:`PROBE_SPREAD`) must meet the
   chains from w* (Gelman & Rubin 1992). Failing, the run is doubled up to ``max_extensions`` times; still failing,
   the result says ``diagnostics.converged = False`` with a :class:`NotConvergedWarning`.

Calibration and checks are on by default for self-calibrated runs and off for hand-set ones; ``max_extensions`` /
``convergence_probe`` given explicitly apply to hand-set runs too.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from slt_tools.sampling.calibration import calibrate
from slt_tools.sampling.config import LLCConfig
from slt_tools.sampling.estimate import LLCProblem, model_mode, sample
from slt_tools.sampling.functional import LossFn
from slt_tools.sampling.result import Calibration, LLCDivergenceError, LLCResult, NotConvergedWarning, ProbeRecord

#: scale of the convergence probe's overdispersed start, in units of the localising Gaussian's std γ^{-1/2}.
#: Measured (experiments/calibration_study.py): at 1 the start is so far out that relaxing back takes longer than the
#: run even at healthy points; at 0.1 a rank-cut DLN (4,4,4,4) was passed as converged at λ̂ = 4.0 < Aoyagi's 6.5;
#: 0.3 flags it and the (6,6,6,6,6) point and lets the healthy DLN suite through.
PROBE_SPREAD = 0.3


def overdispersed_probe(problem: LLCProblem, main: LLCResult, config: LLCConfig) -> ProbeRecord:
    """Run chains from an overdispersed start (``init_spread=PROBE_SPREAD``) with the settings of ``main``; compare.

    Chains from w* approach the localised posterior from inside (their loss rises), chains from
    w* + N(0, PROBE_SPREAD²·γ⁻¹I) from outside in the flat directions (their loss falls): agreement of the two λ̂
    (within 10 %, or 3 standard errors with the main chains' spread as the noise model) is evidence both reached the
    posterior; disagreement means the run is too short for the slowest directions.
    """
    k = min(max(2, config.num_chains // 2), 8)
    probe_config = config.replace(num_chains=k, on_divergence="exclude", chain_chunk_size=None,
                                  init_spread=PROBE_SPREAD)
    try:
        res = sample(problem, probe_config, chain_ids=[1_000_000 + c for c in range(k)])
    except LLCDivergenceError as exc:
        return ProbeRecord(num_chains=k, agrees=False, why=f"every overdispersed chain diverged ({exc})")
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
    return ProbeRecord(res.llc_mean, res.llc_sem, k, agrees, why, res.llc_per_chain.tolist(),
                       res.diagnostics.num_diverged, res.diagnostics.start_distance)


@dataclass
class _Checks:
    """What the driver has seen: λ̂ per run length, probe records, step-downs, the previous run's (λ̂, sem)."""

    previous: tuple[float, float] | None
    history: list[float] = field(default_factory=list)
    probes: list[ProbeRecord] = field(default_factory=list)
    step_downs: list[dict[str, Any]] = field(default_factory=list)
    extensions: int = 0

    def settled(self, result: LLCResult, problem: LLCProblem, config: LLCConfig) -> bool:
        """Stationary, not moved by the longer run, and (if enabled) met by the overdispersed probe."""
        self.history.append(result.llc_mean)
        ok = bool(result.diagnostics.stationary)
        if self.previous is not None:
            gap = abs(result.llc_mean - self.previous[0])
            ok = ok and gap <= max(0.1 * abs(result.llc_mean), 3 * math.hypot(result.llc_sem, self.previous[1]))
        if config.probe_enabled:
            self.probes.append(overdispersed_probe(problem, result, config))
            ok = ok and self.probes[-1].agrees
        return ok


def _run_with_step_down(problem: LLCProblem, config: LLCConfig, checks: _Checks, may_step_down: bool,
                        chain_ids: Sequence[int] | None, progress: bool) -> tuple[LLCResult, LLCConfig]:
    """One run; on divergence of a calibrated ε, divide it by 3 and rerun (at most 3 times)."""
    while True:
        try:
            return sample(problem, config, chain_ids=chain_ids, progress=progress), config
        except LLCDivergenceError as exc:
            # the pilots' few chains did not see it, the final run's many did: the step is too large for rare
            # excursions
            if not may_step_down or len(checks.step_downs) >= 3:
                raise
            checks.step_downs.append({"lr": config.lr, "error": str(exc)})
            config = config.replace(lr=config.lr / 3.0)


def _not_converged_message(result: LLCResult, checks: _Checks, pilot: list[Any], draws: int) -> str:
    reasons = list(result.diagnostics.not_stationary_reasons)
    if len(checks.history) > 1 or pilot:
        reasons.append("λ̂ kept changing as the run got longer: " + " → ".join(
            f"{v:.3g}" for v in ([pilot[-1]["llc_mean"]] if pilot else []) + checks.history))
    if checks.probes and not checks.probes[-1].agrees:
        p = checks.probes[-1]
        reasons.append(f"chains started away from w* (w* + N(0, {PROBE_SPREAD ** 2:g}·γ⁻¹I)) settle at λ̂ = "
                       f"{p.llc_mean:.4g} against {result.llc_mean:.4g} from w* — {p.why}")
    return (f"LLC estimate did not converge after {checks.extensions} extension(s) to {draws} draws: "
            + "; ".join(reasons) + f". λ̂ = {result.llc_mean:.4g} is not a trustworthy answer "
            "(typical of highly degenerate points whose flat directions relax slowly)")


def _checked_run(problem: LLCProblem, config: LLCConfig, calib: Calibration | None, may_step_down: bool,
                 chain_ids: Sequence[int] | None, progress: bool) -> LLCResult:
    """Run, check, and double the run until it settles or the extensions are spent; record it all.
    ``may_step_down``: ε was calibrated (not the user's), so a diverging run may retry at ε/3."""
    pilot = [c for c in calib.candidates if c.lr == calib.lr and c.llc_mean is not None] if calib else []
    checks = _Checks((pilot[-1].llc_mean, pilot[-1].llc_sem or 0.0) if pilot else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while True:
            result, config = _run_with_step_down(problem, config, checks, may_step_down, chain_ids, progress)
            settled = checks.settled(result, problem, config)
            if settled or checks.extensions >= config.extensions_allowed:
                break
            checks.extensions += 1
            checks.previous = (result.llc_mean, result.llc_sem)
            config = config.replace(num_draws=2 * config.num_draws,
                                    num_burnin_steps=2 * config.num_burnin_steps + config.num_draws)
    d = result.diagnostics
    d.update(calibration=calib, extensions=checks.extensions, converged=bool(settled),
             llc_by_run_length=checks.history)
    if checks.probes:
        d.update(overdispersed_probe=checks.probes[-1],
                 overdispersed_llc_by_run_length=[p.llc_mean for p in checks.probes])
    if checks.step_downs:
        d.update(lr_reduced_after_divergence=checks.step_downs)
    result.hyperparameters["calibrated"] = calib is not None
    if not settled:
        warnings.warn(_not_converged_message(result, checks, [c.to_dict() for c in pilot], config.num_draws),
                      NotConvergedWarning, stacklevel=3)
    return result


def estimate_llc(model: nn.Module, loader: Any, loss_fn: LossFn, config: LLCConfig | None = None, *,
                 chain_ids: Sequence[int] | None = None, device: str | torch.device | None = None,
                 progress: bool = False, logger: Any = None, **settings: Any) -> LLCResult:
    """Estimate the LLC λ̂(w*) of ``model`` at its current weights w* (math: :mod:`slt_tools.sampling.estimate`).

    Args:
        model: the trained network; it is not modified.
        loader: a DataLoader (or any iterable of batches) over the training data; read once and cached on the
            sampling device when possible.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean minibatch loss L_B.
        config: an :class:`LLCConfig`; keyword ``settings`` (its field names) override it or, without it, build one:
            ``num_chains, num_draws, num_burnin_steps, num_steps_bw_draws`` (devinterp's names), ``lr`` (ε),
            ``localization`` (γ), ``nbeta`` (default n/log n, see ``nbeta_convention``), ``sampler`` ("sgld",
            "rmsprop_sgld", "sgnht") with ``sampler_kwargs`` (alpha/eps, diffusion), ``restrict_to`` (names or a
            predicate: only these move — the weight-refined LLC), ``seed`` (chain c's noise is seeded by
            (seed, c); all chains share one seeded minibatch order; bit-identical on CPU), ``chain_chunk_size``
            (chains advanced at once), ``vectorize`` (vmap over chains, loop fallback with a warning),
            ``mala_every`` (MALA acceptance of the SGLD proposal every k steps, 0 disables), ``explode_threshold``
            (a chain whose loss exceeds L_n(w*) + this diverged; default 100·(|L_n(w*)| + 1)), ``on_divergence``
            ("raise" or "exclude"), ``init_spread`` (s > 0 starts chain c at w* + s_c·u_c, u_c ~ N(0, s²γ⁻¹I), s_c ≤ 1
            halved until the first drift step contracts), ``compile`` (one fused ``torch.compile``-d graph per step;
            the measured speed-up is in docs/benchmarks.md), ``max_extensions`` and ``convergence_probe`` (the
            driver's checks, module docstring).
        chain_ids: which chains of the run to compute (default ``range(num_chains)``) — for sharding chains.
        device: where to sample (default: the model's device). progress: a tqdm bar over steps.
        logger: optional logger with ``log_llc(result)`` (e.g. :class:`slt_tools.WandbLogger`).

    ``lr`` or ``localization`` left unset are calibrated (:func:`slt_tools.calibrate_llc`) and the result is checked
    for convergence; the calibration record is ``result.diagnostics.calibration``.
    """
    config = LLCConfig.from_kwargs(config, **settings)
    with model_mode(model, config.model_mode):
        result = _estimate(model, loader, loss_fn, config, chain_ids, device, progress)
    if logger is not None:
        logger.log_llc(result)
    return result


def _estimate(model: nn.Module, loader: Any, loss_fn: LossFn, config: LLCConfig, chain_ids: Sequence[int] | None,
              device: str | torch.device | None, progress: bool) -> LLCResult:
    """Prepare once, calibrate what is unset, then one plain run or the checked run."""
    problem = LLCProblem.build(model, loader, loss_fn, config.restrict_to, device)
    calib, user_lr = None, config.lr
    if config.calibrated:
        calib = calibrate(problem, config)
        # the checks stay on (as for every calibrated run) once ε and γ are filled in
        config = config.replace(lr=calib.lr, localization=calib.localization,
                                num_draws=max(config.num_draws, calib.num_draws),
                                num_burnin_steps=max(config.num_burnin_steps, calib.num_burnin_steps),
                                max_extensions=config.extensions_allowed, convergence_probe=config.probe_enabled)
    if calib is not None or config.extensions_allowed > 0 or config.probe_enabled:
        return _checked_run(problem, config, calib, calib is not None and user_lr is None, chain_ids, progress)
    return sample(problem, config, chain_ids=chain_ids, progress=progress)
