"""Argument checks for sweeps and the tracker, run before any file is touched.

A mistyped argument must fail at once, with the argument's name, and never after a results store has been created
with the bad value in its header (the corrected rerun would then be refused as "different settings"). LLC settings
are validated by :class:`~slt_tools.sampling.config.LLCConfig` (the estimator's own checks); the sweep's own integer
arguments by :func:`check_int`.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from slt_tools.sampling.config import LLCConfig


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    """``value`` must be an integer ≥ ``minimum`` (or None when ``optional``); bools and 2.0 are refused."""
    if value is None and optional:
        return
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}" + (" (or None)" if optional else "")
                         + f", got {value!r}")


#: run-time placement accepted beside the LLC settings: not part of the estimate, not recorded in a store's header
RUNTIME = ("device", "progress")


def check_llc_kwargs(llc_kwargs: Mapping[str, Any], *, reserved: tuple[str, ...] = ()) -> LLCConfig:
    """Validate keyword arguments meant for :func:`slt_tools.estimate_llc` without running anything: they must be
    :class:`~slt_tools.sampling.config.LLCConfig` fields (validated by it, the one place LLC settings are checked) or
    run-time placement (:data:`RUNTIME`). Returns the config.

    Raises TypeError for unknown names and ValueError (naming the argument) for bad values.
    """
    for name in llc_kwargs:
        if name in reserved:
            raise ValueError(f"{name} is chosen by the sweep; do not pass it")
    if "progress" in llc_kwargs and not isinstance(llc_kwargs["progress"], bool):
        raise ValueError(f"progress must be True or False, got {llc_kwargs['progress']!r}")
    return LLCConfig.from_kwargs(**{k: v for k, v in llc_kwargs.items() if k not in RUNTIME})


def store_header(config: LLCConfig, **sweep_settings: Any) -> dict[str, Any]:
    """A results store's header: the LLC config (without ``compile``, which changes speed, not results, so a sweep
    may be resumed with or without it) and the sweep's own settings."""
    llc = {k: v for k, v in config.to_dict().items() if k != "compile"}
    return {"llc": llc, **sweep_settings}
