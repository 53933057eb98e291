"""Loss along straight lines between networks, loss barriers, and distances modulo symmetries.

Loss barrier definitions (say which you report):

* ``"linear"`` (default; Entezari et al. 2022, "The role of permutation invariance in linear mode connectivity"):
  B = max_t [L((1−t)θ_a + tθ_b) − ((1−t)L(θ_a) + tL(θ_b))], the excess over the straight line between the end losses;
* ``"mean"`` (Ainsworth et al. 2022, Git Re-Basin plots): B = max_t L(θ_t) − (L(θ_a) + L(θ_b))/2.

Models with BatchNorm get their running statistics re-estimated at every t (a pass over the data in train mode,
momentum None = cumulative average), since interpolated weights invalidate the end points' statistics.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from slt_tools.sampling.functional import model_loss
from slt_tools.symmetry.canonical import canonicalize, state_of
from slt_tools.symmetry.spec import SymmetrySpec


@dataclass
class Interpolation:
    ts: np.ndarray
    losses: np.ndarray

    def barrier(self, definition: str = "linear") -> float:
        """Loss barrier under the named definition (see module docstring)."""
        la, lb = self.losses[0], self.losses[-1]
        if definition == "linear":
            return float(np.max(self.losses - ((1 - self.ts) * la + self.ts * lb)))
        if definition == "mean":
            return float(np.max(self.losses) - 0.5 * (la + lb))
        raise ValueError(f"unknown barrier definition {definition!r}: use 'linear' or 'mean'")


def reset_batchnorm(model: nn.Module, loader: Any) -> None:
    """Re-estimate every BatchNorm's running mean/variance on ``loader`` (cumulative average, momentum None): a
    weight-space interpolant is evaluated with its own batch statistics, not with either endpoint's."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for batch in loader:
            model(batch[0] if isinstance(batch, (list, tuple)) else batch)
    model.eval()


def check_argument_order(loader: Any, loss_fn: Any) -> None:
    """(…, loader, loss_fn) is the package-wide order; the pre-0.2 order (loss_fn, loader) fails loudly."""
    if callable(loader) and not callable(loss_fn):
        raise TypeError("interpolate/loss_barrier take (a, b, loader, loss_fn, ...) like the rest of slt_tools; "
                        "the arguments look swapped (loss_fn first)")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")


def interpolate(a: nn.Module | Mapping[str, torch.Tensor], b: nn.Module | Mapping[str, torch.Tensor],
                loader: Any, loss_fn: Callable[[Any, Any], torch.Tensor], num_points: int = 25,
                model: nn.Module | None = None) -> Interpolation:
    """Mean loss L_n over ``loader`` at θ_t = (1−t)θ_a + tθ_b for ``num_points`` values of t in [0, 1].

    ``a``/``b`` are models or state dicts (then ``model`` supplies the architecture).
    """
    check_argument_order(loader, loss_fn)
    if num_points < 2:
        raise ValueError("num_points must be at least 2")
    template = model if model is not None else (a if isinstance(a, nn.Module) else b)
    if not isinstance(template, nn.Module):
        raise ValueError("pass model= when interpolating between state dicts")
    sa, sb = state_of(a), state_of(b)
    if set(sa) != set(sb) or any(sa[k].shape != sb[k].shape for k in sa):
        raise ValueError("the two networks have different parameter names or shapes")
    work = copy.deepcopy(template)
    work.eval()
    ts = np.linspace(0.0, 1.0, num_points)
    losses = []
    for t in ts:
        mixed = {k: (1 - t) * sa[k] + t * sb[k] if sa[k].is_floating_point() else sa[k] for k in sa}
        work.load_state_dict(mixed)
        reset_batchnorm(work, loader)
        losses.append(model_loss(work, loader, loss_fn))
    return Interpolation(ts, np.array(losses))


def loss_barrier(a: Any, b: Any, loader: Any, loss_fn: Callable[[Any, Any], torch.Tensor], num_points: int = 25,
                 definition: str = "linear", model: nn.Module | None = None) -> float:
    """Loss barrier between two networks (definition ``"linear"`` or ``"mean"``, see module docstring)."""
    return interpolate(a, b, loader, loss_fn, num_points, model).barrier(definition)


def parameter_distance(a: nn.Module | Mapping[str, torch.Tensor], b: nn.Module | Mapping[str, torch.Tensor],
                       canonical: bool = True, spec: SymmetrySpec | None = None) -> float:
    """Euclidean distance between the flattened parameters, after canonicalising both (``canonical=True``)."""
    if canonical:
        spec = spec if spec is not None else _spec_of(a if isinstance(a, nn.Module) else b)
        sa, sb = canonicalize(a, spec), canonicalize(b, spec)
    else:
        sa, sb = state_of(a), state_of(b)
    if set(sa) != set(sb):
        raise ValueError("the two networks have different parameter names")
    sq = sum(((sa[k].double() - sb[k].double()) ** 2).sum() for k in sa if sa[k].is_floating_point())
    return float(torch.sqrt(torch.as_tensor(sq)))


def _spec_of(a: Any) -> SymmetrySpec:
    from slt_tools.symmetry.spec import symmetry_spec

    if isinstance(a, nn.Module):
        return symmetry_spec(a)
    raise ValueError("pass spec= to compare state dicts modulo symmetries")

