"""Self-calibration of the SGLD step size ε and localization γ from measured diagnostics.

The rule (documented in docs/calibration.md, with the measurements behind it):

1. **nβ is not tuned.** It fixes the temperature, i.e. *which* quantity is estimated; the default is n / log n
   (Lau et al. 2023, Watanabe's WBIC temperature β* = 1/log n).
2. **γ: the smallest stable localization.** Localization biases λ̂ downwards in directions whose curvature nβ·h is not
   ≫ γ, so smaller is better — as long as the chains stay local. Candidates γ ∈ ``gammas`` (default 1, 10, 100, 1000)
   are tried from small to large; the first whose pilot chains are healthy (below) is kept.
3. **ε: the largest step with a small discretisation error.** For each γ, ε runs down a log grid (factor ``step``)
   from ``max_lr``. Pilot chains (``pilot_chains`` × ``pilot_steps``) reject a setting if any chain diverges, if the
   MALA acceptance probability of the SGLD proposals is below ``min_acceptance`` (0.95; Lau et al. use the MALA
   acceptance to flag a step size whose Euler discretisation bias is no longer small), if more than half the draws
    fall below L_n(w*)
   (w* is then not a local minimum at this scale), if λ̂ ≤ 0, or if the Stein bound on the step-size bias
   (ε/8)(E‖∇U_B‖² − dγ) (:func:`slt_tools.sampling.result.step_bias_bound`) exceeds ``max_step_bias`` (2 %) of λ̂ —
   MALA acceptance ≥ 0.95 still let a DLN at n = 1e4 read +9 % above its HMC reference; the bound, measured along
   the pilot's draws, saw 4.3 % there (it is first order, so it reads up to ≈ 2× low near the stability limit:
   2 % keeps the bias within ≈ 4 %). The largest surviving ε mixes fastest, and a second
   pilot at ε/``step`` checks that λ̂ has reached its small-ε plateau (agreement within ``plateau_tol`` or 3 standard
   errors); otherwise the smaller step is taken.
4. **Length from relaxation.** The pilot's integrated autocorrelation time τ of the λ̂ trace sets the burn-in
   (≥ 10 τ) and a number of draws giving ≥ ``min_ess`` effective draws per chain.
5. **Convergence check after the fact** (in :mod:`slt_tools.sampling.auto`): if the final trace still drifts, the run
   is extended (×2, up to ``max_extensions`` times); if it never settles, ``diagnostics["converged"]`` is False and a
   warning says so — slowly relaxing, highly degenerate points are reported, not passed off as answers.

Calibration cost: pilots (at most ``num_chains`` chains each, so a pilot step costs at most a final step) share a
budget of ``budget_fraction`` × (sequential steps of the final estimate) and stop early; ``Calibration.sgld_steps``
counts the sequential steps spent.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from slt_tools.sampling.config import LLCConfig
from slt_tools.sampling.diagnostics import effective_sample_size
from slt_tools.sampling.estimate import LLCProblem, sample
from slt_tools.sampling.result import Calibration, CalibrationCandidate, LLCDivergenceError, LLCResult


class CalibrationError(RuntimeError):
    """No candidate setting passed the checks (e.g. the loss diverges for every step size)."""


def _verdict(res: Any, min_acceptance: float, max_step_bias: float = math.inf) -> str | None:
    d = res.diagnostics
    if d.get("num_diverged", 0):
        return f"{d['num_diverged']} chain(s) diverged"
    acc = d.get("mala_acceptance", float("nan"))
    if math.isfinite(acc) and acc < min_acceptance:
        return f"MALA acceptance {acc:.2f} < {min_acceptance}"
    if d.get("frac_below_init", 0.0) > 0.5:
        return f"{100 * d['frac_below_init']:.0f}% of draws below L_n(w*)"
    if not math.isfinite(res.llc_mean) or res.llc_mean <= 0:
        return f"λ̂ = {res.llc_mean:.3g} ≤ 0"
    rel = d.get("step_bias_bound_rel")
    # (a pilot still relaxing reads λ̂ low, so the ratio errs towards a smaller step; at a rank-cut DLN that left the
    # flat directions too slow for the SGLD checks to notice — the driver's flat-direction verification catches it)
    if rel is not None and math.isfinite(rel) and rel > max_step_bias:
        return f"Stein step-bias bound {100 * rel:.1f}% of λ̂ > {100 * max_step_bias:g}%"
    return None



@dataclass(frozen=True)
class CalibrationSettings:
    """The rule's knobs (module docstring): γ candidates, the ε grid (``max_lr`` down to ``min_lr`` by factors of
    ``step``), pilot size and length, acceptance threshold, plateau tolerance, effective draws wanted, budget."""

    gammas: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
    max_lr: float = 1e-2
    min_lr: float = 1e-9
    step: float = 3.0
    pilot_chains: int = 4
    pilot_steps: int | None = None
    min_acceptance: float = 0.95
    max_step_bias: float = 0.02
    plateau_tol: float = 0.05
    min_ess: float = 50.0
    budget_fraction: float = 1.0

    def lr_grid(self, lr: float | None) -> list[float]:
        if lr is not None:
            return [lr]
        return list(self.max_lr / self.step ** np.arange(0, int(math.log(self.max_lr / self.min_lr, self.step)) + 1))

    def pilot_length(self, num_draws: int) -> int:
        """Pilot steps: pilots total ≈ 5.3 × this, plus 60-step screens, within ``budget_fraction`` of the run."""
        return self.pilot_steps or int(max(100, min(2000, self.budget_fraction * max(num_draws, 200) / 8)))


class _Pilots:
    """Runs pilot chains for candidate (ε, γ) and keeps the record (candidates, SGLD steps spent)."""

    def __init__(self, problem: LLCProblem, config: LLCConfig, settings: CalibrationSettings) -> None:
        self.problem, self.settings = problem, settings
        # cost is counted in sequential SGLD steps: a step of ≤ num_chains pilot chains costs at most one final step
        self.base = config.replace(num_chains=max(1, min(settings.pilot_chains, config.num_chains)),
                                   seed=config.seed + 7919, on_divergence="exclude", mala_every=10, init_spread=0.0,
                                   chain_chunk_size=None, compile=False, num_burnin_steps=0,
                                   num_steps_bw_draws=1)
        self.candidates: list[CalibrationCandidate] = []
        self.spent = 0

    def _sample(self, **changes: Any) -> LLCResult:
        return sample(self.problem, self.base.replace(**changes))

    def run(self, eps: float, gamma: float, length: int) -> tuple[LLCResult | None, str | None]:
        """A 60-step screen (MALA every 3 steps: most bad step sizes fail here), then a pilot of ``length`` draws
        after ``length // 3`` burn-in; (result, why rejected or None)."""
        burn, min_acc = length // 3, self.settings.min_acceptance
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.spent += 60
                screen = self._sample(lr=eps, localization=gamma, num_draws=60, mala_every=3)
                why = _verdict(screen, min_acc)
                if why is not None and ("diverged" in why or "acceptance" in why):
                    self.candidates.append(CalibrationCandidate(
                        eps, gamma, f"rejected (screen): {why}",
                        mala_acceptance=screen.diagnostics.get("mala_acceptance")))
                    return None, why
                self.spent += length + burn
                res = self._sample(lr=eps, localization=gamma, num_draws=length, num_burnin_steps=burn)
            except LLCDivergenceError as exc:
                self.candidates.append(CalibrationCandidate(eps, gamma, f"rejected: {exc}"))
                return None, "diverged"
        why = _verdict(res, min_acc, self.settings.max_step_bias)
        d = res.diagnostics
        self.candidates.append(CalibrationCandidate(
            eps, gamma, "ok" if why is None else f"rejected: {why}", llc_mean=res.llc_mean, llc_sem=res.llc_sem,
            mala_acceptance=d.get("mala_acceptance"), frac_below_init=d.get("frac_below_init"),
            stationary=d.get("stationary")))
        return res, why


def _plateau_check(pilots: _Pilots, res: LLCResult, eps: float, smaller: float, gamma: float, length: int
                   ) -> tuple[float, LLCResult, str]:
    """Compare λ̂ at ε with ε/step at the same diffusion time ε·steps; take the smaller step if λ̂ moved."""
    s = pilots.settings
    res2, why2 = pilots.run(smaller, gamma, int(length * s.step))
    reason = "largest step size passing divergence, MALA-acceptance and minimum checks"
    if res2 is None or why2 is not None:
        return eps, res, reason
    gap = abs(res.llc_mean - res2.llc_mean)
    tol = max(s.plateau_tol * abs(res2.llc_mean), 3 * math.hypot(res.llc_sem or 0, res2.llc_sem or 0))
    if gap > tol:
        return smaller, res2, (f"ε = {eps:.3g} passed the checks but λ̂ moved by {gap:.3g} (> {tol:.3g}) at "
                               f"ε/{s.step:g}: not yet on the small-ε plateau, took the smaller step")
    return eps, res, reason + f"; λ̂ agrees with ε/{s.step:g} within {tol:.3g} (small-ε plateau)"


def calibrate(problem: LLCProblem, config: LLCConfig, settings: CalibrationSettings | None = None,
              max_steps: int | None = None) -> Calibration:
    """Choose the unset ε and γ of ``config`` on a prepared problem (module docstring); :class:`CalibrationError`
    if no setting passes, or if the pilots have spent ``max_steps`` sequential SGLD steps before one did."""
    s = settings or CalibrationSettings()
    t0 = time.perf_counter()
    lrs = s.lr_grid(config.lr)
    gammas = [config.localization] if config.localization is not None else list(s.gammas)
    pilots = _Pilots(problem, config, s)
    length = s.pilot_length(config.num_draws)
    for gamma in gammas:
        for i, eps in enumerate(lrs):
            if max_steps is not None and pilots.spent >= max_steps:
                raise CalibrationError(f"calibration spent its share of the budget ({pilots.spent} ≥ {max_steps} "
                                       "SGLD steps) before a setting passed; raise budget_steps or set lr and "
                                       "localization")
            res, why = pilots.run(eps, gamma, length)
            if why is not None or res is None:
                continue
            chosen, reason = eps, "largest step size passing divergence, MALA-acceptance and minimum checks"
            if config.lr is None and i + 1 < len(lrs):
                chosen, res, reason = _plateau_check(pilots, res, eps, lrs[i + 1], gamma, length)
            tau = max(1.0, float(np.median([len(t) / max(effective_sample_size(t), 1e-9) for t in res.llc_trace])))
            burnin = int(max(10 * tau, 100))
            draws = int(min(max(config.num_draws, math.ceil(s.min_ess * tau)), 20 * max(config.num_draws, 200)))
            return Calibration(chosen, gamma, config.nbeta, draws, burnin, pilots.candidates,
                               f"γ = {gamma:g}: smallest localization with a healthy setting; ε = {chosen:.3g}: "
                               f"{reason}; autocorrelation time τ ≈ {tau:.0f} draws → burn-in {burnin}, "
                               f"{draws} draws", time.perf_counter() - t0, pilots.spent)
    raise CalibrationError("no (lr, localization) setting passed the checks — " +
                           "; ".join(f"ε={c.lr:.2g}, γ={c.localization:g}: {c.verdict}"
                                     for c in pilots.candidates[-6:]) + ". Is w* a trained (near-critical) point, "
                           "and is the loss finite and well scaled?")


def calibrate_llc(model: Any, loader: Any, loss_fn: Any, config: LLCConfig | None = None, *, device: Any = None,
                  settings: CalibrationSettings | None = None, **kwargs: Any) -> Calibration:
    """Choose ε (``lr``) and γ (``localization``) for :func:`slt_tools.estimate_llc` — see the module docstring.

    ``config`` (or LLC settings as keywords: ``lr``, ``localization``, ``nbeta``, ``sampler``, ``sampler_kwargs``,
    ``num_chains``, ``num_draws``, ``seed``, …) is the run to calibrate for: values it fixes are kept, only the unset
    ones are chosen, and the pilots use its sampler with its ``sampler_kwargs``. The rule's own knobs
    (``gammas``, ``max_lr``, ``pilot_chains``, …) may be passed as keywords too or as ``settings``.
    """
    knob_names = {f.name for f in fields(CalibrationSettings)}
    knobs = {k: kwargs.pop(k) for k in list(kwargs) if k in knob_names}
    if knobs:
        settings = dataclasses.replace(settings or CalibrationSettings(), **knobs)
    config = LLCConfig.from_kwargs(config, **kwargs)
    problem = LLCProblem.build(model, loader, loss_fn, config.restrict_to, device)
    return calibrate(problem, config, settings)
