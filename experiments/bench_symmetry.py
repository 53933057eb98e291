"""Benchmark: wall time of canonicalisation and weight matching on a ~1M-parameter transformer (with and without the
residual-stream permutation) and a wide MLP, checking that planted permutations are recovered; plus the interpolation
figure: loss barriers between a trained MLP and (i) a permuted copy of itself, (ii) an independently trained MLP,
before and after weight matching.

    python experiments/bench_symmetry.py [--out experiments/results/bench_symmetry.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slt_tools.models import Transformer, TransformerConfig
from slt_tools.plots import plot_interpolation
from slt_tools.symmetry import SymmetrySpec, align, canonicalize, interpolate, permute, symmetry_spec


def other_perms(model: nn.Module, seed: int, spec: SymmetrySpec) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(size, generator=gen).numpy() for name, size, _, _ in spec.permutation_groups()}


def shuffled(model: nn.Module, seed: int, spec: SymmetrySpec) -> dict:
    """A copy of the model with every permutation group shuffled (seeded)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    perms = other_perms(model, seed, spec)
    for name, _, axes, block in spec.permutation_groups():
        permute(sd, axes, perms[name], block)
    return sd


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def train_mlp(seed: int, x: torch.Tensor, y: torch.Tensor, width: int, steps: int) -> nn.Sequential:
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(x.shape[1], width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                        nn.Linear(width, 1))
    opt = torch.optim.Adam(mlp.parameters(), lr=2e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(mlp(x), y).backward()
        opt.step()
    return mlp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_symmetry.json")
    p.add_argument("--figure", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "figures"
                   / "interpolation_alignment.png")
    p.add_argument("--repeats", type=int, default=3, help="timings: best of this many runs")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    cfg = TransformerConfig(n_layers=2, d_model=128, n_heads=4, d_head=32, d_mlp=512, d_vocab=2048, n_ctx=32,
                            attn_only=False, normalization="LN")
    tf = Transformer(cfg)
    wide = nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
    cases = (("transformer (2 layers, d_model 128, 4 heads, d_mlp 512)", tf, False),
             ("same transformer, residual-stream permutation on", tf, True),
             ("MLP 64-2048-2048-10 (ReLU)", wide, False))
    for name, model, residual in cases:
        spec = symmetry_spec(model, residual_stream=residual)
        other = shuffled(model, 1, spec)
        t_canon = min(timed(canonicalize, model, spec)[1] for _ in range(args.repeats))
        t_align = min(timed(align, model, other, spec=spec)[1] for _ in range(args.repeats))
        _, perms = align(model, other, spec=spec)
        planted = {n: np.argsort(p) for n, p in other_perms(model, 1, spec).items()}
        rows.append({"model": name, "params": sum(p.numel() for p in model.parameters()),
                     "permutation_groups": len(spec.permutation_groups()),
                     "canonicalize_s": round(t_canon, 4), "align_s": round(t_align, 4),
                     "planted_permutations_recovered": all(np.array_equal(perms[n], planted[n]) for n in planted)})
        print(json.dumps(rows[-1]), flush=True)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 8, generator=gen)
    y = torch.relu(x @ torch.randn(8, 1, generator=gen))  # a one-unit ReLU teacher
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    loss = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    mlp_a, mlp_b = (train_mlp(seed, x, y, width=128, steps=800) for seed in (0, 1))
    copy_a = shuffled(mlp_a, 2, symmetry_spec(mlp_a))
    curves = {"A vs permuted copy of A, naive": interpolate(mlp_a, copy_a, loader, loss, num_points=21, model=mlp_a),
              "A vs B (another seed), naive": interpolate(mlp_a, mlp_b, loader, loss, num_points=21)}
    (aligned_copy, _), t_small = timed(align, mlp_a, copy_a, spec=symmetry_spec(mlp_a))
    aligned_b, _ = align(mlp_a, mlp_b)
    copy_after = interpolate(mlp_a, aligned_copy, loader, loss, num_points=21, model=mlp_a)
    curves["A vs B after weight matching"] = interpolate(mlp_a, aligned_b, loader, loss, num_points=21, model=mlp_a)
    plot_interpolation(curves, path=args.figure, title="Trained ReLU MLPs 8-128-128-1: loss along straight lines")
    barriers = {label: {"linear": c.barrier("linear"), "mean": c.barrier("mean")} for label, c in curves.items()}
    barriers["A vs permuted copy of A, after weight matching"] = {"linear": copy_after.barrier("linear"),
                                                                  "mean": copy_after.barrier("mean")}
    ends = curves["A vs B (another seed), naive"].losses
    result = {"command": "python experiments/bench_symmetry.py", "torch_threads": torch.get_num_threads(),
              "load_average_1_5_15min": os.getloadavg(),  # the machine was shared: timings are upper bounds
              "timing": rows, "barriers": barriers, "endpoint_losses": {"A": float(ends[0]), "B": float(ends[-1])},
              "barrier_definition": "linear: max_t L(θ_t) − ((1−t)L(A) + tL(B)) (Entezari et al.); "
                                    "mean: max_t L(θ_t) − (L(A)+L(B))/2",
              "figure": str(args.figure.relative_to(Path(__file__).resolve().parents[1]))
              if args.figure.is_absolute() else str(args.figure)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(barriers, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
