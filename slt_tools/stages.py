"""Developmental stages from LLC (and loss) curves.

Hoogland et al., "Loss Landscape Degeneracy Drives Stagewise Development in Transformers" (arXiv 2402.02364): training
is divided at the **critical points of the LLC curve** — where dλ̂/d log t ≈ 0 after smoothing — and each stage is typed

* **A**: the loss decreases and the LLC increases (the model becomes more complex);
* **B**: the LLC decreases while the loss changes little (the model simplifies);
* anything else is reported as such: ``"flat"`` (no LLC change the noise can support), ``"other"`` (e.g. the loss
  rises, or the LLC rises while the loss does not fall, or the LLC falls while the loss falls a lot).

Method (no tuning needed for the common case):

1. Smoothing. x = log(step + 1) (``axis="log"``) or the step itself (``axis="linear"``). The LLC is modelled as a
   Gaussian process f ~ GP(0, σ_f²·Matérn₅/₂(|x−x'|/ℓ)) observed with per-point noise var_i = c·s_i² + σ_n², where s_i
   is the given ``llc_std`` and c ∈ [10⁻³, 1] a learned factor (the noise of a chain *mean* is s_i²/#chains, and the
   number of chains is often unknown). (σ_f, ℓ, σ_n, c) maximise the log marginal likelihood (multi-start L-BFGS-B),
   with ℓ in [``min_lengthscale``, ``max_lengthscale``] × (x range): the smoother can neither chase single-checkpoint
   noise nor blur short stages into one. The
   posterior gives the smoothed curve μ(x), its slope μ'(x) and their covariances in closed form (kernel
   derivatives). Hoogland et al. used an RBF kernel; Matérn-5/2 keeps sharp transitions in log-time sharp.
2. Boundaries (critical points) on a dense grid: sign changes of μ' (local extrema of the smoothed LLC), and plateaus —
   local minima of |μ'| (where dλ/dlog t ≈ 0 between two rises or falls) whose neighbouring peaks of |μ'| (within two
   lengthscales on each side) are both significant (|μ'| > z·sd(μ')), and which are either below ``plateau_slope`` ×
   the smaller peak or indistinguishable from zero slope. (So the flat start and end of a run are not stages.)
3. A stage is kept only if it spans at least ``min_points`` checkpoints and ``min_length`` (fraction of the x range);
   otherwise its weaker boundary is removed.
4. Typing. Δλ = μ(end) − μ(start) with posterior standard deviation sd(Δλ). The LLC change is *supported* when
   |Δλ| ≥ ``z`` · sd(Δλ) and |Δλ| ≥ ``min_rel_change`` × (range of μ). The loss change ΔL is read off a median-filtered,
   log-step-interpolated loss curve; "decreases" means ΔL < 0 by more than ``loss_tol`` of the loss range (or of the
   stage-start loss); "changes little" means |ΔL| ≤ ``flat_loss`` × (loss range over the whole run).
   ``confidence`` = Φ(|Δλ| / sd(Δλ)), the posterior probability that the LLC moved in the reported direction (for
   ``"flat"`` stages, 1 − |2Φ(Δλ/sd) − 1|). A flat stage's boundaries are not supported by the data, so it is merged
   into its neighbour across its weaker boundary; only a run with no supported LLC change at all is one flat stage.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy  # submodules load on first use (keeps `import slt_tools` fast)


@dataclass
class Stage:
    """One developmental stage [start, end] (training steps) with its type and the changes across it."""

    start: float
    end: float
    kind: str
    delta_llc: float
    delta_loss: float
    confidence: float
    llc_start: float = float("nan")
    llc_end: float = float("nan")
    delta_llc_sd: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


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


class _GP:
    """Matérn-5/2 GP regression with heteroscedastic noise c·s_i² + σ_n²; hyperparameters by maximum marginal
    likelihood (Rasmussen & Williams 2006, §4.2 and §5.4). Matérn-5/2 is twice differentiable (so the slope has a
    proper posterior) but, unlike the RBF kernel, does not force steps in log-time to be smeared into ramps."""

    def __init__(self, x: np.ndarray, y: np.ndarray, rel_var: np.ndarray | None, min_ls: float, max_ls: float) -> None:
        self.x = x
        self.mean, self.scale = float(y.mean()), float(y.std()) or 1.0
        self.y = (y - self.mean) / self.scale
        self.rv = None if rel_var is None else rel_var / self.scale**2
        bounds = [(math.log(1e-2), math.log(1e2)), (math.log(min_ls), math.log(max_ls)), (math.log(1e-4), 0.0),
                  (math.log(1e-3), 0.0)]
        best = None
        for ls0 in np.geomspace(min_ls * 1.5, max_ls * 0.6, 4):
            x0 = np.array([0.0, math.log(ls0), math.log(0.05), math.log(0.3)])
            res = scipy.optimize.minimize(self._nll, x0, method="L-BFGS-B", bounds=bounds)
            if best is None or res.fun < best.fun:
                best = res
        self.theta = best.x
        self._c, self._alpha = self._factor(self.theta)

    @staticmethod
    def _k(a: np.ndarray, b: np.ndarray, log_sf: float, log_ls: float) -> tuple[np.ndarray, np.ndarray]:
        """Kernel matrix and its derivative with respect to the first argument."""
        d = a[:, None] - b[None, :]
        ls = math.exp(log_ls)
        r = np.abs(d) * (math.sqrt(5.0) / ls)
        e = np.exp(-r)
        sf2 = math.exp(2 * log_sf)
        k = sf2 * (1 + r + r * r / 3) * e
        dk = -sf2 * (5.0 / (3 * ls * ls)) * d * (1 + r) * e
        return k, dk

    def _noise(self, theta: np.ndarray) -> np.ndarray:
        _, _, log_sn, log_c = theta
        base = np.full(len(self.x), math.exp(2 * log_sn))
        return base + (0 if self.rv is None else math.exp(log_c) * self.rv) + 1e-8

    def _factor(self, theta: np.ndarray):
        K = self._k(self.x, self.x, theta[0], theta[1])[0] + np.diag(self._noise(theta))
        c = scipy.linalg.cho_factor(K, lower=True)
        return c, scipy.linalg.cho_solve(c, self.y)

    def _nll(self, theta: np.ndarray) -> float:
        try:
            c, alpha = self._factor(theta)
        except np.linalg.LinAlgError:
            return 1e10
        return float(0.5 * self.y @ alpha + np.log(np.diag(c[0])).sum())

    @property
    def hyperparameters(self) -> dict[str, float]:
        log_sf, log_ls, log_sn, log_c = self.theta
        return {"signal_sd": math.exp(log_sf) * self.scale, "lengthscale": math.exp(log_ls),
                "noise_sd": math.exp(log_sn) * self.scale, "llc_std_scale": math.sqrt(math.exp(log_c))
                if self.rv is not None else float("nan")}

    def predict(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(mean, sd, slope, slope sd, posterior covariance of the mean) at xs, in the data's units."""
        log_sf, log_ls = self.theta[0], self.theta[1]
        Ks, dKs = self._k(xs, self.x, log_sf, log_ls)
        mean, slope = Ks @ self._alpha, dKs @ self._alpha
        cov = self._k(xs, xs, log_sf, log_ls)[0] - Ks @ scipy.linalg.cho_solve(self._c, Ks.T)
        slope_prior = math.exp(2 * log_sf) * 5.0 / (3 * math.exp(2 * log_ls))
        slope_var = slope_prior - np.einsum("ij,ji->i", dKs, scipy.linalg.cho_solve(self._c, dKs.T))
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        return (mean * self.scale + self.mean, sd * self.scale, slope * self.scale,
                np.sqrt(np.clip(slope_var, 0, None)) * self.scale, cov * self.scale**2)


def _as_curves(steps: Any, llc: Any, loss: Any, llc_std: Any) -> tuple[np.ndarray, ...]:
    if llc is None and all(hasattr(steps, a) for a in ("steps", "llc_mean")):
        traj = steps
        steps, llc = traj.steps, traj.llc_mean
        loss = getattr(traj, "loss", None) if loss is None else loss
        llc_std = getattr(traj, "llc_std", None) if llc_std is None else llc_std
    if llc is None:
        raise TypeError("detect_stages needs (steps, llc, ...) arrays or a Trajectory-like object")
    s = np.asarray(steps, dtype=float).ravel()
    y = np.asarray(llc, dtype=float).ravel()
    lo = None if loss is None else np.asarray(loss, dtype=float).ravel()
    sd = None if llc_std is None else np.asarray(llc_std, dtype=float).ravel()
    for name, arr in (("llc", y), ("loss", lo), ("llc_std", sd)):
        if arr is not None and len(arr) != len(s):
            raise ValueError(f"{name} has {len(arr)} values but steps has {len(s)}: curves must have equal lengths")
    if len(s) and np.any(np.diff(s) <= 0):
        bad = int(np.argmax(np.diff(s) <= 0))
        raise ValueError(f"steps must be strictly increasing (step[{bad}] = {s[bad]:g} ≥ step[{bad + 1}] = "
                         f"{s[bad + 1]:g})")
    if sd is not None and np.any(sd[np.isfinite(sd)] < 0):
        raise ValueError("llc_std must be non-negative")
    bad = ~np.isfinite(y) | ~np.isfinite(s)
    if lo is not None:
        bad |= ~np.isfinite(lo)
    if sd is not None:
        sd = np.where(np.isfinite(sd), sd, np.nan)
        bad |= ~np.isfinite(sd)
    if bad.any():
        warnings.warn(f"dropping {int(bad.sum())} checkpoints with NaN/inf values (steps {s[bad].tolist()[:10]})",
                      RuntimeWarning, stacklevel=3)
        s, y = s[~bad], y[~bad]
        lo = None if lo is None else lo[~bad]
        sd = None if sd is None else sd[~bad]
    return s, y, lo, sd


def detect_stages(
    steps: Any,
    llc: Any = None,
    loss: Any = None,
    llc_std: Any = None,
    *,
    axis: str = "log",
    min_points: int = 3,
    min_length: float = 0.02,
    min_lengthscale: float = 0.04,
    max_lengthscale: float = 0.15,
    plateau_slope: float = 0.5,
    z: float = 2.0,
    min_rel_change: float = 0.02,
    loss_tol: float = 0.01,
    flat_loss: float = 0.2,
    return_details: bool = False,
) -> list[Stage] | tuple[list[Stage], StageDetails]:
    """Split training into stages at the critical points of the smoothed LLC and type each A/B/flat/other.

    ``steps, llc, loss, llc_std`` are equal-length arrays (or pass a ``Trajectory`` as the first argument). See the
    module docstring for the method and the meaning of each knob. With ``return_details=True`` also returns the
    smoothed curve, its slope and the boundaries (:class:`StageDetails`).
    """
    s, y, lo, sd = _as_curves(steps, llc, loss, llc_std)
    if axis not in ("log", "linear"):
        raise ValueError(f"axis must be 'log' or 'linear', got {axis!r}")
    if len(s) < 2 * min_points:
        raise ValueError(f"need at least {2 * min_points} checkpoints to find stages (min_points={min_points}), "
                         f"got {len(s)}")
    if axis == "log" and s.min() < 0:
        raise ValueError("axis='log' needs non-negative steps")
    x = np.log(s + 1.0) if axis == "log" else s.copy()
    span = float(x.max() - x.min())
    grid_x = np.linspace(x.min(), x.max(), 600)
    grid_steps = np.expm1(grid_x) if axis == "log" else grid_x

    y_range = float(np.ptp(y))
    if y_range == 0 or (sd is not None and np.all(np.abs(y - y.mean()) <= 1e-12 * (1 + np.abs(y).max()))):
        stage = Stage(float(s[0]), float(s[-1]), "flat", 0.0, _delta_loss(s, lo, s[0], s[-1], axis), 1.0,
                      float(y[0]), float(y[-1]), 0.0)
        details = StageDetails(grid_steps, np.full_like(grid_x, y.mean()), np.zeros_like(grid_x),
                               np.zeros_like(grid_x), np.zeros_like(grid_x), [])
        return ([stage], details) if return_details else [stage]

    gp = _GP(x, y, None if sd is None else sd**2, min_ls=max(min_lengthscale * span, 1e-6),
             max_ls=max_lengthscale * span)
    mu, mu_sd, slope, slope_sd, _ = gp.predict(grid_x)

    # candidate boundaries: sign changes of the slope, and plateau minima of |slope|
    cand: list[int] = []
    sign = np.sign(slope)
    for i in range(1, len(grid_x)):
        if sign[i] != sign[i - 1] and sign[i] != 0:
            cand.append(i if abs(slope[i]) < abs(slope[i - 1]) else i - 1)
    a = np.abs(slope)
    win = max(1, int(round(2 * gp.hyperparameters["lengthscale"] / (grid_x[1] - grid_x[0]))))
    for i in range(1, len(grid_x) - 1):
        if a[i] <= a[i - 1] and a[i] < a[i + 1]:
            li = max(0, i - win) + int(np.argmax(a[max(0, i - win): i]))
            ri = i + 1 + int(np.argmax(a[i + 1: i + 1 + win]))
            left, right = a[li], a[ri]
            # a plateau separates real movement: both neighbouring slope peaks must be significant
            if left < z * slope_sd[li] or right < z * slope_sd[ri]:
                continue
            if a[i] < plateau_slope * min(left, right) or a[i] < z * slope_sd[i]:
                cand.append(i)
    cand = sorted(set(c for c in cand if 0 < c < len(grid_x) - 1))

    def npts(lo_x: float, hi_x: float) -> int:
        return int(((x >= lo_x) & (x <= hi_x)).sum())

    # enforce minimum stage size by removing the weakest boundary (largest |slope|) until all stages are long enough
    bounds = list(cand)
    while bounds:
        edges = [0, *bounds, len(grid_x) - 1]
        short = [k for k in range(len(edges) - 1)
                 if npts(grid_x[edges[k]], grid_x[edges[k + 1]]) < min_points
                 or grid_x[edges[k + 1]] - grid_x[edges[k]] < min_length * span]
        if not short:
            break
        k = short[0]
        neighbours = [b for b in (edges[k], edges[k + 1]) if b in bounds]
        drop = max(neighbours, key=lambda b: (a[b], b))
        bounds.remove(drop)

    loss_range = float(np.ptp(lo)) if lo is not None else float("nan")

    def type_stages(bnds: list[int]) -> list[Stage]:
        edges = [0, *bnds, len(grid_x) - 1]
        cov_idx = sorted(set(edges))
        cov = gp.predict(grid_x[cov_idx])[4]
        pos = {g: n for n, g in enumerate(cov_idx)}
        out = []
        for k in range(len(edges) - 1):
            i, j = edges[k], edges[k + 1]
            d = float(mu[j] - mu[i])
            dsd = math.sqrt(max(cov[pos[i], pos[i]] + cov[pos[j], pos[j]] - 2 * cov[pos[i], pos[j]], 1e-300))
            start = float(grid_steps[i]) if k else float(s[0])
            end = float(grid_steps[j]) if k < len(edges) - 2 else float(s[-1])
            dl = _delta_loss(s, lo, start, end, axis)
            moved = abs(d) >= z * dsd and abs(d) >= min_rel_change * float(np.ptp(mu))
            kind = _classify(d, moved, dl, lo, loss_range, start, s, axis, loss_tol, flat_loss)
            cdf = scipy.stats.norm.cdf
            conf = float(cdf(abs(d) / dsd)) if kind != "flat" else float(1 - abs(2 * cdf(d / dsd) - 1))
            out.append(Stage(start, end, kind, d, dl, conf, float(mu[i]), float(mu[j]), dsd))
        return out

    # a stage whose LLC change the noise cannot support has no supported boundary either: merge it into the
    # neighbour across its weaker boundary (the one where |slope| is larger, i.e. less of a critical point)
    stages = type_stages(bounds)
    while len(stages) > 1 and any(st.kind == "flat" for st in stages):
        k = next(n for n, st in enumerate(stages) if st.kind == "flat")
        options = [b for b in (bounds[k - 1] if k > 0 else None, bounds[k] if k < len(bounds) else None)
                   if b is not None]
        bounds.remove(max(options, key=lambda b: a[b]))
        stages = type_stages(bounds)
    details = StageDetails(grid_steps, mu, mu_sd, slope, slope_sd, [st.start for st in stages[1:]],
                           {**gp.hyperparameters, "axis_span": span})
    return (stages, details) if return_details else stages


def _loss_at(s: np.ndarray, lo: np.ndarray, step: float, axis: str) -> float:
    smooth = scipy.signal.medfilt(lo, 3) if len(lo) >= 3 else lo
    xs = np.log(s + 1.0) if axis == "log" else s
    xq = math.log(step + 1.0) if axis == "log" else step
    return float(np.interp(xq, xs, smooth))


def _delta_loss(s: np.ndarray, lo: np.ndarray | None, start: float, end: float, axis: str) -> float:
    if lo is None:
        return float("nan")
    return _loss_at(s, lo, end, axis) - _loss_at(s, lo, start, axis)


def _classify(d: float, moved: bool, dl: float, lo: np.ndarray | None, loss_range: float, start: float,
              s: np.ndarray, axis: str, loss_tol: float, flat_loss: float) -> str:
    if not moved:
        return "flat"
    if lo is None or not math.isfinite(dl):
        return "up" if d > 0 else "down"  # no loss curve: only the direction of the LLC is known
    l0 = abs(_loss_at(s, lo, start, axis))
    falls = dl < 0 and (-dl > loss_tol * loss_range or -dl > 10 * loss_tol * l0)
    rises = dl > 0 and (dl > loss_tol * loss_range and dl > 10 * loss_tol * l0)
    little = abs(dl) <= flat_loss * loss_range
    if d > 0:
        return "A" if falls else "other"
    return "B" if (little and not rises) else "other"
