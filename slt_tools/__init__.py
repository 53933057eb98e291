"""slt_tools: singular learning theory tools for PyTorch.

Public API (kept small and stable): LLC estimation (:func:`estimate_llc`, :func:`sample_llc`, :class:`LLCConfig`,
:func:`calibrate_llc`), refined LLCs of many restrictions in one batched run (:func:`estimate_refined_llc`,
:class:`RefinedLLCResult`), LLC over training (:func:`llc_trajectory`, :class:`LLCTracker`), developmental stages
(:func:`detect_stages`) and W&B logging (:class:`WandbLogger`). Submodules are reachable as attributes and imported on
first use (``slt_tools.theory``, ``.symmetry``, ``.geometry``, ``.models``, ``.plots``, ``.sampling``, ``.stages``,
``.trajectory``, ``.logging``, ``.synthetic``, ``.cli``, ``.restrictions`` (per-head / per-layer parameter masks),
``.losses`` (language-model losses)): wandb and matplotlib are imported only when used.
"""
from __future__ import annotations

import importlib
from typing import Any

from slt_tools.essential_dynamics import EssentialDynamics, essential_dynamics
from slt_tools.logging import WandbLogger
from slt_tools.sampling import (
    Calibration,
    CalibrationError,
    DegeneracyWarning,
    DivergenceWarning,
    LLCConfig,
    LLCDiagnostics,
    LLCDivergenceError,
    LLCResult,
    LLCWarning,
    LocalizationRaisedWarning,
    NegativeLLCWarning,
    NotConvergedWarning,
    NotStationaryWarning,
    SamplingFallbackWarning,
    StepSizeWarning,
    calibrate_llc,
    combine_results,
    estimate_llc,
    sample_llc,
)
from slt_tools.sampling.bif import BIFResult, bif
from slt_tools.sampling.refined import estimate_refined_llc
from slt_tools.sampling.refined_result import RefinedLLCResult
from slt_tools.sampling.susceptibility import SusceptibilityResult, susceptibilities
from slt_tools.stages import Stage, StageList, detect_stages
from slt_tools.trajectory import (
    CheckpointError,
    LLCTracker,
    Trajectory,
    llc_trajectory,
    log_schedule,
    save_checkpoint,
)

__version__ = "0.1.0"

#: submodules importable as attributes (``slt_tools.theory``), loaded on first access as numpy/scipy do
_SUBMODULES = ("cli", "geometry", "logging", "losses", "models", "plots", "restrictions",
               "sampling", "stages", "symmetry", "synthetic", "theory", "trajectory", "observables")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))


__all__ = [
    "Calibration", "CalibrationError", "CheckpointError", "DegeneracyWarning", "DivergenceWarning",
    "EssentialDynamics", "LLCConfig",
    "LLCDiagnostics", "LLCDivergenceError", "LLCResult", "LLCTracker", "LLCWarning", "LocalizationRaisedWarning",
    "NegativeLLCWarning", "NotConvergedWarning", "NotStationaryWarning", "RefinedLLCResult", "SamplingFallbackWarning",
    "Stage", "StageList", "StepSizeWarning", "Trajectory", "WandbLogger", "calibrate_llc", "combine_results",
    "detect_stages", "essential_dynamics", "estimate_llc", "estimate_refined_llc", "llc_trajectory", "log_schedule",
    "sample_llc", "save_checkpoint", "BIFResult", "bif",
    "SusceptibilityResult", "susceptibilities",
]
