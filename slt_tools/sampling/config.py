"""``LLCConfig``: every setting of an LLC estimate, frozen and validated once.

One object travels from the entry points (:func:`slt_tools.estimate_llc`, :func:`slt_tools.llc_trajectory`,
:class:`slt_tools.LLCTracker`, the CLI) to the estimator, instead of keyword lists relayed and re-declared at each
layer. Its field names are devinterp's where devinterp has the setting (``num_chains``, ``num_draws``,
``num_burnin_steps``, ``num_steps_bw_draws``, ``lr``, ``localization``, ``nbeta``). :meth:`LLCConfig.to_dict` is the
JSON form written as a results store's header; :meth:`LLCConfig.from_dict` reads it back.

Run-time placement (device, progress bar, logger, which chains of the run to compute) is not part of the config: it
does not change the estimate.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from slt_tools.sampling.functional import RestrictTo
from slt_tools.sampling.rules import get_rule
from slt_tools.sampling.samplers import rule_hyperparameters


class LocalizationWarning(RuntimeWarning):
    """γ = 0: the chains are not localised (see :class:`LLCConfig`)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _positive(name: str, v: Any, optional: bool = False) -> None:
    if optional and v is None:
        return
    if not _is_real(v) or float(v) <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")


def _integer(name: str, v: Any, minimum: int) -> None:
    if not _is_int(v) or v < minimum:
        kind = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f"≥ {minimum}"
        raise ValueError(f"{name} must be a {kind} integer, got {v!r}")


#: extensions of a self-calibrated run (``max_extensions`` None): each continues the run's chains (doubling it costs
#: only the steps added), so the budget (``budget_steps``), not this count, is what normally stops the driver
DEFAULT_EXTENSIONS = 4


def relaxation_steps(lr: float, localization: float) -> int:
    """SGLD steps the flat directions of the localised posterior need to relax from w*: ⌈4/(εγ)⌉.

    Where the loss does not curve (symmetry orbits, degenerate valleys), SGLD is the Ornstein–Uhlenbeck recursion
    x′ = (1 − εγ/2)·x + √ε·ξ started at 0, whose variance (1/γ)(1 − (1 − εγ/2)^{2t}) ≈ (1/γ)(1 − e^{−εγt}) misses
    e^{−4} ≈ 2 % of its limit after t = 4/(εγ) steps; curved directions relax faster. Chains from w* that stop earlier
    have not explored those directions, and where λ̂ depends on them (on most networks: moving along a symmetry orbit
    changes the curvature of the other directions) it is still rising.
    """
    if localization <= 0:
        return 2**62
    return int(math.ceil(4.0 / (lr * localization)))


def default_burnin(lr: float, localization: float, sampling_steps: int) -> int:
    """The burn-in of a hand-set run that does not give one: the flat directions' relaxation time
    :func:`relaxation_steps` (4/(εγ)), but at most the sampling steps themselves (so the default at most doubles a
    run's cost; where 4/(εγ) is longer the diagnostics' initial-transient and drift checks say the run is short).
    With devinterp's typical ε = 1e-4, γ = 100 that is 400 steps. ``num_burnin_steps=0`` keeps devinterp's default."""
    return int(min(relaxation_steps(lr, localization), sampling_steps))


@dataclass(frozen=True)
class LLCConfig:
    """Settings of one LLC estimate (see :func:`slt_tools.estimate_llc` for what each does).

    ``lr``/``localization`` left as None are chosen by self-calibration (:mod:`slt_tools.sampling.calibration`);
    :func:`slt_tools.sampling.estimate.sample_llc` needs both. ``localization = 0`` (devinterp's tests use it) is
    allowed with a :class:`LocalizationWarning`: without localisation the chains are not held near w* and on a
    model with unbounded flat directions λ̂ can drift without limit. ``max_extensions``/``convergence_probe`` left as
    None mean "on for self-calibrated runs, off for hand-set ones"; set explicitly, they apply to hand-set runs too.
    ``model_mode``: the model is sampled in eval mode by default (dropout off, BatchNorm on its running statistics:
    the loss is then one deterministic function of w) and its modes are restored afterwards; ``"train"`` samples in
    train mode (dropout noise per chain and step; BatchNorm normalises by each minibatch).
    ``step_check=True`` also runs half the chains (at least 2) at ε/2 for twice the steps (the same diffusion time
    ε·steps, so unfinished relaxation cancels) and warns (:class:`StepSizeWarning`) when λ̂ moves by more than 5 %
    and 3 standard errors: the step-size bias is then measurable (:func:`slt_tools.sampling.auto.step_size_check`).
    ``num_burnin_steps`` left as None is :func:`default_burnin` (min(4/(εγ), the sampling steps)) once ε and γ
    are known. ``budget_steps``/``budget_seconds``: the most the self-calibrating driver may spend on one estimate,
    in sequential
    SGLD steps (pilots, runs and probes; None: :data:`slt_tools.sampling.auto.DEFAULT_BUDGET_STEPS`) and in wall
    time (None: no limit). A run that would not fit is not started; the result then says it was cut short.
    """

    num_chains: int = 8
    num_draws: int = 200
    num_burnin_steps: int | None = None
    num_steps_bw_draws: int = 1
    lr: float | None = None
    localization: float | None = None
    nbeta: float | None = None
    nbeta_convention: str = "dataset"
    sampler: str = "sgld"
    sampler_kwargs: Mapping[str, float] = field(default_factory=dict)
    restrict_to: RestrictTo = None
    seed: int = 0
    chain_chunk_size: int | None = None
    vectorize: bool = True
    mala_every: int = 20
    explode_threshold: float | None = None
    on_divergence: str = "raise"
    init_spread: float = 0.0
    compile: bool = False
    model_mode: str = "eval"
    max_extensions: int | None = None
    convergence_probe: bool | None = None
    budget_steps: int | None = None
    budget_seconds: float | None = None
    step_check: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler_kwargs", MappingProxyType(dict(self.sampler_kwargs or {})))
        if isinstance(self.restrict_to, str):
            object.__setattr__(self, "restrict_to", (self.restrict_to,))
        elif self.restrict_to is not None and not callable(self.restrict_to):
            object.__setattr__(self, "restrict_to", tuple(self.restrict_to))
        self._validate()
        if self.num_burnin_steps is None and self.lr is not None and self.localization is not None:
            object.__setattr__(self, "num_burnin_steps",
                               default_burnin(float(self.lr), float(self.localization),
                                              int(self.num_draws) * int(self.num_steps_bw_draws)))
        for name in ("num_chains", "num_draws", "num_burnin_steps", "num_steps_bw_draws", "seed", "mala_every",
                     "chain_chunk_size", "max_extensions", "budget_steps"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("lr", "localization", "nbeta", "explode_threshold", "init_spread", "budget_seconds"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))

    def _validate(self) -> None:
        _integer("num_chains", self.num_chains, 1)
        _integer("num_draws", self.num_draws, 1)
        if self.num_burnin_steps is not None:
            _integer("num_burnin_steps", self.num_burnin_steps, 0)
        _integer("num_steps_bw_draws", self.num_steps_bw_draws, 1)
        _integer("seed", self.seed, 0)
        _integer("mala_every", self.mala_every, 0)
        _positive("lr", self.lr, optional=True)
        if self.localization is not None and (not _is_real(self.localization) or self.localization < 0):
            raise ValueError(f"localization must be a non-negative finite number, got {self.localization!r}")
        _positive("nbeta", self.nbeta, optional=True)
        _positive("explode_threshold", self.explode_threshold, optional=True)
        if self.chain_chunk_size is not None:
            _integer("chain_chunk_size", self.chain_chunk_size, 1)
        if self.max_extensions is not None:
            _integer("max_extensions", self.max_extensions, 0)
        if self.budget_steps is not None:
            _integer("budget_steps", self.budget_steps, 1)
        _positive("budget_seconds", self.budget_seconds, optional=True)
        if not _is_real(self.init_spread) or self.init_spread < 0:
            raise ValueError(f"init_spread must be a non-negative finite number, got {self.init_spread!r}")
        if self.nbeta_convention not in ("dataset", "batch"):
            raise ValueError(f"nbeta_convention must be 'dataset' or 'batch', got {self.nbeta_convention!r}")
        if self.model_mode not in ("eval", "train"):
            raise ValueError(f"model_mode must be 'eval' or 'train', got {self.model_mode!r}")
        if self.on_divergence not in ("raise", "exclude"):
            raise ValueError(f"on_divergence must be 'raise' or 'exclude', got {self.on_divergence!r}")
        get_rule(self.sampler)  # unknown sampler: ValueError naming the registered ones
        rule_hyperparameters(self.sampler, 1.0, 1.0, 1.0, dict(self.sampler_kwargs))  # unknown sampler_kwargs
        for name in ("vectorize", "compile", "step_check"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.localization == 0 and self.init_spread > 0:
            raise ValueError("init_spread > 0 scales the start by γ^(-1/2): it needs localization > 0")

    # ------------------------------------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, base: LLCConfig | None = None, **kwargs: Any) -> LLCConfig:
        """``base`` (default: all defaults) with ``kwargs`` replaced; an unknown name is a TypeError naming it."""
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise TypeError(f"unknown LLC setting(s) {unknown}; known: {list(cls.field_names())}")
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)

    def replace(self, **changes: Any) -> LLCConfig:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------------ derived facts
    @property
    def calibrated(self) -> bool:
        """Whether step size or localization is left for self-calibration."""
        return self.lr is None or self.localization is None

    @property
    def extensions_allowed(self) -> int:
        return (DEFAULT_EXTENSIONS if self.calibrated else 0) if self.max_extensions is None else self.max_extensions

    @property
    def probe_enabled(self) -> bool:
        return self.calibrated if self.convergence_probe is None else self.convergence_probe

    def warn_if_risky(self) -> None:
        """Warnings for legal but risky settings (called once per estimate)."""
        if self.localization == 0:
            warnings.warn("localization = 0: chains are not held near w*; in flat directions they drift without "
                          "limit and λ̂ may not settle (devinterp-compatible, but prefer γ > 0)", LocalizationWarning,
                          stacklevel=3)

    # ------------------------------------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every setting; a predicate ``restrict_to`` is written by name (it cannot be stored)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["sampler_kwargs"] = dict(self.sampler_kwargs)
        rt = self.restrict_to
        out["restrict_to"] = None if rt is None else (list(rt) if not callable(rt) else
                                                     f"<predicate {getattr(rt, '__qualname__', repr(rt))}>")
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LLCConfig:
        """Inverse of :meth:`to_dict` (a stored predicate cannot be restored and is refused)."""
        d = dict(d)
        rt = d.get("restrict_to")
        if isinstance(rt, str) and rt.startswith("<predicate"):
            raise ValueError(f"the stored config restricted sampling by a predicate ({rt}); pass it again")
        return cls.from_kwargs(**d)
