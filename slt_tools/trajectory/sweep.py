"""LLC over training: sweep saved checkpoints (single process or ``torchrun``), resumably.

Work is split into units (checkpoint, block of chains): ``chain_chunk_size`` chains per unit (default: all chains of
a checkpoint in one unit). Chain c of every checkpoint is seeded by (seed, c) and the minibatch order by seed alone, so
a checkpoint's estimate does not depend on which other checkpoints are in the sweep, on their order, or on which
process ran which unit: under ``torchrun --nproc_per_node=N`` the units are dealt round-robin to the ranks, each round's
results are gathered on every rank and rank 0 appends them to the store, and the combined result equals the
single-process run with the same ``chain_chunk_size``.

Every argument is checked before any file is touched; with ``on_error="skip"`` every per-checkpoint failure (an
unreadable file, a step that cannot be told, non-finite weights, a model mismatch, an estimator error) is skipped and
all of them are reported together at the end (``Trajectory.skipped``).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slt_tools.restrictions.core import Restriction, collect
from slt_tools.sampling import LLCConfig, LLCResult, combine_results, estimate_llc
from slt_tools.sampling.refined import estimate_refined_llc
from slt_tools.sampling.refined_result import RefinedLLCResult, combine_refined_results
from slt_tools.trajectory.arguments import check_int, check_llc_kwargs, store_header
from slt_tools.trajectory.checkpoints import CheckpointError, CheckpointRef, find_checkpoints, load_into
from slt_tools.trajectory.refined import RefinedTrajectory
from slt_tools.trajectory.store import ResultsStore, StoreError
from slt_tools.trajectory.trajectory import Trajectory

#: ``restrictions=`` of a refined sweep: fixed restrictions, or a builder called on each checkpoint's model
RestrictionsArg = Mapping[str, Restriction] | Sequence[Restriction] | Callable[[nn.Module], Any] | None

#: how a sweep's summary names each warning class (grouped by class, never by wording)
WARNING_LABELS = {
    "NegativeLLCWarning": "λ̂ < 0 (w* is not a local minimum)",
    "NotStationaryWarning": "LLC trace not settled",
    "DivergenceWarning": "some chains diverged (excluded)",
    "NotConvergedWarning": "self-calibrated estimate did not converge",
    "VmapFallbackWarning": "model not vmappable (chains looped)",
    "CompileFallbackWarning": "torch.compile failed (ran eagerly)",
    "StepSizeWarning": "step-size bias (MALA acceptance low or Stein bound > 5 %)",
}


def _warning_kind(category: str) -> str:
    """Label of an estimator warning class, to group them over a sweep."""
    return WARNING_LABELS.get(category, category)


def _dist() -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised torch.distributed from torchrun's environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available():
        return 0, 1, False
    owned = not torch.distributed.is_initialized()
    if owned:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), owned


def _close_dist(owned: bool, clean: bool) -> None:
    """Tear down a process group this sweep created, so no communicator thread outlives the interpreter.

    Without it a gloo rank can abort at exit ("terminate called without an active exception", SIGABRT) while its
    peer is still draining the last collective; a group the caller created is left to the caller. The closing barrier
    runs only after a clean finish (after an error a peer may already be gone, and waiting on it would hang).
    """
    if not owned or not torch.distributed.is_initialized():
        return
    try:
        if clean:
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _default_device(world: int) -> torch.device | None:
    if world > 1 and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return None



def _broadcast(obj: Any, world: int) -> Any:
    """``obj`` from rank 0 on every rank (no-op in a single process)."""
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _open_store(results: str | Path | None, config: dict[str, Any], rank: int,
                world: int) -> tuple[ResultsStore | None, set[tuple[str, tuple[int, ...]]]]:
    """Rank 0 opens (and locks) the store; every rank learns the finished units — or raises rank 0's error."""
    store, error = None, None
    if results is not None and rank == 0:
        try:
            store = ResultsStore(results, config)
        except (OSError, ValueError) as exc:
            error = exc
    status = _broadcast(("error", f"{type(error).__name__}: {error}") if error is not None
                        else ("ok", None if store is None else sorted(store.units)), world)
    if error is not None:
        raise error
    if status[0] == "error":
        raise StoreError(f"rank 0 could not open the results store: {status[1]}")
    return store, {(c, tuple(ch)) for c, ch in (status[1] or [])}


def _nonfinite(state_dict: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


@dataclass
class _Sweep:
    """The state of one sweep: what is finished, what failed, the warnings gathered (see :func:`llc_trajectory`)."""

    refs: list[CheckpointRef]
    blocks: list[tuple[int, ...]]
    model_factory: Callable[[], nn.Module]
    loader: Any
    loss_fn: Callable[[Any, Any], torch.Tensor]
    llc_kwargs: dict[str, Any]  # run-time placement only (device); the settings are llc_config
    on_error: str
    metrics_fn: Callable[[nn.Module], dict[str, float]] | None
    logger: Any
    progress: bool
    rank: int
    world: int
    store: ResultsStore | None
    failed: dict[str, str] = field(default_factory=dict)
    finished: dict[str, list[LLCResult]] = field(default_factory=dict)
    extra_by_id: dict[str, dict[str, float]] = field(default_factory=dict)
    notes_by_step: dict[int, list[str]] = field(default_factory=dict)
    bar: Any = None
    llc_config: LLCConfig = field(default_factory=LLCConfig)
    restrictions: RestrictionsArg = None  # a refined sweep: every unit is one batched run over these

    @property
    def refined(self) -> bool:
        return self.restrictions is not None

    def estimate(self, model: nn.Module, block: tuple[int, ...], kw: dict[str, Any]) -> LLCResult | RefinedLLCResult:
        """The unit's estimate: whole-model, or every restriction in one batched refined run."""
        if not self.refined:
            return estimate_llc(model, self.loader, self.loss_fn, self.llc_config, chain_ids=list(block),
                                progress=False, **kw)
        rs = self.restrictions(model) if callable(self.restrictions) else self.restrictions
        return estimate_refined_llc(model, self.loader, self.loss_fn, rs, self.llc_config, chain_ids=list(block),
                                    progress=False, **kw)

    def parse(self, d: dict[str, Any]) -> LLCResult | RefinedLLCResult:
        return RefinedLLCResult.from_dict(d) if self.refined else LLCResult.from_dict(d)

    def note(self, step: int, category: str) -> None:
        kinds, kind = self.notes_by_step.setdefault(step, []), _warning_kind(category)
        if kind not in kinds:
            kinds.append(kind)

    def run_unit(self, ref: CheckpointRef, block: tuple[int, ...]) -> dict[str, Any]:
        """One unit's result dict, or {"error": why} (skip) / {"fatal": why} (raise, under torchrun)."""
        source = str(ref.path or ref.id)
        try:
            model = self.model_factory()
            state_dict = ref.load()
            bad = _nonfinite(state_dict)
            if bad:
                raise CheckpointError(f"{source}: non-finite weights (NaN or inf) in {bad[:5]}")
            load_into(model, state_dict, source)
            kw = {k: v for k, v in self.llc_kwargs.items() if k == "device"}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = self.estimate(model, block, kw)
            out = res.to_dict()
            out["_warnings"] = [w.category.__name__ for w in caught if issubclass(w.category, RuntimeWarning)]
            if self.metrics_fn is not None and block[0] == 0:
                out["metrics"] = {k: float(v) for k, v in self.metrics_fn(model).items()}
            return out
        except Exception as exc:  # noqa: BLE001 - every per-checkpoint failure is skippable
            if self.on_error == "raise" and self.world == 1:
                raise
            why = str(exc) if isinstance(exc, CheckpointError) else f"{source}: {type(exc).__name__}: {exc}"
            return {"fatal" if self.on_error == "raise" else "error": why}

    def fail(self, cid: str, why: str) -> None:
        if cid not in self.failed:
            self.failed[cid] = why
            if self.rank == 0:
                self.bar.update(1)
                if self.progress:
                    tqdm.write(f"skipping checkpoint: {why}")

    def record(self, ref: CheckpointRef, block: tuple[int, ...], d: dict[str, Any]) -> None:
        """Store one finished unit; when its checkpoint is complete, combine, print and log it."""
        cid = ref.id
        for category in d.pop("_warnings", []):
            self.note(ref.step, category)
        extra = d.pop("metrics", None)
        if extra is not None:
            self.extra_by_id[cid] = extra
        if self.store is not None:
            self.store.append(cid, ref.step, block, d, metrics=extra)
        self.finished.setdefault(cid, []).append(self.parse(d))
        if len(self.finished[cid]) != len(self.blocks):
            return
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = self.combine(cid, warn=len(self.blocks) > 1)
        except Exception as exc:  # noqa: BLE001 - e.g. every chain of this checkpoint diverged
            if self.on_error == "raise":
                raise
            self.fail(cid, f"{ref.path or cid}: {type(exc).__name__}: {exc}")
            return
        for w in caught:
            self.note(ref.step, w.category.__name__)
        if self.rank == 0:
            self.bar.update(1)
            if self.progress:
                flags = self.notes_by_step.get(ref.step)
                what = (f"λ̂ = {res.llc_mean:.4g} ± {res.llc_std:.2g}" if not self.refined else
                        "λ̂_r = " + ", ".join(f"{k} {v:.3g}" for k, v in list(res.llc_means.items())[:6])
                        + (", …" if len(res) > 6 else ""))
                tqdm.write(f"step {ref.step}: {what}  (L_n(w*) = {res.init_loss:.4g})"
                           + (f"  [{'; '.join(flags)}]" if flags else ""))
            if self.logger is not None and hasattr(self.logger, "log_trajectory_point") and not self.refined:
                self.logger.log_trajectory_point(ref.step, res, metrics=self.extra_by_id.get(cid))

    def combine(self, cid: str, warn: bool = False) -> LLCResult | RefinedLLCResult:
        if self.refined:
            return combine_refined_results(self.finished[cid], on_divergence=self.llc_config.on_divergence,
                                           warn=warn)
        return combine_results(self.finished[cid], on_divergence=self.llc_config.on_divergence,
                               warn=warn)

    def run(self, units: list[tuple[CheckpointRef, tuple[int, ...]]]) -> None:
        """Deal the units round-robin to the ranks; gather each round; rank 0 appends; errors stop every rank."""
        by_id = {r.id: r for r in self.refs}
        for start in range(0, len(units), self.world):
            mine = units[start + self.rank] if start + self.rank < len(units) else None
            out = None if mine is None else self.run_unit(*mine)
            entry = (None if mine is None else (mine[0].id, mine[1]), out)
            gathered = [entry]
            if self.world > 1:
                gathered = [None] * self.world
                torch.distributed.all_gather_object(gathered, entry)
            fatal = [d["fatal"] for _, d in gathered if d is not None and "fatal" in d]
            if fatal:
                raise CheckpointError("; ".join(fatal))
            error = None
            if self.rank == 0:
                try:
                    self.absorb(gathered, by_id)
                except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
                    error = exc
            status = _broadcast(None if error is None else f"{type(error).__name__}: {error}", self.world)
            if error is not None:
                raise error
            if status is not None:
                raise StoreError(f"rank 0 stopped the sweep: {status}")
            if self.rank != 0:
                self.absorb(gathered, by_id)

    def absorb(self, gathered: list[Any], by_id: dict[str, CheckpointRef]) -> None:
        for key, d in gathered:
            if key is None or d is None:
                continue
            cid, block = key
            if "error" in d:
                self.fail(cid, d["error"])
            elif cid not in self.failed:
                self.record(by_id[cid], block, dict(d))

    def report(self, total: int) -> None:
        """One warning per kind of estimator warning, and one listing every skipped checkpoint."""
        if self.rank != 0:
            return
        by_kind: dict[str, list[int]] = {}
        for step, kinds in sorted(self.notes_by_step.items()):
            for kind in kinds:
                by_kind.setdefault(kind, []).append(step)
        for kind, steps in by_kind.items():
            shown = ", ".join(map(str, steps[:12])) + (", …" if len(steps) > 12 else "")
            warnings.warn(f"{kind} at {len(steps)} of {total} checkpoints (steps {shown}); see each result's "
                          "diagnostics", RuntimeWarning, stacklevel=4)
        if self.failed:
            warnings.warn(f"skipping checkpoints: {len(self.failed)} of {total} could not be evaluated — "
                          + "; ".join(self.failed.values()), RuntimeWarning, stacklevel=4)


def _check_sweep_args(on_error: str, chain_chunk_size: int | None, llc_kwargs: dict[str, Any]) -> LLCConfig:
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    check_int("chain_chunk_size", chain_chunk_size, 1, optional=True)
    return check_llc_kwargs(llc_kwargs, reserved=("chain_ids", "logger", "chain_chunk_size"))


def _check_restrictions(restrictions: RestrictionsArg, model_factory: Callable[[], nn.Module]
                        ) -> dict[str, Any] | None:
    """The restrictions of a refined sweep as its store header records them (name → coordinate counts), checked
    against a fresh model before any file is touched (``ValueError`` as for :func:`estimate_refined_llc`)."""
    if restrictions is None:
        return None
    model = model_factory()
    rs = collect(restrictions(model) if callable(restrictions) else restrictions, model)
    return {name: r.to_dict() for name, r in rs.items()}


def llc_trajectory(
    checkpoints: str | Path | Iterable[Any],
    model_factory: Callable[[], nn.Module],
    loader: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    results: str | Path | None = None,
    *,
    progress: bool = True,
    on_error: str = "skip",
    chain_chunk_size: int | None = None,
    logger: Any = None,
    metrics: Callable[[nn.Module], dict[str, float]] | None = None,
    restrictions: RestrictionsArg = None,
    **llc_kwargs: Any,
) -> Trajectory | RefinedTrajectory:
    """Estimate the LLC at every checkpoint; see the module docstring for resume and scale-out semantics.

    Args:
        checkpoints: a directory, a glob, paths, or (step, state_dict) pairs (steps: see
            :mod:`slt_tools.trajectory.checkpoints`; two checkpoints with one step are an error).
        model_factory: builds an (untrained) model of the right architecture; each checkpoint is loaded into it.
        results: optional JSONL results store; finished units are skipped on re-runs. Locked for the sweep's life.
        on_error: "skip" (skip every checkpoint that cannot be evaluated and list them all in one warning at the end
            and in ``Trajectory.skipped``) or "raise" (stop at the first).
        chain_chunk_size: chains per work unit (the unit of resumption and of sharding across ranks); with automatic
            calibration (lr or localization unset) every unit is a whole checkpoint, since the convergence checks need
            all its chains.
        logger: object with ``log_trajectory_point(step, result, metrics)`` (e.g. ``WandbLogger``), called on rank 0.
        metrics: optional ``model -> {name: value}`` evaluated once per checkpoint beside the LLC and stored with it,
            e.g. ``lambda m: slt_tools.geometry.hessian_summary(m, loader, loss_fn)`` for sharpness and trace.
        restrictions: refined LLCs instead (:func:`slt_tools.estimate_refined_llc`): ``{name: Restriction}``, a
            list, or a builder ``model -> restrictions`` (e.g. ``slt_tools.restrictions.heads``) called on each
            checkpoint's model. Each unit (checkpoint, chain block) is one batched run over every restriction; the
            store's header records the restrictions; the result is a :class:`RefinedTrajectory` (a ``Trajectory``
            per restriction). The logger is not called for refined sweeps.
        **llc_kwargs: passed to :func:`slt_tools.estimate_llc` (num_chains, num_draws, lr, localization, seed, ...);
            checked before any file is touched.
    """
    llc_config = _check_sweep_args(on_error, chain_chunk_size, llc_kwargs)
    header_restrictions = _check_restrictions(restrictions, model_factory)
    refs, failed = find_checkpoints(checkpoints)
    if failed and on_error == "raise":
        raise CheckpointError(next(iter(failed.values())))
    num_chains = llc_config.num_chains
    chunk = int(chain_chunk_size or num_chains)
    if llc_config.calibrated:
        # self-calibrated estimates decide convergence (extensions, overdispersed probe) on all chains together:
        # shard by checkpoint only
        chunk = num_chains
    blocks = [tuple(range(i, min(i + chunk, num_chains))) for i in range(0, num_chains, chunk)]
    rank, world, owned = _dist()
    clean = False
    try:
        if world > 1 and "device" not in llc_kwargs:
            dev = _default_device(world)
            if dev is not None:
                llc_kwargs["device"] = dev
        config = store_header(llc_config, chain_chunk_size=chunk)
        if header_restrictions is not None:
            config["restrictions"] = header_restrictions
        store, done = _open_store(results, config, rank, world)
        try:
            sweep = _Sweep(refs, blocks, model_factory, loader, loss_fn, llc_kwargs, on_error, metrics, logger,
                           progress, rank, world, store, failed=dict(failed), llc_config=llc_config,
                           restrictions=restrictions)
            traj = _run_sweep(sweep, done, len(refs) + len(failed))
            clean = True
            return traj
        finally:
            if store is not None:
                store.close()
    finally:
        _close_dist(owned, clean)


def _run_sweep(sweep: _Sweep, done: set[tuple[str, tuple[int, ...]]], total: int
               ) -> Trajectory | RefinedTrajectory:
    refs, blocks, store = sweep.refs, sweep.blocks, sweep.store
    ids = {r.id for r in refs}
    if store is not None:
        for (cid, _), rec in store.units.items():
            if cid in ids:
                sweep.finished.setdefault(cid, []).append(sweep.parse(rec["result"]))
                if rec.get("metrics"):
                    sweep.extra_by_id[cid] = rec["metrics"]
    units = [(ref, block) for ref in refs for block in blocks if (ref.id, block) not in done]
    sweep.bar = tqdm(total=total, desc="LLC over checkpoints", unit="ckpt",
                     disable=not sweep.progress or sweep.rank != 0)
    sweep.bar.update(sum(1 for r in refs if len(sweep.finished.get(r.id, [])) == len(blocks)) + len(sweep.failed))
    try:
        sweep.run(units)
    finally:
        sweep.bar.close()
    if store is not None:
        store.sync()
    sweep.report(total)
    items = []
    for ref in refs:
        if ref.id in sweep.failed or len(sweep.finished.get(ref.id, [])) != len(blocks):
            continue
        try:
            items.append((ref.step, ref.id, sweep.combine(ref.id)))
        except Exception as exc:  # noqa: BLE001 - a finished unit from an earlier run that cannot be combined
            if sweep.on_error == "raise":
                raise
            sweep.failed[ref.id] = f"{ref.path or ref.id}: {type(exc).__name__}: {exc}"
    if not items:
        raise CheckpointError("no checkpoint could be evaluated: " + "; ".join(sweep.failed.values()))
    traj = (RefinedTrajectory if sweep.refined else Trajectory).from_results(items, sweep.extra_by_id)
    traj.skipped = dict(sweep.failed)
    return traj
