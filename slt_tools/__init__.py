"""slt_tools: singular learning theory tools for PyTorch.

Public API (kept small and stable): LLC estimation (:func:`estimate_llc`, :class:`LLCResult`), closed-form learning
coefficients (:mod:`slt_tools.theory`), and — as they land — trajectories, stages, symmetry, geometry and logging.
Heavy optional dependencies (wandb, matplotlib) are imported only when used.
"""
from slt_tools.logging import WandbLogger
from slt_tools.sampling import LLCDivergenceError, LLCResult, combine_results, estimate_llc
from slt_tools.sampling.calibration import Calibration, CalibrationError, calibrate_llc
from slt_tools.stages import Stage, detect_stages
from slt_tools.trajectory import (
    CheckpointError,
    LLCTracker,
    Trajectory,
    llc_trajectory,
    log_schedule,
    save_checkpoint,
)

__version__ = "0.1.0"

__all__ = ["Calibration", "CalibrationError", "calibrate_llc", "CheckpointError", "LLCDivergenceError", "LLCResult", "LLCTracker", "Stage", "Trajectory", "WandbLogger",
           "combine_results", "detect_stages", "estimate_llc", "llc_trajectory", "log_schedule", "save_checkpoint"]
