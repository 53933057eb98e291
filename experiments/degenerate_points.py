"""Issue 16 item 6: LLC estimators at highly degenerate points (deep linear networks with every layer rank-cut), and
the healthy-point check; item 7's steep potentials are measured by ``--phase steep``.

    OMP_NUM_THREADS=1 python experiments/degenerate_points.py --phase points|healthy|detector|steep|all
        [--points deg_a,deg_b] [--methods sgld_calibrated,...] [--out experiments/results/degenerate_points.json]

Points (noise-free data, w* = the teacher, every layer of rank r: the deepest stratum, where the local λ equals
Aoyagi's global λ, ``slt_tools.theory.dln_learning_coefficient``): ``deg_a`` = DLN (4,4,4,4), r = 1, n = 10⁴,
λ = 13/2; ``deg_b`` = DLN (6,6,6,6,6), r = 2, n = 5·10⁴, λ = 15 (the construction of ``calibration_study.py``).
γ = 1 and nβ = n/log n throughout (the settings the self-calibrating path chose there). Methods:

* ``sgld_calibrated``: SGLD at the step the self-calibrating path chose (calibration_study.json), 2000 draws — before;
* ``sgld_long``: the same step, 8× the steps (is it slow relaxation?);
* ``rmsprop_sgld``: RMSProp-SGLD (α = 0.99, δ = 0.1), ε = calibrated/10 (G ≈ 1/δ = 10 at w*), 8× the steps;
* ``uld``: underdamped Langevin with :func:`slt_tools.sampling.degenerate.uld_settings` (the proposal);
* ``uld_capped``: the same, capped at 30 000 steps (``deg_b``: the full run takes ~10⁵ steps); ``uld_capped_b<m>``
  the same with the data re-batched to batch size m (less minibatch heating);
* ``uld_exact_gradient``: the same rule and settings on the exact full-data potential (closed form for a DLN with
  squared error: no minibatch noise) — separates the sampler's dynamics from SGHMC's minibatch heating;
  ``uld_exact_gradient_b<m>``: the same with Σ_B of m fresh rows per step (minibatch noise of batch size m);
* ``uld_gamma10``: the same at γ = 10 (does a larger γ swamp the degenerate directions?);
* ``uld_slope``: the multi-temperature slope of E_t[L_n − L_n(w*)] against 1/t over t = nβ·{½, 1, 2} (ULD chains).

Healthy check: ULD with the same rule on the reference suite's points (``llc_reference_suite.py``) against their HMC
gold (``experiments/results/llc_reference_suite.json``). Detector: :func:`degeneracy_check` on healthy and degenerate
points, seeds 0–4 (false-positive and detection rates). Results are merged into the output file after every row.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import slt_tools as slt
from slt_tools.models import DeepLinearNetwork
from slt_tools.sampling.degenerate import degeneracy_check, estimate_llc_degenerate, top_curvature, uld_settings
from slt_tools.theory import dln_jacobian_rank_llc, dln_learning_coefficient, numerical_rank

sys.path.insert(0, str(Path(__file__).parent))
RESULTS = Path(__file__).parent / "results"
POINTS = {"deg_a": ((4, 4, 4, 4), 1, 10_000, 1.5241579027587259e-06),  # calibrated SGLD ε (calibration_study.json)
          "deg_b": ((6, 6, 6, 6, 6), 2, 50_000, 1.6935087808430286e-07)}
HEALTHY = ("dln_a_n1000", "dln_b_n1000", "relu_n1000", "tanh_n1000", "dln_a_n10000")


def mse(m: Any, b: Any) -> torch.Tensor:
    return F.mse_loss(m(b[0]), b[1])


def degenerate_point(widths: tuple[int, ...], rank: int, n: int, seed: int = 0) -> tuple[DeepLinearNetwork, DataLoader]:
    """Every layer W_i = A_i B_i / √r with A_i, B_i standard normal (rank r), x ~ N(0, I), y = model(x)."""
    gen = torch.Generator().manual_seed(seed)
    model = DeepLinearNetwork(widths)
    with torch.no_grad():
        for layer in model.layers:
            o, i = layer.weight.shape
            layer.weight.copy_(torch.randn(o, rank, generator=gen) @ torch.randn(rank, i, generator=gen)
                               / math.sqrt(rank))
    x = torch.randn(n, widths[0], generator=gen)
    with torch.no_grad():
        y = model(x)
    return model, DataLoader(TensorDataset(x, y), batch_size=500, shuffle=True)


def stratum(model: DeepLinearNetwork, loader: DataLoader) -> dict[str, Any]:
    """Layer ranks, rank of the end-to-end matrix, rank(J)/2 and rank(∇²L_n)/2 at w* (float32 tolerances)."""
    ws = [layer.weight.detach().double().numpy() for layer in model.layers]
    eps = float(np.finfo(np.float32).eps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        half_rank_j = float(dln_jacobian_rank_llc([layer.weight.detach() for layer in model.layers]))
    from slt_tools.geometry.hessian import HessianOperator

    op = HessianOperator(model, loader, mse, num_batches=4)
    hess = torch.stack([op(e) for e in torch.eye(op.dim)]).double()
    ev = torch.linalg.eigvalsh(0.5 * (hess + hess.T))
    rank_h = int((ev > 1e-5 * ev[-1]).sum())
    return {"layer_ranks": [numerical_rank(w, eps) for w in ws], "product_rank": numerical_rank(
        np.linalg.multi_dot(ws[::-1]), eps), "half_rank_J": half_rank_j, "half_rank_hessian": rank_h / 2,
        "not_morse_bott_warning": any("not Morse" in str(w.message) for w in caught),
        "hessian_lambda_max": float(ev[-1])}


def _row(point: str, method: str, res: Any, truth: float, wall: float, **extra: Any) -> dict[str, Any]:
    return {"point": point, "method": method, "llc": float(res.llc_mean), "sem": float(res.llc_sem), "truth": truth,
            "rel_error": (float(res.llc_mean) - truth) / truth, "wall_s": wall, **extra}


def run_sgld(model, loader, lr, steps, sampler="sgld", chains=8, localization=1.0, seed=0):
    burn = steps // 5
    return slt.estimate_llc(model, loader, mse, lr=lr, localization=localization, num_chains=chains,
                            num_draws=steps - burn, num_burnin_steps=burn, sampler=sampler, seed=seed)


def slope_fit(model, loader, nbeta: float, chains: int, **kw) -> dict[str, Any]:
    """E_t[K] at t = nβ·{½, 1, 2} by ULD; least-squares slope of E_t[K] against 1/t (K = L − L_n(w*))."""
    ts, ek, se = [], [], []
    curv = top_curvature(model, loader, mse)
    for f in (0.5, 1.0, 2.0):
        res = estimate_llc_degenerate(model, loader, mse, nbeta=nbeta * f, num_chains=chains, curvature=curv, **kw)
        ts.append(nbeta * f)
        ek.append(res.llc_mean / (nbeta * f))
        se.append(res.llc_sem / (nbeta * f))
    inv = 1.0 / np.array(ts)
    A = np.stack([inv, np.ones_like(inv)], 1)
    coef, *_ = np.linalg.lstsq(A, np.array(ek), rcond=None)
    cov = np.linalg.pinv(A.T @ A) @ A.T @ np.diag(np.array(se) ** 2) @ A @ np.linalg.pinv(A.T @ A)
    return {"slope": float(coef[0]), "slope_se": float(math.sqrt(cov[0, 0])), "intercept": float(coef[1]),
            "llc_by_nbeta": {f"{t:.1f}": e * t for t, e in zip(ts, ek)}}


def exact_gradient_uld(model: DeepLinearNetwork, loader: DataLoader, chains: int, seed: int = 0,
                       batch: int | None = None, **uld_kwargs: Any) -> dict[str, Any]:
    """The ``uld`` rule (registry update, :func:`uld_settings`' ε, ζ and lengths) on the DLN's exact full-data
    potential: L_n(w) = tr(Δ Σ̂ Δᵀ)/H_L with Δ = W_L⋯W_1 − P*, Σ̂ = XᵀX/n (mean-squared error, noise-free y = P*x) —
    the sampler's dynamics without minibatch noise, float64, chains batched. With ``batch`` = m the gradient uses
    Σ_B = X_Bᵀ X_B/m of m rows drawn afresh each step (shared by the chains, as in the library): the same potential
    with minibatch noise of batch size m, to measure the heating against m."""
    from slt_tools.sampling.rules import RULES

    x = loader.dataset.tensors[0].double()
    sigma = x.T @ x / x.shape[0]
    shapes = [tuple(layer.weight.shape) for layer in model.layers]
    theta0 = torch.cat([layer.weight.detach().double().reshape(-1) for layer in model.layers])

    def product(theta: torch.Tensor) -> torch.Tensor:
        out, i = None, 0
        for o, k in shapes:
            w = theta[:, i:i + o * k].reshape(-1, o, k)
            i += o * k
            out = w if out is None else w @ out
        return out

    p_star = product(theta0[None])[0]

    def loss_grad(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cov = sigma
        if batch is not None:
            rows = x[torch.randint(0, x.shape[0], (batch,), generator=gen)]
            cov = rows.T @ rows / batch
        theta = theta.detach().requires_grad_(True)
        d = product(theta) - p_star
        loss = torch.einsum("cij,jk,cik->c", d, cov, d) / shapes[-1][0]
        return loss.detach(), torch.autograd.grad(loss.sum(), theta)[0]

    cfg = uld_settings(model, loader, mse, **uld_kwargs)
    hp = {"lr": cfg["lr"], "nbeta": cfg["nbeta"], "localization": cfg["localization"], **cfg["sampler_kwargs"]}
    gen = torch.Generator().manual_seed(seed)
    theta = theta0.expand(chains, -1).clone()
    rule = RULES["uld"]
    state = rule.init(theta, torch.randn(theta.shape, generator=gen, dtype=torch.float64), hp)
    total, trace = cfg["num_burnin_steps"] + cfg["num_draws"], []
    for t in range(total):
        loss, grad = loss_grad(theta)
        if t >= cfg["num_burnin_steps"]:
            trace.append(loss)
        theta, state = rule.update(theta, theta0, grad, torch.randn(theta.shape, generator=gen,
                                                                     dtype=torch.float64), state, hp)
    per_chain = cfg["nbeta"] * torch.stack(trace, 1).mean(1)
    return {"llc": float(per_chain.mean()), "sem": float(per_chain.std() / math.sqrt(chains)), "lr": cfg["lr"],
            "num_burnin_steps": cfg["num_burnin_steps"], "num_draws": cfg["num_draws"],
            "sampler_kwargs": cfg["sampler_kwargs"]}


def point_methods(name: str, methods: list[str], out: dict) -> None:
    widths, rank, n, lr = POINTS[name]
    model, loader = degenerate_point(widths, rank, n)
    truth = float(dln_learning_coefficient(widths, rank)[0])
    nbeta = n / math.log(n)
    out.setdefault("strata", {})[name] = stratum(model, loader)
    chains = 16
    for method in methods:
        t0 = time.perf_counter()
        extra: dict[str, Any] = {}
        if method == "sgld_calibrated":
            res = run_sgld(model, loader, lr, 2500, chains=4)
            extra = {"lr": lr, "steps": 2500, "chains": 4}
        elif method == "sgld_long":
            res = run_sgld(model, loader, lr, 20_000, chains=chains)
            extra = {"lr": lr, "steps": 20_000, "diffusion_time": lr * 20_000}
        elif method == "rmsprop_sgld":
            res = run_sgld(model, loader, lr / 10, 20_000, sampler="rmsprop_sgld", chains=chains)
            extra = {"lr": lr / 10, "steps": 20_000}
        elif method in ("uld", "uld_gamma10"):
            gamma = 10.0 if method == "uld_gamma10" else 1.0
            cfg = uld_settings(model, loader, mse, localization=gamma, draw_time=6.0 if name == "deg_a" else 3.0)
            res = estimate_llc_degenerate(model, loader, mse, num_chains=chains, settings=cfg)
            extra = {k: cfg[k] for k in ("lr", "num_burnin_steps", "num_draws", "sampler_kwargs", "localization")}
        elif method.startswith("uld_exact_gradient"):
            batch = int(method.split("_b")[-1]) if "_b" in method else None
            fit = exact_gradient_uld(model, loader, chains, batch=batch, draw_time=6.0 if name == "deg_a" else 3.0)
            llc = fit.pop("llc")
            _emit(out, "points", {"point": name, "method": method, "llc": llc, "sem": fit.pop("sem"), "truth": truth,
                                  "rel_error": (llc - truth) / truth, "wall_s": time.perf_counter() - t0, **fit})
            continue
        elif method.startswith("uld_capped"):
            batch = int(method.split("_b")[-1]) if "_b" in method else None
            cfg = uld_settings(model, loader, mse, localization=1.0, draw_time=3.0, max_steps=30_000)
            res = estimate_llc_degenerate(model, loader, mse, num_chains=chains, settings=cfg, batch_size=batch)
            extra["batch_size"] = batch or loader.batch_size
            extra.update({k: cfg[k] for k in ("lr", "num_burnin_steps", "num_draws", "sampler_kwargs",
                                               "localization")})
        elif method == "uld_slope":
            fit = slope_fit(model, loader, nbeta, chains, draw_time=4.0 if name == "deg_a" else 2.0,
                            burnin_time=3.0)
            wall = time.perf_counter() - t0
            row = {"point": name, "method": method, "llc": fit["slope"], "sem": fit["slope_se"], "truth": truth,
                   "rel_error": (fit["slope"] - truth) / truth, "wall_s": wall, **fit}
            _emit(out, "points", row)
            continue
        else:
            raise ValueError(f"unknown method {method}")
        _emit(out, "points", _row(name, method, res, truth, time.perf_counter() - t0, **extra))


def healthy(names: list[str], out: dict) -> None:
    from llc_reference_suite import build_cases

    gold = {r["case"]: r for r in json.loads((RESULTS / "llc_reference_suite.json").read_text())["rows"]}
    for name in names:
        case = build_cases()[name]()
        t0 = time.perf_counter()
        cfg = uld_settings(case.model, case.loader(), case.loss_fn, nbeta=gold[name]["nbeta"],
                           localization=gold[name]["localization"])
        res = estimate_llc_degenerate(case.model, case.loader(), case.loss_fn, num_chains=8, settings=cfg)
        ref = gold[name]["gold"]
        _emit(out, "healthy", {"case": name, "method": "uld", "llc": res.llc_mean, "sem": res.llc_sem, "gold": ref,
                               "gold_sem": gold[name]["gold_sem"], "gold_source": gold[name]["gold_source"],
                               "rel_error": (res.llc_mean - ref) / ref, "wall_s": time.perf_counter() - t0,
                               "lr": cfg["lr"], "steps": cfg["num_burnin_steps"] + cfg["num_draws"]})


def detector(seeds: list[int], out: dict, which: str) -> None:
    """SGLD at the step the default path chose (healthy: reference suite; degenerate: calibration study), 4 chains ×
    (300 burn-in + 1200 draws), then :func:`degeneracy_check` with the same seed."""
    from llc_reference_suite import build_cases

    gold = {r["case"]: r for r in json.loads((RESULTS / "llc_reference_suite.json").read_text())["rows"]}
    cases: list[tuple[str, Callable[[], tuple[Any, Any, Any]], float, bool]] = []
    if which in ("healthy", "all"):
        for name in HEALTHY[:4]:
            cases.append((name, lambda name=name: (lambda c: (c.model, c.loader(), c.loss_fn))(build_cases()[name]()),
                          gold[name]["default_lr"], False))
    if which in ("degenerate", "all"):
        for name, (widths, rank, n, lr) in POINTS.items():
            cases.append((name, lambda w=widths, r=rank, n=n: (*degenerate_point(w, r, n), mse), lr, True))
    for name, build, lr, truly in cases:
        model, loader, loss = build()
        for seed in seeds:
            t0 = time.perf_counter()
            sg = slt.estimate_llc(model, loader, loss, lr=lr, localization=1.0, num_chains=4, num_draws=1200,
                                  num_burnin_steps=300, seed=seed)
            chk = degeneracy_check(model, loader, loss, llc_sgld=sg.llc_mean, llc_sgld_sem=sg.llc_sem,
                                   localization=1.0, seed=seed)
            _emit(out, "detector", {"case": name, "seed": seed, "truly_degenerate": truly, **chk.to_dict(),
                                    "sgld_lr": lr, "total_wall_s": time.perf_counter() - t0})


class Monomial(torch.nn.Module):
    """L(w) = Π_j w_j^{2k_j} (w* = 0), the loss ignores the data."""

    def __init__(self, k: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("k", torch.tensor(k, dtype=torch.float32))
        self.w = torch.nn.Parameter(torch.zeros(len(k)))

    def forward(self, x: Any = None) -> torch.Tensor:
        return torch.prod(self.w ** (2 * self.k))


def steep(seeds: list[int], out: dict) -> None:
    """w⁴ and w⁶ at n = 1000 (nβ = n/log n), γ = 1, 32 chains: SGLD at the Stein step (:func:`stein_step_size`,
    c = 0.1) for 10/ε steps (a fifth of them burn-in), and the default self-calibrated path, per seed, against
    :func:`slt_tools.theory.finite_nbeta_monomial_llc`."""
    from slt_tools.sampling.degenerate import stein_step_size
    from slt_tools.theory import finite_nbeta_monomial_llc

    loader = DataLoader(TensorDataset(torch.zeros(1000, 1)), batch_size=100)
    nbeta = 1000 / math.log(1000)

    def loss(m: Any, b: Any) -> torch.Tensor:
        return m()

    for k in ((2,), (3,)):
        target = finite_nbeta_monomial_llc(k, nbeta, 1.0)
        for seed in seeds:
            t0 = time.perf_counter()
            rule = stein_step_size(Monomial(k), loader, loss, localization=1.0, seed=seed)
            steps = int(round(10 / rule["lr"]))
            res = slt.estimate_llc(Monomial(k), loader, loss, lr=rule["lr"], localization=1.0, num_chains=32,
                                   num_draws=steps - steps // 5, num_burnin_steps=steps // 5, seed=seed)
            wall = time.perf_counter() - t0
            t1 = time.perf_counter()
            dflt = slt.estimate_llc(Monomial(k), loader, loss, num_chains=32, num_draws=1000, seed=seed)
            _emit(out, "steep", {"k": list(k), "seed": seed, "method": "sgld_stein_step", "target": target,
                                 "llc": res.llc_mean, "sem": res.llc_sem, "rel_error": res.llc_mean / target - 1,
                                 "lr": rule["lr"], "mean_curvature": rule["mean_curvature"], "steps": steps,
                                 "wall_s": wall, "default_llc": dflt.llc_mean,
                                 "default_rel_error": dflt.llc_mean / target - 1,
                                 "default_lr": dflt.hyperparameters["lr"], "default_wall_s": time.perf_counter() - t1})


def summarize(out: dict) -> dict[str, Any]:
    """Detector rates (a flag on a healthy point is a false alarm when the SGLD value it doubts is within 10 % of
    the gold), best method per degenerate point, steep-potential worst errors, healthy worst error."""
    gold = {r["case"]: r["gold"] for r in json.loads((RESULTS / "llc_reference_suite.json").read_text())["rows"]}
    det = out.get("detector", [])
    healthy_rows = [r for r in det if not r["truly_degenerate"]]
    ok_sgld = [r for r in healthy_rows if abs(r["llc_sgld"] / gold[r["case"]] - 1) <= 0.10]
    deg_rows = [r for r in det if r["truly_degenerate"]]
    summary: dict[str, Any] = {
        "detector_flag_rate_healthy": [sum(r["degenerate"] for r in healthy_rows), len(healthy_rows)],
        "detector_false_alarms_where_sgld_within_10pct": [sum(r["degenerate"] for r in ok_sgld), len(ok_sgld)],
        "detector_detection_rate_degenerate": [sum(r["degenerate"] for r in deg_rows), len(deg_rows)]}
    best: dict[str, Any] = {}
    for r in out.get("points", []):
        if r["point"] not in best or abs(r["rel_error"]) < abs(best[r["point"]]["rel_error"]):
            best[r["point"]] = {"method": r["method"], "rel_error": r["rel_error"]}
    summary["best_method_per_point"] = best
    for k in ((2,), (3,)):
        rows = [r for r in out.get("steep", []) if tuple(r["k"]) == k]
        if rows:
            summary[f"steep_w{2 * k[0]}_max_abs_rel_error"] = max(abs(r["rel_error"]) for r in rows)
            summary[f"steep_w{2 * k[0]}_default_max_abs_rel_error"] = max(abs(r["default_rel_error"]) for r in rows)
    if out.get("healthy"):
        summary["healthy_uld_max_abs_rel_error"] = max(abs(r["rel_error"]) for r in out["healthy"])
    return summary


def _emit(out: dict, key: str, row: dict) -> None:
    """Print ``row`` and merge it into the output file, re-read first (several phases may run at once)."""
    print(json.dumps(row, default=float), flush=True)
    disk = json.loads(_OUT[0].read_text()) if _OUT[0].exists() else {}
    for k, v in out.items():
        if not isinstance(v, list) and k != "summary":
            disk[k] = {**disk.get(k, {}), **v} if isinstance(v, dict) else v
    disk[key] = [r for r in disk.get(key, []) if not _same(r, row)] + [row]
    disk["summary"] = summarize(disk)
    out.clear()
    out.update(disk)
    _save(out)


def _same(a: dict, b: dict) -> bool:
    keys = ("point", "case", "method", "seed", "k", "form")
    return all(a.get(k) == b.get(k) for k in keys)


_OUT: list[Path] = []


def _save(out: dict) -> None:
    out["written_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    _OUT[0].write_text(json.dumps(out, indent=1, default=float))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", default="points", choices=["points", "healthy", "detector", "steep", "all"])
    p.add_argument("--points", default="deg_a,deg_b")
    p.add_argument("--methods", default="sgld_calibrated,sgld_long,rmsprop_sgld,uld,uld_gamma10,uld_slope")
    p.add_argument("--cases", default=",".join(HEALTHY))
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--detector-cases", default="all", choices=["healthy", "degenerate", "all"])
    p.add_argument("--out", type=Path, default=RESULTS / "degenerate_points.json")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    _OUT.append(args.out)
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.phase in ("points", "all"):
        for name in args.points.split(","):
            point_methods(name, args.methods.split(","), out)
    if args.phase in ("healthy", "all"):
        healthy(args.cases.split(","), out)
    if args.phase in ("detector", "all"):
        detector(seeds, out, args.detector_cases)
    if args.phase in ("steep", "all"):
        steep(seeds, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
