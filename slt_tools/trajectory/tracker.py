"""Estimate the LLC during training, from inside the user's own loop, without disturbing it.

``LLCTracker.maybe_estimate(step, model, optimizer)`` estimates at scheduled steps. The estimator never writes to
the model (it samples stateless copies), but reading the data loader and building generators can consume the global
random streams; the tracker snapshots and restores torch (CPU and CUDA), numpy and Python RNG states, the model's
state dict and the optimizer's state dict — and the random generators the loader owns (``DataLoader(generator=...)``,
its sampler's and batch sampler's generators, numpy/Python generators held by a custom iterable): a loader whose
batches cannot be cached (say, a non-tensor field) is iterated by the estimator, which would otherwise advance the
loader's own generator. Training continues bit-identically as if no estimate had been made.
"""
from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slt_tools.sampling import LLCResult, estimate_llc
from slt_tools.trajectory.arguments import RUNTIME, check_llc_kwargs, store_header
from slt_tools.trajectory.store import ResultsStore


def log_schedule(max_step: int, num: int = 30, first: int = 1) -> list[int]:
    """About ``num`` distinct integer steps spaced evenly in log(step) from ``first`` to ``max_step``."""
    if max_step < first or num < 1 or first < 0:
        raise ValueError(f"need 0 ≤ first ≤ max_step and num ≥ 1, got first={first}, max_step={max_step}, num={num}")
    lo = max(first, 1)
    pts = np.unique(np.round(np.geomspace(lo, max_step, num)).astype(int))
    return sorted(set(pts.tolist()) | ({0} if first == 0 else set()))


class LLCTracker:
    """Callback for a training loop: ``tracker.maybe_estimate(step, model, optimizer)``.

    ``schedule``: an int k (every k steps, from step k), an iterable of steps, or a predicate ``step -> bool``.
    Results go to ``results`` (a JSONL store, the same format as :func:`llc_trajectory`) and to ``logger``.
    """

    def __init__(self, loader: Any, loss_fn: Callable[[Any, Any], torch.Tensor],
                 schedule: int | Iterable[int] | Callable[[int], bool], results: str | Path | None = None,
                 logger: Any = None, **llc_kwargs: Any) -> None:
        self.llc_config = check_llc_kwargs(llc_kwargs, reserved=("logger",))
        if isinstance(schedule, bool):
            raise ValueError(f"schedule must be an int, an iterable of steps or a predicate, got {schedule!r}")
        if isinstance(schedule, int):
            if schedule < 1:
                raise ValueError(f"an every-k schedule needs k ≥ 1, got {schedule}")
            k = schedule
            self._due: Callable[[int], bool] = lambda s: s > 0 and s % k == 0
        elif callable(schedule):
            self._due = schedule
        else:
            steps = {int(s) for s in schedule}
            self._due = steps.__contains__
        self.loader, self.loss_fn, self.logger, self.llc_kwargs = loader, loss_fn, logger, llc_kwargs
        num_chains = self.llc_config.num_chains
        config = store_header(self.llc_config, chain_chunk_size=num_chains)
        if logger is not None and hasattr(logger, "add_config"):
            logger.add_config(config)  # the run's hyperparameters: the estimates' settings
        # estimates during training are rare and costly: make each one durable at once
        self.store = ResultsStore(results, config, fsync_interval=0.0) if results is not None else None
        self._chains = tuple(range(num_chains))
        self.history: list[tuple[int, LLCResult]] = []

    def close(self) -> None:
        """Release the results store (its lock); the tracker can no longer record estimates to it."""
        if self.store is not None:
            self.store.close()

    def due(self, step: int) -> bool:
        return bool(self._due(int(step)))

    def maybe_estimate(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
                       ) -> LLCResult | None:
        """Estimate at ``step`` if the schedule says so (and it is not already in the store); else do nothing."""
        cid = f"step-{int(step)}"
        if not self.due(step) or (self.store is not None and self.store.has(cid, self._chains)):
            return None
        if self.store is not None:
            self.store.check_alive()  # fail before the (costly) estimate, not after it
        snapshot = _snapshot(model, optimizer, self.loader)
        try:
            runtime = {k: v for k, v in self.llc_kwargs.items() if k in RUNTIME}
            result = estimate_llc(model, self.loader, self.loss_fn, self.llc_config, **runtime)
        finally:
            _restore(snapshot, model, optimizer)
        if self.store is not None:
            self.store.append(cid, int(step), self._chains, result.to_dict())
        if self.logger is not None and hasattr(self.logger, "log_trajectory_point"):
            self.logger.log_trajectory_point(int(step), result)
        self.history.append((int(step), result))
        return result


def _loader_generators(loader: Any) -> list[Any]:
    """Random generators a loader owns: its own, its sampler's, its batch sampler's (and that one's sampler's).

    torch, numpy (``Generator``/``RandomState``) and Python ``random.Random`` objects, found as attributes of the
    loader and of those samplers; deduplicated by identity."""
    kinds = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)
    found: list[Any] = []
    holders = [loader]
    for name in ("sampler", "batch_sampler"):
        holders.append(getattr(loader, name, None))
    holders.append(getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    for holder in holders:
        attrs = getattr(holder, "__dict__", None)
        if holder is None or attrs is None:
            continue
        for value in list(attrs.values()):
            if isinstance(value, kinds) and not any(value is f for f in found):
                found.append(value)
    return found


def _generator_state(gen: Any) -> Any:
    if isinstance(gen, torch.Generator):
        return gen.get_state()
    if isinstance(gen, np.random.Generator):
        return copy.deepcopy(gen.bit_generator.state)
    return gen.get_state() if isinstance(gen, np.random.RandomState) else gen.getstate()


def _set_generator_state(gen: Any, state: Any) -> None:
    if isinstance(gen, torch.Generator):
        gen.set_state(state)
    elif isinstance(gen, np.random.Generator):
        gen.bit_generator.state = state
    elif isinstance(gen, np.random.RandomState):
        gen.set_state(state)
    else:
        gen.setstate(state)


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None, loader: Any = None) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "loader": [(g, _generator_state(g)) for g in _loader_generators(loader)],
        "model": copy.deepcopy(model.state_dict()),
        "training": model.training,
        "optimizer": copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
    }


def _restore(snap: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    torch.set_rng_state(snap["torch"])
    if snap["cuda"] is not None:
        torch.cuda.set_rng_state_all(snap["cuda"])
    np.random.set_state(snap["numpy"])
    random.setstate(snap["python"])
    for gen, state in snap["loader"]:
        _set_generator_state(gen, state)
    model.load_state_dict(snap["model"])
    model.train(snap["training"])
    if optimizer is not None:
        optimizer.load_state_dict(snap["optimizer"])
