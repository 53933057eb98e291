"""Input handling for stage detection: validation, NaN dropping, and which estimates are flagged.

An estimate is *flagged* (not evidence about the loss landscape) when λ̂ < 0 (w* is not near a local minimum, so the
LLC is undefined there), when chains diverged, or when the estimator reported that the run did not converge or was
not stationary (``LLCResult.diagnostics``: ``num_diverged``, ``converged``, ``stationary``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Curves:
    """Validated curves: LLC points (after dropping NaNs and flagged points) and the loss on its own step grid."""

    steps: np.ndarray
    llc: np.ndarray
    llc_std: np.ndarray | None
    loss_steps: np.ndarray | None
    loss: np.ndarray | None
    excluded: list[dict[str, Any]] = field(default_factory=list)  # {"step", "reason"} per dropped checkpoint
    weights: np.ndarray | None = None


def flags_from_results(results: Any) -> list[str | None]:
    """Per result (``LLCResult`` or its ``to_dict``), the reason it is flagged, or ``None``.

    Reads only fields the estimator already reports: ``llc_mean`` and ``diagnostics`` (``num_diverged``,
    ``converged``, ``stationary``).
    """
    out: list[str | None] = []
    for r in results:
        mean = r.get("llc_mean") if isinstance(r, dict) else getattr(r, "llc_mean", float("nan"))
        diag = (r.get("diagnostics") if isinstance(r, dict) else getattr(r, "diagnostics", None)) or {}
        reasons = []
        if mean is not None and math.isfinite(mean) and mean < 0:
            reasons.append("llc<0")
        if int(diag.get("num_diverged", 0) or 0) > 0:
            reasons.append("diverged")
        if diag.get("converged") is False:
            reasons.append("not converged")
        if diag.get("stationary") is False:
            reasons.append("not stationary")
        out.append(", ".join(reasons) or None)
    return out


def _unpack(steps: Any, llc: Any, loss: Any, llc_std: Any, flags: Any):
    if llc is None and all(hasattr(steps, a) for a in ("steps", "llc_mean")):
        traj = steps
        steps, llc = traj.steps, traj.llc_mean
        loss = getattr(traj, "loss", None) if loss is None else loss
        llc_std = getattr(traj, "llc_std", None) if llc_std is None else llc_std
        if flags is None and getattr(traj, "results", None):
            flags = flags_from_results(traj.results)
    if llc is None:
        raise TypeError("detect_stages needs (steps, llc, ...) arrays or a Trajectory-like object")
    return steps, llc, loss, llc_std, flags


def _check_steps(s: np.ndarray, what: str) -> None:
    if len(s) > 1 and np.any(np.diff(s) <= 0):
        bad = int(np.argmax(np.diff(s) <= 0))
        word = "duplicated" if s[bad + 1] == s[bad] else "decreasing"
        raise ValueError(f"{what} must be strictly increasing ({word}: step[{bad}] = {s[bad]:g}, "
                         f"step[{bad + 1}] = {s[bad + 1]:g})")


def prepare(steps: Any, llc: Any = None, loss: Any = None, llc_std: Any = None, *, loss_steps: Any = None,
            flags: Any = None, exclude_flagged: bool = True) -> Curves:
    """Validate and clean the inputs of :func:`detect_stages` (see its docstring for the rules)."""
    steps, llc, loss, llc_std, flags = _unpack(steps, llc, loss, llc_std, flags)
    s = np.asarray(steps, dtype=float).ravel()
    y = np.asarray(llc, dtype=float).ravel()
    sd = None if llc_std is None else np.asarray(llc_std, dtype=float).ravel()
    lo = None if loss is None else np.asarray(loss, dtype=float).ravel()
    ls = None if loss_steps is None else np.asarray(loss_steps, dtype=float).ravel()
    if lo is not None and ls is None:
        ls = s
    for name, arr, ref, rname in (("llc", y, s, "steps"), ("llc_std", sd, s, "steps"), ("loss", lo, ls, "loss_steps")):
        if arr is not None and ref is not None and len(arr) != len(ref):
            raise ValueError(f"{name} has {len(arr)} values but {rname} has {len(ref)}: curves must have equal "
                             f"lengths")
    if flags is not None and len(flags) != len(s):
        raise ValueError(f"flags has {len(flags)} entries but steps has {len(s)}: curves must have equal lengths")
    _check_steps(s, "steps")
    if sd is not None and np.any(sd[np.isfinite(sd)] < 0):
        raise ValueError("llc_std must be non-negative")
    reason = np.array([None] * len(s), dtype=object)
    if flags is not None:
        for i, f in enumerate(flags):
            reason[i] = (("flagged" if f is True else str(f)) if f not in (None, False, "") else None)
    reason[(np.isfinite(y)) & (y < 0) & (reason == None)] = "llc<0"  # noqa: E711 - elementwise test
    bad = ~np.isfinite(y) | ~np.isfinite(s) | (np.zeros(len(s), bool) if sd is None else ~np.isfinite(sd))
    if lo is not None and ls is s:
        bad |= ~np.isfinite(lo)
    if bad.any():
        warnings.warn(f"dropping {int(bad.sum())} checkpoints with NaN/inf values (steps "
                      f"{[f'{v:g}' for v in s[bad][:20]]})", RuntimeWarning, stacklevel=3)
    excluded = [{"step": float(s[i]), "reason": "nan"} for i in np.flatnonzero(bad)]
    drop = bad.copy()
    if exclude_flagged:
        fl = (reason != None) & ~bad  # noqa: E711
        excluded += [{"step": float(s[i]), "reason": reason[i]} for i in np.flatnonzero(fl)]
        drop |= fl
    excluded.sort(key=lambda e: e["step"])
    keep = ~drop
    if lo is not None:
        lo_keep = keep if ls is s else np.isfinite(lo) & np.isfinite(ls)
        if ls is not s and not lo_keep.all():
            warnings.warn(f"dropping {int((~lo_keep).sum())} NaN/inf loss values (loss_steps "
                          f"{[f'{v:g}' for v in ls[~lo_keep][:20]]})", RuntimeWarning, stacklevel=3)
        ls, lo = ls[lo_keep], lo[lo_keep]
        _check_steps(ls, "loss_steps")
    return Curves(s[keep], y[keep], None if sd is None else sd[keep], ls, lo, excluded)
