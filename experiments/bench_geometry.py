"""Benchmark: top-10 Hessian eigenvalues and trace on a ~1M-parameter transformer (wall time, HVPs), and accuracy
against a dense Hessian on a model small enough for one.

    python experiments/bench_geometry.py [--out experiments/results/bench_geometry.json]

PyHessian is not compared here: its `density()` calls a removed torch API and its power iteration returns the
largest |λ| rather than the largest λ (science notes §5); installing it would also pin an old torch.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slt_tools.geometry import HessianOperator, hessian_eigenvalues, hessian_trace
from slt_tools.models import Transformer, TransformerConfig


def lm_loss(m, batch):
    toks = batch[0]
    logits = m(toks[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_geometry.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = TransformerConfig(n_layers=2, d_model=128, n_heads=4, d_head=32, d_mlp=512, d_vocab=2048, n_ctx=32,
                            attn_only=False, normalization="LN")
    tf = Transformer(cfg)
    toks = torch.randint(0, cfg.d_vocab, (64, cfg.n_ctx + 1))
    loader = DataLoader(TensorDataset(toks), batch_size=16)
    op = HessianOperator(tf, loader, lm_loss, num_batches=1)
    t0 = time.perf_counter()
    spec = hessian_eigenvalues(tf, loader, lm_loss, k=10, num_iter=40, op=op)
    t_eig = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr = hessian_trace(tf, loader, lm_loss, num_samples=30, op=op)
    t_tr = time.perf_counter() - t0
    big = {"params": op.dim, "top10": spec.top.tolist(), "bottom3": spec.bottom[:3].tolist(),
           "eig_wall_s": t_eig, "eig_hvps": spec.num_hvps, "trace": tr.trace, "trace_stderr": tr.stderr,
           "trace_wall_s": t_tr, "trace_hvps": tr.num_hvps}
    print(json.dumps(big), flush=True)

    small = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    x, y = torch.randn(256, 8, dtype=torch.float64), torch.randn(256, 4, dtype=torch.float64)
    sl = DataLoader(TensorDataset(x, y), batch_size=64)
    loss = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    names = [n for n, _ in small.named_parameters()]
    shapes = [q.shape for q in small.parameters()]

    def flat(theta):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(np.prod(s))
            parts[n] = theta[i:i + k].reshape(s)
            i += k
        return F.mse_loss(torch.func.functional_call(small, parts, (x,)), y)

    theta = torch.cat([q.detach().reshape(-1) for q in small.parameters()])
    t0 = time.perf_counter()
    dense = np.linalg.eigvalsh(torch.autograd.functional.hessian(flat, theta).numpy())
    t_dense = time.perf_counter() - t0
    t0 = time.perf_counter()
    lz = hessian_eigenvalues(small, sl, loss, k=10, num_iter=60)
    t_lz = time.perf_counter() - t0
    rel = np.abs(lz.top - dense[::-1][:10]) / np.abs(dense[::-1][:10])
    small_row = {"params": int(theta.numel()), "dense_wall_s": t_dense, "lanczos_wall_s": t_lz,
                 "lanczos_hvps": lz.num_hvps, "max_rel_error_top10": float(rel.max())}
    print(json.dumps(small_row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"transformer": big, "small_dense_check": small_row}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
