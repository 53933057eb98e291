"""Essential dynamics: the trajectory of a model's outputs on a fixed probe set, in its principal components.

Hoogland et al. (arXiv 2402.02364, first version "The Developmental Landscape of In-Context Learning", §4) concatenate
a model's outputs on a fixed set of probe inputs into one vector per checkpoint, run PCA across checkpoints, smooth
the principal-component curves, and read developmental milestones off their geometry: sharp turns and cusps.

Here: X[t] = flattened outputs at checkpoint t (logits, per-token losses, or whatever ``forward`` returns), centred over
checkpoints; PCA by the thin SVD X = U S Vᵀ, scores U S, explained-variance ratios S²/ΣS². Each score curve is smoothed
against x = log(step + 1) by local linear regression (Gaussian kernel, bandwidth ``bandwidth`` × x-range; Fan &
Gijbels 1996). The velocity v(x) = dPC/dx of the smoothed curve (first ``n_components`` PCs) turns by
θ(x) = ∠(v(x − h), v(x + h)) over a window of ±h = ±``bandwidth`` × x-range; a *milestone* is a local maximum of θ
above ``min_turn_deg`` (a cusp, where the curve reverses, has θ ≈ 180°), at least 2h from the ends and from a
stronger milestone.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slt_tools.stages.classify import smooth_loss


@dataclass
class Milestone:
    """A sharp turn of the smoothed PC trajectory: its step and how far the direction turned (degrees)."""

    step: float
    turn_deg: float


@dataclass
class EssentialDynamics:
    """PCA of outputs across checkpoints: raw and smoothed scores (checkpoints × components), explained variance,
    and milestones."""

    steps: np.ndarray
    scores: np.ndarray
    smoothed: np.ndarray
    explained_variance_ratio: np.ndarray
    milestones: list[Milestone] = field(default_factory=list)
    turn_deg: np.ndarray | None = None
    grid_steps: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps.tolist(), "explained_variance_ratio": self.explained_variance_ratio.tolist(),
                "scores": self.scores.tolist(), "milestones": [m.__dict__ for m in self.milestones]}


def _outputs(checkpoints: Any, probe_inputs: Any, model_factory: Callable[[], Any] | None,
             forward: Callable[[Any, Any], Any] | None, steps: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
    import torch

    fwd = forward or (lambda m, x: m(x))
    models = list(checkpoints) if isinstance(checkpoints, (list, tuple)) else None
    if models and all(isinstance(m, torch.nn.Module) for m in models):
        if steps is None or len(steps) != len(models):
            raise ValueError("a list of models needs ``steps`` (one per model)")
        pairs = list(zip(steps, models))
    else:
        from slt_tools.trajectory.checkpoints import discover_checkpoints, load_into

        if model_factory is None:
            raise ValueError("checkpoints given as files or state dicts need ``model_factory``")
        pairs = []
        for ref in discover_checkpoints(checkpoints):
            model = model_factory()
            load_into(model, ref.load(), ref.id)
            pairs.append((ref.step, model))
    rows = []
    for _, model in pairs:
        model.eval()
        with torch.no_grad():
            rows.append(torch.as_tensor(fwd(model, probe_inputs)).detach().float().reshape(-1).cpu().numpy())
    return np.array([float(s) for s, _ in pairs]), np.stack(rows).astype(np.float64)


def _milestones(grid_x: np.ndarray, curve: np.ndarray, h: int, min_turn_deg: float) -> tuple[list[int], np.ndarray]:
    v = np.gradient(curve, grid_x, axis=0)
    speed = np.linalg.norm(v, axis=1)
    turn = np.zeros(len(grid_x))
    for i in range(h, len(grid_x) - h):
        a, b = v[i - h], v[i + h]
        na, nb = speed[i - h], speed[i + h]
        if min(na, nb) > 1e-6 * speed.max():
            turn[i] = math.degrees(math.acos(float(np.clip(a @ b / (na * nb), -1, 1))))
    cand = [i for i in range(2 * h, len(grid_x) - 2 * h)
            if turn[i] >= min_turn_deg and turn[i] >= turn[i - 1] and turn[i] > turn[i + 1]]
    kept: list[int] = []
    for i in sorted(cand, key=lambda j: -turn[j]):
        if all(abs(i - j) > 2 * h for j in kept):
            kept.append(i)
    return sorted(kept), turn


def essential_dynamics(checkpoints: Any = None, probe_inputs: Any = None, *,
                       model_factory: Callable[[], Any] | None = None,
                       forward: Callable[[Any, Any], Any] | None = None, steps: Sequence[float] | None = None,
                       outputs: Any = None, n_components: int = 3, bandwidth: float = 0.05,
                       min_turn_deg: float = 45.0) -> EssentialDynamics:
    """Essential dynamics of a training run (see the module docstring).

    ``checkpoints``: a checkpoint directory / glob / list of paths / (step, state_dict) pairs (with ``model_factory``),
    or a list of models (with ``steps``). ``probe_inputs`` is passed to ``forward(model, probe_inputs)`` (default
    ``model(probe_inputs)``). Or give ``outputs`` (checkpoints × anything) and ``steps`` directly.
    """
    if outputs is not None:
        if steps is None:
            raise ValueError("``outputs`` needs ``steps``")
        s = np.asarray(steps, dtype=float)
        X = np.asarray(outputs, dtype=np.float64).reshape(len(s), -1)
    else:
        s, X = _outputs(checkpoints, probe_inputs, model_factory, forward, steps)
    if len(s) < 5 or np.any(np.diff(s) <= 0):
        raise ValueError(f"essential dynamics needs ≥ 5 checkpoints with strictly increasing steps, got {len(s)}")
    Xc = X - X.mean(axis=0)
    U, S, _ = np.linalg.svd(Xc, full_matrices=False)
    k = max(1, min(n_components, len(S)))
    var = S**2
    ratio = var[:k] / var.sum() if var.sum() > 0 else np.zeros(k)
    scores = U[:, :k] * S[:k]
    x = np.log(s + 1.0)
    grid_x = np.linspace(x[0], x[-1], 300)
    grid_steps = np.expm1(grid_x)
    sm_grid = np.stack([smooth_loss(s, scores[:, j], "log", bandwidth=bandwidth, k_nearest=2).at(grid_steps)[0]
                        for j in range(k)], axis=1)
    smoothed = np.stack([np.interp(x, grid_x, sm_grid[:, j]) for j in range(k)], axis=1)
    h = max(1, int(round(bandwidth * len(grid_x))))
    idx, turn = _milestones(grid_x, sm_grid, h, min_turn_deg)
    ms = [Milestone(float(grid_steps[i]), float(turn[i])) for i in idx]
    return EssentialDynamics(s, scores, smoothed, ratio, ms, turn, grid_steps)
