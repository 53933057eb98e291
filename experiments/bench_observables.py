"""Benchmark (issue 20): a susceptibility run over R restrictions, batched and streamed, against (a) the same batched
run keeping every draw of every observable (keep_draws) and (b) R sequential single-restriction runs.

Model: a deep linear network (8, 16, 16, 8) on 512 teacher samples; restrictions: the 16 rows of the middle layer
(R = 16, 16 coordinates each); two probe sets of 128 samples; 4 chains × 200 draws. Small enough for a shared CPU:
``OMP_NUM_THREADS=1 .venv/bin/python experiments/bench_observables.py``. Memory is that of the statistics (the
accumulators' float64 state vs the stored draws), counted from the arrays, not the process.
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import slt_tools as slt
from slt_tools.models import DeepLinearNetwork
from slt_tools.restrictions import Restriction


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = DeepLinearNetwork((8, 16, 16, 8))
    x = torch.randn(512, 8)
    y = model(x).detach() + 0.1 * torch.randn(512, 8)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)

    def per_sample(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean(-1)

    name = "layers.1.weight"
    rs = {}
    for i in range(16):
        mask = torch.zeros(16, 16, dtype=torch.bool)
        mask[i] = True
        rs[f"row{i}"] = Restriction(f"row{i}", {name: mask})
    probes = {"first": (x[:128], y[:128]), "noisy": (x[128:256] * 2, y[128:256])}
    config = slt.LLCConfig(num_chains=4, num_draws=200, num_burnin_steps=100, lr=1e-4, localization=10.0,
                           mala_every=0, chain_chunk_size=64)
    slt.susceptibilities(model, loader, probes, rs, per_sample, config.replace(num_draws=5), reference_size=128)
    t = time.perf_counter()  # timed after a short warm-up run (first calls of vmap/functional_call are slower)
    sus = slt.susceptibilities(model, loader, probes, rs, per_sample, config, reference_size=128)
    t_batched = time.perf_counter() - t
    r = sus.refined["row0"]
    k_obs = sum(int(np.prod(o.shape)) for o in r.observables.values())
    state_bytes = len(rs) * config.num_chains * k_obs * 8 * 5  # means, M_xx, M_xy, partner mean/M_yy per value
    draw_bytes = len(rs) * config.num_chains * config.num_draws * k_obs * 8
    t = time.perf_counter()
    slt.estimate_refined_llc(model, loader, lambda m, b: per_sample(m, b).mean(), rs, config,
                             observables={"reference_loss": lambda m: per_sample(m, (x[:128], y[:128])).mean(),
                                          **{f"probe:{k}": (lambda m, b=b: per_sample(m, b))
                                             for k, b in probes.items()}},
                             keep_draws=True)
    t_keep = time.perf_counter() - t
    t = time.perf_counter()
    for k, rr in list(rs.items()):
        slt.susceptibilities(model, loader, probes, {k: rr}, per_sample, config, reference_size=128)
    t_seq = time.perf_counter() - t
    print(f"R={len(rs)} restrictions, {k_obs} observable values, {config.num_chains} chains x {config.num_draws} "
          f"draws")
    print(f"batched streamed: {t_batched:.2f} s, statistics state ≈ {state_bytes / 1e6:.2f} MB")
    print(f"batched keep_draws: {t_keep:.2f} s, stored draws {draw_bytes / 1e6:.2f} MB (grows with draws)")
    print(f"{len(rs)} sequential single-restriction runs: {t_seq:.2f} s ({t_seq / t_batched:.1f}x the batched run)")
    print("response matrix (first 4 restrictions):", np.round(sus.response[:4], 5).tolist())


if __name__ == "__main__":
    main()
