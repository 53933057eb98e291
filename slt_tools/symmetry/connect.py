"""Mode connectivity along curves: fit a one-bend curve between two networks, before and after alignment.

Garipov, Izmailov, Podoprikhin, Vetrov, Wilson 2018 ("Loss Surfaces, Mode Connectivity, and Fast Ensembling of
DNNs"): two minima θ_a, θ_b that are not linearly connected are often joined by a simple low-loss curve φ_θ(t),
t ∈ [0, 1], φ(0) = θ_a, φ(1) = θ_b, with one trainable bend θ:

* quadratic Bézier: φ_θ(t) = (1−t)² θ_a + 2t(1−t) θ + t² θ_b;
* polygonal chain:   φ_θ(t) = θ_a + 2t (θ − θ_a) for t ≤ ½, θ + (2t − 1)(θ_b − θ) for t > ½.

The bend is trained by minimising the expected loss along the curve, E_{t∼U[0,1]} L(φ_θ(t)), with one t drawn per
minibatch step (Adam here; the paper uses SGD). With ``align=True`` the same is done a second time after θ_b has been
moved along its symmetry orbit to match θ_a (:func:`slt_tools.symmetry.align`, Git Re-Basin weight matching): a
barrier that survives alignment is not an artefact of permuted units.

**Barrier** (the definition of :func:`slt_tools.symmetry.loss_barrier`, default ``"linear"``; the endpoint losses
are the same along every path, so the definitions carry over unchanged):
B[φ] = max_t [L(φ(t)) − ((1−t) L(θ_a) + t L(θ_b))] on the t-grid; ``definition="mean"`` gives
max_t L(φ(t)) − (L(θ_a) + L(θ_b))/2.

The bend starts at the midpoint (θ_a + θ_b)/2, where both curves *are* the straight line, so the initial curve has
exactly the line's barrier. After fitting, the curve's barrier is compared with the line's on the same grid; if the
optimiser made it worse (it minimises the mean loss along the curve, not the max), the midpoint bend is kept and
``CurveFit.kept_line`` says so. Hence B[curve] ≤ B[line] always.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from slt_tools.sampling.data import BatchStream
from slt_tools.sampling.functional import FlatParams, make_loss, model_loss
from slt_tools.symmetry.canonical import align as align_models
from slt_tools.symmetry.canonical import state_of
from slt_tools.symmetry.landscape import Interpolation, check_argument_order, interpolate, reset_batchnorm
from slt_tools.symmetry.spec import SymmetrySpec, symmetry_spec

CURVES = ("bezier", "polychain")


def curve_point(theta_a: torch.Tensor, bend: torch.Tensor, theta_b: torch.Tensor, t: float,
                curve: str = "bezier") -> torch.Tensor:
    """φ_bend(t) for the quadratic Bézier or the polygonal chain (module docstring); differentiable in ``bend``."""
    if curve == "bezier":
        return (1 - t) ** 2 * theta_a + 2 * t * (1 - t) * bend + t ** 2 * theta_b
    if curve == "polychain":
        if t <= 0.5:
            return theta_a + 2 * t * (bend - theta_a)
        return bend + (2 * t - 1) * (theta_b - bend)
    raise ValueError(f"unknown curve {curve!r}: use one of {CURVES}")


@dataclass
class CurveFit:
    """One fitted curve between fixed end points, with the straight line between the same end points.

    ``line`` and ``path`` hold the losses on the same t-grid; ``bend`` is the fitted bend point (a state dict);
    ``fit_losses`` the minibatch loss at the sampled t per optimiser step; ``kept_line`` is True when the fitted bend
    had a higher barrier than the line and the midpoint bend (the line itself) was kept instead.
    """

    curve: str
    line: Interpolation
    path: Interpolation
    bend: dict[str, torch.Tensor]
    fit_losses: np.ndarray
    kept_line: bool

    def barrier(self, definition: str = "linear") -> float:
        """Barrier along the fitted curve."""
        return self.path.barrier(definition)

    def line_barrier(self, definition: str = "linear") -> float:
        """Barrier along the straight line between the same end points."""
        return self.line.barrier(definition)


@dataclass
class Connection:
    """Line and curve between two networks, before (``raw``) and after (``aligned``, None if ``align=False``)
    alignment of b to a; ``permutations`` are the ones :func:`align` found."""

    curve: str
    definition: str
    raw: CurveFit
    aligned: CurveFit | None = None
    permutations: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def barriers(self) -> dict[str, float]:
        """{"line/raw", "curve/raw", "line/aligned", "curve/aligned"} → barrier under ``definition``."""
        out = {"line/raw": self.raw.line_barrier(self.definition), "curve/raw": self.raw.barrier(self.definition)}
        if self.aligned is not None:
            out["line/aligned"] = self.aligned.line_barrier(self.definition)
            out["curve/aligned"] = self.aligned.barrier(self.definition)
        return out


def _flat_state(work: nn.Module, layout: FlatParams, sd: Mapping[str, torch.Tensor]) -> torch.Tensor:
    work.load_state_dict(sd)
    return layout.flatten(work).clone()


def _curve_losses(work: nn.Module, layout: FlatParams, ends: tuple[torch.Tensor, torch.Tensor], bend: torch.Tensor,
                  curve: str, ts: np.ndarray, loader: Any, loss_fn: Callable[[Any, Any], torch.Tensor]
                  ) -> Interpolation:
    """Mean loss over ``loader`` at φ(t) on the grid (BatchNorm statistics re-estimated at every t)."""
    losses = []
    for t in ts:
        layout.write_to(work, curve_point(ends[0], bend, ends[1], float(t), curve))
        reset_batchnorm(work, loader)
        losses.append(model_loss(work, loader, loss_fn))
    return Interpolation(ts.copy(), np.array(losses))


def _fit_bend(work: nn.Module, layout: FlatParams, ends: tuple[torch.Tensor, torch.Tensor], curve: str,
              loader: Any, loss_fn: Callable[[Any, Any], torch.Tensor], steps: int, lr: float, seed: int
              ) -> tuple[torch.Tensor, np.ndarray]:
    """Adam on E_{t∼U[0,1]} L_B(φ_bend(t)), one t and one minibatch per step, from the midpoint bend."""
    dev = ends[0].device
    bend = (0.5 * (ends[0] + ends[1])).clone().requires_grad_(True)
    opt = torch.optim.Adam([bend], lr=lr)
    loss_at = make_loss(work, layout, loss_fn)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in work.modules())
    work.train(has_bn)  # BatchNorm: batch statistics while fitting (as in the paper); otherwise mode is moot
    gen = torch.Generator().manual_seed(int(seed))
    batches = BatchStream.from_loader(loader, dev).stream(seed)
    history = []
    for _ in range(steps):
        t = float(torch.rand((), generator=gen))
        loss = loss_at(curve_point(ends[0], bend, ends[1], t, curve), next(batches))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    work.eval()
    return bend.detach(), np.array(history)


def fit_curve(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], template: nn.Module, loader: Any,
              loss_fn: Callable[[Any, Any], torch.Tensor], curve: str = "bezier", num_points: int = 25,
              steps: int = 300, lr: float = 1e-2, seed: int = 0, definition: str = "linear") -> CurveFit:
    """Fit one bend between the state dicts ``a`` and ``b`` (fixed end points) and evaluate line and curve."""
    if curve not in CURVES:
        raise ValueError(f"unknown curve {curve!r}: use one of {CURVES}")
    work = copy.deepcopy(template)
    work.eval()
    layout = FlatParams.from_model(work, [n for n, _ in work.named_parameters()])
    ends = (_flat_state(work, layout, a), _flat_state(work, layout, b))
    line = interpolate(a, b, loader, loss_fn, num_points, model=template)
    bend, history = _fit_bend(work, layout, ends, curve, loader, loss_fn, steps, lr, seed)
    path = _curve_losses(work, layout, ends, bend, curve, line.ts, loader, loss_fn)
    kept_line = path.barrier(definition) > line.barrier(definition)
    if kept_line:
        bend, path = 0.5 * (ends[0] + ends[1]), Interpolation(line.ts.copy(), line.losses.copy())
    layout.write_to(work, bend)
    return CurveFit(curve, line, path, state_of(work), history, bool(kept_line))


def _check_same_architecture(sa: Mapping[str, torch.Tensor], sb: Mapping[str, torch.Tensor]) -> None:
    only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
    if only_a or only_b:
        raise ValueError(f"connect needs two networks of the same architecture: parameters only in a {only_a[:3]}, "
                         f"only in b {only_b[:3]}")
    bad = [(k, tuple(sa[k].shape), tuple(sb[k].shape)) for k in sa if sa[k].shape != sb[k].shape]
    if bad:
        raise ValueError(f"connect needs two networks of the same architecture: shapes differ, e.g. {bad[:3]}")


def connect(a: nn.Module | Mapping[str, torch.Tensor], b: nn.Module | Mapping[str, torch.Tensor], loader: Any,
            loss_fn: Callable[[Any, Any], torch.Tensor], curve: str = "bezier", align: bool = True,
            num_points: int = 25, steps: int = 300, lr: float = 1e-2, seed: int = 0, definition: str = "linear",
            spec: SymmetrySpec | None = None, model: nn.Module | None = None) -> Connection:
    """Barriers along the straight line and along a fitted one-bend curve between ``a`` and ``b``, before and (with
    ``align=True``) after aligning ``b`` to ``a`` (see the module docstring for the curves, the fit and the barrier).

    ``a``/``b`` are models or state dicts (then ``model`` supplies the architecture); ``loss_fn(model, batch)``
    returns the minibatch mean loss, the package-wide convention. ``steps``/``lr``: Adam steps on the bend.
    Raises ValueError for networks of different architectures or an unknown curve/definition.
    """
    check_argument_order(loader, loss_fn)
    if curve not in CURVES:
        raise ValueError(f"unknown curve {curve!r}: use one of {CURVES}")
    if definition not in ("linear", "mean"):
        raise ValueError(f"unknown barrier definition {definition!r}: use 'linear' or 'mean'")
    template = model if model is not None else (a if isinstance(a, nn.Module) else b)
    if not isinstance(template, nn.Module):
        raise ValueError("pass model= when connecting state dicts")
    sa, sb = state_of(a), state_of(b)
    _check_same_architecture(sa, sb)
    _check_same_architecture(sa, template.state_dict())
    kw = {"curve": curve, "num_points": num_points, "steps": steps, "lr": lr, "seed": seed, "definition": definition}
    raw = fit_curve(sa, sb, template, loader, loss_fn, **kw)
    if not align:
        return Connection(curve, definition, raw)
    spec = spec if spec is not None else symmetry_spec(template)
    aligned_b, perms = align_models(sa, sb, spec=spec, seed=seed)
    fitted = fit_curve(sa, aligned_b, template, loader, loss_fn, **kw)
    return Connection(curve, definition, raw, fitted, perms)


def log_connection(conn: Connection, logger: Any, prefix: str = "connect") -> None:
    """Log a :class:`Connection` through a :class:`slt_tools.logging.WandbLogger`: the loss along each path against
    ``{prefix}/t``, the barriers in the run summary, and :func:`slt_tools.plots.plot_connection` as an image (also
    saved under the logger's ``save_dir``). Nothing happens when W&B is unavailable beyond the saved figure."""
    from slt_tools.plots import plot_connection

    fig = plot_connection(conn)
    image = logger.image(fig, f"{prefix}_{conn.curve}.png")
    run = logger.run
    if run is None:
        return
    run.define_metric(f"{prefix}/loss/*", step_metric=f"{prefix}/t")
    fits = {"raw": conn.raw, **({"aligned": conn.aligned} if conn.aligned is not None else {})}
    for i, t in enumerate(conn.raw.line.ts):
        row = {f"{prefix}/t": float(t)}
        for which, fit in fits.items():
            row[f"{prefix}/loss/line_{which}"] = float(fit.line.losses[i])
            row[f"{prefix}/loss/{conn.curve}_{which}"] = float(fit.path.losses[i])
        run.log(row)
    for k, v in conn.barriers.items():
        run.summary[f"{prefix}/barrier/{k}"] = v
    run.summary[f"{prefix}/definition"] = conn.definition
    if image is not None:
        run.log({f"{prefix}/figure": image})
