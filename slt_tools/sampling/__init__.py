"""Batched SGMCMC sampling and LLC estimation.

Layers, bottom up (no module imports one above it):
``rules`` (update rules registry) → ``samplers`` (rule + hyperparameters + state) → ``noise``, ``data``,
``functional`` (flat parameter views), ``compiled`` (torch.compile internals) → ``steps`` (step paths) → ``engine``
(the hot loop) → ``result``, ``config`` → ``estimate`` (:func:`sample_llc`, one run) → ``calibration`` →
``auto`` (:func:`estimate_llc`, the self-calibrating driver).
"""
from slt_tools.sampling.auto import estimate_llc
from slt_tools.sampling.calibration import CalibrationError, CalibrationSettings, calibrate_llc
from slt_tools.sampling.config import LLCConfig, LocalizationWarning
from slt_tools.sampling.degenerate import (
    DegeneracyCheck,
    degeneracy_check,
    estimate_llc_degenerate,
    stein_step_size,
    uld_settings,
)
from slt_tools.sampling.estimate import LLCProblem, default_nbeta, sample_llc
from slt_tools.sampling.result import (
    Calibration,
    CalibrationCandidate,
    DegeneracyWarning,
    DivergenceWarning,
    LLCDiagnostics,
    LLCDivergenceError,
    LLCResult,
    LLCWarning,
    LocalizationRaisedWarning,
    NegativeLLCWarning,
    NotConvergedWarning,
    NotStationaryWarning,
    PerChainDiagnostics,
    ProbeRecord,
    SamplingFallbackWarning,
    StepSizeWarning,
    combine_results,
)
from slt_tools.sampling.rules import RULES, Rule, register

__all__ = [
    "RULES", "Calibration", "CalibrationCandidate", "CalibrationError", "CalibrationSettings", "DegeneracyCheck",
    "DegeneracyWarning", "DivergenceWarning", "degeneracy_check", "estimate_llc_degenerate", "stein_step_size",
    "uld_settings",
    "LLCConfig", "LLCDiagnostics", "LLCDivergenceError", "LLCProblem", "LLCResult", "LLCWarning",
    "LocalizationRaisedWarning",
    "LocalizationWarning", "NegativeLLCWarning", "NotConvergedWarning", "NotStationaryWarning",
    "PerChainDiagnostics", "ProbeRecord", "Rule", "SamplingFallbackWarning", "StepSizeWarning", "calibrate_llc",
    "combine_results",
    "default_nbeta", "estimate_llc", "register", "sample_llc",
]
