"""Benchmark: refined LLCs of every attention head — one batched call vs one call per head vs devinterp 1.3.2.

    python experiments/bench_refined.py [--quick] [--d-model 256] [--vocab 1024] [--draws 16] [--blocks 8 32]
                                        [--out experiments/results/bench_refined.json]

The default model is the issue's: d_model 256, d_vocab 1024, 8 heads of size 32 per layer, 1.06M parameters. The
draws default to 16 (one epoch of the data, see below) and no burn-in, the same for all three contenders, so the
whole benchmark takes about ten minutes on one CPU thread (``--quick``: a 12k-parameter model, a minute).

Model: a 2-layer attention-only ``slt_tools.models.Transformer`` (8 heads per layer), trained briefly (Adam, seeded)
on random sequences repeated once (an induction task), so w* is near a minimum. Data: those sequences, cached.
Methods, all with the same draws, chains (4 per head), ε, γ, nβ and L_n(w*):

* ``batched``: ``slt.estimate_refined_llc(model, loader, causal_lm, heads)`` — all 16 heads × 4 chains in one call,
  with ``--blocks`` (restriction, chain) pairs per vmapped block (32 = each layer's 8 heads × 4 chains at once),
  head-factored (:mod:`slt_tools.sampling.refined_heads`: a layer's unmoved heads once per step, one head per pair);
* ``batched_plain``: the same call with ``factor_heads=False`` (every head of the layer per pair): before/after;
* ``sequential``: ``slt.estimate_refined_llc(..., heads[h])`` once per head (same seeds: identical chains);
* ``devinterp``: devinterp 1.3.2's ``estimate_learning_coeff_with_summary`` once per head with
  ``optimize_over_per_model_param`` = that head's masks (zeros for every other parameter); timed as devinterp
  runs (glibc's malloc defaults) and again with freed host memory kept as our runs keep it
  (:mod:`slt_tools.sampling.host_memory`; before/after for our call: experiments/bench_host_memory.py).

The draws cover whole epochs of the data (``--draws`` a multiple of n/m = 512/32 = 16 batches): every chain of a run
sees the same minibatch sequence, so over a partial epoch the minibatch noise of L_B is common to all chains and heads,
invisible in the chain spread, and shifts one library's λ̂ against the other's; over whole epochs it cancels at w*.

Reported: wall times and speed-ups, per-head agreement (batched vs sequential and vs batched_plain: max |Δλ̂|;
batched vs devinterp: |Δλ̂| over the combined chain standard error), and memory against the number of (restriction,
chain) pairs advanced at once: the bytes autograd saves for the backward pass of one step, per layer group
(:func:`activation_bytes`), and the peak resident memory of a whole batched call over R heads × 4 chains in one
block (:func:`peak_memory`).
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
                num_chains=hp["num_chains"], num_draws=hp["num_draws"], num_burnin_steps=hp["num_burnin_steps"],
                init_loss=init_loss, seed=hp["seed"],
                verbose=False, optimize_over_per_model_param=masks)
        out[name] = [float(s[f"llc-chain/{c}"]) for c in range(hp["num_chains"])]
    return time.perf_counter() - t0, out


def activation_bytes(model, loader, heads, sizes: list[int]) -> list[dict]:
    """Per block size k and layer group: bytes autograd saves for the backward of one step of k (restriction, chain)
    pairs (unique storages, via ``saved_tensors_hooks``): the memory that grows with the block. Device-agnostic and
    exact, unlike a process's peak RSS (which the allocator and the data cache dominate at these sizes)."""
    from slt_tools.sampling.refined import RefinedProblem
    from slt_tools.sampling.refined_heads import factored_lift
    from slt_tools.sampling.steps import BatchedLossGrad, scatter_lift

    problem = RefinedProblem.build(model, loader, slt.losses.causal_lm, heads)
    batch = next(problem.base.data.stream(0))
    rows = []
    for group in problem.groups:
        fac = group.factored
        loss_grad = BatchedLossGrad(group.loss_at if fac is None else fac.loss_at,
                                    lift=scatter_lift if fac is None else factored_lift)
        for k in sizes:
            pick = torch.arange(k) % len(group.names)
            index = group.index[pick]
            context = (index, group.theta0) if fac is None else (index, group.theta0, fac.keep[pick])
            seen: dict[int, int] = {}

            def pack(t: torch.Tensor, seen: dict[int, int] = seen) -> torch.Tensor:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss_grad(group.theta0[index], (context, batch))
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


def timed_batched(model, loader, heads, hp, blocks: list[int], **extra) -> tuple[dict[int, float], dict[int, object]]:
    """Wall time and result of one batched call over every head, per block size (pairs per vmapped block)."""
    times, results = {}, {}
    label = "batched" if extra.get("factor_heads", True) else "batched_plain"
    for k in blocks:
        t0 = time.perf_counter()
        results[k] = ours(model, loader, heads, hp, chain_chunk_size=k, **extra)
        times[k] = time.perf_counter() - t0
        print(f"  {label:13s}: {times[k]:7.1f} s  (16 heads × 4 chains in one call, {k} pairs per block)", flush=True)
    return times, results


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory(model, loader, heads, hp, heads_per_run: list[int]) -> list[dict]:
    """Peak resident memory of one batched call of R heads × C chains, all R·C pairs in one block (the memory that
    chunking bounds), minus the resident memory before it: Linux's high-water mark VmHWM, reset before each call
    (``/proc/self/clear_refs`` = 5) after glibc returned its free memory (``malloc_trim``). Also R = 16 with the
    default block, which chunking keeps at the small blocks' peak. A few draws suffice: the peak is one step's."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    names = list(heads)
    rows = []
    for r, chunk in [(r, None) for r in heads_per_run] + [(len(names), 0)]:
        subset = {n: heads[n] for n in names[:r]}
        pairs = r * hp["num_chains"]
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kib("VmRSS")
        ours(model, loader, subset, dict(hp, num_draws=2), chain_chunk_size=None if chunk == 0 else pairs)
        peak = _rss_kib("VmHWM")
        block = pairs if chunk is None else "default"
        rows.append({"restrictions": r, "pairs": pairs, "pairs_per_block": block,
                     "peak_rss_mib": (peak - before) / 1024})
        print(f"  peak memory: {r:2d} heads × {hp['num_chains']} chains, block {block}: "
              f"{rows[-1]['peak_rss_mib']:7.1f} MiB above the {before / 1024:.0f} MiB before", flush=True)
    return rows


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller model, fewer draws, no memory curve")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--n-ctx", type=int, default=32)
    p.add_argument("--n-seq", type=int, default=512)
    p.add_argument("--draws", type=int, default=16)
    p.add_argument("--blocks", type=int, nargs="+", default=[8, 32],
                   help="pairs per block of the batched call (32 = a whole layer's heads × chains)")
    p.add_argument("--memory-heads", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="R of the peak-memory runs (R heads × 4 chains in one block)")
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
        args.d_model, args.vocab, args.draws, args.memory_heads = 32, 32, 16, [1, 2]
    model, loader = build(args.d_model, args.vocab, args.n_ctx, args.n_seq, 300)
    heads = slt.restrictions.heads(model)
    n_params = sum(p.numel() for p in model.parameters())
    hp = dict(num_chains=4, num_draws=args.draws, num_burnin_steps=0, lr=args.lr, localization=args.gamma,
              nbeta=args.nbeta, seed=0, mala_every=0)
    print(f"model: {n_params} parameters, {len(heads)} heads of {heads['l0h0'].numel} coordinates; "
          f"{hp['num_chains']} chains × {args.draws} draws per head, no burn-in", flush=True)
    ours(model, loader, {"l0h0": heads["l0h0"]}, dict(hp, num_draws=2))  # warm-up (allocator, first vmap trace)
    times, batched = timed_batched(model, loader, heads, hp, args.blocks[:1])
    plain_times, plain = timed_batched(model, loader, heads, hp, args.blocks[:1], factor_heads=False)
    t0 = time.perf_counter()
    sequential = {}
    for r in heads.values():
        sequential.update(ours(model, loader, r, hp).results)
    t_seq = time.perf_counter() - t0
    print(f"  sequential   : {t_seq:7.1f} s  (one call per head, 4 pairs per block)", flush=True)
    more_times, more = timed_batched(model, loader, heads, hp, args.blocks[1:])
    times.update(more_times)
    batched.update(more)
    best = min(times, key=times.get)
    dev = None if args.no_devinterp else devinterp_per_head(model, loader, heads, hp, batched[best].init_loss)
    t_dev = None if dev is None else dev[0]
    t_dev_kept = None
    if dev is not None:    # devinterp with freed host memory kept as our runs keep it (its own runs do not)
        with slt.sampling.host_memory.retained_host_memory("cpu"):
            t_dev_kept = devinterp_per_head(model, loader, heads, hp, batched[best].init_loss)[0]
        print(f"  devinterp    : {t_dev:7.1f} s; {t_dev_kept:7.1f} s with freed host memory kept", flush=True)
    print(f"  → best batched ({best} pairs per block) vs sequential {t_seq / times[best]:.2f}×, vs its plain lift "
          f"{plain_times[args.blocks[0]] / times[args.blocks[0]]:.2f}× (at {args.blocks[0]} pairs per block)"
          + ("" if t_dev is None else f"; devinterp {t_dev:.1f} s → {t_dev / times[best]:.2f}×"), flush=True)
    agreement = compare(batched[best], sequential, None if dev is None else dev[1])
    agreement["max_abs_diff_any_block_vs_sequential"] = max(
        float(np.max(np.abs(res[k].llc_per_chain - sequential[k].llc_per_chain))) for res in batched.values()
        for k in heads)
    agreement["max_abs_diff_factored_vs_plain"] = max(
        float(np.max(np.abs(batched[args.blocks[0]][k].llc_per_chain - plain[args.blocks[0]][k].llc_per_chain)))
        for k in heads)
    print(f"  max |Δλ̂| per chain: batched (any block size) vs sequential "
          f"{agreement['max_abs_diff_any_block_vs_sequential']:.2e}, factored vs plain "
          f"{agreement['max_abs_diff_factored_vs_plain']:.2e}", flush=True)
    if dev is not None:
        print(f"  max |z| batched vs devinterp: {agreement['max_abs_z_vs_devinterp']:.2f}; heads within 2 SE: "
              f"{agreement['heads_within_2_sem_of_devinterp']}/16")
    memory = activation_bytes(model, loader, heads, [1, 4, 8, 16, 32])
    peak = peak_memory(model, loader, heads, hp, args.memory_heads)
    out = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
                       "load_average_1min": os.getloadavg()[0], "torch": torch.__version__},
           "model": {"n_layers": 2, "n_heads": 8, "d_model": args.d_model, "d_vocab": args.vocab,
                     "n_ctx": args.n_ctx, "attn_only": True, "num_params": n_params,
                     "head_coordinates": heads["l0h0"].numel, "n_samples": args.n_seq, "batch_size": 32},
           "hyperparameters": hp, "init_loss": batched[best].init_loss,
           "wall_s": {"batched_by_pairs_per_block": times, "batched_plain_lift_by_pairs_per_block": plain_times,
                      "sequential": t_seq, "devinterp": t_dev, "devinterp_host_memory_kept": t_dev_kept},
           "speedup": {"best_batched_vs_sequential": t_seq / times[best],
                       "best_batched_vs_devinterp": None if t_dev is None else t_dev / times[best],
                       "best_batched_vs_devinterp_host_memory_kept": None if t_dev_kept is None
                       else t_dev_kept / times[best],
                       "factored_vs_plain_lift": plain_times[args.blocks[0]] / times[args.blocks[0]],
                       "sequential_vs_devinterp": None if t_dev is None else t_dev / t_seq},
           "agreement": agreement, "memory_vs_pairs_per_block": memory, "peak_rss_vs_pairs": peak,
           "table": batched[best].table()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda f: json.dump(slt.sampling.result.json_safe(out), f, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
