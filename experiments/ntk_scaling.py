"""Data scaling: a network vs kernel regression with its eNTK (at initialisation and frozen mid-training).

Teacher-student task: x ~ N(0, I_d), y = f*(x) + ε with f* a random two-unit tanh network (a low-dimensional
target, the setting where feature learning should pay) and ε ~ N(0, σ²). For n on a log grid and several seeds
(= data draws), we compare on a common test set:

* **network**: the student MLP, from one fixed initialisation, trained full-batch with Adam on the n samples
  (test loss at the step of best validation loss);
* **eNTK(step s)**: :func:`slt_tools.geometry.kernel_regression` (traced eNTK, Cholesky, no f₀ offset) with the
  kernel of the student frozen at step s of a training run on the largest n (s = 0 is the initial kernel) — the
  protocol of Vyas et al. 2022 ("Limitations of the NTK for Understanding Generalization in Deep Learning"), whose
  kernels are frozen from a run on the full training set. The ridge is chosen per (kernel, n) from a grid on a
  held-out validation set (relative to the kernel's mean diagonal).

Scaling exponents α from log L_test = c − α log n: OLS on the seed means, with the uncertainty a bootstrap over
seeds (resample seeds per n, refit) and the OLS standard error beside it.

    python experiments/ntk_scaling.py            # quick (< 5 min on one CPU core)
    python experiments/ntk_scaling.py --full     # larger n grid, more seeds
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slt_tools.geometry import empirical_ntk, kernel_gap, kernel_regression

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Config:
    d: int = 16
    width: int = 128
    noise: float = 0.05
    ns: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    seeds: int = 3
    n_val: int = 500
    n_test: int = 1000
    steps: int = 1500
    lr: float = 3e-3
    freeze_at: tuple[int, ...] = (0, 100, 400, 1500)
    ridges: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def teacher(d: int, seed: int = 123) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, 2), nn.Tanh(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(2 * torch.randn(2, d, generator=g) / d ** 0.5)
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
        net[2].bias.zero_()
    return net


def sample(cfg: Config, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.d, generator=g)
    with torch.no_grad():
        y = teacher(cfg.d)(x) + cfg.noise * torch.randn(n, 1, generator=g)
    return x, y


def student(cfg: Config) -> nn.Module:
    torch.manual_seed(0)  # one initialisation for every n and seed: only the data vary
    return nn.Sequential(nn.Linear(cfg.d, cfg.width), nn.ReLU(), nn.Linear(cfg.width, cfg.width), nn.ReLU(),
                         nn.Linear(cfg.width, 1))


def train(cfg: Config, data: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
          test: tuple[torch.Tensor, torch.Tensor], keep: tuple[int, ...] = ()) -> tuple[float, dict[int, dict]]:
    """Full-batch Adam; returns (test loss at the best-validation step, {step: state dict} for ``keep``)."""
    net = student(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    best_val, best_test, saved = float("inf"), float("nan"), {}
    for step in range(cfg.steps + 1):
        if step in keep:
            saved[step] = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if step % 25 == 0 or step == cfg.steps:
            with torch.no_grad():
                v, t = F.mse_loss(net(val[0]), val[1]).item(), F.mse_loss(net(test[0]), test[1]).item()
            if v < best_val:
                best_val, best_test = v, t
        if step == cfg.steps:
            break
        opt.zero_grad()
        F.mse_loss(net(data[0]), data[1]).backward()
        opt.step()
    return best_test, saved


def kernel_loss(cfg: Config, net: nn.Module, data: tuple, val: tuple, test: tuple, scale: float
                ) -> tuple[float, float]:
    """(test loss, chosen relative ridge) of eNTK regression with the ridge tuned on the validation set."""
    best = (float("inf"), float("nan"), float("nan"))
    for r in cfg.ridges:
        kw = {"ridge": r * scale, "kernel": "traced", "solver": "cholesky", "offset": False}
        v = kernel_regression(net, data, val, **kw).test_loss
        if v < best[0]:
            best = (v, r, kernel_regression(net, data, test, **kw).test_loss)
    return best[2], best[1]


def fit_exponent(ns: np.ndarray, losses: np.ndarray, n_boot: int = 500, seed: int = 0) -> dict[str, float]:
    """α of log L = c − α log n (losses: (len(ns), seeds)); OLS on seed means, bootstrap over seeds, OLS SE."""
    from scipy import stats

    lx = np.log(ns)
    fit = stats.linregress(lx, np.log(losses.mean(1)))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, losses.shape[1], size=losses.shape)
        boots.append(-stats.linregress(lx, np.log(np.take_along_axis(losses, idx, 1).mean(1))).slope)
    return {"alpha": float(-fit.slope), "alpha_boot_std": float(np.std(boots)), "alpha_ols_se": float(fit.stderr)}


def run(cfg: Config) -> dict:
    torch.set_num_threads(1)
    val, test = sample(cfg, cfg.n_val, 10_001), sample(cfg, cfg.n_test, 10_002)
    big = sample(cfg, max(cfg.ns), 0)
    _, frozen = train(cfg, big, val, test, keep=cfg.freeze_at)
    nets = {}
    for s in cfg.freeze_at:
        nets[s] = student(cfg)
        nets[s].load_state_dict(frozen[s])
        nets[s].eval()
    scales = {s: float(empirical_ntk(nets[s], big[0][:256], trace_outputs=True).diagonal().mean()) for s in nets}
    methods = ["network"] + [f"entk@{s}" for s in cfg.freeze_at]
    losses = {m: np.zeros((len(cfg.ns), cfg.seeds)) for m in methods}
    ridge_used = {m: [] for m in methods[1:]}
    for i, n in enumerate(cfg.ns):
        for seed in range(cfg.seeds):
            data = sample(cfg, n, seed)
            losses["network"][i, seed] = train(cfg, data, val, test)[0]
            for s in cfg.freeze_at:
                loss, r = kernel_loss(cfg, nets[s], data, val, test, scales[s])
                losses[f"entk@{s}"][i, seed] = loss
                ridge_used[f"entk@{s}"].append(r)
        print(f"n={n}: " + ", ".join(f"{m} {losses[m][i].mean():.4g}" for m in methods), flush=True)
    ns = np.array(cfg.ns, dtype=float)
    gap = kernel_gap([frozen[s] for s in cfg.freeze_at], lambda: student(cfg), big, test, steps=cfg.freeze_at,
                     ridge=1e-2 * float(np.median(list(scales.values()))), kernel="traced", offset=False)
    return {"kernel_gap": {"steps": gap.steps.tolist(), "kernel_loss": gap.kernel_loss.tolist(),
                           "network_loss": gap.network_loss.tolist(), "gap": gap.gap.tolist()},
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()},
            "noise_floor": cfg.noise ** 2, "losses": {m: v.tolist() for m, v in losses.items()},
            "exponents": {m: fit_exponent(ns, v) for m, v in losses.items()},
            "ridges_chosen": ridge_used}


def figure(res: dict, path: Path) -> None:
    from slt_tools.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ns = np.array(res["config"]["ns"], dtype=float)
    for m, v in res["losses"].items():
        v = np.array(v)
        e = res["exponents"][m]
        label = f"{m}: α = {e['alpha']:.2f} (boot ±{e['alpha_boot_std']:.2f}, SE {e['alpha_ols_se']:.2f})"
        line = ax.errorbar(ns, v.mean(1), yerr=v.std(1), marker="o", capsize=2, label=label)
        ax.plot(ns, np.exp(np.polyfit(np.log(ns), np.log(v.mean(1)), 1)[1]) * ns ** -e["alpha"], "--",
                color=line[0].get_color(), lw=0.8)
    ax.axhline(res["noise_floor"], color="grey", lw=0.8, ls=":", label="noise floor σ²")
    ax.set(xscale="log", yscale="log", xlabel="training samples n", ylabel="test MSE",
           title="network vs frozen-eNTK kernel regression")
    ax.legend(fontsize=7)
    _save(fig, path)


def log_wandb(res: dict, figures: list[Path], mode: str | None = None, dir: Path | None = None) -> None:
    """Losses per n (x-axis ``data/n``), the kernel gap per step (``train/step``), exponents in the summary and the
    figures, through :class:`slt_tools.logging.WandbLogger` (offline unless W&B is configured)."""
    from slt_tools.logging import WandbLogger

    logger = WandbLogger(name="ntk_scaling", config=res["config"], mode=mode, dir=dir)
    run = logger.run
    if run is None:
        return
    run.define_metric("scaling/*", step_metric="data/n")
    run.define_metric("kernel_gap/*", step_metric="train/step")
    for i, n in enumerate(res["config"]["ns"]):
        run.log({"data/n": n, **{f"scaling/{m}": float(np.mean(v[i])) for m, v in res["losses"].items()}})
    g = res["kernel_gap"]
    for j, step in enumerate(g["steps"]):
        run.log({"train/step": step, "kernel_gap/kernel_loss": g["kernel_loss"][j],
                 "kernel_gap/network_loss": g["network_loss"][j], "kernel_gap/gap": g["gap"][j]})
    for m, e in res["exponents"].items():
        for k, v in e.items():
            run.summary[f"exponent/{m}/{k}"] = v
    import wandb

    run.log({f"figures/{f.stem}": wandb.Image(str(f)) for f in figures if f.exists()})
    logger.finish()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--full", action="store_true", help="n up to 4096, 5 seeds")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--fig", type=Path, default=None)
    p.add_argument("--wandb", action="store_true", help="log losses, kernel gap, exponents and figures to W&B")
    args = p.parse_args(argv)
    cfg = Config(ns=(32, 64, 128, 256, 512, 1024, 2048, 4096), seeds=5) if args.full else Config()
    tag = "full" if args.full else "quick"
    t0 = time.perf_counter()
    res = run(cfg)
    res["wall_s"] = time.perf_counter() - t0
    out = args.out or ROOT / "experiments" / "results" / f"ntk_scaling_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    fig_path = args.fig or ROOT / "docs" / "figures" / f"ntk_scaling_{tag}.png"
    figure(res, fig_path)
    from slt_tools.geometry import KernelGap
    from slt_tools.plots import plot_kernel_gap

    g = res["kernel_gap"]
    plot_kernel_gap(KernelGap(np.array(g["steps"]), np.array(g["kernel_loss"]), np.array(g["network_loss"]), None,
                              None), path=ROOT / "docs" / "figures" / f"ntk_kernel_gap_{tag}.png",
                    title=f"Kernel gap over training (n = {max(cfg.ns)})")
    if args.wandb:
        log_wandb(res, [fig_path, ROOT / "docs" / "figures" / f"ntk_kernel_gap_{tag}.png"])
    print(json.dumps(res["exponents"], indent=1), f"\nwall {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
