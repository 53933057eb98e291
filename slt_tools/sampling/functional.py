"""Stateless views of a module so many parameter vectors (chains) can share one forward/backward.

A chain's movable parameters live in one flat vector θ ∈ R^D; ``FlatParams`` maps it to the named tensors that
``torch.func.functional_call`` needs; :func:`make_loss` turns the user's ``loss_fn(model, batch)`` into θ ↦ L_B(θ).
How many chains' θ are evaluated at once is the business of :mod:`slt_tools.sampling.steps`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

LossFn = Callable[[Any, Any], torch.Tensor]
RestrictTo = Sequence[str] | Callable[[str], bool] | None


class FunctionalModel:
    """Callable stand-in for ``model`` whose forward uses the given tensors; other attributes come from ``model``,
    so a user's ``loss_fn(model, batch)`` works unchanged."""

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor], tie_weights: bool = True) -> None:
        self._model = model
        self._tensors = tensors
        self._tie_weights = tie_weights

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._model, self._tensors, args, kwargs, tie_weights=self._tie_weights)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def select_parameters(model: nn.Module, restrict_to: RestrictTo = None) -> list[str]:
    """Names of the parameters that move: trainable ones, optionally restricted by a list of names or a predicate."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (none with requires_grad=True)")
    if restrict_to is None:
        return trainable
    if callable(restrict_to):
        chosen = [name for name in trainable if restrict_to(name)]
        if not chosen:
            raise ValueError("restrict_to matched no trainable parameter")
        return chosen
    if isinstance(restrict_to, str):
        restrict_to = [restrict_to]
    wanted = list(restrict_to)
    unknown = [name for name in wanted if name not in trainable]
    if unknown:
        raise ValueError(f"restrict_to names unknown or non-trainable parameters {unknown}; known: {trainable}")
    if not wanted:
        raise ValueError("restrict_to is an empty list")
    return [name for name in trainable if name in set(wanted)]


@dataclass
class FlatParams:
    """Layout of the movable parameters inside a flat vector, plus the frozen tensors (other params, buffers)."""

    names: list[str]
    shapes: list[torch.Size]
    numels: list[int]
    frozen: dict[str, torch.Tensor]

    @classmethod
    def from_model(cls, model: nn.Module, names: Iterable[str]) -> FlatParams:
        names = list(names)
        params = dict(model.named_parameters())
        frozen = {k: v.detach() for k, v in params.items() if k not in set(names)}
        # buffers are cloned: a module that updates them in place (BatchNorm in train mode) must not touch the model
        frozen.update({k: v.detach().clone() for k, v in model.named_buffers()})
        shapes = [params[k].shape for k in names]
        return cls(names, shapes, [math.prod(s) for s in shapes], frozen)

    @property
    def dim(self) -> int:
        return sum(self.numels)

    def flatten(self, model: nn.Module) -> torch.Tensor:
        params = dict(model.named_parameters())
        return torch.cat([params[k].detach().reshape(-1) for k in self.names])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(self.frozen)
        for name, shape, piece in zip(self.names, self.shapes, torch.split(theta, self.numels)):
            out[name] = piece.view(shape)
        return out

    def write_to(self, model: nn.Module, theta: torch.Tensor) -> None:
        """Copy a flat vector back into the model's parameters (in place, no grad)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, shape, piece in zip(self.names, self.shapes, torch.split(theta, self.numels)):
                params[name].copy_(piece.view(shape))


try:  # the context manager behind torch.func.functional_call (private; without it: FunctionalModel)
    from torch.nn.utils.stateless import _reparametrize_module
except ImportError:  # pragma: no cover - older torch
    _reparametrize_module = None


def make_loss(model: nn.Module, layout: FlatParams, loss_fn: LossFn) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """θ, batch ↦ L_B(θ), the user's scalar minibatch loss at the flat parameters θ.

    The whole ``loss_fn(model, batch)`` call runs with θ swapped into the model (as ``functional_call`` does for a
    forward pass), so every way the loss reads the weights sees the sampled ones: ``model(x)``, a weight-decay term
    over ``model.parameters()``, a hand-written forward reading ``model.layer.weight``. The swap is undone when the
    call returns; the model itself is never modified.
    """
    # untying shared parameters costs a pass over the module tree on every call: skip it when nothing is shared
    tied = (len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.named_parameters()))
            or len(list(model.named_buffers(remove_duplicate=False))) != len(list(model.named_buffers())))

    if _reparametrize_module is None:  # pragma: no cover - older torch: only model(...) sees θ
        def loss_at(theta: torch.Tensor, batch: Any) -> torch.Tensor:
            return loss_fn(FunctionalModel(model, layout.unflatten(theta), tie_weights=tied), batch)

        return loss_at

    def loss_at(theta: torch.Tensor, batch: Any) -> torch.Tensor:
        with _reparametrize_module(model, layout.unflatten(theta), tie_weights=tied):
            return loss_fn(model, batch)

    return loss_at


def full_data_loss(loss_at: Callable[[torch.Tensor, Any], torch.Tensor], theta: torch.Tensor, data: Any) -> float:
    """L_n(w) = Σ_batches |B|·L_B(w) / n — the exact mean loss when ``loss_fn`` returns a per-batch mean (evaluated in
    batches of 8× the sampling batch of the :class:`~slt_tools.sampling.data.BatchStream` ``data``: no gradients
    are kept, so the memory is that of a forward pass). The one full-data loss of the package."""
    with torch.no_grad():
        total = sum(loss_at(theta, batch).double() * size for batch, size in data.full_batches(batch_factor=8))
    return float(total) / data.num_samples


def model_loss(model: nn.Module, loader: Any, loss_fn: LossFn, device: str | torch.device | None = None) -> float:
    """L_n at the model's current weights over every sample of ``loader`` (:func:`full_data_loss`)."""
    from slt_tools.sampling.data import BatchStream

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    layout = FlatParams.from_model(model, [n for n, _ in model.named_parameters()])
    layout.frozen = {k: v.to(dev) for k, v in layout.frozen.items()}
    return full_data_loss(make_loss(model, layout, loss_fn), layout.flatten(model).to(dev),
                          BatchStream.from_loader(loader, dev))
