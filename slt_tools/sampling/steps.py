"""Step paths: how one SGMCMC step of every chain is computed, behind one interface the engine drives.

A step is (θ ∈ R^{C×D}, batch) ↦ (L_B(θ_c), ∇L_B(θ_c), θ′, state′) for every chain c. The paths:

* :class:`VmapPath` — the forward pass ``vmap``-ed over chains; gradients from one reverse pass of Σ_c L_B(θ_c)
  (exact per-chain gradients, since chain c's loss depends on θ_c alone), cheaper than ``vmap(grad(·))``.
* :class:`LoopPath` — a Python loop over chains, for models that cannot be vmapped (data-dependent control flow,
  ``.item()``, in-place updates of captured tensors…).
* :class:`CompiledPath` — loss, gradient (``torch.func.grad`` of the vmapped sum) and update rule as one
  ``torch.compile``-d graph; hyperparameters enter as 0-d tensors so one graph serves every ε, γ, nβ.
* :class:`slt_tools.sampling.compiled.PinnedStep` — within a fixed-shape loop, the compiled graph called directly,
  once it has been checked to reproduce the ordinary compiled call on the first step.

:class:`BatchedLossGrad` holds the path in use and falls back compiled → vmap → loop when a path fails, recording
why and warning once (:class:`~slt_tools.sampling.result.SamplingFallbackWarning`) where speed was lost. The engine
sees only :meth:`BatchedLossGrad.step`, :meth:`~BatchedLossGrad.draw` and :meth:`~BatchedLossGrad.session`.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from torch.func import vmap

from slt_tools.sampling.compiled import (
    GRAPH_CALLS,
    PinnedStep,
    allow_recompiles,
    inductor_backend,
    rewrite_snapshot,
    rewrites_status,
)
from slt_tools.sampling.noise import NoisePool, pick_noise
from slt_tools.sampling.result import SamplingFallbackWarning
from slt_tools.sampling.samplers import update

LossAt = Callable[[torch.Tensor, Any], torch.Tensor]
#: (θ_sub (C, d), context) ↦ θ (C, D): chains that move only some coordinates, embedded in the loss's flat vector
Lift = Callable[[torch.Tensor, Any], torch.Tensor]
StepOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]

_WARNED: set[str] = set()
#: id(graph) → (graph, placements verified to reproduce its compiled call): verification costs one step per graph
_VERIFIED: dict[int, tuple[Any, set[tuple[Any, ...]]]] = {}


def warn_once(key: str, message: str) -> None:
    """One :class:`SamplingFallbackWarning` per process and ``key`` (a lost speed-up is news once, not per step)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, SamplingFallbackWarning, stacklevel=3)


def scatter_lift(theta: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """θ_c = w* with coordinates idx_c replaced by θ_sub[c]: ``context`` = (idx (C, d) long, w* (D,)).

    Differentiable in θ_sub (the gradient is ∇L gathered at idx_c), out of place; the other D − d coordinates of
    chain c are exactly w*'s."""
    index, base = context
    return base.expand(theta.shape[0], base.shape[-1]).scatter(1, index, theta)


def _lifted(batched: LossAt, lift: Lift | None) -> LossAt:
    """With a ``lift``, the step's batch is the pair (lift context, data batch) and θ is lifted before the loss."""
    if lift is None:
        return batched

    def lifted(theta: torch.Tensor, batch: Any) -> torch.Tensor:
        context, data = batch
        return batched(lift(theta, context), data)

    return lifted


class VmapPath:
    """Per-chain losses and gradients through one ``vmap``-ed forward and one reverse pass."""

    name = "vmap"

    def __init__(self, loss_at: LossAt, lift: Lift | None = None) -> None:
        self.batched = _lifted(vmap(loss_at, in_dims=(0, None), randomness="different"), lift)

    def __call__(self, theta: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            losses = self.batched(leaf, batch)
            (grads,) = torch.autograd.grad(losses.sum(), leaf)
        return losses.detach(), grads


class LoopPath:
    """Per-chain losses and gradients through a loop over chains (same numbers, slower)."""

    name = "loop"

    def __init__(self, loss_at: LossAt, lift: Lift | None = None) -> None:
        self.loss_at = loss_at
        self.batched = _lifted(lambda th, b: torch.stack([loss_at(th[c], b) for c in range(th.shape[0])]), lift)

    def __call__(self, theta: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            losses = self.batched(leaf, batch)
            (grads,) = torch.autograd.grad(losses.sum(), leaf)
        return losses.detach(), grads


def _fused_step(batched: LossAt, theta: torch.Tensor, theta0: torch.Tensor, batch: Any, noise: Any, kind: str,
                state: dict[str, torch.Tensor], hp: dict[str, torch.Tensor]) -> StepOut:
    """The function ``torch.compile`` fuses: vmapped loss, its gradient, and the update rule."""
    def total(th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses = batched(th, batch)
        return losses.sum(), losses

    grads, losses = torch.func.grad(total, has_aux=True)(theta)
    new_theta, new_state = update(kind, theta, theta0, grads, pick_noise(noise, theta), state, hp)
    return losses.detach(), grads, new_theta, new_state


def _skip_guards() -> AbstractContextManager[Any]:
    """``torch.compile`` stance that evaluates only the guards telling cached graphs apart (torch ≥ 2.7; a no-op
    context before that)."""
    try:
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    except (AttributeError, TypeError):
        return nullcontext()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and torch.allclose(a, b, rtol=1e-5, atol=1e-7, equal_nan=True))


class CompiledPath:
    """A whole step as one compiled graph. ``fn`` is the ``torch.compile``-d :func:`_fused_step`; each call records
    its inputs, outputs and the graph that ran (for :meth:`pin`)."""

    name = "compiled"

    def __init__(self, vmap_path: VmapPath) -> None:
        allow_recompiles()
        self.fn: Callable[..., Any] = torch.compile(partial(_fused_step, vmap_path.batched),
                                                    backend=inductor_backend(), dynamic=False)
        self.last: tuple[tuple[Any, ...], StepOut, Any] | None = None

    def __call__(self, theta: torch.Tensor, theta0: torch.Tensor, batch: Any, noise: Any, kind: str,
                 state: dict[str, torch.Tensor], hp: dict[str, torch.Tensor]) -> StepOut:
        GRAPH_CALLS.reset()
        out = self.fn(theta, theta0, batch, noise, kind, state, hp)
        self.last = ((theta, theta0, batch, noise, state, hp), out, GRAPH_CALLS.take())
        return out

    def pin(self) -> PinnedStep | str:
        """The last call's graph as a :class:`PinnedStep`, verified to reproduce that call on its own inputs (which
        the engine has not touched yet: it pins right after the step) once per graph and placement per process; or
        why it cannot be pinned."""
        if self.last is None:
            return "no compiled step ran yet"
        inputs, out, record = self.last
        built = PinnedStep.build(inputs, out, record)
        if isinstance(built, str):
            return built
        key = (tuple(built.sources), tuple(built.outs), str(built.batch_spec))
        if key in _VERIFIED.get(id(built.graph), (None, set()))[1]:
            return built  # this graph, placed this way, already reproduced its compiled call in this process
        try:
            again = built(*inputs)
        except Exception as exc:  # noqa: BLE001 - any failure of the direct call means "do not pin"
            return f"the pinned call failed ({type(exc).__name__}: {exc})"
        if again is None or not all(_same(a, b) for a, b in zip(again, out)):
            return ("the pinned call did not reproduce the compiled step on the same inputs (a torch change in how "
                    "graphs take their inputs?)")
        # the graph object is kept alive with its verified placements, so its id cannot be reused by another graph
        _VERIFIED.setdefault(id(built.graph), (built.graph, set()))[1].add(key)
        return built


class BatchedLossGrad:
    """The step interface the engine drives, over the best path that works for this model (see module docstring).

    With a ``lift`` (e.g. :func:`scatter_lift`) the chains' θ are (C, d) sub-vectors and each batch is a pair
    (lift context, data batch): the loss is L_B(lift(θ, context)_c), its gradient taken with respect to θ.

    Attributes recorded for the result: ``vectorized``/``fallback_reason`` (vmap or loop), ``compiled``/
    ``compile_error`` (compiled or eager), ``pin_error`` (why a fixed-shape loop was not pinned, if it was not).
    """

    def __init__(self, loss_at: LossAt, vectorize: bool = True, compile: bool = False, lift: Lift | None = None
                 ) -> None:
        self.eager: VmapPath | LoopPath = VmapPath(loss_at, lift) if vectorize else LoopPath(loss_at, lift)
        self._loop = LoopPath(loss_at, lift)
        self.fallback_reason: str | None = None if vectorize else "vectorize=False"
        self.compile_error: str | None = None
        self.compiled_path: CompiledPath | None = CompiledPath(self.eager) if (
            compile and isinstance(self.eager, VmapPath)) else None
        self.pin_error: str | None = None
        self._hp_tensors: tuple[tuple, dict[str, torch.Tensor]] | None = None
        self._session: tuple[ExitStack, bool] | None = None
        self._pinned: PinnedStep | None = None
        self._rewrites_before = rewrite_snapshot()

    @property
    def vectorized(self) -> bool:
        return isinstance(self.eager, VmapPath)

    @property
    def compiled(self) -> bool:
        """Whether steps run through the ``torch.compile``-d graph (False after a compile failure)."""
        return self.compiled_path is not None

    # ------------------------------------------------------------------------------------------------ eager
    def __call__(self, theta: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses and gradients only, always eager (used a few times per run, e.g. for overdispersed starts)."""
        if isinstance(self.eager, VmapPath):
            try:
                return self.eager(theta, batch)
            except Exception as exc:  # noqa: BLE001 - any vmap failure means "use the loop"
                self.eager, self.fallback_reason = self._loop, f"{type(exc).__name__}: {exc}"
                self.compiled_path = None  # the compiled step vmaps too
        return self.eager(theta, batch)

    def _eager_step(self, theta: torch.Tensor, theta0: torch.Tensor, batch: Any, noise: Any, kind: str,
                    state: dict[str, torch.Tensor], hp: dict[str, float]) -> StepOut:
        losses, grads = self(theta, batch)
        new_theta, new_state = update(kind, theta, theta0, grads, pick_noise(noise, theta), state, hp)
        return losses, grads, new_theta, new_state

    # ------------------------------------------------------------------------------------------------ compiled
    def _tensor_hp(self, hp: dict[str, float], like: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (tuple(sorted(hp.items())), like.device, like.dtype)
        if self._hp_tensors is None or self._hp_tensors[0] != key:
            self._hp_tensors = (key, {k: torch.tensor(v, device=like.device, dtype=like.dtype) for k, v in hp.items()})
        return self._hp_tensors[1]

    def _compiled_step(self, theta: torch.Tensor, theta0: torch.Tensor, batch: Any, noise: Any, kind: str,
                       state: dict[str, torch.Tensor], hp: dict[str, float]) -> StepOut | None:
        assert self.compiled_path is not None
        hp_t, theta_d = self._tensor_hp(hp, theta), theta.detach()
        if self._pinned is not None:
            out = self._pinned(theta_d, theta0, batch, noise, state, hp_t)
            if out is not None:
                return out
            self._pinned, self.pin_error = None, "inputs changed structure within the loop"
        try:
            out = self.compiled_path(theta_d, theta0, batch, noise, kind, state, hp_t)
        except Exception as exc:  # noqa: BLE001 - a model torch.compile cannot handle runs eagerly instead
            self.compiled_path, self.compile_error = None, f"{type(exc).__name__}: {exc}"
            return None
        self._after_compiled_step()
        return out

    def _after_compiled_step(self) -> None:
        """Once per session: check the graph rewrites ran, and pin a fixed-shape loop after its first step."""
        why = rewrites_status(self._rewrites_before)
        if why is not None:
            warn_once("rewrites:" + why, f"compiled SGMCMC steps run without slt_tools' graph rewrites ({why}); "
                      "results are unaffected, steps may be slower")
        self._rewrites_before = rewrite_snapshot()
        if self._session is None or not self._session[1] or self._pinned is not None or self.pin_error is not None:
            return
        assert self.compiled_path is not None
        built = self.compiled_path.pin()
        if isinstance(built, str):
            self.pin_error = built
            if "did not reproduce" in built or "pinned call failed" in built:
                warn_once("pin", f"compiled steps are not pinned: {built}; using the ordinary compiled call")
            return
        self._pinned = built
        self._session[0].enter_context(_skip_guards())

    # ------------------------------------------------------------------------------------------------ interface
    def step(self, theta: torch.Tensor, theta0: torch.Tensor, batch: Any, noise: Any, kind: str,
             state: dict[str, torch.Tensor], hp: dict[str, float]) -> StepOut:
        """(L_B(θ), ∇L_B(θ), θ′, state′) for every chain: one SGMCMC step of rule ``kind``."""
        if self.compiled_path is not None:
            out = self._compiled_step(theta, theta0, batch, noise, kind, state, hp)
            if out is not None:
                return out
        return self._eager_step(theta, theta0, batch, noise, kind, state, hp)

    def draw(self, pool: NoisePool) -> Any:
        """The next step's noise in the form this path takes: normals (eager) or a (uniform pool, index) pair that
        the compiled graph turns into the same normals inside itself."""
        return pool.indexed() if self.compiled_path is not None else pool()

    @contextmanager
    def session(self, fixed_shapes: bool = False) -> Iterator[None]:
        """Scope of one sampling loop. With ``fixed_shapes`` (every batch of one structure and shape: a cached data
        set), the compiled step is pinned after its first step and guard evaluation is skipped; both end with the
        block, also when the loop raises."""
        with ExitStack() as stack:
            self._session, self._pinned, self.pin_error = (stack, bool(fixed_shapes)), None, None
            try:
                yield
            finally:
                self._session, self._pinned = None, None
