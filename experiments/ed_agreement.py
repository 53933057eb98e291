"""Essential dynamics vs LLC stages, collected from a study's output (issue 17, requirement 4).

    python experiments/dln_staircase.py [--quick] --out runs/dln --no-wandb
    python experiments/induction_heads.py [--quick] --out runs/ih --no-wandb
    python experiments/ed_agreement.py runs/dln runs/ih [--results experiments/results] [--figures docs/figures]

Each study directory holds ``summary.json`` and ``essential_dynamics.json`` (PC scores and smoothed curves), both
written by ``study_common.analyse``; a study re-run over the same ``--out`` reuses its checkpoints and LLC results
store and only redoes the analysis. For each study this writes

* ``<results>/ed_<study>.json``: explained-variance ratios, milestones, LLC stages and boundaries (interval,
  existence probability, replicate support), the checkpoints left out of stage detection and why, and the agreement
  table: each LLC boundary with the milestone matched to it within 0.15 decades (``detect_stages(...,
  milestones=ed).agreement``) or none, each unmatched milestone with where it lies (inside which LLC stage, or among
  the checkpoints left out of stage detection);
* ``<figures>/ed_<study>.png``: left, the PC1–PC2 trajectory, checkpoints coloured by LLC stage, boundaries and
  milestones marked (``slt_tools.plots.plot_essential_dynamics``); right, PC1 and PC2 against the step with the
  stages shaded, LLC boundaries (with their intervals) and milestones as vertical lines.

It prints the agreement table as Markdown.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from slt_tools.essential_dynamics import EssentialDynamics, Milestone
from slt_tools.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]


def load_ed(study_dir: Path) -> EssentialDynamics:
    path = study_dir / "essential_dynamics.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: re-run the study with the same --out (it reuses the checkpoints and the "
                         "LLC results store and only redoes the analysis)")
    d = json.loads(path.read_text())
    return EssentialDynamics(np.asarray(d["steps"], float), np.asarray(d["scores"], float),
                             np.asarray(d["smoothed"], float), np.asarray(d["explained_variance_ratio"], float),
                             [Milestone(**m) for m in d["milestones"]])


def _where(step: float, stages: list[dict], excluded: list[float]) -> str:
    for k, s in enumerate(stages):
        if s["start"] <= step <= s["end"]:
            return f"inside LLC stage {k + 1} ({s['kind']}, {s['start']:,.0f}–{s['end']:,.0f})"
    if stages and step < stages[0]["start"]:
        left = [e for e in excluded if e < stages[0]["start"]]
        return (f"before the first LLC stage ({len(left)} checkpoints left out there)" if left
                else "before the first LLC stage")
    right = [e for e in excluded if stages and e > stages[-1]["end"]]
    return (f"after the last LLC stage ({len(right)} checkpoints left out there)" if right
            else "after the last LLC stage")


def agreement_rows(summary: dict) -> list[dict]:
    """One row per LLC boundary and per unmatched milestone, sorted by step."""
    agree = summary.get("stages_vs_essential_dynamics") or {}
    bounds = {round(b["step"], 6): b for b in summary["stage_boundaries"]}
    excluded = ([float(s) for s in summary["excluded_checkpoints"]]
                + [e["step"] for e in summary["excluded_from_stages"]])

    def bound(step):
        b = bounds.get(round(step, 6), {})
        return {"boundary": step, "interval": b.get("interval"), "probability": b.get("probability"),
                "replicate_support": b.get("replicate_support")}

    rows = [{**bound(p["boundary"]), "milestone": p["milestone"], "decades": p["decades"], "verdict": "agree"}
            for p in agree.get("agree", [])]
    rows += [{**bound(b), "milestone": None, "decades": None, "verdict": "LLC boundary, no milestone"}
             for b in agree.get("boundaries_without_milestone", [])]
    rows += [{"boundary": None, "interval": None, "probability": None, "replicate_support": None, "milestone": m,
              "decades": None, "verdict": "milestone, no LLC boundary: " + _where(m, summary["stages"], excluded)}
             for m in agree.get("milestones_without_boundary", [])]
    return sorted(rows, key=lambda r: r["boundary"] if r["boundary"] is not None else r["milestone"])


def figure(ed: EssentialDynamics, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slt_tools.plots import plot_essential_dynamics

    stages = [SimpleNamespace(**s) for s in summary["stages"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11.5, 4.6))
    plot_essential_dynamics(ed, stages, ax=a1, title="PC1–PC2, coloured by LLC stage")
    palette = plt.get_cmap("tab10").colors
    steps = ed.steps
    for k, s in enumerate(stages):
        a2.axvspan(max(s.start, steps[0]), s.end, color=palette[k % 10], alpha=0.12, lw=0)
    for j, ls in ((0, "-"), (1, "--")):
        if ed.scores.shape[1] > j:
            a2.plot(steps, ed.smoothed[:, j], color="0.3", ls=ls, lw=1.2,
                    label=f"PC{j + 1} ({100 * ed.explained_variance_ratio[j]:.0f}% var.)")
            a2.scatter(steps, ed.scores[:, j], color="0.3", s=9, zorder=3)
    for b in summary["stage_boundaries"]:
        a2.axvspan(*b["interval"], color="C3", alpha=0.12, lw=0)
        a2.axvline(b["step"], color="C3", lw=1.6)
    a2.plot([], [], color="C3", lw=1.6, label="LLC boundary (shaded: interval)")
    for m in ed.milestones:
        a2.axvline(m.step, color="k", ls=":", lw=1.3)
        a2.annotate(f"{m.step:,.0f}", (m.step, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7)
    a2.plot([], [], color="k", ls=":", lw=1.3, label="ED milestone")
    excl = [float(s) for s in summary["excluded_checkpoints"]] + [e["step"] for e in summary["excluded_from_stages"]]
    if excl:
        ymin = float(np.min(ed.scores[:, :2]))
        a2.scatter(excl, np.full(len(excl), ymin), marker="|", color="C1", s=60, zorder=4,
                   label=f"left out of stage detection ({len(excl)})")
    a2.set_xscale("log")
    a2.set_xlabel("training step")
    a2.set_ylabel("PC score")
    a2.set_title("PC curves against the step; stages shaded")
    a2.legend(fontsize=7, loc="best")
    a2.grid(alpha=0.3, lw=0.4)
    fig.suptitle(f"{summary['study']}: essential dynamics vs LLC stages", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect(study_dir: Path, results: Path, figures: Path) -> dict:
    summary = json.loads((study_dir / "summary.json").read_text())
    name = summary["study"]
    ed = load_ed(study_dir)
    out = {"study": name, "source": str(study_dir),
           "checkpoints": len(summary["checkpoints"]),
           "explained_variance_ratio": ed.explained_variance_ratio.tolist(),
           "milestones": [m.__dict__ for m in ed.milestones],
           "stages": [{k: s[k] for k in ("start", "end", "kind", "delta_llc", "delta_loss", "confidence")}
                      for s in summary["stages"]],
           "boundaries": summary["stage_boundaries"], "excluded_checkpoints": summary["excluded_checkpoints"],
           "excluded_from_stages": summary["excluded_from_stages"], "stage_flag_policy": summary["stage_flag_policy"],
           "agreement": agreement_rows(summary),
           "tolerance_decades": (summary.get("stages_vs_essential_dynamics") or {}).get("tolerance_decades")}
    results.mkdir(parents=True, exist_ok=True)
    atomic_write(results / f"ed_{name}.json", json.dumps(out, indent=2))
    figure(ed, summary, figures / f"ed_{name.replace('-', '_')}.png")
    return out


def markdown(out: dict) -> str:
    def f(v, fmt=",.0f"):
        return "—" if v is None else format(v, fmt)

    ev = ", ".join(f"PC{i + 1} {100 * v:.0f} %" for i, v in enumerate(out["explained_variance_ratio"]))
    lines = [f"{out['study']} ({out['checkpoints']} checkpoints; {ev})", "",
             "| LLC boundary [interval], P(exists), support | ED milestone | decades apart | verdict |",
             "|---|---|---|---|"]
    for r in out["agreement"]:
        b = ("—" if r["boundary"] is None else
             f"{r['boundary']:,.0f} [{r['interval'][0]:,.0f}, {r['interval'][1]:,.0f}], {r['probability']:.2f}, "
             f"{f(r['replicate_support'], '.2f')}")
        lines.append(f"| {b} | {f(r['milestone'])} | {f(r['decades'], '.2f')} | {r['verdict']} |")
    n_b = sum(r["boundary"] is not None for r in out["agreement"])
    n_a = sum(r["verdict"] == "agree" for r in out["agreement"])
    n_m = len(out["milestones"])
    lines += ["", f"{n_a} of {n_b} LLC boundaries have a milestone within {out['tolerance_decades']} decades; "
                  f"{n_m - n_a} of {n_m} milestones have no LLC boundary."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study_dirs", nargs="+", type=Path)
    p.add_argument("--results", type=Path, default=ROOT / "experiments" / "results")
    p.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    args = p.parse_args(argv)
    for d in args.study_dirs:
        print(markdown(collect(d, args.results, args.figures)), "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
