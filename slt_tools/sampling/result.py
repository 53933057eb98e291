"""Typed results of LLC estimation: :class:`LLCResult`, its :class:`LLCDiagnostics`, calibration and probe records,
the warning classes, and :func:`summarize` / :func:`combine_results` (raw chain traces → result).

Every record is a dataclass with ``to_dict``/``from_dict`` (plain JSON: non-finite floats become None) and can also
be read like the dict it replaced (``diag["stationary"]``, ``diag.get("converged")``, ``"calibration" in diag``),
so stored results and existing code keep working. Keys a record does not know (a store written by a later version)
are kept in ``extra`` and written back unchanged.

Warnings are classes, so sweeps and users filter or group them by kind rather than by wording:
:class:`DivergenceWarning`, :class:`NegativeLLCWarning`, :class:`NotStationaryWarning`,
:class:`NotConvergedWarning`, :class:`SamplingFallbackWarning` — all subclasses of :class:`LLCWarning`
(a ``RuntimeWarning``).
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import torch

from slt_tools.sampling.diagnostics import summarize_chains
from slt_tools.sampling.streaming import Moments, merge


# --------------------------------------------------------------------------------------------------- warnings/errors
class LLCWarning(RuntimeWarning):
    """Base class of every warning the estimator issues about a result."""


class DivergenceWarning(LLCWarning):
    """Some chains diverged (NaN/inf or exploding loss) and were excluded."""


class NegativeLLCWarning(LLCWarning):
    """λ̂ < 0: draws fall below L_n(w*), so w* is not a local minimum at the sampled scale."""


class NotStationaryWarning(LLCWarning):
    """The λ̂ trace has not settled (split-R̂ or drift over the second half)."""


class StepSizeWarning(LLCWarning):
    """The MALA acceptance of the sampler's proposals is low: the step size's discretisation bias is measurable."""


class NotConvergedWarning(LLCWarning):
    """The convergence checks (longer runs, overdispersed probe) failed: λ̂ is not a trustworthy answer."""


class LocalizationRaisedWarning(LLCWarning):
    """The self-calibrating path raised the localization γ because the run at the smaller γ could not relax within
    the budget, and λ̂ depends on γ: the value is the localised posterior's at the larger γ (see the diagnostics)."""


class DegeneracyWarning(LLCWarning):
    """SGLD did not relax the point and a short underdamped-Langevin run reads clearly higher: slow flat directions
    (a degenerate point); the result says which estimate it reports and how to get the better one."""


class SamplingFallbackWarning(LLCWarning):
    """A faster path could not be used (vmap, torch.compile, pinned step, graph rewrites); the result is unaffected."""


class VmapFallbackWarning(SamplingFallbackWarning):
    """The model could not be vmapped over chains; chains ran in a loop."""


class CompileFallbackWarning(SamplingFallbackWarning):
    """torch.compile failed; steps ran eagerly."""


class LLCDivergenceError(RuntimeError):
    """Raised when SGMCMC chains diverge (NaN/inf or exploding loss) and the caller asked not to keep going."""


#: warning class name → the class, for reading grouped warnings back from a store
WARNING_CLASSES: dict[str, type[LLCWarning]] = {c.__name__: c for c in (
    LLCWarning, DivergenceWarning, NegativeLLCWarning, NotStationaryWarning, NotConvergedWarning,
    SamplingFallbackWarning, StepSizeWarning, VmapFallbackWarning, CompileFallbackWarning)}

#: MALA acceptance below which a run warns that ε is large enough to bias λ̂ (calibration demands 0.95)
LOW_ACCEPTANCE = 0.9
#: relative Stein bound on the step-size bias (:func:`step_bias_bound`) above which a run warns
#: (:class:`StepSizeWarning`); the self-calibration rejects steps above ``CalibrationSettings.max_step_bias`` (2 %)
WARN_STEP_BIAS = 0.05


# --------------------------------------------------------------------------------------------------- JSON helpers
def json_safe(x: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays converted, non-finite floats as None, records via ``to_dict``."""
    if isinstance(x, Record) or (hasattr(x, "to_dict") and hasattr(x, "__dataclass_fields__")):
        return x.to_dict()
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _as_float_array(x: Any) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in x] if x and isinstance(x[0], list)
                    else [np.nan if v is None else v for v in x], dtype=float)


# --------------------------------------------------------------------------------------------------- records
class Record:
    """Mixin: a dataclass that reads like a mapping and round-trips through JSON.

    ``NESTED`` maps a field name to the record class its dict form is read back into.
    """

    NESTED: ClassVar[dict[str, type[Record]]] = {}

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]  # type: ignore[arg-type]

    def _extra(self) -> dict[str, Any]:
        return getattr(self, "extra", {})

    def __getitem__(self, key: str) -> Any:
        if key in self._names():
            return getattr(self, key)
        if key in self._extra():
            return self._extra()[key]
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            value = self[key]
        except KeyError:
            return default
        return default if value is None else value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def keys(self) -> list[str]:
        return [k for k in [*self._names(), *self._extra()] if k in self]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self[k]) for k in self.keys()]

    def to_dict(self) -> dict[str, Any]:
        out = {k: json_safe(getattr(self, k)) for k in self._names()}
        out.update(json_safe(self._extra()))
        return out

    @classmethod
    def from_dict(cls, d: Any) -> Any:
        if d is None or isinstance(d, cls):
            return d
        names = set(cls._names())
        known: dict[str, Any] = {}
        for k, v in dict(d).items():
            if k in names:
                nested = cls.NESTED.get(k)
                if nested is not None and v is not None:
                    v = [nested.from_dict(x) for x in v] if isinstance(v, list) else nested.from_dict(v)
                known[k] = v
        extra = {k: v for k, v in dict(d).items() if k not in names}
        if extra and "extra" in {f.name for f in fields(cls)}:  # type: ignore[arg-type]
            known["extra"] = extra
        return cls(**known)


@dataclass
class PerChainDiagnostics(Record):
    """Per-chain health: divergence flags, fraction of draws below L_n(w*), Geweke z, ESS, MALA acceptance."""

    diverged: list[bool] = field(default_factory=list)
    nonfinite: list[bool] = field(default_factory=list)
    exploded: list[bool] = field(default_factory=list)
    frac_below_init: list[float] = field(default_factory=list)
    geweke_z: list[float] = field(default_factory=list)
    ess: list[float] = field(default_factory=list)
    mala_acceptance: list[float] | None = None


@dataclass
class ProbeRecord(Record):
    """Chains started overdispersed (w* + N(0, s²γ⁻¹I)) compared with the chains from w*."""

    llc_mean: float = float("nan")
    llc_sem: float = float("nan")
    num_chains: int = 0
    agrees: bool = False
    why: str = ""
    llc_per_chain: list[float] | None = None
    num_diverged: int | None = None
    start_distance: list[float] | None = None


@dataclass
class CalibrationCandidate(Record):
    """One (ε, γ) pilot of the self-calibration and its verdict."""

    lr: float
    localization: float
    verdict: str
    llc_mean: float | None = None
    llc_sem: float | None = None
    mala_acceptance: float | None = None
    frac_below_init: float | None = None
    stationary: bool | None = None


@dataclass
class Calibration(Record):
    """Chosen hyperparameters, and every candidate tried with its diagnostics and verdict."""

    NESTED: ClassVar[dict[str, type[Record]]] = {"candidates": CalibrationCandidate}

    lr: float
    localization: float
    nbeta: float | None
    num_draws: int
    num_burnin_steps: int
    candidates: list[CalibrationCandidate] = field(default_factory=list)
    reason: str = ""
    wall_time_s: float = 0.0
    sgld_steps: int = 0


@dataclass
class LLCDiagnostics(Record):
    """Everything the estimator measured about its chains (see :mod:`slt_tools.sampling.diagnostics`) and, for
    the self-calibrating driver, about calibration and convergence checks. Fields a run did not compute are None."""

    NESTED: ClassVar[dict[str, type[Record]]] = {"per_chain": PerChainDiagnostics, "calibration": Calibration,
                                                 "overdispersed_probe": ProbeRecord}

    per_chain: PerChainDiagnostics = field(default_factory=PerChainDiagnostics)
    num_diverged: int = 0
    stationary: bool = False
    not_stationary_reasons: list[str] = field(default_factory=list)
    excluded_chains: list[int] = field(default_factory=list)
    r_hat: float | None = None
    trend_rel_change: float | None = None
    trend_z: float | None = None
    frac_below_init: float | None = None
    ess_total: float | None = None
    mala_acceptance: float | None = None
    geweke_max_abs_z: float | None = None
    #: Stein bound on SGLD's step-size bias of λ̂ (:func:`step_bias_bound`), and the same relative to λ̂
    step_bias_bound: float | None = None
    step_bias_bound_rel: float | None = None
    # how the run went
    vectorized: bool | None = None
    fallback_reason: str | None = None
    device: str | None = None
    compiled: bool | None = None
    compile_error: str | None = None
    wall_time_s: float | None = None
    data_cached: bool | None = None
    steps_run: int | None = None
    start_distance: list[float] | None = None
    # the self-calibrating driver
    calibration: Calibration | None = None
    converged: bool | None = None
    extensions: int | None = None
    llc_by_run_length: list[float] | None = None
    overdispersed_probe: ProbeRecord | None = None
    overdispersed_llc_by_run_length: list[float] | None = None
    lr_reduced_after_divergence: list[dict[str, Any]] | None = None
    localization_raised: list[dict[str, Any]] | None = None
    step_check: dict[str, Any] | None = None
    degeneracy: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def update(self, **values: Any) -> None:
        """Set fields (records given as dicts are converted)."""
        for k, v in values.items():
            if k not in self._names():
                self.extra[k] = v
                continue
            nested = self.NESTED.get(k)
            setattr(self, k, nested.from_dict(v) if nested is not None and isinstance(v, dict) else v)


@dataclass
class ObservableStats:
    """Posterior statistics of one observable φ ∈ R^K (K = ``shape`` flattened) from a run's draws.

    ``mean_per_chain`` (C, K) and ``cov_with_loss_per_chain`` (C, K) are within-chain; ``mean``, ``var`` and
    ``cov_with_loss`` pool every chain's draws (Chan merge); ``mean_sem``/``cov_with_loss_sem`` are the spread of the
    per-chain values over √C. ``draws`` (C, T, K) only with ``keep_draws=True``. ``var_per_chain`` (C, K) and the
    covariance partner's (the minibatch loss's, or a reference observable's) per-chain mean and variance (C,) make
    the record mergeable: with them the per-chain moments are recovered exactly and chain blocks of one run combine
    into the statistics of the whole run (:func:`combine_results`, Chan's merge)."""

    name: str
    shape: list[int]
    num_draws: int
    mean_per_chain: np.ndarray
    mean: np.ndarray
    mean_sem: np.ndarray
    var: np.ndarray
    cov_with_loss_per_chain: np.ndarray
    cov_with_loss: np.ndarray
    cov_with_loss_sem: np.ndarray
    draws: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    var_per_chain: np.ndarray | None = None
    partner_mean_per_chain: np.ndarray | None = None
    partner_var_per_chain: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return json_safe({k: getattr(self, k) for k in self.__dataclass_fields__})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ObservableStats:
        arrays = ("mean_per_chain", "mean", "mean_sem", "var", "cov_with_loss_per_chain", "cov_with_loss",
                  "cov_with_loss_sem", "draws", "var_per_chain", "partner_mean_per_chain", "partner_var_per_chain")
        return cls(**{k: (np.array(v, dtype=float) if k in arrays and v is not None else v) for k, v in d.items()})


# ---- observable statistics: single-chain moments <-> ObservableStats, and the exact merge of chain blocks

def chain_list(m: Moments) -> list[Moments]:
    """Split batched moments (leading axis = chains) into one single-chain :class:`Moments` per chain."""
    def pick(t: torch.Tensor | None, c: int) -> torch.Tensor | None:
        return None if t is None else t[c:c + 1]

    return [Moments(m.n, m.mean_x[c:c + 1], pick(m.mean_y, c), m.m_xx[c:c + 1], pick(m.m_yy, c), pick(m.m_xy, c))
            for c in range(m.mean_x.shape[0])]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _sem(per_chain: np.ndarray) -> np.ndarray:
    c = per_chain.shape[0]
    return per_chain.std(axis=0, ddof=1) / math.sqrt(c) if c > 1 else np.full(per_chain.shape[1:], np.nan)


def stats_from_chains(name: str, shape: Sequence[int], chains: Sequence[Moments],
                      draws: np.ndarray | None = None) -> ObservableStats:
    """Summarise single-chain moments (one leading axis of size 1 each) into an :class:`ObservableStats`."""
    pooled = chains[0]
    for c in chains[1:]:
        pooled = merge(pooled, c)
    means = np.concatenate([_np(c.mean_x) for c in chains])
    covs = np.concatenate([_np(c.cov_xy()[..., 0]) for c in chains])
    return ObservableStats(name, list(shape), int(pooled.n // len(chains)), means, _np(pooled.mean_x[0]),
                           _sem(means), _np(pooled.var_x()[0]), covs, _np(pooled.cov_xy()[0, :, 0]), _sem(covs),
                           draws, var_per_chain=np.concatenate([_np(c.var_x()) for c in chains]),
                           partner_mean_per_chain=np.concatenate([_np(c.mean_y[:, 0]) for c in chains]),
                           partner_var_per_chain=np.concatenate([_np(c.var_y()[:, 0]) for c in chains]))


def moments_of(stats: ObservableStats) -> list[Moments]:
    """The single-chain moments behind an :class:`ObservableStats` (exact inverse of :func:`stats_from_chains` up to
    float64 rounding): M = (n − 1)·variance, M_xy = (n − 1)·covariance."""
    if stats.var_per_chain is None or stats.partner_mean_per_chain is None or stats.partner_var_per_chain is None:
        raise ValueError(f"observable {stats.name!r} has no per-chain variances (saved by an older version): "
                         "its statistics cannot be merged")
    n, f = stats.num_draws, stats.num_draws - 1
    t = (lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64)))  # noqa: E731
    return [Moments(n, t(stats.mean_per_chain[c])[None], t(stats.partner_mean_per_chain[c:c + 1])[None],
                    t(stats.var_per_chain[c])[None] * f, t(stats.partner_var_per_chain[c:c + 1])[None] * f,
                    t(stats.cov_with_loss_per_chain[c])[None, :, None] * f)
            for c in range(stats.mean_per_chain.shape[0])]


def combine_observables(parts: Sequence[Mapping[str, ObservableStats]], order: Sequence[int]
                        ) -> dict[str, ObservableStats]:
    """Merge the observables of disjoint chain blocks of one run: the blocks' chains concatenated, reordered by
    ``order`` (positions into that concatenation, e.g. by chain id), and pooled by Chan's merge."""
    names = list(parts[0])
    if any(list(p) != names for p in parts):
        raise ValueError(f"cannot combine results with different observables: {[list(p) for p in parts]}")
    out = {}
    for name in names:
        stats = [p[name] for p in parts]
        if len({s.num_draws for s in stats}) != 1 or len({tuple(s.shape) for s in stats}) != 1:
            raise ValueError(f"observable {name!r}: the parts have different numbers of draws or shapes")
        chains = [c for s in stats for c in moments_of(s)]
        draws = None
        if all(s.draws is not None for s in stats):
            draws = np.concatenate([s.draws for s in stats])[list(order)]  # type: ignore[misc]
        out[name] = stats_from_chains(name, stats[0].shape, [chains[i] for i in order], draws)
    return out


@dataclass
class LLCResult:
    """An LLC estimate: per-chain values, traces, hyperparameters and diagnostics.

    ``llc_mean``/``llc_std``/``llc_sem`` are over the chains kept (diverged chains are excluded only when the
    caller asked for it; they are listed in ``diagnostics.excluded_chains``). ``loss_trace`` holds every chain's
    minibatch loss at each draw (chains × draws); ``llc_per_chain[c] = nβ·(mean_t loss_trace[c, t] − init_loss)``.
    """

    llc_mean: float
    llc_std: float
    llc_sem: float
    llc_per_chain: np.ndarray
    loss_trace: np.ndarray
    init_loss: float
    hyperparameters: dict[str, Any]
    diagnostics: LLCDiagnostics
    chain_ids: list[int] = field(default_factory=list)
    #: name → :class:`slt_tools.sampling.observables.ObservableStats` (runs with ``observables=``)
    observables: dict[str, Any] = field(default_factory=dict)

    def _wbic_applies(self) -> bool:
        n = self.hyperparameters.get("num_samples")
        nbeta = self.hyperparameters.get("nbeta")
        return bool(n and n >= 2 and nbeta and math.isclose(float(nbeta), n / math.log(n), rel_tol=1e-9))

    @property
    def wbic(self) -> float | None:
        """WBIC = n·E_β[L_n] at β = 1/log n (Watanabe 2013, "A widely applicable Bayesian information criterion",
        JMLR 14, eq. (4)), estimated by n × the mean minibatch loss over the kept chains' draws; None unless the run
        is at nβ = n/log n (the default "dataset" convention). The posterior is the localised one (Gaussian
        prior N(w*, γ⁻¹I) centred at w*), so this is the WBIC of that local model."""
        if not self._wbic_applies():
            return None
        kept = np.isfinite(self.llc_per_chain)
        return float(self.hyperparameters["num_samples"] * np.nanmean(self.loss_trace[kept]))

    @property
    def wbic_sem(self) -> float | None:
        """Standard error of :attr:`wbic`: n × the spread of the kept chains' mean losses / √C."""
        if not self._wbic_applies():
            return None
        kept = np.isfinite(self.llc_per_chain)
        means = np.nanmean(self.loss_trace[kept], axis=1)
        if len(means) < 2:
            return float("nan")
        return float(self.hyperparameters["num_samples"] * means.std(ddof=1) / math.sqrt(len(means)))

    @property
    def llc_trace(self) -> np.ndarray:
        """nβ·(L_B(w_t) − L_n(w*)) per chain and draw: the running quantity whose mean is λ̂."""
        return self.hyperparameters["nbeta"] * (self.loss_trace - self.init_loss)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (non-finite floats become None)."""
        return json_safe({f.name: getattr(self, f.name) for f in fields(self)})

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LLCResult:
        d = dict(d)
        d["llc_per_chain"] = _as_float_array(d["llc_per_chain"])
        d["loss_trace"] = _as_float_array(d["loss_trace"])
        for key in ("llc_mean", "llc_std", "llc_sem", "init_loss"):
            d[key] = float("nan") if d[key] is None else float(d[key])
        d["diagnostics"] = LLCDiagnostics.from_dict(d["diagnostics"])
        if d.get("observables"):
            d["observables"] = {k: ObservableStats.from_dict(v) for k, v in d["observables"].items()}
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> LLCResult:
        return cls.from_dict(json.loads(s))

    def __repr__(self) -> str:
        return (f"LLCResult(llc={self.llc_mean:.4g} ± {self.llc_std:.2g} (sem {self.llc_sem:.2g}), "
                f"chains={len(self.llc_per_chain)}, init_loss={self.init_loss:.4g})")


# --------------------------------------------------------------------------------------------------- summarising
def _per_chain_llc(loss_trace: np.ndarray, init_loss: float, nbeta: float, diverged: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        per_chain = nbeta * (np.nanmean(np.where(np.isfinite(loss_trace), loss_trace, np.nan), axis=1) - init_loss)
    per_chain[diverged] = np.nan
    return per_chain


def _divergence_policy(diag: LLCDiagnostics, chain_ids: Sequence[int], hp: dict[str, Any], on_divergence: str,
                       warn: bool) -> None:
    """Raise :class:`LLCDivergenceError` or warn (:class:`DivergenceWarning`) about diverged chains."""
    diverged = np.array(diag.per_chain.diverged, dtype=bool)
    if not diverged.any():
        return
    which = [int(c) for c, d in zip(chain_ids, diverged) if d]
    msg = (f"{len(which)} of {len(diverged)} SGMCMC chains diverged (chains {which}: "
           f"{sum(diag.per_chain.nonfinite)} with NaN/inf loss, {sum(diag.per_chain.exploded)} with "
           f"loss above L_n(w*) + {hp['explode_threshold']:g}); lr={hp['lr']:g} is "
           "probably too large or localization too small")
    if on_divergence == "raise" or diverged.all():
        raise LLCDivergenceError(msg + ("; every chain diverged" if diverged.all() else
                                        "; pass on_divergence='exclude' to drop them"))
    if warn:
        warnings.warn(msg + "; excluded from the estimate", DivergenceWarning, stacklevel=4)


def step_bias_bound(lr: float, localization: float, num_params: int, mean_sq_drift: Sequence[float]) -> float:
    """First-order bound on SGLD's step-size bias of λ̂, from Stein's identity — no Hessian, no extra gradients.

    SGLD w′ = w − (ε/2)∇U_B(w) + √ε ξ on a quadratic U with curvatures a_i = nβh_i + γ has stationary variances
    (1 + εs_i/4) / (a_i(1 − εa_i/4)) (s_i: the minibatch-gradient variance in direction i), so λ̂ = nβ·E[L − L*]
    = Σ_i (nβh_i/2a_i)·a_i·Var_i is biased by Σ_i (nβh_i/2a_i)·(ε/4)(a_i + s_i) + O(ε²) ≤ (ε/8)·Σ_i (a_i − γ + s_i).
    Stein's identity E_p[‖∇U‖²] = E_p[ΔU] = Σ_i a_i (integration by parts under p ∝ e^{−U}) turns the sum into
    what the chains measure: bias ≲ (ε/8)·(E‖∇U_B(w)‖² − dγ), with E‖∇U_B‖² averaged over the draws (the engine
    records it at the MALA points; minibatch noise included). Exact to first order when the gradient noise lies in
    stiff directions, conservative otherwise; at steps near the stability limit (εa_i → 4) the O(ε²) terms add
    to it. Measured against HMC references (docs/reference_suite.md): within 25 % of the SGLD − HMC gap at
    n = 1e3, about half of it at n = 1e4 where the MALA acceptance is lower."""
    g2 = np.asarray(mean_sq_drift, dtype=float)
    g2 = g2[np.isfinite(g2)]
    if len(g2) == 0:
        return float("nan")
    return float(lr / 8.0 * max(float(g2.mean()) - num_params * localization, 0.0))


def _step_bias(diag: LLCDiagnostics, hp: dict[str, Any], kept: np.ndarray, mean: float) -> None:
    """Fill ``diag.step_bias_bound(_rel)`` from the per-chain E‖∇U_B‖² (``mean_sq_drift``) of the kept chains, for
    plain SGLD runs that recorded it."""
    g2 = diag.extra.get("mean_sq_drift")
    if g2 is None or hp.get("sampler", "sgld") != "sgld" or len(g2) != len(kept) or "num_params" not in hp:
        return
    bound = step_bias_bound(float(hp["lr"]), float(hp["localization"]), int(hp["num_params"]),
                            np.asarray(g2, dtype=float)[kept])
    diag.step_bias_bound = bound
    diag.step_bias_bound_rel = bound / abs(mean) if math.isfinite(bound) and mean != 0 else None


def summarize(
    loss_trace: np.ndarray,
    init_loss: float,
    hyperparameters: dict[str, Any],
    chain_ids: Sequence[int],
    mala: np.ndarray | None = None,
    on_divergence: str = "raise",
    extra_diagnostics: dict[str, Any] | None = None,
    warn: bool = True,
) -> LLCResult:
    """Turn raw chain traces into an :class:`LLCResult`: per-chain λ̂, diagnostics, divergence policy, warnings."""
    nbeta = float(hyperparameters["nbeta"])
    diag = LLCDiagnostics.from_dict(summarize_chains(loss_trace, init_loss, nbeta,
                                                     hyperparameters["explode_threshold"], mala))
    diag.update(**(extra_diagnostics or {}))
    diverged = np.array(diag.per_chain.diverged, dtype=bool)
    per_chain = _per_chain_llc(loss_trace, init_loss, nbeta, diverged)
    _divergence_policy(diag, chain_ids, hyperparameters, on_divergence, warn)
    diag.excluded_chains = [int(c) for c, d in zip(chain_ids, diverged) if d]
    kept = per_chain[~diverged]
    mean = float(kept.mean())
    std = float(kept.std(ddof=1)) if len(kept) > 1 else float("nan")
    sem = std / math.sqrt(len(kept)) if len(kept) > 1 else float("nan")
    _step_bias(diag, hyperparameters, ~diverged, mean)
    if warn and mean < 0:
        frac = diag.frac_below_init if diag.frac_below_init is not None else float("nan")
        warnings.warn(f"λ̂ = {mean:.4g} < 0: w* is not a local minimum of the loss (draws fall below L_n(w*) "
                      f"{100 * frac:.0f}% of the time); train further or increase localization", NegativeLLCWarning,
                      stacklevel=3)
    low = diag.mala_acceptance is not None and math.isfinite(diag.mala_acceptance) and \
        diag.mala_acceptance < LOW_ACCEPTANCE
    if warn and low:
        warnings.warn(f"MALA acceptance of the proposals is {diag.mala_acceptance:.2f} < {LOW_ACCEPTANCE}: lr = "
                      f"{hyperparameters['lr']:g} is large enough for a measurable discretisation bias in λ̂ — use a "
                      "smaller lr (and more steps for the same diffusion time)", StepSizeWarning, stacklevel=3)
    rel = diag.step_bias_bound_rel
    if warn and not low and mean > 0 and rel is not None and rel > WARN_STEP_BIAS:
        warnings.warn(f"SGLD's step-size bias may be measurable: its Stein bound (ε/8)(E‖∇U‖² − dγ) is "
                      f"{diag.step_bias_bound:.3g} = {100 * rel:.0f}% of λ̂ = {mean:.4g} at lr = "
                      f"{hyperparameters['lr']:g} (λ̂ reads high by up to about that) — use a smaller lr (the bias "
                      "shrinks ∝ lr; more steps for the same diffusion time)", StepSizeWarning, stacklevel=3)
        low = True
    if warn and not diag.stationary:
        advice = ("use more draws/burn-in (not a larger lr: the step size is already large)" if low else
                  "use more draws/burn-in or a larger lr")
        warnings.warn("LLC trace has not settled: " + "; ".join(diag.not_stationary_reasons) +
                      f" — {advice}; see result.diagnostics", NotStationaryWarning, stacklevel=3)
    return LLCResult(mean, std, sem, per_chain, loss_trace, float(init_loss), dict(hyperparameters), diag,
                     [int(c) for c in chain_ids])


#: run facts carried over when chain blocks of one run are combined
_RUN_FACTS = ("vectorized", "fallback_reason", "device", "compiled")


def combine_results(parts: Sequence[LLCResult], on_divergence: str = "raise", warn: bool = True) -> LLCResult:
    """Merge results of disjoint chain blocks of one run (same w*, data, hyperparameters) into one result; their
    observables' statistics are merged exactly (Chan's merge of the per-chain moments, chains in id order: the
    same numbers as one run of all chains, up to float64 rounding)."""
    if not parts:
        raise ValueError("combine_results needs at least one result")
    hp = {k: v for k, v in parts[0].hyperparameters.items() if k not in ("chain_ids", "num_chains")}
    for p in parts[1:]:
        other = {k: v for k, v in p.hyperparameters.items() if k not in ("chain_ids", "num_chains")}
        if other != hp or p.init_loss != parts[0].init_loss:
            raise ValueError("cannot combine LLC results from different runs (hyperparameters or init_loss differ)")
    order = np.argsort(np.concatenate([p.chain_ids for p in parts]), kind="stable")
    ids = list(np.concatenate([p.chain_ids for p in parts])[order])
    if len(set(ids)) != len(ids):
        raise ValueError("cannot combine LLC results: chain ids overlap")
    trace = np.concatenate([p.loss_trace for p in parts])[order]
    mala_parts = [p.diagnostics.per_chain.mala_acceptance for p in parts]
    mala = None if any(m is None for m in mala_parts) else np.concatenate(mala_parts)[order]
    extra = {k: parts[0].diagnostics[k] for k in _RUN_FACTS}
    extra["wall_time_s"] = float(sum(p.diagnostics.get("wall_time_s", 0.0) for p in parts))
    drift = [p.diagnostics.extra.get("mean_sq_drift") for p in parts]
    if all(g is not None for g in drift):  # per chain, so the step-bias bound covers the combined chains
        extra["mean_sq_drift"] = list(np.concatenate([np.asarray(g, dtype=float) for g in drift])[order])
    result = summarize(trace, parts[0].init_loss, {**hp, "num_chains": len(ids)}, ids, mala, on_divergence, extra,
                       warn=warn)
    if any(p.observables for p in parts):

        result.observables = combine_observables([p.observables for p in parts], order)
    return result
