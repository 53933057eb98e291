"""Benchmark: slt_tools' batched LLC estimator vs devinterp 1.3.2 vs plain one-chain-at-a-time SGLD loops, and
accuracy against Aoyagi's closed-form λ on a suite of deep linear networks.

    python experiments/bench_llc.py [--quick] [--out experiments/results/bench_llc.json]

Speed: same model, data, chains × draws, batch size and SGLD hyperparameters for every method. "plain loop
(DataLoader)" is what a user writes: for each chain, iterate the DataLoader, forward, backward, SGLD update of every
parameter. "plain loop (cached)" is the same loop with the data pre-loaded as tensors (to show how much of the gain is
the data path and how much is batching chains). Achieved FLOP/s counts the FLOPs of the work inside the timed call
(torch.utils.flop_counter): forward+backward of one chain-step × chains × steps, plus the forward pass over all n
samples that gives L_n(w*), divided by the wall time, against a float32 matmul peak measured in the same run.
Accuracy: DLNs at noise-free points where rank(J)/2 equals Aoyagi's λ, in the regime of Lau et al. (n = 1e5, batch 500,
γ = 1, nβ = n / log n, small ε).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import slt_tools as slt
from slt_tools.files import atomic_write
from slt_tools.models import DeepLinearNetwork, Transformer, TransformerConfig
from slt_tools.theory import dln_jacobian_rank_llc, dln_learning_coefficient

warnings.simplefilter("ignore")


def matmul_peak(n: int = 2048, reps: int = 3, trials: int = 5) -> float:
    """Float32 FLOP/s of an n×n GEMM: the best of ``trials`` timings of ``reps`` products (the peak, not a mean)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = math.inf
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best


def mse(m, batch):
    return F.mse_loss(m(batch[0]), batch[1])


def xent_lm(m, batch):
    toks = batch[0]
    logits = m(toks[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1))


def make_problems(quick: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    dln = DeepLinearNetwork((10, 10, 10, 10, 10))
    x = torch.randn(10000, 10, generator=gen)
    with torch.no_grad():
        y = dln(x)
    mlp = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
    x2 = torch.randn(10000, 20, generator=gen)
    with torch.no_grad():
        y2 = mlp(x2)
    cfg = TransformerConfig(n_layers=2, d_model=128, n_heads=4, d_head=32, d_mlp=512, d_vocab=2048, n_ctx=32,
                            attn_only=False, normalization="LN")
    tf = Transformer(cfg)
    toks = torch.randint(0, cfg.d_vocab, (1024, cfg.n_ctx + 1), generator=gen)
    draws_small, draws_tf = (100, 10) if quick else (300, 40)
    return [
        {"name": "DLN (10,10,10,10,10)", "model": dln, "data": (x, y), "batch": 100, "loss": mse,
         "draws": draws_small, "lr": 1e-5, "gamma": 100.0},
        {"name": "ReLU MLP 20-64-10", "model": mlp, "data": (x2, y2), "batch": 100, "loss": mse,
         "draws": draws_small, "lr": 1e-5, "gamma": 100.0},
        {"name": "transformer (2 layers, d_model 128)", "model": tf, "data": (toks,), "batch": 16, "loss": xent_lm,
         "draws": draws_tf, "lr": 1e-6, "gamma": 100.0},
    ]


def plain_loop(model: nn.Module, batches, loss_fn, chains: int, steps: int, lr: float, gamma: float,
               nbeta: float) -> float:
    """One chain after another: the SGLD update written by hand on every parameter."""
    import copy

    t0 = time.perf_counter()
    for c in range(chains):
        torch.manual_seed(c)
        m = copy.deepcopy(model)
        w0 = [p.detach().clone() for p in m.parameters()]
        it = batches()
        for _ in range(steps):
            try:
                batch = next(it)
            except StopIteration:
                it = batches()
                batch = next(it)
            loss = loss_fn(m, batch)
            m.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p, p0 in zip(m.parameters(), w0):
                    p.add_(nbeta * p.grad + gamma * (p - p0), alpha=-lr / 2).add_(torch.randn_like(p),
                                                                                alpha=math.sqrt(lr))
    return time.perf_counter() - t0


def devinterp_time(model, loader, loss_fn, chains, draws, lr, gamma, nbeta) -> float | None:
    try:
        from devinterp.optim import SGLD
        from devinterp.slt.sampler import estimate_learning_coeff_with_summary
    except ImportError:
        return None
    t0 = time.perf_counter()
    estimate_learning_coeff_with_summary(model, loader, evaluate=loss_fn, sampling_method=SGLD,
                                         optimizer_kwargs={"lr": lr, "localization": gamma, "nbeta": nbeta},
                                         num_chains=chains, num_draws=draws, init_loss=1.0, seed=0, verbose=False)
    return time.perf_counter() - t0


def step_flops(model, loss_fn, batch, backward: bool = True) -> float:
    """FLOPs of one chain's loss on ``batch`` (forward, plus backward unless ``backward=False``)."""
    with FlopCounterMode(display=False) as counter:
        loss = loss_fn(model, batch)
        if backward:
            loss.backward()
    model.zero_grad()
    return float(counter.get_total_flops())


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def speed(quick: bool, chains: int, repeats: int = 5, large_repeats: int = 3) -> list[dict]:
    """Wall times per method: best of ``repeats`` rounds (``large_repeats`` for the transformer, whose round takes
    ≈ 50 s; the matmul peak it is compared with is a best-of too), methods interleaved within a round
    so that drifts of this shared VM's speed hit all of them alike; every method gets a warm-up call first. The
    matmul peak that FLOP/s are compared with is measured right before and right after each model's timings (the
    higher of the two): this VM's speed drifts by up to 1.5× within minutes."""
    rows = []
    for prob in make_problems(quick):
        model, data, bs, lf = prob["model"], prob["data"], prob["batch"], prob["loss"]
        loader = DataLoader(TensorDataset(*data), batch_size=bs, shuffle=True)
        n = len(data[0])
        nbeta = n / math.log(n)
        steps = prob["draws"]
        kw = {"num_chains": chains, "num_draws": steps, "lr": prob["lr"], "localization": prob["gamma"],
              "nbeta": nbeta, "seed": 0, "on_divergence": "exclude", "mala_every": 0,
              "num_burnin_steps": 0}  # devinterp's default: every method samples the same steps
        slt.estimate_llc(model, loader, lf, **{**kw, "num_draws": 5})  # warm-up
        # compile=True: the first call compiles (timed separately, it is paid once per process, model class and
        # chain count); later calls on any instance of the model reuse the graph — that steady state is timed
        t0 = time.perf_counter()
        warm = slt.estimate_llc(model, loader, lf, compile=True, **{**kw, "num_draws": 5})
        t_compile = time.perf_counter() - t0
        cached = [tuple(t[i:i + bs] for t in data) for i in range(0, n - bs + 1, bs)]
        lr, gamma = prob["lr"], prob["gamma"]
        methods = {
            "slt": partial(slt.estimate_llc, model, loader, lf, **kw),
            "compiled": partial(slt.estimate_llc, model, loader, lf, compile=True, **kw),
            "plain": partial(plain_loop, model, partial(iter, loader), lf, chains, steps, lr, gamma, nbeta),
            "cached": partial(plain_loop, model, partial(iter, cached), lf, chains, steps, lr, gamma, nbeta),
        }
        if devinterp_time(model, loader, lf, chains, 5, lr, gamma, nbeta) is not None:  # warm-up
            methods["devinterp"] = partial(devinterp_time, model, loader, lf, chains, steps, lr, gamma, nbeta)
        params = sum(p.numel() for p in model.parameters())
        rounds = large_repeats if params > 1e5 else repeats
        peak = matmul_peak()
        best = {k: timed(fn) for k, fn in methods.items()}
        for _ in range(rounds - 1):
            for k, fn in methods.items():
                best[k] = min(best[k], timed(fn))
        peak = max(peak, matmul_peak())
        t_slt, t_comp, t_plain, t_cached = best["slt"], best["compiled"], best["plain"], best["cached"]
        t_dev = best.get("devinterp")
        # the sampled steps, plus the forward pass over all n samples that gives L_n(w*) (inside the timed call)
        flops = (step_flops(model, lf, cached[0]) * chains * steps
                 + step_flops(model, lf, cached[0], backward=False) * len(cached))
        row = {"model": prob["name"], "params": params, "chains": chains,
               "draws": steps, "batch": bs, "timing": f"best of {rounds}", "slt_tools_s": t_slt,
               "plain_loop_dataloader_s": t_plain, "plain_loop_cached_s": t_cached, "devinterp_s": t_dev,
               "speedup_vs_devinterp": None if t_dev is None else t_dev / t_slt,
               "speedup_vs_plain_loop": t_plain / t_slt, "speedup_vs_plain_cached": t_cached / t_slt,
               "slt_steps_per_s": chains * steps / t_slt, "slt_flops_per_s": flops / t_slt, "matmul_peak_flops": peak,
               "fraction_of_matmul_peak": flops / t_slt / peak,
               "compiled": bool(warm.diagnostics["compiled"]), "first_compiled_call_s": t_compile,
               "slt_tools_compiled_s": t_comp,
               "compiled_speedup_vs_devinterp": None if t_dev is None else t_dev / t_comp,
               "compiled_speedup_vs_plain_loop": t_plain / t_comp,
               "compiled_speedup_vs_plain_cached": t_cached / t_comp,
               "compiled_fraction_of_matmul_peak": flops / t_comp / peak}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def dln_point(widths, rank, cut, seed):
    """A noise-free DLN point: layer ``cut`` has rank ``rank``, the others are orthonormal (well conditioned).
    Returns the model, its local learning coefficient rank(J)/2 (a Morse–Bott point) and Aoyagi's global λ."""
    gen = torch.Generator().manual_seed(seed)
    model = DeepLinearNetwork(widths)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            shape = layer.weight.shape
            if i == cut:
                w = torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, shape[1], generator=gen)
                w = w / math.sqrt(max(rank, 1))
            else:
                q, _ = torch.linalg.qr(torch.randn(max(shape), max(shape), generator=gen, dtype=torch.float64))
                w = q[: shape[0], : shape[1]].float()
            layer.weight.copy_(w)
    local = float(dln_jacobian_rank_llc([l.weight.detach().double().numpy() for l in model.layers], 1e-5))
    return model, local, float(dln_learning_coefficient(widths, rank)[0])


# (widths, rank, layer whose rank is cut): the first four are points where rank(J)/2 equals Aoyagi's global λ
SUITE = [((6, 5, 4, 7), 2, 1), ((9, 4, 6), 1, 1), ((4, 6, 6, 4), 1, 1), ((8, 3, 8), 2, 0),
         ((8, 6, 6, 8), 2, 1), ((10, 4, 4, 4, 10), 2, 1), ((12, 8, 10), 3, 1), ((5, 3, 5), 1, 1)]


def accuracy(quick: bool) -> list[dict]:
    suite = SUITE[:2] if quick else SUITE
    n, rows = 100_000, []
    for k, (widths, rank, cut) in enumerate(suite):
        model, local, aoyagi = dln_point(widths, rank, cut, seed=k)
        gen = torch.Generator().manual_seed(100 + k)
        x = torch.randn(n, widths[0], generator=gen)
        with torch.no_grad():
            y = model(x)
        loader = DataLoader(TensorDataset(x, y), batch_size=500, shuffle=True)
        t0 = time.perf_counter()
        res = slt.estimate_llc(model, loader, mse, num_chains=4, num_draws=1500 if quick else 6000,
                               num_burnin_steps=1000 if quick else 4000, lr=1e-6, localization=1.0, seed=0)
        row = {"widths": widths, "rank": rank, "cut_layer": cut, "truth_local": local, "aoyagi_global": aoyagi,
               "llc_mean": res.llc_mean, "llc_sem": res.llc_sem, "rel_error": (res.llc_mean - local) / local,
               "wall_s": time.perf_counter() - t0, "stationary": res.diagnostics["stationary"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def import_time(reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-c", "import time; t=time.perf_counter(); import slt_tools; "
                              "print(time.perf_counter()-t)"], capture_output=True, text=True, check=True)
        times.append(float(out.stdout.strip()))
    return min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--chains", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_llc.json")
    args = p.parse_args(argv)
    peak = matmul_peak()
    print(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "matmul_peak_flops": peak, "import_time_s": import_time(), "speed": speed(args.quick, args.chains),
              "accuracy": accuracy(args.quick), "quick": args.quick}
    errs = [abs(r["rel_error"]) for r in result["accuracy"]]
    result["accuracy_median_abs_rel_error"] = float(np.median(errs)) if errs else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=2))
    print(f"import slt_tools: {result['import_time_s']:.2f} s; median |rel. error| on the DLN suite: "
          f"{result['accuracy_median_abs_rel_error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
