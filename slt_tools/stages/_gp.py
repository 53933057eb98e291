"""Gaussian-process smoothing of an LLC curve, with the joint posterior of values and slopes.

Model (Rasmussen & Williams 2006, "Gaussian Processes for Machine Learning", §2.2, §4.2, §5.4, §9.4):
f ~ GP(0, σ_f² k(x − x')), k the Matérn-5/2 kernel k(d) = (1 + a|d| + a²d²/3) e^{−a|d|}, a = √5/ℓ, observed as
y_i = f(x_i) + ε_i with ε_i ~ N(0, c·s_i² + σ_n²) (s_i the given per-point ``llc_std``, c ∈ [10⁻³, 1] learned).
(σ_f, ℓ, σ_n, c) maximise the log marginal likelihood (multi-start L-BFGS-B). Derivatives of a GP are jointly Gaussian
with it (R&W §9.4): cov(f'(a), f(b)) = σ_f² k'(a − b), cov(f'(a), f'(b)) = −σ_f² k''(a − b), with
k'(d) = −(a²/3) d (1 + a|d|) e^{−a|d|} and −k''(d) = (a²/3)(1 + a|d| − a²d²) e^{−a|d|}.
Matérn-5/2 is twice differentiable (the slope has a proper posterior) but, unlike the RBF kernel, does not smear
sharp transitions in log-time into long ramps. With more than ``max_fit_points`` observations the hyperparameters are
fitted on an evenly thinned subset (the "subset of data" approximation, R&W §8.3.1) and the posterior uses all points.
"""
from __future__ import annotations

import math

import numpy as np
import scipy


def _kernels(a_pts: np.ndarray, b_pts: np.ndarray, log_sf: float, log_ls: float):
    """(k, ∂k/∂a, ∂²k/∂a∂b) matrices between point sets a and b."""
    d = a_pts[:, None] - b_pts[None, :]
    a = math.sqrt(5.0) / math.exp(log_ls)
    ad = a * np.abs(d)
    e = np.exp(-ad)
    sf2 = math.exp(2 * log_sf)
    k = sf2 * (1 + ad + ad * ad / 3) * e
    dk = -sf2 * (a * a / 3) * d * (1 + ad) * e
    ddk = sf2 * (a * a / 3) * (1 + ad - ad * ad) * e
    return k, dk, ddk


class GP:
    """Matérn-5/2 GP regression with heteroscedastic noise; see the module docstring."""

    def __init__(self, x: np.ndarray, y: np.ndarray, rel_var: np.ndarray | None, min_ls: float, max_ls: float,
                 max_fit_points: int = 160) -> None:
        self.mean, self.scale = float(y.mean()), float(y.std()) or 1.0
        full_y = (y - self.mean) / self.scale
        full_rv = None if rel_var is None else rel_var / self.scale**2
        sub = np.unique(np.linspace(0, len(x) - 1, min(len(x), max_fit_points)).round().astype(int))
        self.x, self.y, self.rv = x[sub], full_y[sub], None if full_rv is None else full_rv[sub]
        bounds = [(math.log(1e-2), math.log(1e2)), (math.log(min_ls), math.log(max_ls)), (math.log(1e-4), 0.0),
                  (math.log(1e-6), 0.0)]
        best = None
        for ls0 in np.geomspace(min_ls * 1.5, max_ls * 0.6, 4):
            x0 = np.array([0.0, math.log(ls0), math.log(0.05), math.log(0.3)])
            res = scipy.optimize.minimize(self._nll, x0, method="L-BFGS-B", bounds=bounds)
            if best is None or res.fun < best.fun:
                best = res
        self.theta = best.x
        self.x, self.y, self.rv = x, full_y, full_rv
        self._chol, self._alpha = self._factor(self.theta)
        self._cache: dict = {}  # posterior covariances: they depend on the inputs and θ, not on y

    def conditioned_on(self, y: np.ndarray) -> GP:
        """The same GP (hyperparameters, noise, Cholesky factor) conditioned on other observations ``y`` (data
        units) at the same inputs: only the posterior mean changes, so covariances are shared (cached)."""
        other = object.__new__(GP)
        other.__dict__.update(self.__dict__)
        other.y = (np.asarray(y, dtype=float) - self.mean) / self.scale
        other._alpha = scipy.linalg.cho_solve(self._chol, other.y)
        return other

    def sample_replicates(self, num: int, rng: np.random.Generator) -> np.ndarray:
        """``num`` posterior-predictive replicates of the observations, y_rep = f(x_i) + ε_i with f a posterior
        draw and ε_i ~ N(0, c·s_i² + σ_n²): data a repeat of the run could have given (data units), (num, n)."""
        f = self.sample_joint(self.x, self.x[:0], num, rng)
        return f + np.sqrt(self.noise_var()) * rng.standard_normal(f.shape)

    def _noise(self, theta: np.ndarray) -> np.ndarray:
        _, _, log_sn, log_c = theta
        base = np.full(len(self.x), math.exp(2 * log_sn))
        return base + (0 if self.rv is None else math.exp(log_c) * self.rv) + 1e-8

    def _factor(self, theta: np.ndarray):
        K = _kernels(self.x, self.x, theta[0], theta[1])[0] + np.diag(self._noise(theta))
        c = scipy.linalg.cho_factor(K, lower=True)
        return c, scipy.linalg.cho_solve(c, self.y)

    def _nll(self, theta: np.ndarray) -> float:
        try:
            c, alpha = self._factor(theta)
        except np.linalg.LinAlgError:
            return 1e10
        return float(0.5 * self.y @ alpha + np.log(np.diag(c[0])).sum())

    def noise_var(self) -> np.ndarray:
        """Fitted per-observation noise variance c·s_i² + σ_n² (data units), at the observed points."""
        return self._noise(self.theta) * self.scale**2

    @property
    def y_data(self) -> np.ndarray:
        """The observations (data units)."""
        return self.y * self.scale + self.mean

    @property
    def hyperparameters(self) -> dict[str, float]:
        log_sf, log_ls, log_sn, log_c = self.theta
        return {"signal_sd": math.exp(log_sf) * self.scale, "lengthscale": math.exp(log_ls),
                "noise_sd": math.exp(log_sn) * self.scale,
                "llc_std_scale": math.sqrt(math.exp(log_c)) if self.rv is not None else float("nan")}

    def joint(self, xv: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and covariance of the stacked vector [f(xv); f'(xs)] (data units)."""
        log_sf, log_ls = self.theta[0], self.theta[1]
        kstar = np.vstack([_kernels(xv, self.x, log_sf, log_ls)[0], _kernels(xs, self.x, log_sf, log_ls)[1]])
        units = np.r_[np.full(len(xv), self.scale), np.full(len(xs), self.scale)]
        mean = (kstar @ self._alpha) * units + np.r_[np.full(len(xv), self.mean), np.zeros(len(xs))]
        key = ("joint", xv.tobytes(), xs.tobytes())
        if key not in self._cache:
            kvv = _kernels(xv, xv, log_sf, log_ls)[0]
            dsv = _kernels(xs, xv, log_sf, log_ls)[1]
            dss = _kernels(xs, xs, log_sf, log_ls)[2]
            prior = np.block([[kvv, dsv.T], [dsv, dss]])
            cov = prior - kstar @ scipy.linalg.cho_solve(self._chol, kstar.T)
            self._cache[key] = cov * np.outer(units, units)
        return mean, self._cache[key]

    def predict(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Marginal (mean, sd, slope, slope sd) at xs (data units)."""
        log_sf, log_ls = self.theta[0], self.theta[1]
        k, dk, _ = _kernels(xs, self.x, log_sf, log_ls)
        mean, slope = k @ self._alpha, dk @ self._alpha
        key = ("predict", xs.tobytes())
        if key not in self._cache:
            var = math.exp(2 * log_sf) - np.einsum("ij,ji->i", k, scipy.linalg.cho_solve(self._chol, k.T))
            slope_prior = math.exp(2 * log_sf) * 5.0 / (3 * math.exp(2 * log_ls))
            slope_var = slope_prior - np.einsum("ij,ji->i", dk, scipy.linalg.cho_solve(self._chol, dk.T))
            self._cache[key] = (var, slope_var)
        var, slope_var = self._cache[key]
        s = self.scale
        return (mean * s + self.mean, np.sqrt(np.clip(var, 0, None)) * s, slope * s,
                np.sqrt(np.clip(slope_var, 0, None)) * s)

    def sample_joint(self, xv: np.ndarray, xs: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
        """``num`` joint posterior draws of [f(xv); f'(xs)], shape (num, len(xv) + len(xs))."""
        mean, cov = self.joint(xv, xs)
        key = ("root", xv.tobytes(), xs.tobytes())
        if key not in self._cache:
            w, v = np.linalg.eigh(0.5 * (cov + cov.T))
            self._cache[key] = v * np.sqrt(np.clip(w, 0, None))
        return mean + rng.standard_normal((num, len(mean))) @ self._cache[key].T
