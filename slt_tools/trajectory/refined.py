"""Refined LLCs over training: one :class:`~slt_tools.trajectory.sweep.Trajectory` per restriction.

A sweep with ``restrictions=`` (:func:`slt_tools.llc_trajectory`) runs one batched refined estimate per work unit
(checkpoint, chain block) holding every restriction; the results store keeps one line per unit (the
:class:`~slt_tools.sampling.refined_result.RefinedLLCResult` of that block), so a sweep resumes by unit as
whole-model sweeps do, and its header records the restrictions (a rerun over other restrictions is refused).
"""
from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slt_tools.files import atomic_write
from slt_tools.sampling.refined_result import RefinedLLCResult, combine_refined_results
from slt_tools.trajectory.store import ResultsStore, StoreError
from slt_tools.trajectory.trajectory import Trajectory

ROW_FIELDS = ("step", "checkpoint", "restriction", "numel", "llc_mean", "llc_std", "llc_sem", "loss")


@dataclass
class RefinedTrajectory:
    """Per restriction, its refined LLC along training (``traj["l1h3"]`` is a ``Trajectory``), sorted by step.

    ``results`` holds each checkpoint's :class:`RefinedLLCResult`; ``skipped`` the checkpoints that could not be
    evaluated and why."""

    trajectories: dict[str, Trajectory]
    results: list[RefinedLLCResult] = field(default_factory=list)
    checkpoint_ids: list[str] = field(default_factory=list)
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_results(cls, items: Sequence[tuple[int, str, RefinedLLCResult]],
                     metrics: dict[str, dict[str, float]] | None = None) -> RefinedTrajectory:
        items = sorted(items, key=lambda t: (t[0], t[1]))
        names = items[0][2].keys() if items else []
        trajs = {n: Trajectory.from_results([(s, c, r[n]) for s, c, r in items], metrics) for n in names}
        return cls(trajs, [r for _, _, r in items], [c for _, c, _ in items],
                   np.array([s for s, _, _ in items], dtype=np.int64))

    @classmethod
    def from_store(cls, path: str | Path) -> RefinedTrajectory:
        """Rebuild from a refined sweep's results store (checkpoints whose every chain block is finished)."""
        config, units = ResultsStore.read_units(path)
        if "restrictions" not in config:
            raise StoreError(f"{path}: not a refined sweep's store (its header lists no restrictions); use "
                             "Trajectory.from_store")
        wanted = set(range(int(config["llc"]["num_chains"])))
        by_ckpt: dict[str, list[dict[str, Any]]] = {}
        for u in units:
            by_ckpt.setdefault(u["checkpoint"], []).append(u)
        items = []
        for ckpt, us in by_ckpt.items():
            chains = [c for u in us for c in u["chains"]]
            if len(chains) == len(set(chains)) and set(chains) == wanted:
                parts = [RefinedLLCResult.from_dict(u["result"]) for u in us]
                items.append((us[0]["step"], ckpt, combine_refined_results(parts, on_divergence="exclude",
                                                                           warn=False)))
        return cls.from_results(items)

    def __getitem__(self, name: str) -> Trajectory:
        return self.trajectories[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.trajectories)

    def __len__(self) -> int:
        return len(self.steps)

    def keys(self) -> list[str]:
        return list(self.trajectories)

    def items(self) -> list[tuple[str, Trajectory]]:
        return list(self.trajectories.items())

    def rows(self) -> list[dict[str, Any]]:
        """Tidy rows: one per (checkpoint, restriction)."""
        out = []
        for step, cid, res in zip(self.steps, self.checkpoint_ids, self.results):
            for row in res.table():
                out.append({"step": int(step), "checkpoint": cid, "restriction": row["restriction"],
                            "numel": row["numel"], "llc_mean": row["llc_mean"], "llc_std": row["llc_std"],
                            "llc_sem": row["llc_sem"], "loss": res.init_loss})
        return out

    def to_csv(self, path: str | Path) -> Path:
        """Write :meth:`rows` as CSV (atomically)."""
        def write(f: Any) -> None:
            writer = csv.DictWriter(f, fieldnames=list(ROW_FIELDS))
            writer.writeheader()
            writer.writerows(self.rows())

        path = Path(path)
        atomic_write(path, write, newline="")
        return path
