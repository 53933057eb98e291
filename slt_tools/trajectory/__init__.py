"""LLC over training: checkpoints, the resumable results store, sweeps (single process or torchrun), the tracker."""
from slt_tools.trajectory.checkpoints import (
    CheckpointError,
    discover_checkpoints,
    find_checkpoints,
    load_into,
    read_checkpoint,
    save_checkpoint,
)
from slt_tools.trajectory.refined import RefinedTrajectory
from slt_tools.trajectory.store import ResultsStore, StoreError, read_store
from slt_tools.trajectory.sweep import Trajectory, llc_trajectory
from slt_tools.trajectory.tracker import LLCTracker, log_schedule

__all__ = ["CheckpointError", "LLCTracker", "RefinedTrajectory", "ResultsStore", "StoreError", "Trajectory",
           "discover_checkpoints", "find_checkpoints", "llc_trajectory", "load_into", "log_schedule", "read_checkpoint",
           "read_store", "save_checkpoint"]
