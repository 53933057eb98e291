"""Segmentation: stage boundaries of a smoothed LLC curve, each with an interval and an existence probability.

A *move* is a maximal run of the grid where the posterior slope is significantly non-zero, |μ'(x)| > z·sd(μ'(x)),
with one sign, and where μ changes by at least ``min_rel_change`` × range(μ). Where no such run is, a run where the
change across a window of ±0.3 GP lengthscales is significant, |D| > z·sd(D) (:func:`secant_changes`), is a move
too: a slow, small LLC drop under noise has no point of significant slope, but a significant change. So is a
gap of at least one GP lengthscale between two consecutive checkpoints across which the level changes
significantly (:func:`gap_changes`), where no other move is: a transition that happened between two sparse
checkpoints has no point of significant slope either. A run of the same sign is split at an
interior minimum of |μ'| below ``plateau_slope`` × the smaller of the slope peaks on either side (two transitions
in the same direction with a slowdown between them). Stages are the moves; a boundary lies between two consecutive
moves — at the middle of the gap between them (the plateau, or the extremum of λ̂ when the directions differ), or at
the split point. This is Hoogland et al.'s rule (arXiv 2402.02364: boundaries at critical points of the smoothed LLC,
dλ̂/dlog t ≈ 0) made explicit for plateaus, where the critical point is any point of the plateau.

Uncertainty. The *interval* of a boundary is the contiguous set of grid points between the two slope peaks whose
slope is not significantly larger than the slope at the boundary (|μ'(x)| − z·sd ≤ |μ'(b)|). The *existence
probability* is the posterior probability, over joint GP draws of λ at the stage edges and of λ' at the boundary and
at the two peaks, that both neighbouring stages move in their directions by at least ``min_rel_change`` × range and,
for two moves in the same direction, that the slope across the plateau between them (its mean over the gap, or the
slope at a split point) is below ``plateau_slope`` × the smaller of the two moves' mean slopes.
Boundaries below ``level`` are removed (least probable first, probabilities recomputed after each removal); so is
the weaker boundary of a stage whose own observations do not show its move (:func:`unsupported_stages`), or that is
shorter than ``min_length`` or holds fewer than ``min_points`` checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from slt_tools.stages._gp import GP


@dataclass
class Boundary:
    """A stage boundary: the step, a plausible interval [lo, hi] of steps, the posterior probability that it
    exists, and (with ``replicates``) the fraction of posterior-predictive replicates of the data that find it."""

    step: float
    interval: tuple[float, float]
    probability: float
    same_direction: bool
    replicate_support: float = float("nan")

    def to_dict(self) -> dict:
        rs = self.replicate_support
        return {"step": self.step, "interval": list(self.interval), "probability": self.probability,
                "same_direction": self.same_direction, "replicate_support": None if math.isnan(rs) else rs}


@dataclass
class _Move:
    i0: int
    i1: int
    sign: float
    peak: int


def _runs(a: np.ndarray, sig: np.ndarray, sign: np.ndarray) -> list[_Move]:
    out, i, n = [], 0, len(a)
    while i < n:
        if not sig[i]:
            i += 1
            continue
        j = i
        while j + 1 < n and sig[j + 1] and sign[j + 1] == sign[i]:
            j += 1
        out.append(_Move(i, j, float(sign[i]), i + int(np.argmax(a[i: j + 1]))))
        i = j + 1
    return out


def _split(m: _Move, a: np.ndarray, mu: np.ndarray, thr: float, ratio: float) -> list[_Move]:
    """Split a same-sign move at its deepest interior slowdown (recursively)."""
    best, best_r = None, ratio
    for i in range(m.i0 + 1, m.i1):
        if not (a[i] <= a[i - 1] and a[i] < a[i + 1]):
            continue
        left, right = a[m.i0: i].max(), a[i + 1: m.i1 + 1].max()
        r = a[i] / max(min(left, right), 1e-300)
        if r < best_r and abs(mu[i] - mu[m.i0]) >= thr and abs(mu[m.i1] - mu[i]) >= thr:
            best, best_r = i, r
    if best is None:
        return [m]
    lm = _Move(m.i0, best, m.sign, m.i0 + int(np.argmax(a[m.i0: best + 1])))
    rm = _Move(best, m.i1, m.sign, best + int(np.argmax(a[best: m.i1 + 1])))
    return _split(lm, a, mu, thr, ratio) + _split(rm, a, mu, thr, ratio)


def secant_changes(gp: GP, grid_x: np.ndarray, half_width: float, x: np.ndarray,
                   min_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and sd of D(x) = f(x + w) − f(x − w) on the grid (w = ``half_width``, clipped at the ends),
    from the joint posterior of f on the grid. Where the noise is large, the slope at a point is poorly determined
    while the change across a window is not (a slow, small LLC drop). Only where each half-window holds at least
    ``min_points`` observations (elsewhere D is the prior's, not the data's); D = 0 there."""
    n = len(grid_x)
    m = max(1, int(round(half_width / max(grid_x[1] - grid_x[0], 1e-300))))
    mean, cov = gp.joint(grid_x, grid_x[:0])
    lo, hi = np.clip(np.arange(n) - m, 0, n - 1), np.clip(np.arange(n) + m, 0, n - 1)
    d = mean[hi] - mean[lo]
    var = cov[hi, hi] + cov[lo, lo] - 2 * cov[hi, lo]
    xs = np.sort(x)
    left = np.searchsorted(xs, grid_x, "right") - np.searchsorted(xs, grid_x[lo], "left")
    right = np.searchsorted(xs, grid_x[hi], "right") - np.searchsorted(xs, grid_x, "left")
    d = np.where((left >= min_points) & (right >= min_points), d, 0.0)
    return d, np.sqrt(np.clip(var, 0, None))


def gap_changes(x: np.ndarray, y: np.ndarray, noise_var: np.ndarray, grid_x: np.ndarray,
                min_points: int, gp: GP | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per grid point in the gap between consecutive observations x_i < x_{i+1}: the change of level across the gap
    read from the data, d = m_R − m_L, with m_L, m_R the inverse-variance weighted means (weights 1/σ_j², the GP's
    fitted noise variances) of the ``min_points`` observations ending at x_i and starting at x_{i+1}, and its
    standard error √(1/Σw_L + 1/Σw_R); 0 (se 1) where either side has fewer points. Given ``gp``, d is also set to
    0 where the gap is narrower than the GP lengthscale (there the GP interpolates and its slope is the test), or
    where the posterior change f(x_{i+1}) − f(x_i) is not significant (|·| ≤ 2 sd) or has the other sign: the
    change must happen *in this gap*, not in a neighbouring one that a block reaches into.
    A transition that happens between two checkpoints leaves the GP slope inside the gap undetermined — the data do
    not say where in the gap it happened — while the change of level across it is determined; the block means keep
    one outlying point from making it."""
    order = np.argsort(x)
    xs, ys, w = x[order], y[order], 1.0 / noise_var[order]
    n, k = len(xs), min_points
    d_gap, se_gap = np.zeros(max(n - 1, 0)), np.ones(max(n - 1, 0))
    for i in range(k - 1, n - k):
        lw, rw = w[i - k + 1: i + 1], w[i + 1: i + 1 + k]
        d_gap[i] = rw @ ys[i + 1: i + 1 + k] / rw.sum() - lw @ ys[i - k + 1: i + 1] / lw.sum()
        se_gap[i] = math.sqrt(1.0 / lw.sum() + 1.0 / rw.sum())
    if gp is not None:  # and the GP's change across the gap itself must be significant, of the same sign
        mean, cov = gp.joint(xs, xs[:0])
        g = np.diff(mean)
        gsd = np.sqrt(np.clip(np.diag(cov)[1:] + np.diag(cov)[:-1] - 2 * np.diag(cov, 1), 1e-300, None))
        wide = np.diff(xs) >= gp.hyperparameters["lengthscale"]
        keep = wide & (np.abs(g) > 2 * gsd) & (np.sign(g) == np.sign(d_gap))
        d_gap = np.where(keep, d_gap, 0.0)
    j = np.clip(np.searchsorted(xs, grid_x, "right") - 1, 0, max(n - 2, 0))
    return d_gap[j], se_gap[j]


def find_moves(mu: np.ndarray, slope: np.ndarray, slope_sd: np.ndarray, *, z: float, min_rel_change: float,
               plateau_slope: float, secant: tuple[np.ndarray, np.ndarray] | None = None,
               gap: tuple[np.ndarray, np.ndarray] | None = None) -> list[_Move]:
    """Moves of the smoothed curve (see module docstring). A grid point moves if its slope is significant,
    |μ'| > z·sd, or (given ``secant`` = :func:`secant_changes`) the change across the window around it is,
    |D| > z·sd(D) and |D| ≥ ``min_rel_change`` × range; the direction is the slope's, else D's. Given ``gap`` =
    :func:`gap_changes`, grid points in a gap between two checkpoints across which the change is significant (same
    test) and that no other move covers are a move too, in the direction of that change."""
    a = np.abs(slope)
    thr = min_rel_change * float(np.ptp(mu))
    runs = [m for m in _runs(a, a > z * slope_sd, np.sign(slope)) if abs(mu[m.i1] - mu[m.i0]) >= thr]
    if secant is not None:  # moves seen only by the change across a window, where no slope run is
        d, dsd = secant
        taken = np.zeros(len(a), bool)
        for m in runs:
            taken[m.i0: m.i1 + 1] = True
        extra = [m for m in _runs(a, (np.abs(d) > z * dsd) & (np.abs(d) >= thr), np.sign(d))
                 if not taken[m.i0: m.i1 + 1].any() and abs(mu[m.i1] - mu[m.i0]) >= thr]
        runs = sorted(runs + extra, key=lambda m: m.i0)
    if gap is not None:  # changes between two checkpoints, where no move is: only the points no move covers
        d, dsd = gap
        taken = np.zeros(len(a), bool)
        for m in runs:
            taken[m.i0: m.i1 + 1] = True
        sig = (np.abs(d) > z * dsd) & (np.abs(d) >= thr) & ~taken
        runs = sorted(runs + _runs(a, sig, np.sign(d)), key=lambda m: m.i0)
    merged: list[_Move] = []
    for m in runs:  # same-sign runs with no slowdown between them are one move
        if merged and merged[-1].sign == m.sign:
            p = merged[-1]
            gap = a[p.i1: m.i0 + 1].min()
            if gap >= plateau_slope * min(a[p.peak], a[m.peak]):
                merged[-1] = _Move(p.i0, m.i1, m.sign, p.peak if a[p.peak] >= a[m.peak] else m.peak)
                continue
        merged.append(m)
    return [piece for m in merged for piece in _split(m, a, mu, thr, plateau_slope)]


def _boundary_index(left: _Move, right: _Move, a: np.ndarray, sd: np.ndarray, tie_z: float = 1.0) -> int:
    """Split point of touching moves; else the middle of the points of the gap whose slope is within ``tie_z``
    posterior sds of zero (the critical point, where it is located; the plateau's middle, where it is not)."""
    if left.i1 >= right.i0:
        return left.i1
    gap = np.arange(left.i1, right.i0 + 1)
    tied = gap[a[gap] <= tie_z * sd[gap]]
    if len(tied) == 0:
        return int(gap[np.argmin(a[gap])])
    return int((tied[0] + tied[-1]) // 2)


def _merge(moves: list[_Move], k: int, mu: np.ndarray) -> list[_Move]:
    """Remove the boundary between moves k and k+1."""
    p, q = moves[k], moves[k + 1]
    big = p if abs(mu[p.i1] - mu[p.i0]) >= abs(mu[q.i1] - mu[q.i0]) else q
    return [*moves[:k], _Move(p.i0, q.i1, big.sign, big.peak), *moves[k + 2:]]


def existence_probabilities(gp: GP, grid_x: np.ndarray, moves: list[_Move], a: np.ndarray, sd: np.ndarray, *,
                            thr: float, plateau_slope: float, num_samples: int,
                            rng: np.random.Generator) -> np.ndarray:
    """Posterior probability of each boundary between consecutive moves (see module docstring)."""
    if len(moves) < 2:
        return np.array([])
    nb = len(moves) - 1
    b = [_boundary_index(moves[k], moves[k + 1], a, sd) for k in range(nb)]
    edges = [0, *b, len(grid_x) - 1]
    ends = [i for m in moves for i in (m.i0, m.i1)]
    draws = gp.sample_joint(grid_x[[*edges, *ends]], grid_x[b], num_samples, rng)
    f, fe, sb = draws[:, : len(edges)], draws[:, len(edges): len(edges) + len(ends)], np.abs(draws[:, -nb:])
    width = np.array([max(grid_x[m.i1] - grid_x[m.i0], grid_x[1] - grid_x[0]) for m in moves])
    avg = np.abs(fe[:, 1::2] - fe[:, 0::2]) / width  # mean |slope| over each move
    probs = []
    for k in range(nb):
        dl, dr = f[:, k + 1] - f[:, k], f[:, k + 2] - f[:, k + 1]
        ok = (moves[k].sign * dl >= thr) & (moves[k + 1].sign * dr >= thr)
        if moves[k].sign == moves[k + 1].sign:
            gap = grid_x[moves[k + 1].i0] - grid_x[moves[k].i1]
            # slope across the plateau: its mean over the gap between the moves (or the point slope at a split)
            s_gap = np.abs(fe[:, 2 * k + 2] - fe[:, 2 * k + 1]) / gap if gap > 2 * (grid_x[1] - grid_x[0]) else sb[:, k]
            ok &= s_gap < plateau_slope * np.minimum(avg[:, k], avg[:, k + 1])
        probs.append(float(ok.mean()))
    return np.array(probs)


def _interval(left: _Move, right: _Move, bi: int, a: np.ndarray, sd: np.ndarray, z: float) -> tuple[int, int]:
    """Grid indices [lo, hi] around the boundary whose slope is not significantly larger than the boundary's; at
    least one grid cell either side (the resolution at which the boundary is located, so never a point)."""
    ok = a - z * sd <= a[bi]
    lo = hi = bi
    while lo - 1 > left.peak and ok[lo - 1]:
        lo -= 1
    while hi + 1 < right.peak and ok[hi + 1]:
        hi += 1
    return max(min(lo, bi - 1), 0), min(max(hi, bi + 1), len(a) - 1)


def unsupported_stages(edges: list[float], signs: list[float], x: np.ndarray, y: np.ndarray, noise_var: np.ndarray,
                       z: float) -> list[int]:
    """Stages whose own observations do not show their move: with the stage's points split at their median x into
    an earlier and a later half, the inverse-variance weighted means m₁, m₂ (weights 1/σ_i², σ_i² the GP's fitted
    noise variance) must differ in the move's direction by more than z·√(1/Σw₁ + 1/Σw₂). This is a check on the data,
    not on the GP: a stationary kernel fitted to a step overshoots (rings) on either side of it, and its own posterior
    then supports moves that the points do not show."""
    out = []
    for k in range(len(edges) - 1):
        inside = np.flatnonzero((x >= edges[k]) & (x <= edges[k + 1]))
        half = len(inside) // 2
        if half < 1:
            continue
        early, late = inside[:half], inside[len(inside) - half:]
        w1, w2 = 1.0 / noise_var[early], 1.0 / noise_var[late]
        m1, m2 = float(w1 @ y[early] / w1.sum()), float(w2 @ y[late] / w2.sum())
        if signs[k] * (m2 - m1) <= z * math.sqrt(1.0 / w1.sum() + 1.0 / w2.sum()):
            out.append(k)
    return out


def _prune(gp: GP, grid_x: np.ndarray, x: np.ndarray, moves: list[_Move], *, z: float, min_rel_change: float,
           plateau_slope: float, level: float, min_points: int, min_length: float, num_samples: int,
           rng: np.random.Generator) -> tuple[list[_Move], np.ndarray, list[int]]:
    """Remove boundaries between ``moves`` (module docstring) until every remaining one is supported; returns the
    moves, the boundaries' existence probabilities and their grid indices."""
    mu, _, slope, slope_sd = gp.predict(grid_x)
    a = np.abs(slope)
    thr = min_rel_change * float(np.ptp(mu))
    span = float(grid_x[-1] - grid_x[0])
    probs, b = np.array([]), []
    while len(moves) > 1:
        b = [_boundary_index(moves[k], moves[k + 1], a, slope_sd) for k in range(len(moves) - 1)]
        probs = existence_probabilities(gp, grid_x, moves, a, slope_sd, thr=thr, plateau_slope=plateau_slope,
                                        num_samples=num_samples, rng=rng)
        edges = [grid_x[0], *grid_x[b], grid_x[-1]]
        short = [k for k in range(len(edges) - 1) if edges[k + 1] - edges[k] < min_length * span
                 or int(((x >= edges[k]) & (x <= edges[k + 1])).sum()) < min_points]
        bad = short or unsupported_stages(edges, [m.sign for m in moves], x, gp.y_data, gp.noise_var(), z)
        if bad:  # the weaker boundary of the first too-short (or unsupported) stage goes
            k = bad[0]
            cands = [j for j in (k - 1, k) if 0 <= j < len(b)]
            moves = _merge(moves, min(cands, key=lambda j: probs[j]), mu)
            continue
        if probs.min() >= level:
            break
        moves = _merge(moves, int(np.argmin(probs)), mu)
    return moves, (probs if len(moves) > 1 else np.array([])), (b if len(moves) > 1 else [])


def _moves(gp: GP, grid_x: np.ndarray, x: np.ndarray, *, z: float, min_rel_change: float, plateau_slope: float,
           min_points: int, secant_window: bool, gap_moves: bool) -> list[_Move]:
    mu, _, slope, slope_sd = gp.predict(grid_x)
    secant = (secant_changes(gp, grid_x, 0.3 * gp.hyperparameters["lengthscale"], x, min_points)
              if secant_window else None)
    return find_moves(mu, slope, slope_sd, z=z, min_rel_change=min_rel_change, plateau_slope=plateau_slope,
                      secant=secant,
                      gap=gap_changes(x, gp.y_data, gp.noise_var(), grid_x, min_points, gp) if gap_moves else None)


def replicate_support(moves: list[_Move], replicate_bounds: list[list[int]]) -> np.ndarray:
    """Per boundary between moves k and k+1, the fraction of replicates with a boundary (grid index) strictly
    between the two moves' slope peaks: the stretch where a boundary separating those two moves can lie."""
    out = []
    for k in range(len(moves) - 1):
        lo, hi = moves[k].peak, moves[k + 1].peak
        out.append(float(np.mean([any(lo < i < hi for i in rb) for rb in replicate_bounds])))
    return np.array(out)


def segment(gp: GP, grid_x: np.ndarray, grid_steps: np.ndarray, x: np.ndarray, *, z: float, min_rel_change: float,
            plateau_slope: float, level: float, min_points: int, min_length: float, num_samples: int,
            seed: int, secant_window: bool = True, gap_moves: bool = True, replicates: int = 0,
            replicate_level: float = 0.0) -> tuple[list[Boundary], list[_Move]]:
    """Boundaries (with intervals and existence probabilities ≥ ``level``) and the moves between them.

    ``replicates`` > 0: the segmentation is repeated on that many posterior-predictive replicates of the data
    (:meth:`GP.sample_replicates`, hyperparameters held fixed) — curves a repeat of the run could have given — and
    each boundary reports its ``replicate_support``, the fraction of replicates that find a boundary between the
    same two moves (:func:`replicate_support`). Boundaries with support below ``replicate_level`` are removed, least
    supported first, the rest re-pruned after each removal (0: none is removed for its support)."""
    mkw = dict(z=z, min_rel_change=min_rel_change, plateau_slope=plateau_slope, min_points=min_points,
               secant_window=secant_window, gap_moves=gap_moves)
    pkw = dict(z=z, min_rel_change=min_rel_change, plateau_slope=plateau_slope, level=level, min_points=min_points,
               min_length=min_length)
    rng = np.random.default_rng(seed)
    moves, probs, _ = _prune(gp, grid_x, x, _moves(gp, grid_x, x, **mkw), num_samples=num_samples, rng=rng, **pkw)
    mu, _, slope, slope_sd = gp.predict(grid_x)
    support = np.full(max(len(moves) - 1, 0), np.nan)
    if replicates and len(moves) > 1:
        rep = []
        for y_rep in gp.sample_replicates(replicates, rng):
            g = gp.conditioned_on(y_rep)
            rep.append(_prune(g, grid_x, x, _moves(g, grid_x, x, **mkw), num_samples=max(200, num_samples // 4),
                              rng=rng, **pkw)[2])
        support = replicate_support(moves, rep)
        while len(moves) > 1 and support.min() < replicate_level:
            moves = _merge(moves, int(np.argmin(support)), mu)
            moves, probs, _ = _prune(gp, grid_x, x, moves, num_samples=num_samples, rng=rng, **pkw)
            support = replicate_support(moves, rep) if len(moves) > 1 else support[:0]
    if len(moves) < 2:
        return [], moves
    a = np.abs(slope)
    out = []
    for k in range(len(moves) - 1):
        bi = _boundary_index(moves[k], moves[k + 1], a, slope_sd)
        lo, hi = _interval(moves[k], moves[k + 1], bi, a, slope_sd, z)
        out.append(Boundary(float(grid_steps[bi]), (float(grid_steps[lo]), float(grid_steps[hi])), float(probs[k]),
                            moves[k].sign == moves[k + 1].sign, float(support[k])))
    return out, moves
