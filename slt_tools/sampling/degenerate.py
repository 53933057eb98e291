"""LLC estimation at highly degenerate points: underdamped Langevin settings and a cheap degeneracy detector.

Target (Lau et al. arXiv 2308.12108): p(w) ∝ exp(−U(w)), U(w) = nβ·L_n(w) + (γ/2)‖w − w*‖², λ̂ = nβ(E_p[L_n] − L_n(w*)).

**Why SGLD fails there.** At a deep linear network whose every layer has the minimal rank (the deepest stratum, where
the local λ equals Aoyagi's global λ) the posterior is extremely ill-conditioned: the stiff directions have curvature
up to Λ = nβ·λ_max(∇²L_n(w*)) + γ, which caps the step (ε < 4/Λ for stability, smaller for bias), while the set of
true parameters through w* is large and curved and the posterior mass along it is held only by the prior's γ. SGLD
(overdamped) relaxes a mode of stiffness κ in diffusion time ~2/κ, so the flat directions need ~(2/γ)/ε ≈ 2Λ/γ
steps (≈ 10⁶–10⁸ here): a run of a few thousand steps from w* reads only the quadratic directions,
λ̂ ≈ rank(∇²L_n)/2 (measured: 3.4 for (4,4,4,4) r = 1 where rank(H)/2 = 3.5 and λ = 6.5; 7.6 for (6,6,6,6,6) r = 2
where rank(H)/2 = 10 and λ = 15).

**The fix: underdamped (kinetic) Langevin**, rule ``"uld"`` in :mod:`slt_tools.sampling.rules` (BAOAB), step
h = √ε, friction ζ. With a momentum, a mode of stiffness κ relaxes in physical time ~1/√κ (at ζ ≈ √κ..2√κ) instead
of diffusion time 2/κ: the flat directions need ~√(Λ/γ) steps instead of ~Λ/γ — a square-root speed-up (the
standard mixing result for kinetic Langevin / HMC on ill-conditioned targets; e.g. Cheng, Chatterji, Bartlett &
Jordan 2018, "Underdamped Langevin MCMC: a non-asymptotic analysis", COLT). :func:`uld_settings` chooses

    h = c/√Λ  (c = ``safety`` = 0.3; ε = h²),   ζ = 6√γ,   burn-in T_b/√γ and draws T_d/√γ in physical time,

with Λ from Lanczos on Hessian-vector products at w*. The chains wander far along the flat set (‖w − w*‖ ≈ 6 at
(4,4,4,4), ≈ 10 at (6,6,6,6,6) with γ = 1), where the curvature is larger than at w*: c ≈ 1.0–1.2 diverged there,
c ≤ 0.5 did not. The friction is set by minibatch noise: the momentum also receives the gradient noise (SGHMC's
heating, Chen, Fox & Guestrin 2014, ICML), whose extra temperature grows as h·nβ²·Var(∇L_B)/ζ and biases λ̂ up.
Measured: DLN (9,4,6) r = 1, n = 10⁴ (HMC gold 14.34): c = 0.4, ζ = 3 read +6.2 % with batch 256 and −1.7 % with
full-batch gradients; c = 0.3, ζ = 6 read +2.6 %. (4,4,4,4) r = 1 (λ = 6.5; full-batch ULD reads 6.08–6.11): ζ = 1
read 7.27, 6.49, 7.21 (seeds 0–2), ζ = 3 read 6.55, 6.23, 6.63, c = 0.3, ζ = 6 read 6.07–6.15. A larger ζ slows
the flat directions (relaxation time ~ζ/γ once ζ > 2√γ), so it cannot grow without bound: where the heating
h·nβ²·Var/ζ is large (nβ = 4621 at (6,6,6,6,6)) the remedy is a larger batch (heating ∝ 1/batch), at a cost per
step that grows with it. Measured there with the exact potential and minibatch covariance of m fresh rows per step:
m = 500 read 18.6 (+24 %), m = 5000 read 14.47 (−3.5 %), exact gradients 14.31 (−4.6 %); the library run at
batch 500 (c = 0.4, ζ = 3) read 28.6 (+91 %).

**The multi-temperature slope** (thermodynamic integration). With F(t) = −log ∫ e^{−t K(w)} φ_γ(w) dw and
K = L_n − L_n(w*), E_t[K] = F′(t); Watanabe's expansion F(t) = λ log t − (m − 1) log log t + O(1) gives
t·E_t[K] = λ − (m − 1)/log t + o(1), so E_t[K] against 1/t has slope λ + O(1/log t). The slope across a ladder is
insensitive to an offset in L_n(w*) but not to the finite-t correction (for t·E_t[K] = λ + c(t) the slope is
λ + c(t) − t·c′(t), no closer to λ), and with γ > 0 the O(1) term itself depends on t (the prior cuts the flat set at
scale γ^{−½}), so the relation is only approximate. Measured in ``experiments/degenerate_points.py``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from slt_tools.sampling.config import LLCConfig
from slt_tools.sampling.estimate import LLCProblem, default_nbeta, sample_llc
from slt_tools.sampling.functional import LossFn, RestrictTo
from slt_tools.sampling.result import LLCResult
from slt_tools.sampling.rules import drift, get_rule


def _num_samples(loader: Any) -> tuple[int, int]:
    """(n, batch size) of a DataLoader-like object."""
    try:
        n = len(loader.dataset)
    except (AttributeError, TypeError):
        n = sum(len(b[0]) if isinstance(b, (tuple, list)) else len(b) for b in loader)
    return int(n), int(getattr(loader, "batch_size", None) or n)


def top_curvature(model: nn.Module, loader: Any, loss_fn: LossFn, *, num_batches: int | None = 4, num_iter: int = 20,
                  restrict_to: RestrictTo = None, seed: int = 0) -> float:
    """λ_max(∇²L_n(w*)) by Lanczos on Hessian-vector products over the first ``num_batches`` batches (the largest
    Ritz value of ``num_iter`` steps converges first; 20 suffice to a few per cent, which the safety factor of
    :func:`uld_settings` absorbs)."""
    from slt_tools.geometry.hessian import HessianOperator, hessian_eigenvalues  # geometry sits above sampling

    op = HessianOperator(model, loader, loss_fn, restrict_to=restrict_to, num_batches=num_batches)
    spec = hessian_eigenvalues(model, loader, loss_fn, k=1, num_iter=min(num_iter, op.dim), seed=seed, op=op)
    return max(float(spec.top[0]), 0.0)


def uld_settings(model: nn.Module, loader: Any, loss_fn: LossFn, *, localization: float = 1.0,
                 nbeta: float | None = None, safety: float = 0.3, burnin_time: float = 3.0, draw_time: float = 6.0,
                 friction: float | None = None, max_steps: int | None = None, restrict_to: RestrictTo = None,
                 curvature: float | None = None, stiffness: float | None = None) -> dict[str, Any]:
    """LLCConfig fields for an underdamped-Langevin estimate (module docstring): sampler "uld", ε = (c/√Λ)² with
    Λ = nβ·λ_max(∇²L_n(w*)) + γ, ζ = 6√γ (``friction``), burn-in and draws covering ``burnin_time``/√γ and
    ``draw_time``/√γ of physical time (h per step). ``max_steps`` caps burn-in + draws (split in the same ratio).
    ``curvature`` = λ_max(∇²L_n(w*)) if already known (skips the Lanczos run). ``stiffness``: a lower bound on Λ
    (e.g. :func:`stein_step_size`'s ``mean_curvature``) where ∇²L_n(w*) does not see the stiff directions — at a
    minimum of order > 2 (Π w_j^{2k_j}, a DLN at the origin) it is 0 although the posterior's curvature is not."""
    if not (localization > 0 and safety > 0 and burnin_time >= 0 and draw_time > 0):
        raise ValueError("need γ > 0, safety > 0, burnin_time ≥ 0 and draw_time > 0")
    n, batch = _num_samples(loader)
    nb = float(default_nbeta(n, batch) if nbeta is None else nbeta)
    lam = top_curvature(model, loader, loss_fn, restrict_to=restrict_to) if curvature is None else float(curvature)
    h = safety / math.sqrt(max(nb * lam + localization, stiffness or 0.0))
    burn, draws = (max(1, round(t / math.sqrt(localization) / h)) for t in (burnin_time, draw_time))
    if max_steps is not None and burn + draws > max_steps:
        scale = max_steps / (burn + draws)
        burn, draws = int(burn * scale), max(4, int(draws * scale))
    return {"sampler": "uld", "lr": h * h, "localization": float(localization), "nbeta": nb,
            "sampler_kwargs": {"friction": 6.0 * math.sqrt(localization) if friction is None else float(friction)},
            "num_burnin_steps": int(burn), "num_draws": int(draws), "mala_every": 0, "restrict_to": restrict_to}


def estimate_llc_degenerate(model: nn.Module, loader: Any, loss_fn: LossFn, *, localization: float = 1.0,
                            nbeta: float | None = None, num_chains: int = 8, seed: int = 0,
                            settings: dict[str, Any] | None = None, device: Any = None,
                            batch_size: int | None = None, **uld_kwargs: Any) -> LLCResult:
    """λ̂(w*) by underdamped Langevin with :func:`uld_settings` (or the given ``settings``, e.g. its output
    reused across checkpoints); ``uld_kwargs`` go to :func:`uld_settings`; the result's ``diagnostics`` are those of
    an ordinary hand-set run (no MALA diagnostic: ULD proposals are not Langevin proposals). ``batch_size``
    re-batches ``loader.dataset`` (a larger batch lowers the minibatch heating; module docstring).

    Measured (``experiments/degenerate_points.py``, γ = 1, nβ = n/log n, 16 chains): DLN (4,4,4,4) r = 1, every
    layer cut (λ = 6.5; SGLD 3.6–3.8): 6.07–6.15 with minibatches, 6.22 with exact gradients; (6,6,6,6,6) r = 2
    (λ = 15; SGLD 7.8–9.8): 14.25 ± 0.50 (−5.0 %, 381 s) with ``batch_size=2000`` and 30 000 steps, 14.31 with
    exact gradients; with the batch of 500 the minibatch heating dominates at nβ = 4621 (module docstring):
    17.03 (+13.5 %) at 30 000 steps, +24 % (emulated) to +91 % at full length.
    """
    if batch_size is not None:  # re-batch (less minibatch heating): a DataLoader's data set, reshuffled
        from torch.utils.data import DataLoader

        loader = DataLoader(loader.dataset, batch_size=int(batch_size), shuffle=True)
    cfg = settings or uld_settings(model, loader, loss_fn, localization=localization, nbeta=nbeta, **uld_kwargs)
    config = LLCConfig(num_chains=num_chains, seed=seed, **cfg)
    return sample_llc(model, loader, loss_fn, config, device=device)


@dataclass
class DegeneracyCheck:
    """Verdict of :func:`degeneracy_check`: ``gap`` = (λ̂_ULD − λ̂_SGLD)/λ̂_ULD, ``z`` its size in standard errors."""

    degenerate: bool
    llc_sgld: float
    llc_sgld_sem: float
    llc_uld: float
    llc_uld_sem: float
    gap: float
    z: float
    uld_steps: int
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def degeneracy_check(model: nn.Module, loader: Any, loss_fn: LossFn, *, llc_sgld: float, llc_sgld_sem: float,
                     localization: float, nbeta: float | None = None, num_chains: int = 4, seed: int = 0,
                     rel_threshold: float = 0.15, z_threshold: float = 3.0, burnin_time: float = 1.5,
                     draw_time: float = 1.5, max_steps: int | None = 6000, **uld_kwargs: Any) -> DegeneracyCheck:
    """Detector of slow flat directions: does a short underdamped-Langevin pilot read clearly above SGLD?

    What it measures: λ̂ from an ULD pilot (:func:`uld_settings` with ``burnin_time``, ``draw_time`` — 3/√γ of
    physical time in all, at most ``max_steps`` steps) against the caller's SGLD estimate (``llc_sgld`` ±
    ``llc_sgld_sem``, e.g. the self-calibrating driver's pilot or final run at the same γ and nβ). At a point
    whose posterior SGLD has relaxed, both target the same λ̂ (to their step-size biases); where the flat
    directions held by γ alone have not relaxed, SGLD reads ≈ rank(∇²L_n)/2 and ULD, √(Λ/γ) times faster along
    them, reads higher. Verdict: degenerate iff gap = (λ̂_ULD − λ̂_SGLD)/λ̂_ULD > ``rel_threshold`` and
    z = (λ̂_ULD − λ̂_SGLD)/√(SE_ULD² + SE_SGLD²) > ``z_threshold``.

    Measured (``experiments/degenerate_points.py --phase detector``; SGLD at the default path's step, 4 chains ×
    1500 steps; seeds 0–4; results/degenerate_points.json ``detector``): both rank-cut DLNs flagged 10/10 (gap
    0.44–0.57; pilot 4716–6000 steps, 10–52 s). Healthy points: flagged 4/20 — all four on the ReLU MLP, where
    that SGLD run read 22.5–26.1 against the HMC gold 35.1 (SGLD genuinely unrelaxed, ULD 28.8–34.7); 0 false
    alarms in the 10 runs whose SGLD value was within 10 % of the gold (full-rank-cut DLNs (9,4,6), (5,4,3,5);
    pilots 282–356 steps, ≤ 2.3 s). Missed: the tanh MLP's SGLD read 17–27 % low on every seed and was flagged
    on none (gap ≤ 0.16). So it detects "SGLD has not relaxed a direction ULD relaxes", degenerate or not.
    """
    t0 = time.perf_counter()
    cfg = uld_settings(model, loader, loss_fn, localization=localization, nbeta=nbeta, burnin_time=burnin_time,
                       draw_time=draw_time, max_steps=max_steps, **uld_kwargs)
    res = estimate_llc_degenerate(model, loader, loss_fn, num_chains=num_chains, seed=seed, settings=cfg)
    diff = res.llc_mean - llc_sgld
    se = math.sqrt(res.llc_sem ** 2 + llc_sgld_sem ** 2) or 1e-12
    gap = diff / abs(res.llc_mean) if res.llc_mean else 0.0
    return DegeneracyCheck(bool(gap > rel_threshold and diff / se > z_threshold), float(llc_sgld), float(llc_sgld_sem),
                           float(res.llc_mean), float(res.llc_sem), float(gap), float(diff / se),
                           cfg["num_burnin_steps"] + cfg["num_draws"], time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------- steep potentials (item 7)
def _pilot_curvature(problem: LLCProblem, lr: float, nbeta: float, localization: float, num_chains: int,
                     num_steps: int, seed: int) -> float:
    """κ̄ = E‖∇U‖²/d over the second half of an SGLD pilot from w* (inf if a chain blew up)."""
    from slt_tools.sampling.steps import BatchedLossGrad

    rule, hp = get_rule("sgld"), {"lr": lr, "nbeta": nbeta, "localization": localization}
    loss_grad, batches = BatchedLossGrad(problem.loss_at), problem.data.stream(seed)
    gen = torch.Generator(device=problem.device).manual_seed(seed)
    theta0 = problem.theta0
    theta = theta0.expand(num_chains, theta0.numel()).clone()
    total, count = 0.0, 0
    for t in range(num_steps):
        _, grads = loss_grad(theta, next(batches))
        if t >= num_steps // 2:
            total += float(drift(theta, theta0, grads, hp).pow(2).sum(dim=1).mean())
            count += 1
        noise = torch.randn(theta.shape, generator=gen, device=theta.device, dtype=theta.dtype)
        theta, _ = rule.update(theta, theta0, grads, noise, {}, hp)
        if not bool(torch.isfinite(theta).all()):
            return math.inf
    return total / count / theta0.numel()


def stein_step_size(model: nn.Module, loader: Any, loss_fn: LossFn, *, localization: float,
                    nbeta: float | None = None, c: float = 0.1, lr0: float | None = None, num_chains: int = 16,
                    num_steps: int = 400, max_iter: int = 6, seed: int = 0, restrict_to: RestrictTo = None
                    ) -> dict[str, Any]:
    """SGLD step for steep (non-quadratic) potentials: ε = c/κ̄ with κ̄ = E_p[ΔU]/d, the posterior's mean curvature.

    Stein's identity (integration by parts under p ∝ e^{−U}) gives E_p[ΔU] = E_p[‖∇U‖²], so κ̄ is read from the
    drift of a short SGLD pilot, without a Hessian. At a quartic or sextic minimum ∇²U(w*) = γ says nothing (the
    curvature lives where the posterior lives: for U = nβ·w^{2k}, κ̄ = 2k(2k−1)·nβ^{1/k}·E[v^{2k−2}], v ~ e^{−v^{2k}}),
    so a rule from the curvature at w* picks steps far too large (ε = 0.01 read +19 % on w⁴ and +13 % on w⁶ at
    nβ = 145). Unadjusted Langevin's bias in λ̂ is ≈ εκ/4 on a quadratic (variance 1/(κ(1 − εκ/4))) and measured
    ≈ 0.3·εκ̄ on w⁴, w⁶, so c = 0.1 keeps it near 3 %. The fixed point is found by iteration: ε_{j+1} = c/κ̄(ε_j)
    (κ̄ measured at too large a step is too large, so the iteration approaches from above), halving on blow-up,
    stopping when ε changes by < 20 %. Each pilot covers ≈ num_steps·c/2 relaxation times of a mode of stiffness κ̄.
    A step rule for low-dimensional steep potentials: on an ill-conditioned network the mean curvature is far
    below the largest, and the step must also respect ε < 4/λ_max(∇²U). Returns {"lr", "mean_curvature",
    "iterations"}.
    """
    problem = LLCProblem.build(model, loader, loss_fn, restrict_to)
    n = problem.data.num_samples
    nb = float(n / math.log(n) if nbeta is None else nbeta)
    if lr0 is None:
        lam = top_curvature(model, loader, loss_fn, restrict_to=restrict_to)
        lr0 = c / (nb * lam + localization)
    lr, kappa, iterations = float(lr0), math.inf, 0
    while iterations < max_iter:
        iterations += 1
        kappa = _pilot_curvature(problem, lr, nb, localization, num_chains, num_steps, seed)
        if not math.isfinite(kappa):
            lr *= 0.5
            continue
        new = c / kappa
        done = abs(new / lr - 1.0) < 0.2
        lr = new
        if done:
            break
    return {"lr": lr, "mean_curvature": kappa, "iterations": iterations}
