"""``detect_stages``: validated input → GP smoothing → segmentation → typing (see the package docstring)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from slt_tools.stages._gp import GP
from slt_tools.stages.classify import smooth_loss, type_probabilities
from slt_tools.stages.inputs import prepare
from slt_tools.stages.segmentation import Boundary, segment


@dataclass
class Stage:
    """One developmental stage [start, end] (training steps): its type, the changes across it, and uncertainty.

    ``confidence`` is the posterior probability of ``kind``; ``type_probs`` that of every type. ``start_interval``
    and ``start_probability`` describe the boundary the stage starts at (``None``/NaN for the first stage).
    ``typing_window``: the steps over which the LLC moves, where the loss change that typed the stage was read
    (``delta_loss_sd`` is that change's standard error).
    """

    start: float
    end: float
    kind: str
    delta_llc: float
    delta_loss: float
    confidence: float
    llc_start: float = float("nan")
    llc_end: float = float("nan")
    delta_llc_sd: float = float("nan")
    delta_loss_sd: float = float("nan")
    type_probs: dict[str, float] = field(default_factory=dict)
    start_interval: tuple[float, float] | None = None
    start_probability: float = float("nan")
    typing_window: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            return list(v) if isinstance(v, tuple) else v
        return {k: clean(v) for k, v in asdict(self).items()}


@dataclass
class StageDetails:
    """Smoothed curves behind a detection (for plots and diagnostics)."""

    grid_steps: np.ndarray
    llc_smooth: np.ndarray
    llc_smooth_sd: np.ndarray
    slope: np.ndarray
    slope_sd: np.ndarray
    boundaries: list[float]
    hyperparameters: dict[str, float] = field(default_factory=dict)
    loss_smooth: np.ndarray | None = None


class StageList(list):
    """The stages (a list of :class:`Stage`) plus ``boundaries`` (:class:`Boundary`, with intervals and existence
    probabilities), ``excluded`` (checkpoints left out and why), ``agreement`` (with essential-dynamics milestones,
    if given) and ``details``."""

    def __init__(self, stages: list[Stage], boundaries: list[Boundary], excluded: list[dict], details: StageDetails,
                 agreement: dict | None = None) -> None:
        super().__init__(stages)
        self.boundaries, self.excluded, self.details, self.agreement = boundaries, excluded, details, agreement

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self], "boundaries": [b.to_dict() for b in self.boundaries],
                "excluded": self.excluded, "agreement": self.agreement}


def compare_milestones(boundaries: list[float], milestones: Any, tol_decades: float = 0.15) -> dict[str, Any]:
    """Match LLC boundaries with essential-dynamics milestones (one-to-one, nearest first, within ``tol_decades``
    in log10 step). ``milestones``: steps, or an object with ``.milestones`` (each with ``.step``)."""
    ms = [float(getattr(m, "step", m)) for m in getattr(milestones, "milestones", milestones)]
    pairs = sorted(((abs(math.log10(b + 1) - math.log10(m + 1)), i, j) for i, b in enumerate(boundaries)
                    for j, m in enumerate(ms)))
    used_b, used_m, matched = set(), set(), []
    for d, i, j in pairs:
        if d <= tol_decades and i not in used_b and j not in used_m:
            used_b.add(i)
            used_m.add(j)
            matched.append({"boundary": boundaries[i], "milestone": ms[j], "decades": d})
    return {"agree": sorted(matched, key=lambda p: p["boundary"]),
            "boundaries_without_milestone": [b for i, b in enumerate(boundaries) if i not in used_b],
            "milestones_without_boundary": [m for j, m in enumerate(ms) if j not in used_m],
            "tolerance_decades": tol_decades}


def _single_flat(c, axis: str, details_grid: np.ndarray) -> StageList:
    dl = float("nan")
    if c.loss is not None:
        sl = smooth_loss(c.loss_steps, c.loss, axis)
        m, _ = sl.at(np.array([c.steps[0], c.steps[-1]]))
        dl = float(m[1] - m[0])
    st = Stage(float(c.steps[0]), float(c.steps[-1]), "flat", 0.0, dl, 1.0, float(c.llc[0]), float(c.llc[-1]), 0.0,
               type_probs={"flat": 1.0})
    z = np.zeros_like(details_grid)
    det = StageDetails(details_grid, np.full_like(details_grid, float(np.mean(c.llc))), z, z, z, [])
    return StageList([st], [], c.excluded, det)


def detect_stages(steps: Any, llc: Any = None, loss: Any = None, llc_std: Any = None, *, loss_steps: Any = None,
                  flags: Any = None, exclude_flagged: bool = True, milestones: Any = None, axis: str = "log",
                  level: float = 0.95, min_points: int = 3, min_length: float = 0.02, min_lengthscale: float = 0.04,
                  max_lengthscale: float = 0.15, plateau_slope: float = 0.7, z: float = 2.0,
                  min_rel_change: float = 0.02, loss_tol: float = 0.04, flat_loss: float = 0.2,
                  loss_bandwidth: float = 0.004, agreement_tol: float = 0.15, num_samples: int = 2000,
                  replicates: int = 20, replicate_level: float = 0.0, gap_moves: bool = True, seed: int = 0,
                  return_details: bool = False) -> StageList | tuple[StageList, StageDetails]:
    """Split training into stages of LLC change and type each (A/B/other/flat; up/down/flat without a loss).

    Inputs: equal-length ``steps, llc, llc_std`` (or a ``Trajectory`` first); ``loss`` on the same steps or on its
    own ``loss_steps`` (e.g. the per-step training loss). ``flags``: per checkpoint a reason string/True (flagged) or
    None/False; a Trajectory's results are read with :func:`flags_from_results`; λ̂ < 0 is always flagged. Flagged
    checkpoints are left out unless ``exclude_flagged=False``; NaN/inf ones are dropped with a warning naming their
    steps; the result's ``excluded`` lists both. Errors: unequal lengths, non-increasing or duplicated steps, fewer
    than 2·``min_points`` usable checkpoints, a bad ``axis``. A constant curve is one ``"flat"`` stage.
    Method and knobs: the docstrings of :mod:`slt_tools.stages.segmentation` and :mod:`slt_tools.stages.classify`.
    ``milestones`` (steps or :func:`slt_tools.essential_dynamics` output) adds ``result.agreement``.
    ``replicates``: posterior-predictive replicates whose segmentations give each boundary its ``replicate_support``
    (``replicate_level`` > 0 removes boundaries supported less); ``gap_moves``: changes of level between two
    consecutive checkpoints count as moves (sparse checkpoints, transitions between them).
    """
    if axis not in ("log", "linear"):
        raise ValueError(f"axis must be 'log' or 'linear', got {axis!r}")
    c = prepare(steps, llc, loss, llc_std, loss_steps=loss_steps, flags=flags, exclude_flagged=exclude_flagged)
    s, y, sd = c.steps, c.llc, c.llc_std
    if len(s) < 2 * min_points:
        raise ValueError(f"need at least {2 * min_points} checkpoints to find stages (min_points={min_points}), got "
                         f"{len(s)} usable" + (f" after excluding {len(c.excluded)}" if c.excluded else ""))
    if axis == "log" and s.min() < 0:
        raise ValueError("axis='log' needs non-negative steps")
    x = np.log(s + 1.0) if axis == "log" else s.copy()
    span = float(x.max() - x.min())
    grid_x = np.linspace(x.min(), x.max(), 400)
    grid_steps = np.expm1(grid_x) if axis == "log" else grid_x
    if np.ptp(y) <= 1e-12 * (1 + np.abs(y).max()):
        out = _single_flat(c, axis, grid_steps)
        return (out, out.details) if return_details else out
    gp = GP(x, y, None if sd is None else sd**2, min_ls=max(min_lengthscale * span, 1e-9),
            max_ls=max_lengthscale * span)
    bounds, moves = segment(gp, grid_x, grid_steps, x, z=z, min_rel_change=min_rel_change, plateau_slope=plateau_slope,
                        level=level, min_points=min_points, min_length=min_length, num_samples=num_samples, seed=seed,
                        gap_moves=gap_moves, replicates=replicates, replicate_level=replicate_level)
    stages, loss_grid = _type_stages(gp, c, bounds, moves, axis, grid_steps, min_rel_change=min_rel_change,
                                     loss_tol=loss_tol, flat_loss=flat_loss, bandwidth=loss_bandwidth,
                                     num_samples=num_samples, seed=seed)
    mu, mu_sd, slope, slope_sd = gp.predict(grid_x)
    det = StageDetails(grid_steps, mu, mu_sd, slope, slope_sd, [b.step for b in bounds],
                       {**gp.hyperparameters, "axis_span": span}, loss_grid)
    agree = (compare_milestones([b.step for b in bounds], milestones, agreement_tol)
             if milestones is not None else None)
    out = StageList(stages, bounds, c.excluded, det, agree)
    return (out, det) if return_details else out


def _move_windows(moves: list, edges: np.ndarray, grid_steps: np.ndarray) -> list[tuple[float, float]]:
    """Per stage, the steps over which its LLC moves (the move's significant-slope run, inside the stage): the loss
    change that types a stage is read there, so the tail of a neighbouring transition's loss drop that falls in a
    plateau half of the stage is not ascribed to it. Without a move for every stage, the stage edges."""
    if len(moves) != len(edges) - 1:
        return [(float(edges[k]), float(edges[k + 1])) for k in range(len(edges) - 1)]
    out = []
    for k, m in enumerate(moves):
        lo = min(max(float(grid_steps[m.i0]), float(edges[k])), float(edges[k + 1]))
        hi = max(min(float(grid_steps[m.i1]), float(edges[k + 1])), lo)
        out.append((lo, hi) if hi > lo else (float(edges[k]), float(edges[k + 1])))
    return out


def _type_stages(gp: GP, c, bounds: list[Boundary], moves: list, axis: str, grid_steps: np.ndarray, *,
                 min_rel_change: float, loss_tol: float, flat_loss: float, bandwidth: float, num_samples: int,
                 seed: int) -> tuple[list[Stage], np.ndarray | None]:
    """Type each stage from joint GP draws of λ at its edges and the smoothed loss change (± its error) over the
    stage's LLC move (:func:`_move_windows`). ``delta_loss`` reports the change across the whole stage."""
    edges = np.array([c.steps[0], *[b.step for b in bounds], c.steps[-1]])
    ex = np.log(edges + 1.0) if axis == "log" else edges
    rng = np.random.default_rng(seed + 1)
    fdraw = gp.sample_joint(ex, ex[:0], num_samples, rng)
    mean, cov = gp.joint(ex, ex[:0])
    llc_scale = float(np.ptp(gp.predict(np.linspace(ex[0], ex[-1], 200))[0]))
    lmean = wmean = wse = loss_grid = None
    loss_range = float("nan")
    windows = _move_windows(moves, edges, grid_steps)
    if c.loss is not None:
        sl = smooth_loss(c.loss_steps, c.loss, axis, bandwidth=bandwidth)
        lmean = sl.at(edges)[0]
        wmean, wse = sl.at(np.array([w for pair in windows for w in pair]))
        loss_grid = sl.at(grid_steps[:: max(1, len(grid_steps) // 100)])[0]
        loss_range = float(np.ptp(loss_grid))
    out = []
    for k in range(len(edges) - 1):
        dllc = fdraw[:, k + 1] - fdraw[:, k]
        dl = dlsd = float("nan")
        dloss = None
        if lmean is not None:
            dl = float(lmean[k + 1] - lmean[k])
            dw, dlsd = float(wmean[2 * k + 1] - wmean[2 * k]), float(math.hypot(wse[2 * k], wse[2 * k + 1]))
            dloss = dw + dlsd * rng.standard_normal(num_samples)
        probs = type_probabilities(dllc, dloss, llc_scale, loss_range, min_rel_change=min_rel_change,
                                   loss_tol=loss_tol, flat_loss=flat_loss)
        kind = max(probs, key=probs.get)
        d = float(mean[k + 1] - mean[k])
        dsd = math.sqrt(max(cov[k, k] + cov[k + 1, k + 1] - 2 * cov[k, k + 1], 0.0))
        b = bounds[k - 1] if k else None
        out.append(Stage(float(edges[k]), float(edges[k + 1]), kind, d, dl, probs[kind], float(mean[k]),
                         float(mean[k + 1]), dsd, dlsd, probs, None if b is None else b.interval,
                         float("nan") if b is None else b.probability, windows[k]))
    return out, loss_grid
