"""Trajectories: LLC estimates along training, rebuilt from a sweep or from its results store."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slt_tools.files import atomic_write
from slt_tools.sampling import LLCResult, combine_results
from slt_tools.trajectory.store import ResultsStore, StoreError


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
    skipped: dict[str, str] = field(default_factory=dict)  # checkpoint -> why it was skipped (``on_error="skip"``)

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
        """Rebuild a trajectory from a results store (only checkpoints whose every chain block is finished).

        Tolerates what an interrupted or repeated sweep leaves behind (see :mod:`slt_tools.trajectory.store`);
        raises :class:`StoreError` naming the file for anything it cannot read unambiguously."""
        config, units = ResultsStore.read_units(path)
        try:
            wanted = set(range(int(config["llc"]["num_chains"])))
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"{path}: the store header has no llc.num_chains setting") from None
        by_ckpt: dict[str, list[dict]] = {}
        metrics: dict[str, dict[str, float]] = {}
        for u in units:
            by_ckpt.setdefault(u["checkpoint"], []).append(u)
            if u.get("metrics"):
                metrics[u["checkpoint"]] = u["metrics"]
        items = []
        for ckpt, us in by_ckpt.items():
            chains = [c for u in us for c in u["chains"]]
            if len(chains) != len(set(chains)):
                raise StoreError(f"{path}: checkpoint {ckpt!r} has overlapping chain blocks "
                                 f"{sorted(tuple(u['chains']) for u in us)}; the store mixes chunkings")
            if set(chains) == wanted:
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
        def write(f: Any) -> None:
            writer = csv.DictWriter(f, fieldnames=["step", "checkpoint", "llc_mean", "llc_std", "llc_sem", "loss"])
            writer.writeheader()
            writer.writerows(self.rows())

        path = Path(path)
        atomic_write(path, write, newline="")
        return path
