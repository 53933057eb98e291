"""Batched SGMCMC sampling and LLC estimation."""
from slt_tools.sampling.llc import LLCDivergenceError, LLCResult, combine_results, default_nbeta, estimate_llc

__all__ = ["LLCDivergenceError", "LLCResult", "combine_results", "default_nbeta", "estimate_llc"]
