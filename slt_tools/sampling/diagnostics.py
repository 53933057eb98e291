"""Convergence and health diagnostics for LLC chains (host-side numpy, computed once after sampling).

* Divergence: a chain whose loss is ever NaN/±inf, or whose loss exceeds L_n(w*) + ``explode_threshold``.
* Fraction of draws with L_B(w) < L_n(w*): a large fraction means w* is not a local minimum (λ̂ biased low / negative).
* Geweke (1992) z-score per chain: mean of the first 10 % vs the last 50 % of the trace, each variance from batch
  means; |z| ≫ 2 means the trace is still drifting.
* Rank-normalised split-R̂ (Vehtari et al. 2021; split-R̂ of Gelman et al. 2013, BDA3 §11.4, on the normal scores
  of the pooled ranks, and on the folded draws) across chains, and the effective sample size per chain from the
  initial-positive-sequence estimator of the autocorrelation time (Geyer 1992).
* Trend: slope of the chain-averaged trace over its second half, in units of λ̂ change across that half, with a
  z-score from batch means — the relaxation of nearly flat directions shows up here.
* MALA acceptance: mean of min(1, α) of SGLD proposals (see ``Sampler.mala_log_accept``).
"""
from __future__ import annotations

import numpy as np


def _batch_means_var(x: np.ndarray, num_batches: int = 10) -> float:
    """Variance of the mean of ``x`` estimated from non-overlapping batch means."""
    n = len(x)
    b = max(1, min(num_batches, n // 2))
    size = n // b
    if size < 1 or b < 2:
        return float("nan")
    means = x[: b * size].reshape(b, size).mean(axis=1)
    return float(means.var(ddof=1) / b)


def geweke_z(trace: np.ndarray, first: float = 0.1, last: float = 0.5) -> float:
    """Geweke z = (mean_first − mean_last) / sqrt(var_first + var_last) for one chain."""
    n = len(trace)
    a, b = trace[: max(2, int(first * n))], trace[int((1 - last) * n) :]
    if len(a) < 4 or len(b) < 4:
        return float("nan")
    denom = np.sqrt(_batch_means_var(a, 4) + _batch_means_var(b, 10))
    if not np.isfinite(denom) or denom == 0:
        return 0.0 if np.isclose(a.mean(), b.mean()) else float("inf")
    return float((a.mean() - b.mean()) / denom)


def effective_sample_size(trace: np.ndarray) -> float:
    """ESS = N / τ with τ = 1 + 2 Σ ρ_k summed over Geyer's initial positive sequence of pair sums."""
    x = np.asarray(trace, dtype=float)
    n = len(x)
    if n < 4 or np.var(x) == 0:
        return float(n)
    x = x - x.mean()
    f = np.fft.rfft(x, 2 * n)
    acf = np.fft.irfft(f * np.conj(f))[:n] / (n * np.var(x))
    tau, k = 1.0, 1
    while k + 1 < n:
        pair = acf[k] + acf[k + 1]
        if pair <= 0:
            break
        tau += 2 * pair
        k += 2
    return float(n / max(tau, 1e-12))


def split_rhat(traces: np.ndarray) -> float:
    """Split-R̂ over chains (rows of ``traces``): sqrt of pooled/within variance ratio on half-chains."""
    traces = np.asarray(traces, dtype=float)
    c, n = traces.shape
    half = n // 2
    if half < 2:
        return float("nan")
    halves = np.concatenate([traces[:, :half], traces[:, half : 2 * half]], axis=0)
    w = halves.var(axis=1, ddof=1).mean()
    b = half * halves.mean(axis=1).var(ddof=1)
    if w == 0:
        return 1.0 if b == 0 else float("inf")
    var_plus = (half - 1) / half * w + b / half
    return float(np.sqrt(var_plus / w))


def rank_normalized_split_rhat(traces: np.ndarray) -> float:
    """Rank-normalised split-R̂ (Vehtari, Gelman, Simpson, Carpenter & Bürkner 2021, "Rank-normalization, folding,
    and localization: an improved R̂", Bayesian Analysis 16(2), eq. 14 and §4.3): the draws of every chain, pooled,
    are replaced by the normal scores Φ⁻¹((r − 3/8)/(S + 1/4)) of their ranks r among all S draws before
    :func:`split_rhat` — so R̂ compares the chains' *distributions* and a few heavy-tailed draws (the λ trace
    nβ(L − L*) is χ²-like and skewed) do not decide it. The bulk R̂ is the max of this and the same on the folded
    draws |x − median| (§4.3, which sees chains that differ in scale rather than location)."""
    from scipy.special import ndtri
    from scipy.stats import rankdata

    x = np.asarray(traces, dtype=float)
    if x.ndim != 2 or x.shape[1] < 4 or not np.isfinite(x).all():
        return split_rhat(x)

    def normal_scores(a: np.ndarray) -> np.ndarray:
        r = rankdata(a, method="average").reshape(a.shape)
        return ndtri((r - 0.375) / (a.size + 0.25))

    bulk = split_rhat(normal_scores(x))
    folded = split_rhat(normal_scores(np.abs(x - np.median(x))))
    return float(max(bulk, folded))


def trend(traces: np.ndarray) -> tuple[float, float]:
    """(relative change, z) of the chain-averaged trace across its second half, from a least-squares line.

    relative change = slope·(half length) / |mean|; z = change / standard error, with the standard error from
    batch means of the residuals (robust to autocorrelation).
    """
    avg = np.asarray(traces, dtype=float).mean(axis=0)
    y = avg[len(avg) // 2 :]
    if len(y) < 8:
        return 0.0, 0.0
    t = np.arange(len(y), dtype=float)
    slope, intercept = np.polyfit(t, y, 1)
    change = slope * (len(y) - 1)
    resid = y - (slope * t + intercept)
    se_mean = np.sqrt(max(_batch_means_var(resid, 8), 1e-300))
    # SE of the change across the window ≈ 2·√3·SE(mean) for a least-squares line through equally spaced points
    z = change / (2 * np.sqrt(3) * se_mean)
    rel = change / max(abs(y.mean()), 1e-12)
    return float(rel), float(z)


def _systematic_geweke(z: np.ndarray, llc_trace: np.ndarray) -> str | None:
    """A burn-in transient: at least half the chains, and at least two, have Geweke |z| > 3 *with the same sign*,
    and the chain-averaged trace moved by more than 5 % between its first 10 % and its last 50 %.

    Measured on stationary AR(1) traces (300 seeds each): false alarms 0 % (8 chains × 400, ρ = 0.9), 2.3 %
    (4 × 200, ρ = 0.9), 4.3 % (3 × 400, ρ = 0.95), 0.3 % (2 × 1000, ρ = 0.95); linear and sigmoid transients not
    tuned on (4 × 400): 100 % detected.

    Under stationarity each z is ≈ N(0, 1) (heavier-tailed, its first-segment variance coming from 4 batch means), so
    |z| > 3 in one chain is a few-percent event and the same sign in half the chains is rare; an initial transient
    (chains started at w* still climbing to the posterior's typical loss) moves every chain the same way.
    """
    z = z[np.isfinite(z)]
    if len(z) == 0:
        return None
    avg = llc_trace.mean(axis=0)
    head, tail = avg[: max(2, int(0.1 * len(avg)))], avg[len(avg) // 2:]
    rel = (tail.mean() - head.mean()) / max(abs(avg.mean()), 1e-12)
    same = max((z > 3).sum(), (z < -3).sum())
    if same >= max(2, (len(z) + 1) // 2) and abs(rel) > 0.05:
        return (f"initial transient: Geweke |z| > 3 in {same} of {len(z)} chains, the trace moved {100 * rel:+.0f}% "
                "from its first 10 % to its last 50 % (burn-in too short)")
    return None


def summarize_chains(
    loss_trace: np.ndarray,
    init_loss: float,
    nbeta: float,
    explode_threshold: float,
    mala: np.ndarray | None = None,
) -> dict:
    """Per-chain and cross-chain diagnostics of a (chains × draws) loss trace."""
    finite = np.isfinite(loss_trace).all(axis=1)
    with np.errstate(invalid="ignore"):
        exploded = finite & (np.nanmax(np.where(np.isfinite(loss_trace), loss_trace, -np.inf), axis=1)
                             > init_loss + explode_threshold)
    diverged = ~finite | exploded
    ok = ~diverged
    llc_trace = nbeta * (loss_trace - init_loss)
    per_chain: dict[str, list] = {
        "diverged": diverged.tolist(),
        "nonfinite": (~finite).tolist(),
        "exploded": exploded.tolist(),
        "frac_below_init": [float(np.mean(r < init_loss)) if f else float("nan") for r, f in zip(loss_trace, finite)],
        "geweke_z": [geweke_z(r) if o else float("nan") for r, o in zip(llc_trace, ok)],
        "ess": [effective_sample_size(r) if o else float("nan") for r, o in zip(llc_trace, ok)],
    }
    if mala is not None:
        per_chain["mala_acceptance"] = [float(a) for a in mala]
    out: dict = {"per_chain": per_chain, "num_diverged": int(diverged.sum())}
    if ok.sum() >= 1:
        good = llc_trace[ok]
        out["r_hat"] = rank_normalized_split_rhat(good) if ok.sum() >= 2 else float("nan")
        rel, z = trend(good)
        out["trend_rel_change"], out["trend_z"] = rel, z
        out["frac_below_init"] = float(np.mean(loss_trace[ok] < init_loss))
        out["ess_total"] = float(np.nansum(np.array(per_chain["ess"])[ok]))
        if mala is not None:
            out["mala_acceptance"] = float(np.mean(np.asarray(mala)[ok]))
        gz = np.abs(np.array(per_chain["geweke_z"])[ok])
        out["geweke_max_abs_z"] = float(np.nanmax(gz)) if np.isfinite(gz).any() else float("nan")
        reasons = []
        burn_in = _systematic_geweke(np.array(per_chain["geweke_z"])[ok], good)
        if burn_in is not None:
            reasons.append(burn_in)
        if np.isfinite(out["r_hat"]) and out["r_hat"] > 1.1:
            reasons.append(f"split-R̂ = {out['r_hat']:.2f} > 1.1 (chains disagree)")
        if abs(z) > 4 and abs(rel) > 0.05:
            reasons.append(f"trace still drifting over its second half ({100 * rel:+.0f}%, z = {z:.1f})")
        out["stationary"] = not reasons
        out["not_stationary_reasons"] = reasons
    else:
        out["stationary"] = False
        out["not_stationary_reasons"] = ["every chain diverged"]
    return out
