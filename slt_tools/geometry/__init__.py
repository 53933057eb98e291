"""Landscape geometry beside the LLC: Hessian spectrum (Lanczos, Hutch++, SLQ) and the empirical NTK."""
from slt_tools.geometry.hessian import (
    HessianConvergenceWarning,
    HessianOperator,
    Spectrum,
    hessian_eigenvalues,
    hessian_spectral_density,
    hessian_summary,
    hessian_trace,
    lanczos,
)
from slt_tools.geometry.kernel import KernelGap, KernelRegression, kernel_gap, kernel_regression
from slt_tools.geometry.ntk import (
    empirical_ntk,
    kernel_distance,
    kernel_target_alignment,
    kernel_velocity,
    ntk_summary,
)

__all__ = ["HessianConvergenceWarning", "HessianOperator", "KernelGap", "KernelRegression", "Spectrum", "empirical_ntk",
           "hessian_eigenvalues", "hessian_spectral_density", "hessian_summary", "hessian_trace", "kernel_distance",
           "kernel_gap", "kernel_regression", "kernel_target_alignment", "kernel_velocity", "lanczos", "ntk_summary"]
