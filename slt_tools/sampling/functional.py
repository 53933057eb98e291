"""Stateless views of a module so many parameter vectors (chains) can share one forward/backward.

A chain's movable parameters live in one flat vector θ ∈ R^D; ``FlatParams`` maps it to the named tensors that
``torch.func.functional_call`` needs. ``batched_loss_and_grad`` evaluates (L_B(θ_c), ∇L_B(θ_c)) for every chain c
in a single ``vmap``-ed call, or, for models that cannot be vmapped, in a loop over chains.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from slt_tools.sampling.compiled import GRAPH_CALLS, PinnedStep, allow_recompiles, inductor_backend
from slt_tools.sampling.noise import pick_noise
from slt_tools.sampling.samplers import update

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


def make_loss(model: nn.Module, layout: FlatParams, loss_fn: LossFn) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """θ, batch ↦ L_B(θ), the user's scalar minibatch loss at the flat parameters θ."""
    # untying shared parameters costs a pass over the module tree on every call: skip it when nothing is shared
    tied = (len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.named_parameters()))
            or len(list(model.named_buffers(remove_duplicate=False))) != len(list(model.named_buffers())))

    def loss_at(theta: torch.Tensor, batch: Any) -> torch.Tensor:
        return loss_fn(FunctionalModel(model, layout.unflatten(theta), tie_weights=tied), batch)

    return loss_at


class BatchedLossGrad:
    """(C, D) parameters × one batch ↦ per-chain losses (C,) and gradients (C, D); ``step`` adds an SGMCMC update.

    The forward pass is ``vmap``-ed over chains; the gradient comes from one reverse pass of Σ_c L_B(θ_c) — exact
    per-chain gradients because chain c's loss depends on θ_c alone — which is cheaper than ``vmap(grad(·))``.
    If the model cannot be vmapped (data-dependent control flow, ``.item()``, in-place updates of captured tensors…),
    falls back to a loop over chains and records why.

    ``compile=True`` runs a whole sampler step — loss, gradient (``torch.func.grad`` of the vmapped sum) and the
    update rule — through ``torch.compile``: one fused graph per step instead of eager per-op dispatch. The
    hyperparameters enter as 0-d tensors, so one graph serves every step size, localization and nβ. Compiling takes
    seconds to tens of seconds once per model class, sampler rule and shape, so it pays only for long runs; a model
    that fails to compile runs eagerly (``compile_error`` says why).
    """

    def __init__(self, loss_at: Callable[[torch.Tensor, Any], torch.Tensor], vectorize: bool = True,
                 compile: bool = False) -> None:
        self._loss_at = loss_at
        self._batched = vmap(loss_at, in_dims=(0, None), randomness="different")
        self.vectorized = vectorize
        self.fallback_reason: str | None = None if vectorize else "vectorize=False"
        self._compiled: Callable[..., Any] | None = None
        self._hp_tensors: tuple[tuple, dict[str, torch.Tensor]] | None = None
        self.compile_error: str | None = None
        if compile and vectorize:
            allow_recompiles()
            self._compiled = torch.compile(partial(_fused_step, self._batched), backend=inductor_backend(),
                                           dynamic=False)
        self._last_step: tuple[tuple[Any, ...], tuple[Any, ...], Any] | None = None
        self._pinned: PinnedStep | None = None
        self.pin_error: str | None = None

    @property
    def compiled(self) -> bool:
        """Whether steps run through the ``torch.compile``-d graph (False after a compile failure)."""
        return self._compiled is not None

    def _looped(self, theta: torch.Tensor, batch: Any) -> torch.Tensor:
        return torch.stack([self._loss_at(theta[c], batch) for c in range(theta.shape[0])])

    def _eager(self, theta: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            if self.vectorized:
                try:
                    losses = self._batched(leaf, batch)
                except Exception as exc:  # noqa: BLE001 - any vmap failure means "use the loop"
                    self.vectorized = False
                    self.fallback_reason = f"{type(exc).__name__}: {exc}"
            if not self.vectorized:
                losses = self._looped(leaf, batch)
            (grads,) = torch.autograd.grad(losses.sum(), leaf)
        return losses.detach(), grads

    def _tensor_hp(self, hp: dict[str, float], like: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (tuple(sorted(hp.items())), like.device, like.dtype)
        if self._hp_tensors is None or self._hp_tensors[0] != key:
            self._hp_tensors = (key, {k: torch.tensor(v, device=like.device, dtype=like.dtype) for k, v in hp.items()})
        return self._hp_tensors[1]

    def _run_compiled(self, *args: Any) -> Any:
        assert self._compiled is not None
        try:
            return self._compiled(*args)
        except Exception as exc:  # noqa: BLE001 - a model torch.compile cannot handle runs eagerly instead
            self._compiled = None
            self.compile_error = f"{type(exc).__name__}: {exc}"
            return None

    def step(
        self,
        theta: torch.Tensor,
        theta0: torch.Tensor,
        batch: Any,
        noise: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        kind: str,
        state: dict[str, torch.Tensor],
        hp: dict[str, float],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Losses and gradients at θ, and one SGMCMC step of rule ``kind`` (``samplers.update``):
        (L_B(θ), ∇L_B(θ), θ′, state′)."""
        if self._compiled is not None:
            hp_t, theta_d = self._tensor_hp(hp, theta), theta.detach()
            if self._pinned is not None:
                try:
                    out = self._pinned(theta_d, theta0, batch, noise, state, hp_t)
                except Exception as exc:  # noqa: BLE001 - the ordinary compiled call below decides what this means
                    out, self.pin_error = None, f"{type(exc).__name__}: {exc}"
                if out is not None:
                    return out
                self._pinned = None
            inputs = (theta_d, theta0, batch, noise, state, hp_t)
            GRAPH_CALLS.reset()
            out = self._run_compiled(theta_d, theta0, batch, noise, kind, state, hp_t)
            self._last_step = None if out is None else (inputs, out, GRAPH_CALLS.take())
            if out is not None:
                return out
        losses, grads = self._eager(theta, batch)
        new_theta, new_state = update(kind, theta, theta0, grads, pick_noise(noise, theta), state, hp)
        return losses, grads, new_theta, new_state

    @contextmanager
    def pinned(self) -> Iterator[bool]:
        """Within the block, compiled steps call the graph that ran the last step directly (:class:`PinnedStep`),
        skipping ``torch.compile``'s per-call machinery. For loops whose steps all take inputs of one structure and
        shape; yields whether the step could be pinned (``pin_error`` says why not)."""
        built = PinnedStep.build(*self._last_step) if self._last_step is not None else "no compiled step ran yet"
        self._pinned, self.pin_error = (built, None) if isinstance(built, PinnedStep) else (None, built)
        try:
            yield self._pinned is not None
        finally:
            self._pinned, self._last_step = None, None

    def __call__(self, theta: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses and gradients only, always eager: used a few times per run (overdispersed starts), where a graph of
        its own would cost a compile and the step graph does not fit (its noise input is a (pool, index) pair)."""
        return self._eager(theta, batch)


def _fused_step(
    batched: Callable[[torch.Tensor, Any], torch.Tensor],
    theta: torch.Tensor,
    theta0: torch.Tensor,
    batch: Any,
    noise: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    kind: str,
    state: dict[str, torch.Tensor],
    hp: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The function ``torch.compile`` fuses: vmapped loss, its gradient, and the update rule."""
    def total(th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses = batched(th, batch)
        return losses.sum(), losses

    grads, losses = torch.func.grad(total, has_aux=True)(theta)
    new_theta, new_state = update(kind, theta, theta0, grads, pick_noise(noise, theta), state, hp)
    return losses.detach(), grads, new_theta, new_state
