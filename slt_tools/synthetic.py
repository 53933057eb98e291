"""Synthetic LLC and loss curves with planted developmental stages, for validating stage detection.

Curves live on log-spaced checkpoints. The true LLC is a constant plus a sum of logistic transitions in x = log(step):
λ(x) = λ0 + Σ_k a_k σ((x − c_k)/w_k). Stage k contains transition k; its boundaries are the critical points of λ
between transitions (the midpoints of the plateaus in log-step). A type-A stage has a_k > 0 and a substantial loss drop;
a type-B stage has a_k < 0 and a loss drop below 1 % of the run's loss range. Observed λ̂ = λ + N(0, (noise·λ0)²):
``noise`` is the checkpoint-to-checkpoint scatter of the estimate relative to the LLC level. In the published LLC curve
of Hoogland et al. (../shared/data/hoogland2024_lm) that scatter is about 0.07 % of λ̂ (robust second-difference
estimate), while the across-chain std is about 12 % of λ̂ (chains reuse seeds across checkpoints, so the mean moves
smoothly); ``llc_std`` reports ``chain_std`` × λ0 accordingly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SyntheticCurves:
    steps: np.ndarray
    llc: np.ndarray
    llc_std: np.ndarray
    loss: np.ndarray
    true_llc: np.ndarray
    boundaries: np.ndarray  # planted stage boundaries (steps), excluding the run's ends
    kinds: list[str]  # planted kind of each stage ("A" or "B")


def make_synthetic_curves(seed: int = 0, num_points: int = 80, num_stages: int | None = None, noise: float = 0.01,
                          chain_std: float = 0.12, first_step: float = 10.0, last_step: float = 1e5,
                          p_type_b: float = 0.35) -> SyntheticCurves:
    """Draw one random run with 2–5 planted stages (see module docstring)."""
    rng = np.random.default_rng(seed)
    k = int(num_stages if num_stages is not None else rng.integers(2, 6))
    steps = np.unique(np.round(np.geomspace(first_step, last_step, num_points)))
    x = np.log(steps)
    lo, hi = x[0], x[-1]
    # transition centres: spread out with a minimum gap so every plateau is resolvable
    span = hi - lo
    gap = span / (k + 1)
    centres = lo + gap * (np.arange(1, k + 1) + rng.uniform(-0.25, 0.25, size=k))
    widths = rng.uniform(0.08, 0.2, size=k) * gap
    kinds = ["A"] + ["B" if rng.random() < p_type_b else "A" for _ in range(k - 1)]
    lam0 = rng.uniform(20, 100)
    amps = np.array([rng.uniform(0.3, 0.8) * lam0 * (1 if kd == "A" else -0.6) for kd in kinds])
    sig = 1 / (1 + np.exp(-(x[None, :] - centres[:, None]) / widths[:, None]))
    true = lam0 + (amps[:, None] * sig).sum(0)
    loss_drops = np.array([rng.uniform(0.5, 2.0) if kd == "A" else rng.uniform(0.0, 0.004) for kd in kinds])
    loss_drops[kinds.index("A")] += 2.0
    loss = 0.05 + loss_drops.sum() - (loss_drops[:, None] * sig).sum(0)
    loss = loss * (1 + 0.002 * rng.standard_normal(len(x)))
    scale = rng.uniform(0.8, 1.2, size=len(x))
    std = chain_std * lam0 * scale
    llc = true + rng.standard_normal(len(x)) * noise * lam0 * scale
    bounds = np.exp(0.5 * (centres[:-1] + centres[1:]))
    return SyntheticCurves(steps, llc, std, loss, true, bounds, kinds)
