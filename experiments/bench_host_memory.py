"""Benchmark: keeping freed host memory during sampling (slt_tools.sampling.host_memory), before/after.

    python experiments/bench_host_memory.py [--reps 2] [--out experiments/results/bench_host_memory.json]

experiments/bench_refined.py's model (2 layers × 8 heads, d_model 256, d_vocab 1024; trained once here, its state
dict saved to a temporary file with ``torch.save`` and loaded with ``weights_only=True``) and its
batched call (all 16 heads × 4 chains, 16 draws, 8 pairs per block), each timing in a fresh process, alternating
"kept" (the default) and "glibc" (``SLT_TOOLS_KEEP_MALLOC=1``: glibc's malloc defaults): a process's earlier
allocations change what its allocator does, so both are measured from the same start. Also one sequential run
(one call per head) with memory kept. Reported: wall times, medians, and that λ̂ is identical in both modes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_refined import build  # noqa: E402

import slt_tools as slt  # noqa: E402
from slt_tools.files import atomic_write  # noqa: E402

HP = dict(num_chains=4, num_draws=16, num_burnin_steps=0, lr=1e-4, localization=100.0, nbeta=30.0, seed=0,
          mala_every=0)


def child(weights: str, mode: str) -> None:
    """One timed call in this (fresh) process; prints a JSON line."""
    torch.set_num_threads(1)
    model, loader = build(256, 1024, 32, 512, 0)
    model.load_state_dict(torch.load(weights, weights_only=True))
    heads = slt.restrictions.heads(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        if mode == "sequential":
            llc = {}
            for name, r in heads.items():
                llc[name] = slt.estimate_refined_llc(model, loader, slt.losses.causal_lm, r, **HP)[name].llc_mean
        else:
            res = slt.estimate_refined_llc(model, loader, slt.losses.causal_lm, heads, chain_chunk_size=8, **HP)
            llc = {name: res[name].llc_mean for name in heads}
        wall = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "wall_s": wall, "llc": llc}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_host_memory.json")
    p.add_argument("--child", nargs=2, metavar=("WEIGHTS", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)
    torch.set_num_threads(1)
    model, _ = build(256, 1024, 32, 512, 300)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "w.pt")
        torch.save(model.state_dict(), weights)
        for mode in ["kept", "glibc"] * args.reps + ["sequential"]:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            env.pop("SLT_TOOLS_KEEP_MALLOC", None)
            if mode == "glibc":
                env["SLT_TOOLS_KEEP_MALLOC"] = "1"
            out = subprocess.run([sys.executable, __file__, "--child", weights, mode], env=env, check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            runs.append(json.loads(out))
            print(f"  {mode:10s}: {runs[-1]['wall_s']:6.1f} s", flush=True)
    median = {m: statistics.median(r["wall_s"] for r in runs if r["mode"] == m) for m in ("kept", "glibc")}
    same = all(r["llc"] == runs[0]["llc"] for r in runs)
    seq = next(r["wall_s"] for r in runs if r["mode"] == "sequential")
    print(f"  median kept {median['kept']:.1f} s, glibc defaults {median['glibc']:.1f} s → "
          f"{median['glibc'] / median['kept']:.2f}×; sequential (kept) {seq:.1f} s; λ̂ identical: {same}")
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "torch": torch.__version__, "load_average_1min": os.getloadavg()[0], "hyperparameters": HP,
              "runs": [{k: v for k, v in r.items() if k != "llc"} for r in runs], "median_wall_s": median,
              "speedup_kept_vs_glibc": median["glibc"] / median["kept"], "sequential_kept_wall_s": seq,
              "llc_identical_in_every_run": same, "llc": runs[0]["llc"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda f: json.dump(result, f, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
