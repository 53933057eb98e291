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
   (w* is then not a local minimum at this scale), or if λ̂ ≤ 0. The largest surviving ε mixes fastest, and a second
   pilot at ε/``step`` checks that λ̂ has reached its small-ε plateau (agreement within ``plateau_tol`` or 3 standard
   errors); otherwise the smaller step is taken.
4. **Length from relaxation.** The pilot's integrated autocorrelation time τ of the λ̂ trace sets the burn-in
   (≥ 10 τ) and a number of draws giving ≥ ``min_ess`` effective draws per chain.
5. **Convergence check after the fact** (in :func:`estimate_llc_calibrated`): if the final trace still drifts, the run
   is extended (×2, up to ``max_extensions`` times); if it never settles, ``diagnostics["converged"]`` is False and a
   warning says so — slowly relaxing, highly degenerate points are reported, not passed off as answers.

Calibration cost: pilots (at most ``num_chains`` chains each, so a pilot step costs at most a final step) share a
budget of ``budget_fraction`` × (sequential steps of the final estimate) and stop early; ``Calibration.sgld_steps``
counts the sequential steps spent.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from slt_tools.sampling.diagnostics import effective_sample_size


@dataclass
class Calibration:
    """Chosen hyperparameters, and every candidate tried with its diagnostics and verdict."""

    lr: float
    localization: float
    nbeta: float | None
    num_draws: int
    num_burnin_steps: int
    candidates: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    wall_time_s: float = 0.0
    sgld_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CalibrationError(RuntimeError):
    """No candidate setting passed the checks (e.g. the loss diverges for every step size)."""


def _verdict(res: Any, min_acceptance: float) -> str | None:
    d = res.diagnostics
    if d.get("num_diverged", 0):
        return f"{d['num_diverged']} chain(s) diverged"
    acc = d.get("mala_acceptance", float("nan"))
    if math.isfinite(acc) and acc < min_acceptance:
        return f"MALA acceptance {acc:.2f} < {min_acceptance}"
    if d.get("frac_below_init", 0) > 0.5:
        return f"{100 * d['frac_below_init']:.0f}% of draws below L_n(w*)"
    if not math.isfinite(res.llc_mean) or res.llc_mean <= 0:
        return f"λ̂ = {res.llc_mean:.3g} ≤ 0"
    return None


def calibrate_llc(
    model: Any,
    loader: Any,
    loss_fn: Any,
    *,
    lr: float | None = None,
    localization: float | None = None,
    nbeta: float | None = None,
    nbeta_convention: str = "dataset",
    sampler: str = "sgld",
    restrict_to: Any = None,
    seed: int = 0,
    device: Any = None,
    vectorize: bool = True,
    num_chains: int = 8,
    num_draws: int = 200,
    gammas: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0),
    max_lr: float = 1e-2,
    min_lr: float = 1e-9,
    step: float = 3.0,
    pilot_chains: int = 4,
    pilot_steps: int | None = None,
    min_acceptance: float = 0.95,
    plateau_tol: float = 0.05,
    min_ess: float = 50.0,
    budget_fraction: float = 1.0,
) -> Calibration:
    """Choose ε (``lr``) and γ (``localization``) for :func:`slt_tools.estimate_llc` — see the module docstring.

    Values the caller fixed (``lr``, ``localization``, ``nbeta``) are kept; only the unset ones are chosen.
    Raises :class:`CalibrationError` if no setting passes.
    """
    from slt_tools.sampling.llc import LLCDivergenceError, estimate_llc

    t0 = time.perf_counter()
    lrs = [lr] if lr is not None else list(max_lr / step ** np.arange(0, int(math.log(max_lr / min_lr, step)) + 1))
    gs = [localization] if localization is not None else list(gammas)
    # cost is counted in sequential SGLD steps: chains advance together, so a step of ≤ num_chains pilot chains costs
    # at most one step of the final run (for small models, where per-step overhead dominates, about the same)
    pilot_chains = max(1, min(pilot_chains, num_chains))
    budget = budget_fraction * max(num_draws, 200)
    steps = pilot_steps or int(max(100, min(2000, budget / 8)))  # pilots total ≈ 5.3 × steps, plus 60-step screens
    common = dict(nbeta=nbeta, nbeta_convention=nbeta_convention, sampler=sampler, restrict_to=restrict_to,
                  seed=seed + 7919, device=device, vectorize=vectorize, num_chains=pilot_chains,
                  on_divergence="exclude", mala_every=10)
    candidates: list[dict[str, Any]] = []
    spent = 0

    def pilot(eps: float, gamma: float, length: int = steps) -> tuple[Any, str | None]:
        nonlocal spent
        burn = length // 3
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                # cheap screen first (60 steps, MALA every 3): most bad step sizes fail here
                spent += 60
                screen = estimate_llc(model, loader, loss_fn, lr=eps, localization=gamma, num_draws=60,
                                      **{**common, "mala_every": 3})
                why = _verdict(screen, min_acceptance)
                if why is not None and ("diverged" in why or "acceptance" in why):
                    candidates.append({"lr": eps, "localization": gamma, "verdict": f"rejected (screen): {why}",
                                       "mala_acceptance": screen.diagnostics.get("mala_acceptance")})
                    return None, why
                spent += length + burn
                res = estimate_llc(model, loader, loss_fn, lr=eps, localization=gamma, num_draws=length,
                                   num_burnin_steps=burn, **common)
            except LLCDivergenceError as exc:
                candidates.append({"lr": eps, "localization": gamma, "verdict": f"rejected: {exc}"})
                return None, "diverged"
        why = _verdict(res, min_acceptance)
        candidates.append({"lr": eps, "localization": gamma, "llc_mean": res.llc_mean, "llc_sem": res.llc_sem,
                           "mala_acceptance": res.diagnostics.get("mala_acceptance"),
                           "frac_below_init": res.diagnostics.get("frac_below_init"),
                           "stationary": res.diagnostics.get("stationary"),
                           "verdict": "ok" if why is None else f"rejected: {why}"})
        return res, why

    for gamma in gs:
        for i, eps in enumerate(lrs):
            res, why = pilot(eps, gamma)
            if why is not None:
                continue
            chosen, reason = eps, "largest step size passing divergence, MALA-acceptance and minimum checks"
            if lr is None and i + 1 < len(lrs):  # plateau check one step smaller
                res2, why2 = pilot(lrs[i + 1], gamma, int(steps * step))  # same diffusion time ε·steps
                if res2 is not None and why2 is None:
                    gap = abs(res.llc_mean - res2.llc_mean)
                    tol = max(plateau_tol * abs(res2.llc_mean), 3 * math.hypot(res.llc_sem or 0, res2.llc_sem or 0))
                    if gap > tol:
                        chosen, res = lrs[i + 1], res2
                        reason = (f"ε = {eps:.3g} passed the checks but λ̂ moved by {gap:.3g} (> {tol:.3g}) at "
                                  f"ε/{step:g}: not yet on the small-ε plateau, took the smaller step")
                    else:
                        reason += f"; λ̂ agrees with ε/{step:g} within {tol:.3g} (small-ε plateau)"
            tau = max(1.0, float(np.median([len(t) / max(effective_sample_size(t), 1e-9) for t in res.llc_trace])))
            burnin = int(max(10 * tau, 100))
            draws = int(min(max(num_draws, math.ceil(min_ess * tau)), 20 * max(num_draws, 200)))
            return Calibration(chosen, gamma, nbeta, draws, burnin, candidates,
                               f"γ = {gamma:g}: smallest localization with a healthy setting; ε = {chosen:.3g}: "
                               f"{reason}; autocorrelation time τ ≈ {tau:.0f} draws → burn-in {burnin}, "
                               f"{draws} draws", time.perf_counter() - t0, spent)
    raise CalibrationError("no (lr, localization) setting passed the checks — " +
                           "; ".join(f"ε={c['lr']:.2g}, γ={c['localization']:g}: {c['verdict']}"
                                     for c in candidates[-6:]) + ". Is w* a trained (near-critical) point, and is "
                           "the loss finite and well scaled?")
