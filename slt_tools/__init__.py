"""slt_tools: singular learning theory tools for PyTorch.

Public API (kept small and stable): LLC estimation (:func:`estimate_llc`, :func:`calibrate_llc`), LLC over training
(:func:`llc_trajectory`, :class:`LLCTracker`), developmental stages (:func:`detect_stages`) and W&B logging
(:class:`WandbLogger`). Submodules: :mod:`slt_tools.theory` (closed-form learning coefficients),
:mod:`slt_tools.symmetry` (canonical forms, alignment, barriers), :mod:`slt_tools.geometry` (Hessian, eNTK),
:mod:`slt_tools.models`, :mod:`slt_tools.plots`. wandb and matplotlib are imported only when used.
"""
from slt_tools.essential_dynamics import EssentialDynamics, essential_dynamics
from slt_tools.logging import WandbLogger
from slt_tools.sampling import LLCDivergenceError, LLCResult, combine_results, estimate_llc
from slt_tools.sampling.calibration import Calibration, CalibrationError, calibrate_llc
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

__all__ = [
    "Calibration", "CalibrationError", "CheckpointError", "EssentialDynamics", "LLCDivergenceError", "LLCResult",
    "LLCTracker", "Stage", "StageList", "essential_dynamics",
    "Trajectory", "WandbLogger", "calibrate_llc", "combine_results", "detect_stages", "estimate_llc",
    "llc_trajectory", "log_schedule", "save_checkpoint",
]
