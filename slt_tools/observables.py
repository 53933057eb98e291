"""Observables evaluated at every draw of the LLC chains, with streaming statistics (``slt.observables``).

See :mod:`slt_tools.sampling.observables` (the definitions) and docs/observables.md.
"""
from __future__ import annotations

from slt_tools.sampling.observables import Observable, ObservableStats, per_sample_loss
from slt_tools.sampling.streaming import CrossMoments

__all__ = ["CrossMoments", "Observable", "ObservableStats", "per_sample_loss"]
