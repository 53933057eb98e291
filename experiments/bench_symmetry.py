"""Benchmark: wall time of canonicalisation and weight matching on a ~1M-parameter transformer and a wide MLP,
plus the interpolation figure (loss barrier before vs after alignment) for a trained MLP and its permuted copy.

    python experiments/bench_symmetry.py [--out experiments/results/bench_symmetry.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slt_tools.models import Transformer, TransformerConfig
from slt_tools.plots import plot_interpolation
from slt_tools.symmetry import align, canonicalize, fix_gauges, interpolate, permute, symmetry_spec


def shuffled(model: nn.Module, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for _name, size, axes, block in symmetry_spec(model).permutation_groups():
        permute(sd, axes, torch.randperm(size, generator=gen), block)
    return sd


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_symmetry.json")
    p.add_argument("--figure", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "figures"
                   / "interpolation_alignment.png")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    cfg = TransformerConfig(n_layers=2, d_model=128, n_heads=4, d_head=32, d_mlp=512, d_vocab=2048, n_ctx=32,
                            attn_only=False, normalization="LN")
    tf = Transformer(cfg)
    wide = nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
    for name, model in (("transformer (2 layers, d_model 128)", tf), ("MLP 64-2048-2048-10", wide)):
        other = shuffled(model, 1)
        _, t_canon = timed(canonicalize, model)
        (_, perms), t_align = timed(align, model, other, spec=symmetry_spec(model))
        rows.append({"model": name, "params": sum(p.numel() for p in model.parameters()),
                     "canonicalize_s": t_canon, "align_s": t_align})
        print(json.dumps(rows[-1]), flush=True)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 8, generator=gen)
    y = torch.sin(2 * x @ torch.randn(8, 1, generator=gen))
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    mlp = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
    opt = torch.optim.Adam(mlp.parameters(), lr=2e-3)
    for _ in range(1500):
        opt.zero_grad()
        F.mse_loss(mlp(x), y).backward()
        opt.step()
    loss = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    other = shuffled(mlp, 2)
    before = interpolate(mlp, other, loss, loader, num_points=21, model=mlp)
    aligned, _ = align(mlp, other)
    after = interpolate(fix_gauges(mlp), aligned, loss, loader, num_points=21, model=mlp)
    plot_interpolation({"naive (permuted copy)": before, "after weight matching": after}, path=args.figure,
                       title="Trained ReLU MLP vs a permuted copy of itself")
    result = {"timing": rows, "barrier_before": before.barrier(), "barrier_after": after.barrier(),
              "figure": str(args.figure)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "timing"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
