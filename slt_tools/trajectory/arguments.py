"""Argument checks for sweeps and the tracker, run before any file is touched.

A mistyped argument must fail at once, with the argument's name, and never after a results store has been created
with the bad value in its header (the corrected rerun would then be refused as "different settings"). The checks
mirror what :func:`slt_tools.estimate_llc` accepts; those it does not yet check itself (``mala_every``,
``explode_threshold``, integer-valued counts and seeds) are checked here so sweeps are safe today.
"""
from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any

from slt_tools.sampling import llc as _llc
from slt_tools.sampling.llc import estimate_llc

_SAMPLERS = tuple(getattr(_llc, "SAMPLERS", ("sgld", "rmsprop_sgld", "sgnht")))


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    """``value`` must be an integer ≥ ``minimum`` (or None when ``optional``); bools and 2.0 are refused."""
    if value is None and optional:
        return
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}" + (" (or None)" if optional else "")
                         + f", got {value!r}")


def check_positive(name: str, value: Any, *, optional: bool = True) -> None:
    """``value`` must be a positive finite number (or None when ``optional``)."""
    if value is None and optional:
        return
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value))
            or value <= 0):
        raise ValueError(f"{name} must be a positive finite number" + (" (or None)" if optional else "")
                         + f", got {value!r}")


def check_llc_kwargs(llc_kwargs: Mapping[str, Any], *, reserved: tuple[str, ...] = ()) -> None:
    """Validate keyword arguments meant for :func:`slt_tools.estimate_llc` without running anything.

    Raises TypeError for unknown names and ValueError (naming the argument) for bad values.
    """
    accepted = set(inspect.signature(estimate_llc).parameters) - {"model", "loader", "loss_fn"}
    for name in llc_kwargs:
        if name in reserved:
            raise ValueError(f"{name} is chosen by the sweep; do not pass it")
        if name not in accepted:
            raise TypeError(f"unknown estimate_llc argument {name!r}; accepted: {', '.join(sorted(accepted))}")
    kw = dict(llc_kwargs)
    check_int("num_chains", kw.get("num_chains", 8), 1)
    check_int("num_draws", kw.get("num_draws", 200), 1)
    check_int("num_burnin_steps", kw.get("num_burnin_steps", 0), 0)
    check_int("num_steps_bw_draws", kw.get("num_steps_bw_draws", 1), 1)
    check_int("seed", kw.get("seed", 0), 0)
    check_int("mala_every", kw.get("mala_every", 20), 0)
    check_int("max_extensions", kw.get("max_extensions", 2), 0)
    check_int("chain_chunk_size", kw.get("chain_chunk_size"), 1, optional=True)
    for name in ("lr", "localization", "nbeta", "explode_threshold"):
        check_positive(name, kw.get(name))
    spread = kw.get("init_spread", 0.0)
    if isinstance(spread, bool) or not isinstance(spread, numbers.Real) or not math.isfinite(spread) or spread < 0:
        raise ValueError(f"init_spread must be a non-negative finite number, got {spread!r}")
    choices = {"sampler": _SAMPLERS, "on_divergence": ("raise", "exclude"),
               "nbeta_convention": ("dataset", "batch")}
    for name, allowed in choices.items():
        if name in kw and kw[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {kw[name]!r}")
    for name in ("vectorize", "compile", "progress", "convergence_probe"):
        if name in kw and not isinstance(kw[name], bool):
            raise ValueError(f"{name} must be True or False, got {kw[name]!r}")
