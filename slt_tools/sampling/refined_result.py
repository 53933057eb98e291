"""The typed result of a refined run: one :class:`~slt_tools.sampling.result.LLCResult` per restriction."""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from slt_tools.sampling.result import LLCResult, combine_results, json_safe

#: columns of :meth:`RefinedLLCResult.table`, in order
TABLE_COLUMNS = ("restriction", "numel", "llc_mean", "llc_std", "llc_sem", "num_chains", "num_diverged", "r_hat",
                 "stationary", "mala_acceptance", "ess_total")


@dataclass
class RefinedLLCResult:
    """Refined LLCs λ̂_r = nβ·(E_{p_r}[L_n] − L_n(w*)) of several restrictions r at one w*.

    ``res[name]`` is restriction ``name``'s :class:`LLCResult` (per-chain values, traces, SEs, diagnostics as for a
    whole-model run; its ``hyperparameters["num_params"]`` is d_r). ``restrictions`` holds each restriction's
    ``to_dict`` (coordinate counts per parameter); ``hyperparameters`` the settings shared by all of them;
    ``calibration`` the whole-model calibration record when ε or γ were calibrated; ``wall_time_s`` the whole run.
    """

    results: dict[str, LLCResult]
    restrictions: dict[str, dict[str, Any]]
    init_loss: float
    hyperparameters: dict[str, Any]
    wall_time_s: float
    calibration: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------------ mapping
    def __getitem__(self, name: str) -> LLCResult:
        try:
            return self.results[name]
        except KeyError:
            raise KeyError(f"no restriction named {name!r}; this result has {list(self.results)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __contains__(self, name: object) -> bool:
        return name in self.results

    def keys(self) -> list[str]:
        return list(self.results)

    def items(self) -> list[tuple[str, LLCResult]]:
        return list(self.results.items())

    @property
    def llc_means(self) -> dict[str, float]:
        """λ̂_r per restriction."""
        return {k: r.llc_mean for k, r in self.results.items()}

    # ------------------------------------------------------------------------------------------------ tables
    def table(self) -> list[dict[str, Any]]:
        """Tidy rows, one per restriction, with the columns :data:`TABLE_COLUMNS`."""
        rows = []
        for name, r in self.results.items():
            d = r.diagnostics
            rows.append({"restriction": name, "numel": int(r.hyperparameters["num_params"]),
                         "llc_mean": r.llc_mean, "llc_std": r.llc_std, "llc_sem": r.llc_sem,
                         "num_chains": len(r.llc_per_chain), "num_diverged": d.num_diverged, "r_hat": d.r_hat,
                         "stationary": d.stationary, "mala_acceptance": d.mala_acceptance,
                         "ess_total": d.ess_total})
        return rows

    def to_dataframe(self):  # pragma: no cover - thin pandas wrapper
        import pandas as pd

        return pd.DataFrame(self.table(), columns=list(TABLE_COLUMNS))

    def format_table(self) -> str:
        """The table as aligned text (restriction, d, λ̂ ± sem, R̂, MALA)."""
        def num(x: Any, spec: str) -> str:
            return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)

        lines = [f"{'restriction':<14}{'d':>8}{'llc':>10}{'± sem':>9}{'r_hat':>7}{'mala':>6}"]
        for row in self.table():
            lines.append(f"{row['restriction']:<14}{row['numel']:>8}{num(row['llc_mean'], '.3f'):>10}"
                         f"{num(row['llc_sem'], '.3f'):>9}{num(row['r_hat'], '.2f'):>7}"
                         f"{num(row['mala_acceptance'], '.2f'):>6}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"RefinedLLCResult({len(self)} restrictions, init_loss={self.init_loss:.4g})\n{self.format_table()}"

    # ------------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return json_safe({"results": {k: r.to_dict() for k, r in self.results.items()},
                          "restrictions": self.restrictions, "init_loss": self.init_loss,
                          "hyperparameters": self.hyperparameters, "wall_time_s": self.wall_time_s,
                          "calibration": self.calibration, **self.extra})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefinedLLCResult:
        d = dict(d)
        known = {"results", "restrictions", "init_loss", "hyperparameters", "wall_time_s", "calibration"}
        return cls({k: LLCResult.from_dict(r) for k, r in d["results"].items()}, dict(d["restrictions"]),
                   float("nan") if d["init_loss"] is None else float(d["init_loss"]), dict(d["hyperparameters"]),
                   float(d.get("wall_time_s") or 0.0), d.get("calibration"),
                   {k: v for k, v in d.items() if k not in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> RefinedLLCResult:
        return cls.from_dict(json.loads(s))


def combine_refined_results(parts: list[RefinedLLCResult], on_divergence: str = "raise", warn: bool = True
                            ) -> RefinedLLCResult:
    """Merge refined results of disjoint chain blocks of one run (same restrictions, w*, data and settings): per
    restriction, :func:`~slt_tools.sampling.result.combine_results` of its blocks."""
    if not parts:
        raise ValueError("combine_refined_results needs at least one result")
    names = parts[0].keys()
    if any(p.keys() != names or p.restrictions != parts[0].restrictions for p in parts[1:]):
        raise ValueError("cannot combine refined results over different restrictions")
    if len(parts) == 1:
        return parts[0]
    merged = {n: combine_results([p[n] for p in parts], on_divergence=on_divergence, warn=warn) for n in names}
    hp = {**parts[0].hyperparameters, "num_chains": len(next(iter(merged.values())).chain_ids)}
    return RefinedLLCResult(merged, dict(parts[0].restrictions), parts[0].init_loss, hp,
                            float(sum(p.wall_time_s for p in parts)), parts[0].calibration, dict(parts[0].extra))
