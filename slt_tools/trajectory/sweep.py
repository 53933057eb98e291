"""LLC over training: sweep saved checkpoints (single process or ``torchrun``), resumably.

Work is split into units (checkpoint, block of chains): ``chain_chunk_size`` chains per unit (default: all chains of
a checkpoint in one unit). Chain c of every checkpoint is seeded by (seed, c) and the minibatch order by seed alone, so
a checkpoint's estimate does not depend on which other checkpoints are in the sweep, on their order, or on which
process ran which unit: under ``torchrun --nproc_per_node=N`` the units are dealt round-robin to the ranks, each round's
results are gathered on every rank and rank 0 appends them to the store, and the combined result equals the
single-process run with the same ``chain_chunk_size``.
"""
from __future__ import annotations

import csv
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from slt_tools.sampling import LLCResult, combine_results, estimate_llc
from slt_tools.trajectory.checkpoints import CheckpointError, CheckpointRef, discover_checkpoints, load_into
from slt_tools.trajectory.store import ResultsStore


def _warning_kind(message: str) -> str:
    """Short label for an estimator warning, to group them over a sweep."""
    kinds = (("< 0: w* is not a local minimum", "λ̂ < 0 (w* is not a local minimum)"),
             ("has not settled", "LLC trace not settled"),
             ("chains diverged", "some chains diverged (excluded)"),
             ("did not converge", "self-calibrated estimate did not converge"),
             ("could not be vmapped", "model not vmappable (chains looped)"),
             ("torch.compile failed", "torch.compile failed (ran eagerly)"))
    for needle, label in kinds:
        if needle in message:
            return label
    return message.split(";")[0][:80]


@dataclass
class Trajectory:
    """LLC estimates along training, sorted by step. ``loss`` is L_n(w*) at each checkpoint."""

    steps: np.ndarray
    llc_mean: np.ndarray
    llc_std: np.ndarray
    llc_sem: np.ndarray
    loss: np.ndarray
    results: list[LLCResult] = field(default_factory=list)
    checkpoint_ids: list[str] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)  # extra per-checkpoint statistics (``metrics=``)

    @classmethod
    def from_results(cls, items: Sequence[tuple[int, str, LLCResult]],
                     metrics: dict[str, dict[str, float]] | None = None) -> Trajectory:
        items = sorted(items, key=lambda t: (t[0], t[1]))
        res = [r for _, _, r in items]
        metrics = metrics or {}
        return cls(steps=np.array([s for s, _, _ in items], dtype=np.int64),
                   llc_mean=np.array([r.llc_mean for r in res]), llc_std=np.array([r.llc_std for r in res]),
                   llc_sem=np.array([r.llc_sem for r in res]), loss=np.array([r.init_loss for r in res]),
                   results=res, checkpoint_ids=[c for _, c, _ in items],
                   metrics=[metrics.get(c, {}) for _, c, _ in items])

    @classmethod
    def from_store(cls, path: str | Path) -> Trajectory:
        """Rebuild a trajectory from a results store (only checkpoints whose every chain block is finished)."""
        config, units = ResultsStore.read_units(path)
        wanted = set(range(int(config["llc"]["num_chains"])))
        by_ckpt: dict[str, list[dict]] = {}
        metrics: dict[str, dict[str, float]] = {}
        for u in units:
            by_ckpt.setdefault(u["checkpoint"], []).append(u)
            if u.get("metrics"):
                metrics[u["checkpoint"]] = u["metrics"]
        items = []
        for ckpt, us in by_ckpt.items():
            if set().union(*(set(u["chains"]) for u in us)) == wanted:
                parts = [LLCResult.from_dict(u["result"]) for u in us]
                items.append((us[0]["step"], ckpt, combine_results(parts, on_divergence="exclude", warn=False)))
        return cls.from_results(items, metrics)

    def __len__(self) -> int:
        return len(self.steps)

    def rows(self) -> list[dict[str, Any]]:
        return [{"step": int(s), "checkpoint": c, "llc_mean": float(m), "llc_std": float(d), "llc_sem": float(e),
                 "loss": float(lo)} for s, c, m, d, e, lo in zip(self.steps, self.checkpoint_ids, self.llc_mean,
                                                                 self.llc_std, self.llc_sem, self.loss)]

    def to_dataframe(self):  # pragma: no cover - thin pandas wrapper
        """The trajectory as a pandas DataFrame (pandas imported lazily; install it to use this)."""
        import pandas as pd

        return pd.DataFrame(self.rows())

    def to_csv(self, path: str | Path) -> Path:
        """Write step, checkpoint, llc_mean, llc_std, llc_sem, loss as CSV (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "checkpoint", "llc_mean", "llc_std", "llc_sem", "loss"])
            writer.writeheader()
            writer.writerows(self.rows())
        os.replace(tmp, path)
        return path


def _dist() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed from torchrun's environment when needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available():
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _default_device(world: int) -> torch.device | None:
    if world > 1 and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return None


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
    **llc_kwargs: Any,
) -> Trajectory:
    """Estimate the LLC at every checkpoint; see the module docstring for resume and scale-out semantics.

    Args:
        checkpoints: a directory, a glob, paths, or (step, state_dict) pairs.
        model_factory: builds an (untrained) model of the right architecture; each checkpoint is loaded into it.
        results: optional JSONL results store; finished units are skipped on re-runs.
        on_error: "skip" (report an unreadable or mismatching checkpoint and continue) or "raise".
        chain_chunk_size: chains per work unit (the unit of resumption and of sharding across ranks); with automatic
            calibration (lr or localization unset) every unit is a whole checkpoint, since the convergence checks need
            all its chains.
        logger: object with ``log_trajectory_point(step, result, metrics)`` (e.g. ``WandbLogger``), called on rank 0.
        metrics: optional ``model -> {name: value}`` evaluated once per checkpoint beside the LLC and stored with it,
            e.g. ``lambda m: slt_tools.geometry.hessian_summary(m, loader, loss_fn)`` for sharpness and trace.
        **llc_kwargs: passed to :func:`slt_tools.estimate_llc` (num_chains, num_draws, lr, localization, seed, ...).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    for bad in ("chain_ids", "logger"):
        if bad in llc_kwargs:
            raise ValueError(f"{bad} is chosen by the sweep; do not pass it")
    refs = discover_checkpoints(checkpoints)
    num_chains = int(llc_kwargs.get("num_chains", 8))
    if num_chains < 1:
        raise ValueError(f"num_chains must be positive, got {num_chains}")
    chunk = int(chain_chunk_size or num_chains)
    if llc_kwargs.get("lr") is None or llc_kwargs.get("localization") is None:
        # self-calibrated estimates decide convergence (extensions, overdispersed probe) on all chains together:
        # shard by checkpoint only
        chunk = num_chains
    blocks = [tuple(range(i, min(i + chunk, num_chains))) for i in range(0, num_chains, chunk)]
    rank, world = _dist()
    if world > 1 and "device" not in llc_kwargs:
        dev = _default_device(world)
        if dev is not None:
            llc_kwargs["device"] = dev
    config = {"llc": {**{k: v for k, v in llc_kwargs.items() if k not in ("progress", "device", "compile")},
                      "num_chains": num_chains}, "chain_chunk_size": chunk}
    store = ResultsStore(results, config) if (results is not None and rank == 0) else None
    if world > 1:
        obj = [None if store is None else sorted(store.units)]
        torch.distributed.broadcast_object_list(obj, src=0)
        done = {(c, tuple(ch)) for c, ch in obj[0]} if obj[0] is not None else set()
    else:
        done = set(store.units) if store is not None else set()
    units = [(ref, block) for ref in refs for block in blocks if (ref.id, block) not in done]
    finished: dict[str, list[LLCResult]] = {}
    if store is not None:
        for (cid, _), rec in store.units.items():
            finished.setdefault(cid, []).append(LLCResult.from_dict(rec["result"]))
    failed: dict[str, str] = {}
    extra_by_id: dict[str, dict[str, float]] = {}
    if store is not None:
        extra_by_id.update({cid: rec["metrics"] for (cid, _), rec in store.units.items() if rec.get("metrics")})
    by_id = {r.id: r for r in refs}
    bar = tqdm(total=len(refs), desc="LLC over checkpoints", unit="ckpt", disable=not progress or rank != 0)
    bar.update(sum(1 for r in refs if len(finished.get(r.id, [])) == len(blocks)))

    notes_by_step: dict[int, list[str]] = {}

    def note(step: int, message: str) -> None:
        kinds, kind = notes_by_step.setdefault(step, []), _warning_kind(message)
        if kind not in kinds:
            kinds.append(kind)

    def run_unit(ref: CheckpointRef, block: tuple[int, ...]) -> dict | None:
        try:
            model = model_factory()
            load_into(model, ref.load(), str(ref.path or ref.id))
        except CheckpointError as exc:
            if on_error == "raise":
                raise
            return {"error": str(exc)}
        kw = {**llc_kwargs, "progress": False}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = estimate_llc(model, loader, loss_fn, chain_ids=list(block), **kw)
        out = res.to_dict()
        out["_warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if metrics is not None and block[0] == 0:
            out["metrics"] = {k: float(v) for k, v in metrics(model).items()}
        return out

    for start in range(0, len(units), world):
        mine = units[start + rank] if start + rank < len(units) else None
        out = None if mine is None else run_unit(*mine)
        gathered: list[Any]
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, (None if mine is None else (mine[0].id, mine[1]), out))
        else:
            gathered = [(None if mine is None else (mine[0].id, mine[1]), out)]
        for key, d in gathered:
            if key is None or d is None:
                continue
            cid, block = key
            ref = by_id[cid]
            if "error" in d:
                if cid not in failed:
                    failed[cid] = d["error"]
                    if rank == 0:
                        warnings.warn(f"skipping checkpoint: {d['error']}", RuntimeWarning, stacklevel=2)
                        bar.update(1)
                continue
            for msg in d.pop("_warnings", []):
                note(ref.step, msg)
            extra = d.pop("metrics", None)
            if extra is not None:
                extra_by_id[cid] = extra
            if store is not None:
                store.append(cid, ref.step, block, d, metrics=extra)
            finished.setdefault(cid, []).append(LLCResult.from_dict(d))
            if len(finished[cid]) == len(blocks):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    res = combine_results(finished[cid], on_divergence=llc_kwargs.get("on_divergence", "raise"),
                                          warn=len(blocks) > 1)
                for w in caught:
                    note(ref.step, str(w.message))
                if rank == 0:
                    bar.update(1)
                    if progress:
                        flags = notes_by_step.get(ref.step)
                        tqdm.write(f"step {ref.step}: λ̂ = {res.llc_mean:.4g} ± {res.llc_std:.2g}  "
                                   f"(L_n(w*) = {res.init_loss:.4g})" + (f"  [{'; '.join(flags)}]" if flags else ""))
                    if logger is not None and hasattr(logger, "log_trajectory_point"):
                        logger.log_trajectory_point(ref.step, res, metrics=extra_by_id.get(cid))
    bar.close()
    if store is not None:
        store.sync()
    if rank == 0 and notes_by_step:
        # one warning per kind for the whole sweep, not one per checkpoint (details stay in each result's diagnostics)
        by_kind: dict[str, list[int]] = {}
        for step, kinds in sorted(notes_by_step.items()):
            for kind in kinds:
                by_kind.setdefault(kind, []).append(step)
        for kind, steps in by_kind.items():
            shown = ", ".join(map(str, steps[:12])) + (", …" if len(steps) > 12 else "")
            warnings.warn(f"{kind} at {len(steps)} of {len(refs)} checkpoints (steps {shown}); see each result's "
                          "diagnostics", RuntimeWarning, stacklevel=2)
    items = []
    for ref in refs:
        parts = finished.get(ref.id, [])
        if ref.id in failed or len(parts) != len(blocks):
            continue
        items.append((ref.step, ref.id, combine_results(parts, on_divergence=llc_kwargs.get("on_divergence", "raise"),
                                                        warn=False)))
    if not items:
        raise CheckpointError("no checkpoint could be evaluated: " + "; ".join(failed.values()))
    return Trajectory.from_results(items, extra_by_id)
