"""The historical import path of the LLC estimator: re-exports only.

The estimator proper is :mod:`slt_tools.sampling.estimate` (:func:`~slt_tools.sampling.estimate.sample_llc`), the
self-calibrating driver :mod:`slt_tools.sampling.auto` (:func:`~slt_tools.sampling.auto.estimate_llc`), results,
diagnostics and warning classes :mod:`slt_tools.sampling.result`, settings :mod:`slt_tools.sampling.config`.
"""
from slt_tools.sampling.auto import PROBE_SPREAD, estimate_llc
from slt_tools.sampling.estimate import default_nbeta, full_data_loss, sample_llc
from slt_tools.sampling.result import LLCDiagnostics, LLCDivergenceError, LLCResult, combine_results, summarize

__all__ = ["PROBE_SPREAD", "LLCDiagnostics", "LLCDivergenceError", "LLCResult", "combine_results", "default_nbeta",
           "estimate_llc", "full_data_loss", "sample_llc", "summarize"]
