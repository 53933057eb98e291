"""Parameter symmetries: specs, reference-free canonical forms, weight matching, and landscape comparisons."""
from slt_tools.symmetry.canonical import align, canonicalize, fix_gauges, permute
from slt_tools.symmetry.connect import Connection, CurveFit, connect, fit_curve, log_connection
from slt_tools.symmetry.landscape import Interpolation, interpolate, loss_barrier, parameter_distance
from slt_tools.symmetry.spec import HeadGroup, SymmetrySpec, UnitGroup, spec_for_sequential, symmetry_spec

__all__ = ["Connection", "CurveFit", "HeadGroup", "Interpolation", "SymmetrySpec", "UnitGroup", "align",
           "canonicalize", "connect", "fit_curve", "fix_gauges", "interpolate", "log_connection", "loss_barrier",
           "parameter_distance", "permute", "spec_for_sequential", "symmetry_spec"]
