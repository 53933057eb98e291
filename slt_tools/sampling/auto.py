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
4. **Cost.** The probe chains run as extra rows of the main run's batch (no sequential steps of their own), and a
   doubled run continues the chains of the run before (:class:`_Chains`: only the steps it adds are run), so
   without a γ raise or ε step-down the driver spends calibration + the final run's own steps. (With observables
   or explicit ``chain_ids`` runs are separate, as before: the probe is then a run of its own.)

Calibration and checks are on by default for self-calibrated runs and off for hand-set ones; ``max_extensions`` /
``convergence_probe`` given explicitly apply to hand-set runs too.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from slt_tools.sampling.calibration import calibrate
from slt_tools.sampling.config import LLCConfig, relaxation_steps
from slt_tools.sampling.estimate import LLCProblem, model_mode, overdispersed_starts, run_raw, sample
from slt_tools.sampling.functional import LossFn
from slt_tools.sampling.observables import Observable, ObservableFn
from slt_tools.sampling.observables import prepare as prepare_observables
from slt_tools.sampling.result import (
    Calibration,
    DegeneracyWarning,
    LLCDivergenceError,
    LLCResult,
    LocalizationRaisedWarning,
    NotConvergedWarning,
    ProbeRecord,
    StepSizeWarning,
    summarize,
)

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
    k = probe_chains(config)
    probe_config = config.replace(num_chains=k, on_divergence="exclude", chain_chunk_size=None,
                                  init_spread=PROBE_SPREAD)
    try:
        res = sample(problem, probe_config, chain_ids=[PROBE_CHAIN_OFFSET + c for c in range(k)])
    except LLCDivergenceError as exc:
        return ProbeRecord(num_chains=k, agrees=False, why=f"every overdispersed chain diverged ({exc})")
    return compare_probe(res, main, k)


#: chain ids of the probe chains start here (their noise streams differ from the main chains')
PROBE_CHAIN_OFFSET = 1_000_000


def probe_chains(config: LLCConfig) -> int:
    """Number of overdispersed probe chains: min(max(2, C/2), 8)."""
    return min(max(2, config.num_chains // 2), 8)


def compare_probe(res: LLCResult, main: LLCResult, k: int) -> ProbeRecord:
    """The probe chains' λ̂ against the main chains': agreement within 10 %, or 3 standard errors with the main
    chains' spread as the noise model (under "both have converged" the probe chains are draws like the main chains;
    a probe of 2-4 chains cannot estimate its own spread reliably)."""
    gap = res.llc_mean - main.llc_mean
    kept = int(np.isfinite(res.llc_per_chain).sum())
    if kept == 0:
        return ProbeRecord(num_chains=k, agrees=False, why="every overdispersed chain diverged",
                           num_diverged=res.diagnostics.num_diverged)
    spread = main.llc_std if math.isfinite(main.llc_std) else 0.0
    tol = max(0.1 * abs(main.llc_mean), 3 * spread * math.sqrt(1 / max(kept, 1) + 1 / len(main.llc_per_chain)))
    agrees = bool(math.isfinite(gap) and abs(gap) <= tol)
    why = (f"difference {gap:+.3g} within tolerance {tol:.3g}" if agrees else
           f"difference {gap:+.3g} exceeds tolerance {tol:.3g}: the slowest directions have not relaxed from either "
           f"side (the two values need not bracket the true λ)")
    return ProbeRecord(res.llc_mean, res.llc_sem, k, agrees, why, res.llc_per_chain.tolist(),
                       res.diagnostics.num_diverged, res.diagnostics.start_distance)


#: default budget of one self-calibrated estimate, in sequential SGLD steps (pilots + runs + probes): with
#: the default 8 chains about 30 s on a 100-parameter MLP and 5 min on a 1k-parameter CNN on one CPU core.
DEFAULT_BUDGET_STEPS = 30_000

#: γ candidates the driver may raise the localization to (×10 each, as the calibration grid) ...
RAISE_FACTOR = 10.0
#: ... up to MAX_RAISE × the calibrated γ and never above nβ: a localization stiffer than the tempered loss's unit
#: curvature would suppress every direction with Hessian eigenvalue h < γ/nβ ≥ 1, so λ̂ would say more about γ than
#: about the model (on a rank-cut DLN (4,4,4,4) at n = 1e4 an uncapped raise to γ = 1000 "converged" at λ̂ = 2.7
#: against Aoyagi's 6.5; capped, it is reported as not converged)
MAX_RAISE = 100.0


@dataclass
class _Budget:
    """Sequential SGLD steps and seconds left for one estimate (``LLCConfig.budget_steps`` / ``budget_seconds``)."""

    steps: int
    seconds: float | None
    start: float = field(default_factory=time.perf_counter)
    spent: int = 0
    seconds_per_step: float = 0.0

    def charge(self, steps: int, wall: float | None = None) -> None:
        self.spent += int(steps)
        if wall is not None and steps > 0:
            self.seconds_per_step = max(self.seconds_per_step, wall / steps)

    def allows(self, steps: int) -> bool:
        """Whether ``steps`` more fit: in steps, and in time at the slowest step rate seen so far."""
        if self.spent + steps > self.steps:
            return False
        if self.seconds is None:
            return True
        return time.perf_counter() - self.start + steps * self.seconds_per_step <= self.seconds

    def record(self) -> dict[str, Any]:
        return {"budget_steps": self.steps, "budget_seconds": self.seconds, "steps_spent": self.spent,
                "wall_s": time.perf_counter() - self.start}


class _Status:
    """One progress line for the driver (tqdm; ``progress=None`` shows it only on a terminal)."""

    def __init__(self, progress: bool | None, total: int) -> None:
        self.bar = tqdm(total=total, desc="LLC", unit="step", leave=False,
                        disable=None if progress is None else not progress,
                        bar_format="{desc}: {n_fmt}/{total_fmt} steps of the budget [{elapsed}] {postfix}")

    def say(self, what: str) -> None:
        self.bar.set_postfix_str(what, refresh=True)

    def advance(self, steps: int) -> None:
        self.bar.update(min(steps, max(self.bar.total - self.bar.n, 0)))

    def close(self) -> None:
        self.bar.close()


def _run_steps(config: LLCConfig) -> int:
    return config.num_burnin_steps + config.num_draws * config.num_steps_bw_draws


@dataclass
class _Checks:
    """What the driver has seen: λ̂ per run length, probe records, step-downs, γ raises, the previous run's (λ̂, sem)."""

    previous: tuple[float, float] | None
    budget: _Budget
    status: _Status
    history: list[float] = field(default_factory=list)
    probes: list[ProbeRecord] = field(default_factory=list)
    step_downs: list[dict[str, Any]] = field(default_factory=list)
    raises: list[dict[str, Any]] = field(default_factory=list)
    extensions: int = 0
    cut_short: str | None = None
    calibrated_gamma: float = 1.0
    probed_last: bool = False
    #: the chains of the current run (:class:`_Chains`), when the driver continues runs and batches the probe
    chains: _Chains | None = None

    def settled(self, result: LLCResult, problem: LLCProblem, config: LLCConfig) -> bool:
        """Stationary, not moved by the longer run, and (if enabled) met by the overdispersed probe — run only when the
        other checks pass."""
        self.history.append(result.llc_mean)
        ok = bool(result.diagnostics.stationary)
        if self.previous is not None:
            gap = abs(result.llc_mean - self.previous[0])
            ok = ok and gap <= max(0.1 * abs(result.llc_mean), 3 * math.hypot(result.llc_sem, self.previous[1]))
        self.probed_last = False
        if self.chains is not None:  # the probe ran in the same batch: its record is already there
            return ok and bool(self.probes) and self.probes[-1].agrees
        if config.probe_enabled and ok:  # a run already failing is extended anyway: its probe would be wasted
            if not self.probe(problem, result, config):
                return False
            ok = ok and self.probes[-1].agrees
        return ok

    def fits(self, config: LLCConfig) -> bool:
        """Whether a run with ``config`` and its probe fit the budget left: the steps it adds to the current chains
        when it continues them (same ε and γ), and the probe's only when it is not run in the same batch."""
        if self.chains is None:
            return self.budget.allows(2 * _run_steps(config))
        return self.budget.allows(_run_steps(config) - self.chains.continues(config))

    def probe(self, problem: LLCProblem, result: LLCResult, config: LLCConfig, for_the_record: bool = False) -> bool:
        """Run the overdispersed probe on ``result`` if the budget holds it (False, and — unless it is only
        ``for_the_record`` of a run that failed anyway — the reason, otherwise)."""
        steps = _run_steps(config)
        if not self.budget.allows(steps):
            if not for_the_record:
                self.cut_short = f"the overdispersed probe ({steps} steps) did not fit the budget"
            return False
        self.status.say(f"overdispersed probe, γ={config.localization:g}")
        t0 = time.perf_counter()
        self.probes.append(overdispersed_probe(problem, result, config))
        self.budget.charge(steps, time.perf_counter() - t0)
        self.status.advance(steps)
        self.probed_last = True
        return True


@dataclass
class _Chains:
    """The current run's chains (main rows first, then the overdispersed probe rows, one batch): their state after
    ``steps_done`` steps at (ε, γ), and the wall time those steps took. A longer run with the same ε and γ continues
    them: its draws are the last ``num_draws`` steps of one chain of ``num_burnin_steps + num_draws`` steps, exactly
    the run from scratch, at the cost of the steps not yet done."""

    num_main: int
    num_probe: int
    lr: float | None = None
    localization: float | None = None
    final: torch.Tensor | None = None
    steps_done: int = 0
    wall_s: float = 0.0
    segments: list[dict[str, Any]] = field(default_factory=list)

    def continues(self, config: LLCConfig) -> int:
        """Steps of a run with ``config`` already done by these chains (0: it must start afresh)."""
        same = self.final is not None and config.lr == self.lr and config.localization == self.localization
        return self.steps_done if same and config.num_burnin_steps >= self.steps_done else 0

    def ids(self) -> list[int]:
        return list(range(self.num_main)) + [PROBE_CHAIN_OFFSET + c for c in range(self.num_probe)]


def _run_segment(problem: LLCProblem, config: LLCConfig, chains: _Chains, progress: bool
                 ) -> tuple[LLCResult, LLCResult | None, float]:
    """Run ``config``'s run by continuing ``chains`` (or from scratch: main chains at w*, probe chains at their
    overdispersed starts); the main chains' result (divergence policy ``config.on_divergence``) carries the run's
    equivalent settings, the probe's (or None if every probe chain diverged); and the segment's wall time."""
    done = chains.continues(config)
    ids = chains.ids()
    if done:
        start = chains.final
    else:
        probe_ids = ids[chains.num_main:]
        over = overdispersed_starts(problem, config.replace(init_spread=PROBE_SPREAD), probe_ids)
        start = torch.cat([problem.theta0.expand(chains.num_main, problem.theta0.numel()), over])
    seed = config.seed + 104_729 * (len(chains.segments) + 1) if done else config.seed  # fresh noise per segment
    seg = config.replace(num_burnin_steps=config.num_burnin_steps - done, seed=seed, init_spread=0.0,
                         num_chains=len(ids), on_divergence="exclude", chain_chunk_size=None)
    raw = run_raw(problem, seg, ids, start=start, progress=progress)
    steps = _run_steps(seg)
    if not done:
        chains.steps_done, chains.wall_s, chains.segments = 0, 0.0, []
    chains.lr, chains.localization, chains.final = config.lr, config.localization, raw.final_theta
    chains.steps_done += steps
    chains.wall_s += raw.extra["wall_time_s"]
    chains.segments.append({"num_burnin_steps": seg.num_burnin_steps, "num_draws": seg.num_draws, "seed": seed,
                            "steps": steps, "wall_s": raw.extra["wall_time_s"], "continued": bool(done)})
    hp = {**raw.hyperparameters, "num_chains": chains.num_main, "num_burnin_steps": config.num_burnin_steps,
          "seed": config.seed, "init_spread": config.init_spread}
    extra = {**raw.extra, "run_wall_s": chains.wall_s, "segments": list(chains.segments)}
    m = chains.num_main
    mala, drift = raw.mala, extra.pop("mean_sq_drift", None)  # per row: main rows first, then the probe's

    def rows(lo: int, hi: int | None) -> dict[str, Any]:
        return {} if drift is None else {"mean_sq_drift": drift[lo:hi]}

    main = summarize(raw.loss_trace[:m], problem.init_loss, hp, ids[:m], None if mala is None else mala[:m],
                     config.on_divergence, {**extra, **rows(0, m)}, warn=False)
    try:
        probe = summarize(raw.loss_trace[m:], problem.init_loss, {**hp, "num_chains": chains.num_probe,
                                                                  "init_spread": PROBE_SPREAD},
                          ids[m:], None if mala is None else mala[m:], "exclude", rows(m, None), warn=False)
    except LLCDivergenceError:
        probe = None
    return main, probe, steps


def _run_batched(problem: LLCProblem, config: LLCConfig, checks: _Checks, may_step_down: bool, progress: bool
                 ) -> tuple[LLCResult, LLCConfig]:
    """:func:`_run_with_step_down` for the batched path: continue the current chains (or start afresh) with the
    probe chains in the same batch; on divergence of a calibrated ε divide it by 3 and start afresh (≤ 3 times)."""
    chains = checks.chains
    assert chains is not None
    while True:
        done = chains.continues(config)
        checks.status.say(f"run: γ={config.localization:g}, ε={config.lr:.3g}, {_run_steps(config)} steps"
                          + (f" (continuing {done})" if done else ""))
        try:
            main, probe, steps = _run_segment(problem, config, chains, bool(progress))
        except LLCDivergenceError as exc:
            checks.budget.charge(_run_steps(config) - done)
            chains.final = None
            if not may_step_down or len(checks.step_downs) >= 3:
                raise
            checks.step_downs.append({"lr": config.lr, "error": str(exc)})
            config = config.replace(lr=config.lr / 3.0)
            continue
        checks.budget.charge(steps, main.diagnostics.wall_time_s)
        checks.status.advance(steps)
        k = chains.num_probe
        checks.probes.append(compare_probe(probe, main, k) if probe is not None else
                             ProbeRecord(num_chains=k, agrees=False, why="every overdispersed chain diverged"))
        checks.probed_last = True
        return main, config


def _run_with_step_down(problem: LLCProblem, config: LLCConfig, checks: _Checks, may_step_down: bool,
                        chain_ids: Sequence[int] | None, progress: bool, observe: dict[str, Any] | None = None
                        ) -> tuple[LLCResult, LLCConfig]:
    """One run; on divergence of a calibrated ε, divide it by 3 and rerun (at most 3 times). ``observe``: the
    observables' keyword arguments of :func:`~slt_tools.sampling.estimate.sample` (main runs only)."""
    while True:
        checks.status.say(f"run: γ={config.localization:g}, ε={config.lr:.3g}, {_run_steps(config)} steps")
        t0 = time.perf_counter()
        try:
            result = sample(problem, config, chain_ids=chain_ids, progress=bool(progress), **(observe or {}))
            checks.budget.charge(_run_steps(config), time.perf_counter() - t0)
            checks.status.advance(_run_steps(config))
            return result, config
        except LLCDivergenceError as exc:
            checks.budget.charge(_run_steps(config), time.perf_counter() - t0)
            # the pilots' few chains did not see it, the final run's many did: the step is too large for rare
            # excursions
            if not may_step_down or len(checks.step_downs) >= 3:
                raise
            checks.step_downs.append({"lr": config.lr, "error": str(exc)})
            config = config.replace(lr=config.lr / 3.0)


def _rising(result: LLCResult, checks: _Checks) -> bool:
    """Whether λ̂ is still climbing: a significant upward trend over the trace's second half (z > 2), or a rise
    over the previous, shorter run (not the calibration pilot, whose short burn-in makes it read low anyway) beyond
    5 % and 3 standard errors."""
    d = result.diagnostics
    if d.trend_z is not None and math.isfinite(d.trend_z) and d.trend_z > 2.0:
        return True
    if checks.previous is None or len(checks.history) < 2:
        return False
    prev, prev_sem = checks.previous
    rise = result.llc_mean - prev
    return rise > max(0.05 * abs(result.llc_mean), 3 * math.hypot(result.llc_sem, prev_sem))


def _next_run(config: LLCConfig, result: LLCResult, checks: _Checks, may_raise_gamma: bool) -> LLCConfig | None:
    """The next attempt after a run that did not settle, or None (extensions spent or budget exhausted).

    The run is doubled (draws ×2, burn-in 2b + draws). If λ̂ is still rising (:func:`_rising`: chains from w* relax
    from below), the burn-in is at least the flat directions' relaxation time :func:`relaxation_steps`; when that
    does not fit the budget (with room for the probe) and γ was calibrated
    (not the user's), γ is raised ×10 until it fits (capped, :data:`MAX_RAISE`) — λ̂ of the localised posterior at
    that γ is then affordable, and the record says which γ could not be relaxed and what it read there. Otherwise
    the run is doubled as long as extensions and budget remain.
    """
    if checks.extensions >= config.extensions_allowed:
        return None
    fits = checks.fits
    draws, burn = 2 * config.num_draws, 2 * config.num_burnin_steps + config.num_draws
    doubled = config.replace(num_draws=draws, num_burnin_steps=burn)
    relax = relaxation_steps(config.lr, config.localization)
    if not _rising(result, checks) or burn >= relax:
        return _if_it_fits(doubled, checks)  # noise, not an unfinished relaxation from w*: a longer run is the remedy
    relaxed = config.replace(num_draws=draws, num_burnin_steps=max(burn, relax))
    if fits(relaxed):
        return relaxed
    if _bracket_closing(checks) and fits(doubled):
        return doubled  # the chains from w* and from outside are meeting: a longer run at this γ is the remedy
    if may_raise_gamma and len(checks.raises) < 3:
        cap = min(MAX_RAISE * checks.calibrated_gamma, float(result.hyperparameters["nbeta"]))
        left = checks.budget.steps - checks.budget.spent

        def affordable(g: float) -> bool:  # relaxed within half the budget left: room to check and extend it
            relax_g = relaxation_steps(config.lr, g)
            return 2 * relax_g <= left and fits(doubled.replace(localization=g,
                                                                num_burnin_steps=max(burn, relax_g)))

        gamma = config.localization * RAISE_FACTOR
        while not affordable(gamma) and gamma < cap:
            gamma *= RAISE_FACTOR
        raised = doubled.replace(localization=gamma,
                                 num_burnin_steps=max(burn, relaxation_steps(config.lr, gamma)))
        if gamma <= cap and affordable(gamma):
            checks.raises.append({"from": config.localization, "to": gamma, "llc_at_from": result.llc_mean,
                                  "llc_sem_at_from": result.llc_sem, "relaxation_steps_at_from": relax,
                                  "burnin_at_from": config.num_burnin_steps})
            checks.previous = None  # another γ is another estimand: no run-length comparison across it
            checks.history = []
            return raised
    return _if_it_fits(doubled, checks)


def _bracket_closing(checks: _Checks) -> bool:
    """Whether the last two runs at this γ show the main chains (from w*, relaxing from below) and the batched
    overdispersed probe (from outside, relaxing from above) closing on each other fast enough that one more doubling
    brings them within the probe's 10 % tolerance: gap g_k = probe − main keeps its sign, shrinks, and
    g_k·(g_k/g_{k−1}) ≤ 0.1·|λ̂_k| (a geometric extrapolation of the bracket). Then λ̂ is still rising only because
    the run is short, and the next doubling — not a stiffer γ, which changes the estimand — is what the budget is
    for. Measured on the main job's final minimum (experiments/dln_staircase.py): at γ = 1 the bracket went
    58.4 − 29.6 → 36.2 − 32.2; raising γ to 10 there spent the budget without settling (split-R̂ 1.11)."""
    k = len(checks.history)
    if checks.chains is None or k < 2 or len(checks.probes) < k:
        return False
    probes = checks.probes[-k:]
    (m0, m1), (p0, p1) = checks.history[-2:], (probes[-2].llc_mean, probes[-1].llc_mean)
    if p0 is None or p1 is None or not all(map(math.isfinite, (m0, m1, p0, p1))):
        return False
    g0, g1 = p0 - m0, p1 - m1
    if g0 == 0 or g0 * g1 < 0 or abs(g1) >= abs(g0):
        return False
    return abs(g1) * abs(g1 / g0) <= 0.1 * abs(m1)


def _if_it_fits(config: LLCConfig, checks: _Checks) -> LLCConfig | None:
    """``config`` if its run and probe fit the budget left; None, with the reason recorded, otherwise."""
    if checks.fits(config):
        return config
    checks.cut_short = f"a longer run ({_run_steps(config)} steps) did not fit the budget"
    return None


def _not_converged_message(result: LLCResult, checks: _Checks, pilot: list[Any], draws: int) -> str:
    reasons = list(result.diagnostics.not_stationary_reasons)
    pilot = pilot if not checks.raises else []  # the pilot ran at the calibrated γ, not at the raised one
    if len(checks.history) > 1 or pilot:
        reasons.append("λ̂ kept changing as the run got longer: " + " → ".join(
            f"{v:.3g}" for v in ([pilot[-1]["llc_mean"]] if pilot else []) + checks.history))
    if checks.probes and not checks.probes[-1].agrees:
        p = checks.probes[-1]
        reasons.append(f"chains started away from w* (w* + N(0, {PROBE_SPREAD ** 2:g}·γ⁻¹I)) settle at λ̂ = "
                       f"{p.llc_mean:.4g} against {result.llc_mean:.4g} from w* — {p.why}")
    if checks.raises:
        reasons.append("γ raised " + " → ".join(f"{r['from']:g}" for r in checks.raises)
                       + f" → {checks.raises[-1]['to']:g} because the flat directions could not relax in the budget")
    if checks.cut_short:
        reasons.append(f"stopped: {checks.cut_short} (budget_steps={checks.budget.steps}, "
                       f"budget_seconds={checks.budget.seconds})")
    return (f"LLC estimate did not converge after {checks.extensions} extension(s) to {draws} draws: "
            + "; ".join(reasons) + f". λ̂ = {result.llc_mean:.4g} is not a trustworthy answer "
            "(typical of highly degenerate points whose flat directions relax slowly)")


def _fit_first_run(config: LLCConfig, checks: _Checks) -> LLCConfig:
    """The first run, shortened (draws first, then burn-in, to at least 50 draws) if what calibration left of the
    budget cannot hold it; the result is then marked cut short (it cannot pass the checks' probe either)."""
    left = checks.budget.steps - checks.budget.spent
    if _run_steps(config) <= left:
        return config
    bw = config.num_steps_bw_draws
    draws = max(50, min(config.num_draws, (left - config.num_burnin_steps) // bw))
    burn = max(0, min(config.num_burnin_steps, left - draws * bw))
    checks.cut_short = (f"the budget left after calibration ({left} steps) holds only {burn} burn-in steps and "
                        f"{draws} draws of the {_run_steps(config)}-step run")
    return config.replace(num_draws=draws, num_burnin_steps=burn)


def _checked_run(problem: LLCProblem, config: LLCConfig, calib: Calibration | None, may_step_down: bool,
                 may_raise_gamma: bool, chain_ids: Sequence[int] | None, progress: bool | None,
                 budget: _Budget, status: _Status, observe: dict[str, Any] | None = None) -> LLCResult:
    """Run, check, and lengthen (or raise γ) until it settles or extensions/budget are spent; record it all.
    ``may_step_down``: ε was calibrated (not the user's), so a diverging run may retry at ε/3."""
    pilot = [c for c in calib.candidates if c.lr == calib.lr and c.llc_mean is not None] if calib else []
    checks = _Checks((pilot[-1].llc_mean, pilot[-1].llc_sem or 0.0) if pilot else None, budget, status,
                     calibrated_gamma=float(config.localization))
    if config.probe_enabled and chain_ids is None and observe is None:  # probe in the batch, runs continued
        checks.chains = _Chains(config.num_chains, probe_chains(config))
    config = _fit_first_run(config, checks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while True:
            if checks.chains is not None:
                result, config = _run_batched(problem, config, checks, may_step_down, progress)
            else:
                result, config = _run_with_step_down(problem, config, checks, may_step_down, chain_ids, progress,
                                                     observe)
            settled = checks.settled(result, problem, config) and not checks.cut_short
            if settled or checks.cut_short:
                break
            nxt = _next_run(config, result, checks, may_raise_gamma)
            if nxt is None:
                break
            checks.extensions += 1
            if nxt.localization == config.localization:
                checks.previous = (result.llc_mean, result.llc_sem)
            config = nxt
    if not settled and config.probe_enabled and not checks.probed_last and not checks.cut_short:
        with warnings.catch_warnings():  # the final, unconverged run gets its probe too: a record for the reader
            warnings.simplefilter("ignore")
            checks.probe(problem, result, config, for_the_record=True)
    _record(result, checks, calib, settled, budget)
    if not settled:
        warnings.warn(_not_converged_message(result, checks, [c.to_dict() for c in pilot], config.num_draws),
                      NotConvergedWarning, stacklevel=3)
    elif checks.raises:
        r = checks.raises[0]
        warnings.warn(f"λ̂ = {result.llc_mean:.4g} is the localised posterior's at γ = {config.localization:g}, raised "
                      f"from the calibrated γ = {r['from']:g}: there the flat directions need ≈ "
                      f"{r['relaxation_steps_at_from']} steps to relax (more than the budget) and its chains from w* "
                      f"read {r['llc_at_from']:.4g} while still rising. λ̂ decreases with γ; for a smaller γ set "
                      "localization and a larger budget_steps", LocalizationRaisedWarning, stacklevel=3)
    return result


def _record(result: LLCResult, checks: _Checks, calib: Calibration | None, settled: bool, budget: _Budget) -> None:
    d = result.diagnostics
    d.update(calibration=calib, extensions=checks.extensions, converged=bool(settled),
             llc_by_run_length=checks.history, budget=budget.record())
    if checks.probes:
        d.update(overdispersed_probe=checks.probes[-1],
                 overdispersed_llc_by_run_length=[p.llc_mean for p in checks.probes])
    if checks.step_downs:
        d.update(lr_reduced_after_divergence=checks.step_downs)
    if checks.raises:
        d.update(localization_raised=checks.raises)
    if checks.cut_short:
        d.update(cut_short=checks.cut_short)
    result.hyperparameters["calibrated"] = calib is not None


def estimate_llc(model: nn.Module, loader: Any, loss_fn: LossFn, config: LLCConfig | None = None, *,
                 chain_ids: Sequence[int] | None = None, device: str | torch.device | None = None,
                 progress: bool | None = None, logger: Any = None,
                 observables: Mapping[str, ObservableFn] | Sequence[Observable] | None = None, keep_draws: bool = False,
                 **settings: Any) -> LLCResult:
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
        device: where to sample (default: the model's device). progress: True shows a tqdm bar over each run's steps
            and the driver's status line; None (default) the status line only, and only on a terminal; False
            nothing.
        logger: optional logger with ``log_llc(result)`` (e.g. :class:`slt_tools.WandbLogger`).
        observables: ``{name: fn(model) -> tensor}`` or :class:`~slt_tools.sampling.observables.Observable` objects
            (e.g. :func:`slt_tools.observables.per_sample_loss`), evaluated at every draw of the main run(s) (not
            the calibration pilots or probes) into streaming statistics, ``result.observables[name]``; their raw
            draws too with ``keep_draws``.

    ``lr`` or ``localization`` left unset are calibrated (:func:`slt_tools.calibrate_llc`) and the result is checked
    for convergence; the calibration record is ``result.diagnostics.calibration``.
    """
    config = LLCConfig.from_kwargs(config, **settings)
    with model_mode(model, config.model_mode):
        result = _estimate(model, loader, loss_fn, config, chain_ids, device, progress, observables, keep_draws)
    if logger is not None:
        logger.log_llc(result)
    return result


def step_size_check(problem: LLCProblem, main: LLCResult, config: LLCConfig) -> dict[str, Any]:
    """λ̂ at ε against λ̂ at ε/2 over the same diffusion time (burn-in and draws doubled, draws thinned ×2 in steps).

    SGLD's stationary law differs from the posterior by O(ε) (Euler discretisation), so a measurable move between ε
    and ε/2 at equal ε·steps — where an unfinished relaxation would be the same in both — is the step-size bias; the
    ε/2 value is then the better one, and a smaller step still better. Half the chains (at least 2, chain ids
    offset so their noise is fresh) run the check; the move counts when it exceeds 5 % of λ̂ and 3 combined standard
    errors. Returns the record stored as ``diagnostics.step_check`` and warns :class:`StepSizeWarning` if it moved.
    """
    k = min(config.num_chains, max(2, config.num_chains // 2))
    half = config.replace(lr=config.lr / 2, num_chains=k, num_burnin_steps=2 * config.num_burnin_steps,
                          num_steps_bw_draws=2 * config.num_steps_bw_draws, on_divergence="exclude",
                          chain_chunk_size=None, init_spread=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = sample(problem, half, chain_ids=[2_000_000 + c for c in range(k)])
            value, sem = res.llc_mean, res.llc_sem
        except LLCDivergenceError:
            value, sem = float("nan"), float("nan")
    gap = value - main.llc_mean
    tol = max(0.05 * abs(main.llc_mean), 3 * math.hypot(main.llc_sem, sem if math.isfinite(sem) else 0.0))
    moved = bool(not math.isfinite(gap) or abs(gap) > tol)
    record = {"lr": config.lr, "llc_at_lr": main.llc_mean, "half_lr": half.lr, "llc_at_half_lr": value,
              "llc_sem_at_half_lr": sem, "num_chains": k, "difference": gap, "tolerance": tol, "moved": moved}
    if moved:
        warnings.warn(f"λ̂ = {main.llc_mean:.4g} at ε = {config.lr:.3g} but {value:.4g} at ε/2 over the same "
                      f"diffusion time (difference {gap:+.3g} > {tol:.3g}): the step-size bias is measurable; use "
                      f"lr ≤ {half.lr:.3g} (with twice the steps)", StepSizeWarning, stacklevel=3)
    return record


def _estimate(model: nn.Module, loader: Any, loss_fn: LossFn, config: LLCConfig, chain_ids: Sequence[int] | None,
              device: str | torch.device | None, progress: bool | None, observables: Any = None,
              keep_draws: bool = False) -> LLCResult:
    """Prepare once, calibrate what is unset, then one plain run or the checked run."""
    problem = LLCProblem.build(model, loader, loss_fn, config.restrict_to, device)
    observe = None
    if observables:
        observe = dict(observables=prepare_observables(model, problem.layout, problem.theta0, observables),
                       keep_draws=keep_draws)
    if not (config.calibrated or config.extensions_allowed > 0 or config.probe_enabled):
        result = sample(problem, config, chain_ids=chain_ids, progress=bool(progress), **(observe or {}))
    else:
        result = _driven(problem, config, chain_ids, progress, observe)
    check = None
    if config.calibrated and not observe and result.diagnostics.converged and _flat_unexplored(result):
        check = _verify_flat_directions(model, loader, loss_fn, result, config, device)
    if config.calibrated and result.diagnostics.converged is False and not observe:
        # (with observables the SGLD run's statistics are the result's: no replacement by an ULD run without them)
        result = _degenerate_fallback(model, loader, loss_fn, result, config, device, check)
    if config.step_check:
        used = config.replace(**{k: result.hyperparameters[k] for k in ("lr", "localization", "num_burnin_steps",
                                                                        "num_draws")})
        result.diagnostics.update(step_check=step_size_check(problem, result, used))
    return result


#: sequential steps of the degeneracy detector's underdamped-Langevin pilot (slt_tools.sampling.degenerate)
DEGENERACY_PILOT_STEPS = 6000

#: a converged run whose chains covered less than this fraction of the flat directions' relaxation time 4/(εγ) is
#: verified by the degeneracy detector before it is reported converged (:func:`_verify_flat_directions`)
FLAT_COVERAGE = 0.02


#: ... and whose λ̂ rose by more than this factor from the first run to the last (still relaxing at the end)
RISE_FACTOR = 1.25


def _flat_unexplored(result: LLCResult) -> bool:
    """Whether the chains ran for less than :data:`FLAT_COVERAGE` of :func:`relaxation_steps` (ε, γ) — directions
    held by γ alone have then barely moved from w* — while λ̂ rose by more than :data:`RISE_FACTOR` over the runs:
    then nothing in the SGLD run can say whether λ̂ would go on rising along them. Measured: the reference suite's
    cases cover 8–30 % and more; the rank-cut DLN (4,4,4,4) covers 0.3–1 % (ε 5e-7 to 1.5e-6) and rose 1.66 → 4.02
    over five runs, and was reported converged at 4.0 against Aoyagi's λ ≥ 6.5 (chains from w* and the probe
    chains agreeing within noise: the probe start is not overdispersed along those directions). Healthy DLNs at
    n = 1e5 cover < 1 % too but do not rise (14.1 → 14.0); there the detector's ULD pilot reads ≈ 10 % high and
    flagged a right answer, hence the rise condition."""
    h, history = result.hyperparameters, result.diagnostics.llc_by_run_length or []
    if h.get("sampler", "sgld") != "sgld" or not h.get("lr") or not h.get("localization"):
        return False
    steps = int(h.get("num_burnin_steps", 0)) + int(h["num_draws"]) * int(h.get("num_steps_bw_draws", 1))
    rose = len(history) >= 2 and history[0] > 0 and history[-1] > RISE_FACTOR * history[0]
    return rose and steps < FLAT_COVERAGE * relaxation_steps(float(h["lr"]), float(h["localization"]))


def _budget_left(result: LLCResult) -> int:
    """Sequential steps of the estimate's budget not yet spent (``diagnostics.budget``)."""
    budget = result.diagnostics.budget or {}
    return int(budget.get("budget_steps", DEFAULT_BUDGET_STEPS)) - int(budget.get("steps_spent", 0))


def _run_detector(model: nn.Module, loader: Any, loss_fn: LossFn, result: LLCResult, config: LLCConfig,
                  device: str | torch.device | None) -> Any:
    """:func:`slt_tools.sampling.degenerate.degeneracy_check` against ``result`` at its (γ, nβ), its steps charged
    to ``diagnostics.budget``; None if its pilot does not fit the budget left (or the run is refined / on an
    explicit device, which the detector does not support)."""
    from slt_tools.sampling import degenerate

    if _budget_left(result) < DEGENERACY_PILOT_STEPS or config.restrict_to is not None or device is not None:
        return None
    h = result.hyperparameters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chk = degenerate.degeneracy_check(model, loader, loss_fn, llc_sgld=result.llc_mean,
                                          llc_sgld_sem=result.llc_sem, localization=float(h["localization"]),
                                          nbeta=float(h["nbeta"]), seed=config.seed, max_steps=DEGENERACY_PILOT_STEPS)
    budget = dict(result.diagnostics.budget or {})
    budget["steps_spent"] = int(budget.get("steps_spent", 0)) + chk.uld_steps
    result.diagnostics.update(budget=budget)
    return chk


def _verify_flat_directions(model: nn.Module, loader: Any, loss_fn: LossFn, result: LLCResult, config: LLCConfig,
                            device: str | torch.device | None) -> Any:
    """A converged estimate whose flat directions are unexplored (:func:`_flat_unexplored`) is checked by the
    degeneracy detector's underdamped-Langevin pilot (which moves √(Λ/γ) times faster along them); if it reads
    clearly higher, or if its pilot does not fit the budget left, the result is marked not converged (the
    degenerate fallback then decides what to report) with the reason in ``diagnostics.flat_directions``. Returns
    the detector's record (None if it did not run)."""
    h, d = result.hyperparameters, result.diagnostics
    steps = int(h["num_burnin_steps"]) + int(h["num_draws"])
    relax = relaxation_steps(float(h["lr"]), float(h["localization"]))
    record: dict[str, Any] = {"steps_run": steps, "relaxation_steps": relax, "coverage": steps / relax}
    chk = _run_detector(model, loader, loss_fn, result, config, device)
    if chk is None:
        record["verdict"] = "unverified: the underdamped-Langevin check did not fit the budget left"
    else:
        record.update(check=chk.to_dict(), verdict="degenerate" if chk.degenerate else "verified")
    d.update(flat_directions=record)
    if chk is None or chk.degenerate:
        d.update(converged=False)
        _warn_flat(result, record)
    return chk


def _warn_flat(result: LLCResult, record: dict[str, Any]) -> None:
    warnings.warn(f"LLC estimate λ̂ = {result.llc_mean:.4g} passed the SGLD checks, but its chains ran "
                  f"{record['steps_run']} steps, {100 * record['coverage']:.2g} % of the {record['relaxation_steps']} "
                  f"the flat directions need to relax (4/(εγ)), and the underdamped-Langevin check "
                  + ("reads clearly higher" if record["verdict"] == "degenerate" else "did not fit the budget left")
                  + ": not a trustworthy answer (highly degenerate points look like this; raise budget_steps)",
                  NotConvergedWarning, stacklevel=4)


def _degenerate_fallback(model: nn.Module, loader: Any, loss_fn: LossFn, result: LLCResult, config: LLCConfig,
                         device: str | torch.device | None, check: Any = None) -> LLCResult:
    """After an unconverged self-calibrated estimate: is the point degenerate, and can ULD answer it in budget?

    :func:`slt_tools.sampling.degenerate.degeneracy_check` runs a short underdamped-Langevin pilot at the same
    (γ, nβ) if the budget left holds it (``check``: the record of one the flat-direction verification already ran);
    if it reads clearly above SGLD (slow flat directions), the full ULD estimate
    (:func:`slt_tools.sampling.degenerate.estimate_llc_degenerate`; within 5 % of Aoyagi's λ on rank-cut DLNs,
    experiments/degenerate_points.py) replaces the SGLD one when the budget left holds it too — its ``converged`` is
    its own trace's stationarity — and otherwise the SGLD estimate stays, flagged, with the ULD pilot's reading and
    the budget the full run needs. Either way a :class:`DegeneracyWarning` says which it is."""
    from slt_tools.sampling import degenerate

    chk = check if check is not None else _run_detector(model, loader, loss_fn, result, config, device)
    if chk is None:
        return result
    record = chk.to_dict()
    if not chk.degenerate:
        result.diagnostics.update(degeneracy=record)
        return result
    h, budget = result.hyperparameters, dict(result.diagnostics.budget or {})
    left, spent = _budget_left(result), int(budget.get("steps_spent", 0))  # the ULD pilot included
    settings = degenerate.uld_settings(model, loader, loss_fn, localization=float(h["localization"]),
                                       nbeta=float(h["nbeta"]))
    need = settings["num_burnin_steps"] + settings["num_draws"]
    record.update(uld_steps_needed=need, budget_left=left)
    if need > left:
        result.diagnostics.update(degeneracy=record)
        warnings.warn(f"the point looks degenerate: a short underdamped-Langevin run reads λ̂ = {chk.llc_uld:.4g} "
                      f"against SGLD's {result.llc_mean:.4g} (gap {100 * chk.gap:.0f} %, z = {chk.z:.1f}); the full "
                      f"ULD estimate needs {need} steps, {left} are left: rerun with budget_steps ≥ "
                      f"{spent + need} or call "
                      "slt_tools.sampling.estimate_llc_degenerate", DegeneracyWarning, stacklevel=3)
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uld = degenerate.estimate_llc_degenerate(model, loader, loss_fn, num_chains=config.num_chains,
                                                 seed=config.seed, settings=settings)
    record.update(sgld_llc=result.llc_mean, sgld_llc_sem=result.llc_sem)
    uld.diagnostics.update(degeneracy=record, converged=bool(uld.diagnostics.stationary),
                           calibration=result.diagnostics.calibration,
                           budget={**budget, "steps_spent": spent + need})
    warnings.warn(f"the point looks degenerate (SGLD {result.llc_mean:.4g} did not converge; a short underdamped-"
                  f"Langevin run read {chk.llc_uld:.4g}): reporting the underdamped-Langevin estimate λ̂ = "
                  f"{uld.llc_mean:.4g} ± {uld.llc_sem:.2g} ({need} steps; converged: "
                  f"{uld.diagnostics.converged}); the SGLD value is in diagnostics.degeneracy", DegeneracyWarning,
                  stacklevel=3)
    return uld


def _driven(problem: LLCProblem, config: LLCConfig, chain_ids: Sequence[int] | None, progress: bool | None,
            observe: dict[str, Any] | None = None) -> LLCResult:
    """The self-calibrating path: calibrate what is unset, then the checked run, within the budget."""
    budget = _Budget(config.budget_steps or DEFAULT_BUDGET_STEPS, config.budget_seconds)
    status = _Status(progress if config.calibrated else bool(progress), budget.steps)
    try:
        calib, user_lr, user_gamma = None, config.lr, config.localization
        if config.calibrated:
            status.say("calibrating ε and γ on pilot chains")
            calib = calibrate(problem, config, max_steps=budget.steps // 2)
            budget.charge(calib.sgld_steps, calib.wall_time_s)
            status.advance(calib.sgld_steps)
            # the checks stay on (as for every calibrated run) once ε and γ are filled in
            config = config.replace(lr=calib.lr, localization=calib.localization,
                                    num_draws=max(config.num_draws, calib.num_draws),
                                    num_burnin_steps=max(config.num_burnin_steps or 0, calib.num_burnin_steps),
                                    max_extensions=config.extensions_allowed, convergence_probe=config.probe_enabled)
        return _checked_run(problem, config, calib, calib is not None and user_lr is None,
                            calib is not None and user_gamma is None, chain_ids, progress, budget, status, observe)
    finally:
        status.close()
