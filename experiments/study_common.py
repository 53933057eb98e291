"""Shared plumbing of the developmental studies: checkpoint schedule, LLC trajectory, stage detection, figures,
W&B logging, summary JSON and Markdown report. Each study supplies its training loop and its own extra columns."""
from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import slt_tools as slt
from slt_tools.files import atomic_write


def log_spaced_steps(first: int, last: int, num: int) -> list[int]:
    """Distinct integer steps spaced evenly in log(step) between ``first`` and ``last`` (inclusive)."""
    return sorted(set(np.unique(np.geomspace(first, last, num).astype(int)).tolist()) | {last})


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2))


def write_rows_atomic(path: Path, rows: list[dict]) -> None:
    def write(f: Any) -> None:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write, newline="")


def stage_flags(results: Sequence[Any], mask: np.ndarray, min_clean: int = 6) -> tuple[list[str | None], str]:
    """The estimator's own flags for the checkpoints in ``mask`` (``slt.stages.flags_from_results``), and the policy.

    Flagged estimates (λ̂ < 0, diverged, not converged, not stationary) are not evidence about the landscape, so
    ``detect_stages`` leaves them out. When fewer than ``min_clean`` estimates are unflagged, only the hard flags
    (λ̂ < 0, diverged) are kept, and the returned policy string says so.
    """
    flags = slt.stages.flags_from_results(results) if results else [None] * len(mask)
    flags = [f for f, v in zip(flags, mask) if v]
    if sum(f is None for f in flags) >= min_clean:
        return flags, "excluded: llc<0, diverged, not converged, not stationary"
    hard = [f if f and ("llc<0" in f or "diverged" in f) else None for f in flags]
    return hard, "excluded: llc<0, diverged (too few estimates were converged and stationary to exclude the rest)"


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def train_with_checkpoints(out: Path, steps: Sequence[int], make_state: Callable[[], Any],
                           train_step: Callable[[Any, int], None], model_of: Callable[[Any], Any],
                           evaluate: Callable[[Any], dict]) -> list[dict]:
    """Run ``train_step(state, step)`` for step = 1..max(steps); at each step in ``steps`` save a safetensors
    checkpoint and a row ``{"step": step, **evaluate(state)}`` to ``train_log.csv``. Skipped when already done."""
    ckpt_dir, log_path = out / "checkpoints", out / "train_log.csv"
    if log_path.exists() and all((ckpt_dir / f"step_{s:07d}.safetensors").exists() for s in steps):
        return read_rows(log_path)
    state, wanted, rows = make_state(), set(steps), []
    for step in range(1, max(steps) + 1):
        train_step(state, step)
        if step in wanted:
            slt.save_checkpoint(ckpt_dir / f"step_{step:07d}.safetensors", model_of(state), step=step)
            rows.append({"step": step, **evaluate(state)})
    write_rows_atomic(log_path, rows)
    return rows


def analyse(name: str, out: Path, config: dict, model_factory: Callable[[], Any], loader: Any, loss_fn: Callable,
            llc_kwargs: dict, train_rows: list[dict], use_wandb: bool, extra_series: dict[str, str] | None = None,
            valid: Callable[[np.ndarray], np.ndarray] | None = None, probe: tuple[Any, Callable | None] | None = None
            ) -> dict:
    """LLC trajectory over ``out/checkpoints`` → stages → figures, W&B, summary. Returns the summary dict.

    ``valid(llc_mean) -> mask`` selects the estimates used for stage detection (e.g. λ̂ > 0); the others are
    reported as excluded; so are estimates the estimator flagged (diverged, not converged). ``extra_series`` maps
    train-log columns to axis labels drawn under the LLC figure. ``probe = (inputs, forward or None)``: essential
    dynamics of the outputs on ``inputs`` across the checkpoints, a second signal for the stages.
    """
    t0 = time.perf_counter()
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    logger = (slt.WandbLogger(project="slt_tools-studies", name=name, config=config, save_dir=figures)
              if use_wandb else None)
    print(f"[llc] estimating the LLC at {len(train_rows)} checkpoints (resumable store {out / 'llc.jsonl'})",
          flush=True)
    traj = slt.llc_trajectory(out / "checkpoints", model_factory, loader, loss_fn, results=out / "llc.jsonl",
                              logger=logger, **llc_kwargs)
    steps, llc, std, loss = (np.asarray(a, dtype=float) for a in (traj.steps, traj.llc_mean, traj.llc_std, traj.loss))
    mask = valid(llc) if valid is not None else np.isfinite(llc)
    print(f"[stages] detecting stages on {int(mask.sum())} valid estimates", flush=True)
    flags, policy = stage_flags(traj.results, mask)
    ed = (slt.essential_dynamics(out / "checkpoints", probe[0], model_factory=model_factory, forward=probe[1])
          if probe is not None else None)
    stages = slt.detect_stages(steps[mask], llc[mask], loss=loss[mask], llc_std=std[mask], milestones=ed,
                               flags=flags)
    from slt_tools.plots import plot_essential_dynamics, plot_stages

    if ed is not None:  # the PC scores and smoothed curves, for experiments/ed_agreement.py's figures
        write_json_atomic(out / "essential_dynamics.json", {**ed.to_dict(), "smoothed": ed.smoothed.tolist()})
        plot_essential_dynamics(ed, stages, path=figures / "essential_dynamics.png",
                                title=f"{name}: essential dynamics, stages and milestones")

    plot_stages(steps[mask], llc[mask], loss[mask], std[mask], stages=stages,
                path=figures / "stages.png")
    if extra_series:
        plot_extra(train_rows, extra_series, steps, llc, std, mask, stages, figures / "llc_and_metrics.png")
    if logger is not None:
        logger.log_stages(stages, slt.Trajectory(steps[mask], llc[mask], std[mask], np.asarray(traj.llc_sem)[mask],
                                                 loss[mask]))
        logger.finish()
    summary = {
        "study": name,
        "config": config,
        "checkpoints": [{"step": int(s), "llc_mean": float(m), "llc_std": float(d), "loss": float(lo)}
                        for s, m, d, lo in zip(steps, llc, std, loss)],
        "stages": [s.to_dict() for s in stages],
        "stage_kinds": [s.kind for s in stages],
        "excluded_checkpoints": [int(s) for s, v in zip(steps, mask) if not v],
        "excluded_from_stages": stages.excluded,
        "stage_flag_policy": policy,
        "stage_boundaries": [b.to_dict() for b in stages.boundaries],
        "essential_dynamics": None if ed is None else {k: v for k, v in ed.to_dict().items() if k != "scores"},
        "stages_vs_essential_dynamics": stages.agreement,
        "analysis_wall_time_s": time.perf_counter() - t0,
    }
    return summary


def plot_extra(rows: list[dict], series: dict[str, str], steps: np.ndarray, llc: np.ndarray, std: np.ndarray,
               valid: np.ndarray, stages: Sequence[Any], path: Path) -> None:
    """LLC (top; valid estimates, excluded checkpoints marked on the axis) and training metrics (bottom panels) on a
    shared log-step axis, stages shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1 + len(series), 1, figsize=(7.5, 2.6 * (1 + len(series))), sharex=True)
    ax = axes[0]
    s, m, d = steps[valid], llc[valid], std[valid]
    ax.fill_between(s, m - d, m + d, alpha=0.25, color="C0", lw=0)
    ax.plot(s, m, "o-", ms=3, color="C0", label="λ̂ (mean ± std over chains)")
    if (~valid).any():
        ax.plot(steps[~valid], np.full((~valid).sum(), m.min() if len(m) else 0.0), "x", color="C3", ms=5,
                label="excluded: λ̂ ≤ 0 (not near a minimum)")
    ax.set_ylabel("LLC λ̂")
    ax.legend(loc="best", fontsize=8)
    row_steps = np.array([r["step"] for r in rows])
    for a, (col, label) in zip(axes[1:], series.items()):
        vals = np.array([r[col] for r in rows])
        a.plot(row_steps, vals, "o-", ms=3, color="C1")
        a.set_ylabel(label)
        if "loss" in col and np.all(vals > 0) and vals.max() / vals.min() > 100:
            a.set_yscale("log")
    for a in axes:
        for k, s in enumerate(stages):
            colour = {"A": "tab:green", "B": "tab:purple"}.get(s.kind, "0.7")
            a.axvspan(max(s.start, steps.min()), s.end, color=colour, alpha=0.08 if k % 2 else 0.15, lw=0)
        a.set_xscale("log")
        a.grid(alpha=0.3, which="both", lw=0.4)
    for s in stages:
        axes[0].text(np.sqrt(max(s.start, steps.min()) * s.end), axes[0].get_ylim()[1], s.kind, ha="center",
                     va="top", fontsize=10, fontweight="bold")
    axes[-1].set_xlabel("training step")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def report(out: Path, title: str, intro: str, summary: dict, extra_sections: Sequence[str] = ()) -> None:
    """Markdown report: intro, extra sections, detected stages, exclusions, figures."""
    lines = [f"# {title}", "", intro, "", *extra_sections, "## Detected stages", "",
             "| start | end | type | Δλ̂ | Δloss | confidence |", "|---|---|---|---|---|---|"]
    for s in summary["stages"]:
        lines.append(f"| {s['start']:g} | {s['end']:g} | {s['kind']} | {s['delta_llc']:+.2f} | "
                     f"{s['delta_loss']:+.3g} | {s['confidence']:.2f} |")
    if summary["excluded_checkpoints"]:
        lines += ["", "Excluded from stage detection (λ̂ ≤ 0: w* not near a local minimum of the loss): steps "
                  f"{summary['excluded_checkpoints']}."]
    lines += ["", "![stages](figures/stages.png)", ""]
    if (out / "figures" / "llc_and_metrics.png").exists():
        lines += ["![llc and metrics](figures/llc_and_metrics.png)", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def study_main(doc: str, name: str, full: Any, quick: Any, run: Callable[..., dict], show: Sequence[str],
               argv: list[str] | None = None) -> int:
    """The command line shared by the studies: --quick, --out, --no-wandb; prints the summary keys in ``show``."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke test (< 1 min)")
    p.add_argument("--out", type=Path, default=None, help=f"output directory (default runs/{name}[-quick])")
    p.add_argument("--no-wandb", action="store_true", help="do not log to W&B (offline by default)")
    args = p.parse_args(argv)
    out = args.out or Path("runs") / (f"{name}-quick" if args.quick else name)
    summary = run(quick if args.quick else full, out, use_wandb=not args.no_wandb)
    print(json.dumps({k: summary[k] for k in show}, indent=1))
    print(f"report: {out / 'report.md'}")
    return 0
