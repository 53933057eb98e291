"""Typing stages from the LLC change and the (smoothed) loss change, with type probabilities.

Types (Hoogland et al., arXiv 2402.02364, §3): **A** — the LLC increases and the loss decreases; **B** — the LLC
decreases while the loss changes little. Otherwise ``"other"`` (the loss rises, or the LLC rises without the loss
falling, or the LLC falls while the loss falls a lot), ``"flat"`` (no LLC change), and without a loss curve only the
direction: ``"up"`` / ``"down"``.

Loss smoothing: local linear regression (Fan & Gijbels 1996, "Local Polynomial Modelling", ch. 3) in
x = log(step + 1) with a Gaussian kernel of bandwidth h(x) = max(``bandwidth`` × x-range, distance to the k-th
nearest point); its standard error is √(Σ l_i(x)² σ²(x)) with l_i the equivalent-kernel weights and σ²(x) the
kernel-weighted difference-based noise variance ½(y_{i+1} − y_i)² (Rice 1984, Ann. Statist. 12:1215). Local linear
fits have no boundary bias at the start of training, where the loss falls fastest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KINDS = ("A", "B", "other", "flat")
KINDS_NO_LOSS = ("up", "down", "flat")


@dataclass
class SmoothedLoss:
    """Local-linear smoothing of a (possibly very noisy, per-step) loss curve; ``at(steps)`` → (mean, se)."""

    x: np.ndarray
    y: np.ndarray
    axis: str
    bandwidth: float
    k_nearest: int

    def __post_init__(self) -> None:
        d = np.diff(self.y)
        self._dvar = np.r_[d * d / 2, d[-1:] * d[-1:] / 2] if len(d) else np.zeros_like(self.y)
        self._h0 = self.bandwidth * float(np.ptp(self.x) or 1.0)

    def _to_x(self, steps: np.ndarray) -> np.ndarray:
        steps = np.asarray(steps, dtype=float)
        return np.log(steps + 1.0) if self.axis == "log" else steps

    def at(self, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Smoothed loss and its standard error at ``steps``."""
        xq = np.atleast_1d(self._to_x(steps))
        mean, se = np.empty(len(xq)), np.empty(len(xq))
        k = min(self.k_nearest, len(self.x) - 1)
        for n, x0 in enumerate(xq):
            dist = np.abs(self.x - x0)
            h = max(self._h0, float(np.partition(dist, k)[k]) if k > 0 else self._h0, 1e-12)
            w = np.exp(-0.5 * (dist / h) ** 2)
            w[dist > 4 * h] = 0.0
            u = self.x - x0
            s0, s1, s2 = w.sum(), (w * u).sum(), (w * u * u).sum()
            det = s0 * s2 - s1 * s1
            l_w = w * (s2 - s1 * u) / det if det > 1e-12 * s0 * s0 * h * h else w / s0
            mean[n] = float(l_w @ self.y)
            var = float((w @ self._dvar) / s0)
            se[n] = math.sqrt(max(var, 0.0) * float(l_w @ l_w))
        return mean, se


def smooth_loss(steps: np.ndarray, loss: np.ndarray, axis: str = "log", bandwidth: float = 0.004,
                k_nearest: int | None = None) -> SmoothedLoss:
    """Smooth a loss curve (see module docstring). ``k_nearest`` defaults to max(2, min(10, n // 50))."""
    steps = np.asarray(steps, dtype=float)
    x = np.log(steps + 1.0) if axis == "log" else steps.copy()
    k = k_nearest if k_nearest is not None else max(2, min(10, len(x) // 50))
    return SmoothedLoss(x, np.asarray(loss, dtype=float), axis, bandwidth, k)


def type_probabilities(dllc: np.ndarray, dloss: np.ndarray | None, llc_scale: float, loss_range: float, *,
                       min_rel_change: float, loss_tol: float, flat_loss: float) -> dict[str, float]:
    """Probability of each type from joint draws of (Δλ, ΔL) across one stage (R = the loss range).

    A draw is ``flat`` if |Δλ| < max(``min_rel_change`` × ``llc_scale``, 2 sd(Δλ)); otherwise **A** if Δλ > 0 and
    the loss falls, ΔL < −``loss_tol`` × R; **B** if Δλ < 0 and the loss changes little: it does not rise,
    ΔL ≤ ``loss_tol`` × R, and |ΔL| ≤ ``flat_loss`` × R; else ``other`` — e.g. the LLC creeping up while the loss
    falls by less than ``loss_tol`` × R (the last stage of Hoogland et al.'s language model), a rising loss, or the LLC
    falling while the loss falls a lot. Without a loss curve: ``up`` / ``down`` / ``flat``.
    """
    # a change the posterior cannot tell from zero (|Δλ| < 2 sd) or below min_rel_change × range is no change
    moved = np.abs(dllc) >= max(min_rel_change * llc_scale, 2.0 * float(np.std(dllc)))
    if dloss is None:
        up, down = moved & (dllc > 0), moved & (dllc < 0)
        return {"up": float(up.mean()), "down": float(down.mean()), "flat": float((~moved).mean())}
    rng = max(loss_range, 1e-300)
    a = moved & (dllc > 0) & (dloss < -loss_tol * rng)
    b = moved & (dllc < 0) & (dloss <= loss_tol * rng) & (np.abs(dloss) <= flat_loss * rng)
    flat = ~moved
    other = ~(a | b | flat)
    return {"A": float(a.mean()), "B": float(b.mean()), "other": float(other.mean()), "flat": float(flat.mean())}
