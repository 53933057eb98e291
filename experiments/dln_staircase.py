"""Study: the saddle-to-saddle staircase of a deep linear network, seen by the LLC.

A bottleneck DLN with widths (10, 4, 4, 4, 10), trained by SGD from small initialisation on a noise-free rank-4 teacher
with distinct singular values, learns one singular direction at a time: the loss plateaus and drops, and the learned
rank r steps 0 → 1 → 2 → 3 → 4. The LLC should step up towards Aoyagi's closed-form λ(r) = 6, 13, 39/2, 26, 32 for the
rank learned so far, and every stage should be type A (loss falls, LLC rises).

Pipeline (each step resumable): train → log-spaced safetensors checkpoints → LLC trajectory (results store) →
stage detection → figures, W&B offline run, Markdown report, summary JSON.

    python experiments/dln_staircase.py [--quick] [--out runs/dln_staircase] [--no-wandb]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import slt_tools as slt
from slt_tools.models import DeepLinearNetwork
from slt_tools.theory import dln_learning_coefficient


@dataclass(frozen=True)
class StaircaseConfig:
    widths: tuple[int, ...] = (10, 4, 4, 4, 10)
    singular_values: tuple[float, ...] = (10.0, 5.0, 2.5, 1.25)
    num_samples: int = 2000
    batch_size: int = 100
    init_scale: float = 0.06
    train_lr: float = 0.02
    train_steps: int = 60000
    num_checkpoints: int = 40
    seed: int = 0
    llc: dict = field(default_factory=lambda: dict(num_chains=8, num_draws=1000, num_burnin_steps=500, lr=3e-4,
                                                   localization=100.0, seed=0))


QUICK = StaircaseConfig(num_checkpoints=18, llc=dict(num_chains=4, num_draws=400, num_burnin_steps=300, lr=3e-4,
                                                      localization=100.0, seed=0))


def make_teacher(cfg: StaircaseConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise-free data y = T x with T = U diag(s) Vᵀ of rank len(s); returns (T, X, Y)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    d_in, d_out = cfg.widths[0], cfg.widths[-1]
    u, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen))
    r = len(cfg.singular_values)
    teacher = u[:, :r] @ torch.diag(torch.tensor(cfg.singular_values)) @ v[:, :r].T
    x = torch.randn(cfg.num_samples, d_in, generator=gen)
    return teacher, x, x @ teacher.T


def mse_loss(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def checkpoint_steps(cfg: StaircaseConfig) -> list[int]:
    return sorted(set(np.unique(np.geomspace(10, cfg.train_steps, cfg.num_checkpoints).astype(int)).tolist()))


def learned_rank(model: DeepLinearNetwork, cfg: StaircaseConfig) -> int:
    """Number of teacher directions learned: singular values of the product above half the teacher's."""
    sv = torch.linalg.svdvals(model.product().detach())[: len(cfg.singular_values)]
    return int(sum(float(a) > 0.5 * b for a, b in zip(sv, cfg.singular_values)))


def train(cfg: StaircaseConfig, out: Path) -> list[dict]:
    """SGD from small initialisation; saves safetensors checkpoints at log-spaced steps (skipped if present)."""
    ckpt_dir = out / "checkpoints"
    log_path = out / "train_log.csv"
    steps = checkpoint_steps(cfg)
    if log_path.exists() and all((ckpt_dir / f"step_{s:07d}.safetensors").exists() for s in steps):
        with open(log_path) as f:
            return [{k: float(v) if k != "step" else int(v) for k, v in row.items()} for row in csv.DictReader(f)]
    torch.manual_seed(cfg.seed)
    _, x, y = make_teacher(cfg)
    model = DeepLinearNetwork(cfg.widths, init_scale=cfg.init_scale)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train_lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    rows, wanted = [], set(steps)
    for step in range(1, cfg.train_steps + 1):
        idx = torch.randint(0, cfg.num_samples, (cfg.batch_size,), generator=gen)
        loss = F.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in wanted:
            with torch.no_grad():
                full = float(F.mse_loss(model(x), y))
            slt.save_checkpoint(ckpt_dir / f"step_{step:07d}.safetensors", model, step=step)
            rows.append({"step": step, "train_loss": full, "learned_rank": learned_rank(model, cfg)})
    tmp = log_path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(log_path)
    return rows


def plateau_table(traj, train_rows: list[dict], cfg: StaircaseConfig) -> list[dict]:
    """Median λ̂ over the checkpoints of each learned rank (valid estimates only) vs Aoyagi's λ(r)."""
    rank_at = {row["step"]: int(row["learned_rank"]) for row in train_rows}
    table = []
    for r in range(len(cfg.singular_values) + 1):
        vals = [m for s, m in zip(traj.steps, traj.llc_mean) if rank_at.get(int(s)) == r and m > 0]
        truth = float(dln_learning_coefficient(cfg.widths, r)[0])
        if vals:
            est = float(np.median(vals))
            table.append({"rank": r, "truth": truth, "llc_median": est, "rel_error": (est - truth) / truth,
                          "num_checkpoints": len(vals)})
        else:
            table.append({"rank": r, "truth": truth, "llc_median": None, "rel_error": None, "num_checkpoints": 0})
    return table


def run(cfg: StaircaseConfig, out: Path, use_wandb: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[1/4] training DLN {cfg.widths} for {cfg.train_steps} SGD steps", flush=True)
    rows = train(cfg, out)
    _, x, y = make_teacher(cfg)
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size, shuffle=True)
    logger = slt.WandbLogger(project="slt_tools-studies", name=f"dln_staircase{'-quick' if cfg == QUICK else ''}",
                             config=asdict(cfg), save_dir=out / "figures") if use_wandb else None
    print(f"[2/4] LLC at {len(rows)} checkpoints (resumable store {out / 'llc.jsonl'})", flush=True)
    traj = slt.llc_trajectory(out / "checkpoints", lambda: DeepLinearNetwork(cfg.widths), loader, mse_loss,
                              results=out / "llc.jsonl", logger=logger, on_divergence="exclude", **cfg.llc)
    print("[3/4] detecting stages", flush=True)
    valid = np.asarray(traj.llc_mean) > 0
    stages = slt.detect_stages(np.asarray(traj.steps)[valid], np.asarray(traj.llc_mean)[valid],
                               loss=np.asarray(traj.loss)[valid], llc_std=np.asarray(traj.llc_std)[valid])
    table = plateau_table(traj, rows, cfg)
    print("[4/4] figures, report", flush=True)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    from slt_tools.plots import plot_stages

    plot_stages(np.asarray(traj.steps)[valid], np.asarray(traj.llc_mean)[valid],
                llc_std=np.asarray(traj.llc_std)[valid], loss=np.asarray(traj.loss)[valid], stages=stages,
                path=figures / "stages.png")
    if logger is not None:
        logger.log_stages(stages, traj)
        logger.finish()
    summary = {
        "config": asdict(cfg),
        "stages": [s.to_dict() for s in stages],
        "num_type_A": sum(s.kind == "A" for s in stages),
        "plateaus": table,
        "excluded_checkpoints": [int(s) for s, v in zip(traj.steps, valid) if not v],
        "wall_time_s": time.perf_counter() - t0,
    }
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")
    write_report(summary, out)
    return summary


def write_report(summary: dict, out: Path) -> None:
    lines = ["# DLN staircase study", "",
             f"Widths {tuple(summary['config']['widths'])}, teacher singular values "
             f"{tuple(summary['config']['singular_values'])}, {summary['config']['train_steps']} SGD steps.", "",
             "## LLC on each plateau vs Aoyagi's closed form", "", "| learned rank | λ(r) | median λ̂ | rel. error | checkpoints |",
             "|---|---|---|---|---|"]
    for row in summary["plateaus"]:
        est = "—" if row["llc_median"] is None else f"{row['llc_median']:.2f}"
        rel = "—" if row["rel_error"] is None else f"{100 * row['rel_error']:+.1f}%"
        lines.append(f"| {row['rank']} | {row['truth']:g} | {est} | {rel} | {row['num_checkpoints']} |")
    lines += ["", "## Detected stages", "", "| start | end | type | Δλ̂ | Δloss | confidence |", "|---|---|---|---|---|---|"]
    for s in summary["stages"]:
        lines.append(f"| {s['start']:g} | {s['end']:g} | {s['kind']} | {s['delta_llc']:+.2f} | "
                     f"{s['delta_loss']:+.3g} | {s['confidence']:.2f} |")
    if summary["excluded_checkpoints"]:
        lines += ["", f"Checkpoints with λ̂ ≤ 0 (w* not near a local minimum of the loss: mid-transition or on the "
                  f"initial plateau) are excluded from stage detection: steps {summary['excluded_checkpoints']}."]
    lines += ["", "![stages](figures/stages.png)", "", f"Wall time: {summary['wall_time_s']:.0f} s."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke test (< 1 min)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/dln_staircase[-quick])")
    p.add_argument("--no-wandb", action="store_true", help="do not log to W&B (offline by default)")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else StaircaseConfig()
    out = args.out or Path("runs") / ("dln_staircase-quick" if args.quick else "dln_staircase")
    summary = run(cfg, out, use_wandb=not args.no_wandb)
    print(json.dumps({k: summary[k] for k in ("num_type_A", "plateaus")}, indent=1))
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
