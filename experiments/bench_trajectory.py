"""Benchmark: an LLC sweep over 50 checkpoints of a small model — single process vs ``torchrun`` with 2 processes,
and the overhead of the resumable results store: measured directly (time spent inside the store's methods, as a
fraction of the sweep) and as the difference of interleaved sweeps with and without a store (noisier).

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
from slt_tools.trajectory.store import ResultsStore  # noqa: E402

warnings.simplefilter("ignore")
KW = {**tp.LLC_KW, "num_chains": 8, "num_draws": 300}


STORE_TIME = [0.0]


def _timed(fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            STORE_TIME[0] += time.perf_counter() - t0
    return wrapper


# time spent inside the store itself (opening/validating, serialising, write + fsync of every unit)
ResultsStore.__init__ = _timed(ResultsStore.__init__)
ResultsStore.append = _timed(ResultsStore.append)


def sweep(ckpts: Path, results: Path | None, **extra) -> tuple[float, float]:
    """(wall time of the sweep, seconds of it spent inside the results store)."""
    STORE_TIME[0] = 0.0
    t0 = time.perf_counter()
    slt.llc_trajectory(ckpts, tp.make_model, tp.make_loader(), tp.loss_fn, results=results, progress=False,
                       on_divergence="exclude", chain_chunk_size=4, **KW, **extra)
    return time.perf_counter() - t0, STORE_TIME[0]


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
        # each is one epoch (step 8) from another seed; distinct steps, as a sweep refuses two checkpoints at one step
        slt.save_checkpoint(ckpts / f"ckpt_{i:03d}.safetensors", slt.trajectory.read_checkpoint(src)[0], step=i + 1)
        src.unlink()
    sweep(ckpts, None)  # warm-up (imports, allocator, caches)
    runs_without, runs_with, store_s = [], [], []
    for i in range(3):  # interleaved, so drifting machine load hits both alike
        runs_without.append(sweep(ckpts, None)[0])
        wall, inside = sweep(ckpts, tmp / f"s{i}.jsonl")
        runs_with.append(wall)
        store_s.append(inside)
    no_store, with_store = min(runs_without), min(runs_with)
    # compile=True: the first sweep in a process includes the one-off compile, later ones reuse the graph
    compiled_first = sweep(ckpts, tmp / "c0.jsonl", compile=True)[0]
    compiled_again = sweep(ckpts, tmp / "c1.jsonl", compile=True)[0]
    compiled_store = slt.Trajectory.from_store(tmp / "c1.jsonl")
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
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(tmp / "d.jsonl")],
                   check=True, env=env, capture_output=True)
    two = time.perf_counter() - t0
    single_store = slt.Trajectory.from_store(tmp / "s0.jsonl")
    dist_store = slt.Trajectory.from_store(tmp / "d.jsonl")
    result = {"checkpoints": 50, "chains": KW["num_chains"], "draws": KW["num_draws"], "chain_chunk_size": 4,
              "single_process_no_store_s": no_store, "single_process_with_store_s": with_store,
              "store_overhead_fraction": (with_store - no_store) / no_store,
              "store_time_inside_s": store_s, "store_time_fraction": min(store_s) / with_store,
              "runs_without_store_s": runs_without, "runs_with_store_s": runs_with,
              "compiled_first_sweep_s": compiled_first, "compiled_later_sweep_s": compiled_again,
              "compiled_max_rel_diff": float((abs(compiled_store.llc_mean - single_store.llc_mean)
                                              / abs(single_store.llc_mean)).max()),
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
