"""Benchmark: refined LLCs of every attention head — one batched call vs one call per head vs devinterp 1.3.2.

    python experiments/bench_refined.py [--quick] [--d-model 64] [--vocab 64] [--draws 32] [--blocks 32 8 4]
                                        [--out experiments/results/bench_refined.json]

The default model (d_model 64, ≈ 45k parameters) is shrunk from the issue's ≈ 1M (``--d-model 256 --vocab 1024``)
so that the whole benchmark runs in a few minutes on a 2-core CPU.

Model: a 2-layer attention-only ``slt_tools.models.Transformer`` (8 heads per layer), trained briefly (Adam, seeded)
on random sequences repeated once (an induction task), so w* is near a minimum. Data: those sequences, cached.
Methods, all with the same draws, chains (4 per head), ε, γ, nβ and L_n(w*):

* ``batched``: ``slt.estimate_refined_llc(model, loader, causal_lm, heads)`` — all 16 heads × 4 chains in one call,
  with ``--blocks`` (restriction, chain) pairs per vmapped block (32 = each layer's 8 heads × 4 chains at once);
* ``sequential``: ``slt.estimate_refined_llc(..., heads[h])`` once per head (same seeds: identical chains);
* ``devinterp``: devinterp 1.3.2's ``estimate_learning_coeff_with_summary`` once per head with
  ``optimize_over_per_model_param`` = that head's masks (zeros for every other parameter).

The draws cover whole epochs of the data (``--draws`` a multiple of n/m = 512/32 = 16 batches): every chain of a run
sees the same minibatch sequence, so over a partial epoch the minibatch noise of L_B is common to all chains and heads,
invisible in the chain spread, and shifts one library's λ̂ against the other's; over whole epochs it cancels at w*.

Reported: wall times and speed-ups, per-head agreement (batched vs sequential: max |Δλ̂|; batched vs devinterp:
|Δλ̂| over the combined chain standard error), and the memory of a batched step against the number of (restriction,
chain) pairs per block (``chain_chunk_size``): the bytes autograd saves for the backward pass of one step, per layer
group (:func:`activation_bytes`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import slt_tools as slt
from slt_tools.files import atomic_write
from slt_tools.models import Transformer, TransformerConfig


def build(d_model: int, vocab: int, n_ctx: int, n_seq: int, train_steps: int, seed: int = 0
          ) -> tuple[Transformer, DataLoader]:
    """The trained 2-layer, 8-head attention-only model and a loader over its (cached) training data."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = TransformerConfig(n_layers=2, d_model=d_model, n_heads=8, d_head=d_model // 8, d_vocab=vocab,
                            n_ctx=n_ctx, attn_only=True)
    model = Transformer(cfg)
    half = torch.randint(0, vocab, (n_seq, n_ctx // 2), generator=gen)
    tokens = torch.cat([half, half], dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(train_steps):
        idx = torch.randint(0, n_seq, (64,), generator=gen)
        loss = slt.losses.causal_lm(model, tokens[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), DataLoader(TensorDataset(tokens), batch_size=32, shuffle=True)


def ours(model, loader, restrictions, hp, **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slt.estimate_refined_llc(model, loader, slt.losses.causal_lm, restrictions, **hp, **extra)


def devinterp_per_head(model, loader, heads, hp, init_loss) -> tuple[float, dict[str, list[float]]] | None:
    """devinterp 1.3.2, one masked run per head (its only way to sample a head); (wall time, per-chain λ̂)."""
    try:
        from devinterp.optim import SGLD
        from devinterp.slt.sampler import estimate_learning_coeff_with_summary
    except ImportError:
        return None
    params = dict(model.named_parameters())
    out, t0 = {}, time.perf_counter()
    for name, r in heads.items():
        masks = {n: r.masks[n].clone() if n in r.masks else torch.zeros(p.shape, dtype=torch.bool)
                 for n, p in params.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = estimate_learning_coeff_with_summary(
                model, loader, evaluate=lambda m, b: slt.losses.causal_lm(m, b), sampling_method=SGLD,
                optimizer_kwargs={"lr": hp["lr"], "localization": hp["localization"], "nbeta": hp["nbeta"]},
                num_chains=hp["num_chains"], num_draws=hp["num_draws"], init_loss=init_loss, seed=hp["seed"],
                verbose=False, optimize_over_per_model_param=masks)
        out[name] = [float(s[f"llc-chain/{c}"]) for c in range(hp["num_chains"])]
    return time.perf_counter() - t0, out


def activation_bytes(model, loader, heads, sizes: list[int]) -> list[dict]:
    """Per block size k and layer group: bytes autograd saves for the backward of one step of k (restriction, chain)
    pairs (unique storages, via ``saved_tensors_hooks``): the memory that grows with the block. Device-agnostic and
    exact, unlike a process's peak RSS (which the allocator and the data cache dominate at these sizes)."""
    from slt_tools.sampling.refined import RefinedProblem
    from slt_tools.sampling.steps import BatchedLossGrad, scatter_lift

    problem = RefinedProblem.build(model, loader, slt.losses.causal_lm, heads)
    batch = next(problem.base.data.stream(0))
    rows = []
    for group in problem.groups:
        loss_grad = BatchedLossGrad(group.loss_at, lift=scatter_lift)
        for k in sizes:
            index = group.index[torch.arange(k) % len(group.names)]
            seen: dict[int, int] = {}

            def pack(t: torch.Tensor, seen: dict[int, int] = seen) -> torch.Tensor:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss_grad(group.theta0[index], ((index, group.theta0), batch))
            rows.append({"group": group.names[0][:2], "pairs_per_block": k, "saved_bytes": int(sum(seen.values()))})
            print(f"  memory: layer {rows[-1]['group']}, {k:3d} pairs per block → "
                  f"{rows[-1]['saved_bytes'] / 2**20:8.1f} MiB saved for backward")
    return rows


def compare(batched, sequential, dev) -> dict:
    """Per-head agreement: batched vs sequential (same chains) and vs devinterp (independent chains)."""
    rows, seq_diff, z = [], 0.0, []
    for name in batched:
        b, s = batched[name], sequential[name]
        seq_diff = max(seq_diff, float(np.max(np.abs(b.llc_per_chain - s.llc_per_chain))))
        row = {"head": name, "batched": b.llc_mean, "batched_sem": b.llc_sem, "sequential": s.llc_mean}
        if dev is not None:
            d = np.array(dev[name])
            sem = math.hypot(b.llc_sem, d.std(ddof=1) / math.sqrt(len(d)))
            row.update(devinterp=float(d.mean()), devinterp_sem=float(d.std(ddof=1) / math.sqrt(len(d))),
                       z=float((b.llc_mean - d.mean()) / sem) if sem > 0 else None)
            z.append(abs(row["z"]) if row["z"] is not None else float("nan"))
        rows.append(row)
    return {"per_head": rows, "max_abs_diff_batched_vs_sequential": seq_diff,
            "max_abs_z_vs_devinterp": float(np.nanmax(z)) if z else None,
            "heads_within_2_sem_of_devinterp": int(sum(v <= 2 for v in z)) if z else None}


def timed_batched(model, loader, heads, hp, blocks: list[int]) -> tuple[dict[int, float], dict[int, object]]:
    """Wall time and result of one batched call over every head, per block size (pairs per vmapped block)."""
    times, results = {}, {}
    for k in blocks:
        t0 = time.perf_counter()
        results[k] = ours(model, loader, heads, hp, chain_chunk_size=k)
        times[k] = time.perf_counter() - t0
        print(f"  batched   : {times[k]:7.1f} s  (16 heads × 4 chains in one call, {k} pairs per block)")
    return times, results


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller model, fewer draws, no memory curve")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--n-ctx", type=int, default=32)
    p.add_argument("--n-seq", type=int, default=512)
    p.add_argument("--draws", type=int, default=32)
    p.add_argument("--blocks", type=int, nargs="+", default=[32, 8, 4],
                   help="pairs per block of the batched call (32 = a whole layer's heads × chains)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--gamma", type=float, default=100.0)
    p.add_argument("--nbeta", type=float, default=30.0)
    p.add_argument("--no-devinterp", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_refined.json")
    return p.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.quick:
        args.d_model, args.vocab, args.draws = 32, 32, 16
    model, loader = build(args.d_model, args.vocab, args.n_ctx, args.n_seq, 300)
    heads = slt.restrictions.heads(model)
    n_params = sum(p.numel() for p in model.parameters())
    hp = dict(num_chains=4, num_draws=args.draws, lr=args.lr, localization=args.gamma, nbeta=args.nbeta, seed=0,
              mala_every=0)
    print(f"model: {n_params} parameters, {len(heads)} heads of {heads['l0h0'].numel} coordinates; "
          f"{hp['num_chains']} chains × {args.draws} draws per head")
    ours(model, loader, {"l0h0": heads["l0h0"]}, dict(hp, num_draws=2))  # warm-up (allocator, first vmap trace)
    times, batched = timed_batched(model, loader, heads, hp, args.blocks)
    best = min(times, key=times.get)
    t0 = time.perf_counter()
    sequential = {}
    for r in heads.values():
        sequential.update(ours(model, loader, r, hp).results)
    t_seq = time.perf_counter() - t0
    print(f"  sequential: {t_seq:7.1f} s  (one call per head, 4 pairs per block) → best batched ({best} pairs per "
          f"block) is {t_seq / times[best]:.2f}× faster")
    dev = None if args.no_devinterp else devinterp_per_head(model, loader, heads, hp, batched[best].init_loss)
    t_dev = None if dev is None else dev[0]
    if t_dev is not None:
        print(f"  devinterp : {t_dev:7.1f} s  (one masked run per head) → best batched is "
              f"{t_dev / times[best]:.2f}× faster")
    agreement = compare(batched[best], sequential, None if dev is None else dev[1])
    agreement["max_abs_diff_any_block_vs_sequential"] = max(
        float(np.max(np.abs(res[k].llc_per_chain - sequential[k].llc_per_chain))) for res in batched.values()
        for k in heads)
    print(f"  max |Δλ̂| batched (any block size) vs sequential, per chain: "
          f"{agreement['max_abs_diff_any_block_vs_sequential']:.2e}")
    if dev is not None:
        print(f"  max |z| batched vs devinterp: {agreement['max_abs_z_vs_devinterp']:.2f}; heads within 2 SE: "
              f"{agreement['heads_within_2_sem_of_devinterp']}/16")
    memory = activation_bytes(model, loader, heads, [1, 4, 8, 16, 32])
    out = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
                       "load_average_1min": os.getloadavg()[0], "torch": torch.__version__},
           "model": {"n_layers": 2, "n_heads": 8, "d_model": args.d_model, "d_vocab": args.vocab,
                     "n_ctx": args.n_ctx, "attn_only": True, "num_params": n_params,
                     "head_coordinates": heads["l0h0"].numel, "n_samples": args.n_seq, "batch_size": 32},
           "hyperparameters": hp, "init_loss": batched[best].init_loss,
           "wall_s": {"batched_by_pairs_per_block": times, "sequential": t_seq, "devinterp": t_dev},
           "speedup": {"best_batched_vs_sequential": t_seq / times[best],
                       "best_batched_vs_devinterp": None if t_dev is None else t_dev / times[best],
                       "sequential_vs_devinterp": None if t_dev is None else t_dev / t_seq},
           "agreement": agreement, "memory_vs_pairs_per_block": memory, "table": batched[best].table()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda f: json.dump(slt.sampling.result.json_safe(out), f, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
