"""Benchmark: an LLC sweep over 50 checkpoints of a small model — single process vs ``torchrun`` with 2 processes,
and the overhead of the resumable results store (sweep with vs without a store).

    python experiments/bench_trajectory.py [--out experiments/results/bench_trajectory.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FIX = HERE.parent / "tests" / "fixtures" / "tiny_problem.py"
sys.path.insert(0, str(FIX.parent))
import tiny_problem as tp  # noqa: E402

import slt_tools as slt  # noqa: E402

warnings.simplefilter("ignore")
KW = {**tp.LLC_KW, "num_chains": 8, "num_draws": 300}


def sweep(ckpts: Path, results: Path | None) -> float:
    t0 = time.perf_counter()
    slt.llc_trajectory(ckpts, tp.make_model, tp.make_loader(), tp.loss_fn, results=results, progress=False,
                       on_divergence="exclude", chain_chunk_size=4, **KW)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_trajectory.json")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    ckpts = tmp / "ckpts"
    ckpts.mkdir()
    torch.manual_seed(0)
    for i in range(50):
        tp.write_checkpoints(ckpts, num=1, seed=i)
        src = sorted(ckpts.glob("step_*.safetensors"))[-1]
        src.rename(ckpts / f"ckpt_{i:03d}.safetensors.tmp")
    for f in ckpts.glob("*.tmp"):
        f.rename(f.with_suffix(""))
    no_store = min(sweep(ckpts, None) for _ in range(2))
    with_store = min(sweep(ckpts, tmp / f"s{i}.jsonl") for i in range(2))
    script = tmp / "run.py"
    script.write_text(
        "import sys, warnings; warnings.simplefilter('ignore')\n"
        f"sys.path.insert(0, {str(FIX.parent)!r})\n"
        "import tiny_problem as tp, slt_tools as slt\n"
        f"slt.llc_trajectory({str(ckpts)!r}, tp.make_model, tp.make_loader(), tp.loss_fn, results=sys.argv[1],"
        f" progress=False, on_divergence='exclude', chain_chunk_size=4, **{KW!r})\n")
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port=29533", str(script), str(tmp / "d.jsonl")],
                   check=True, env=env, capture_output=True)
    two = time.perf_counter() - t0
    single_store = slt.Trajectory.from_store(tmp / "s0.jsonl")
    dist_store = slt.Trajectory.from_store(tmp / "d.jsonl")
    result = {"checkpoints": 50, "chains": KW["num_chains"], "draws": KW["num_draws"], "chain_chunk_size": 4,
              "single_process_no_store_s": no_store, "single_process_with_store_s": with_store,
              "store_overhead_fraction": (with_store - no_store) / no_store,
              "torchrun_2_processes_s": two, "speedup_2_processes": with_store / two,
              "distributed_equals_single": bool((abs(single_store.llc_mean - dist_store.llc_mean) <= 1e-9
                                                  * (1 + abs(single_store.llc_mean))).all()),
              "cpu_count": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
