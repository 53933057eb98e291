"""Developmental stages from LLC (and loss) curves.

Hoogland et al., "Loss Landscape Degeneracy Drives Stagewise Development in Transformers" (arXiv 2402.02364): training
is divided at the critical points of the smoothed LLC curve, and each stage is typed **A** (the loss decreases, the
LLC increases) or **B** (the LLC decreases while the loss changes little).

The pipeline is split in parts that can be used alone:

* :mod:`~slt_tools.stages.inputs` — validation, NaN dropping, flagged estimates (:func:`flags_from_results`);
* :mod:`~slt_tools.stages._gp` — Gaussian-process smoothing with the joint posterior of values and slopes;
* :mod:`~slt_tools.stages.segmentation` — boundaries (:func:`segment`) with intervals and existence probabilities;
* :mod:`~slt_tools.stages.classify` — loss smoothing (:func:`smooth_loss`) and type probabilities;
* :func:`detect_stages` — all of it; returns a :class:`StageList`.
"""
from slt_tools.stages.classify import SmoothedLoss, smooth_loss, type_probabilities
from slt_tools.stages.detect import Stage, StageDetails, StageList, compare_milestones, detect_stages
from slt_tools.stages.inputs import flags_from_results, prepare
from slt_tools.stages.segmentation import Boundary, find_moves, segment

__all__ = ["Boundary", "SmoothedLoss", "Stage", "StageDetails", "StageList", "compare_milestones", "detect_stages",
           "find_moves", "flags_from_results", "prepare", "segment", "smooth_loss", "type_probabilities"]
