"""Benchmark (issue 20): a susceptibility run over R restrictions, batched with streamed statistics, against (a) the
same batched run also keeping every draw of every observable (``keep_draws=True``) and (b) R sequential
single-restriction runs. Two cases:

* ``induction`` (the issue's case): all 8 heads of the induction-heads study's 2-layer attention-only transformer
  (experiments/susceptibility_study.py, its checkpoint; trained first if absent, ≈ 1 min), per-token susceptibilities
  to the study's two probe sets (repeated / non-repeated sequences), small sampling settings (``--chains``,
  ``--draws``, ``--burnin``, ``--probe``). Each contender runs in its own process, so its peak resident memory is its
  own; the contenders are interleaved (``--repeats`` rounds of streamed, keep_draws, sequential) to spread the
  machine's load over all three.
* ``dln``: a deep linear network (8, 16, 16, 8), R = 16 row restrictions of its middle layer, 4 chains × 200 draws
  (one process, seconds).

Memory is reported two ways: the bytes of the statistics the run returns (the float64 accumulators' summaries vs
the stored draws, counted from the arrays) and each process's peak RSS during the timed run (VmHWM, reset after the
warm-up) next to its RSS just before it.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/bench_observables.py [--case induction dln] [--quick]

Writes experiments/results/bench_observables.json (``--quick``: bench_observables_quick.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import slt_tools as slt
from slt_tools.files import atomic_write
from slt_tools.models import DeepLinearNetwork
from slt_tools.restrictions import Restriction

ROOT = Path(__file__).resolve().parents[1]
MODES = ("streamed", "keep_draws", "sequential")


def machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True)
    return {"commit": commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else ""),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15": list(os.getloadavg()), "torch": torch.__version__}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """VmHWM (the peak since the last reset) where /proc has it, else ru_maxrss (the process's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def stats_bytes(sus: slt.SusceptibilityResult) -> tuple[int, int]:
    """(bytes of the streamed statistics' arrays, bytes of the kept draws) over every restriction and observable."""
    stats = draws = 0
    for name in sus.restrictions:
        for o in sus.refined[name].observables.values():
            for k in o.__dataclass_fields__:
                v = getattr(o, k)
                if isinstance(v, np.ndarray):
                    if k == "draws":
                        draws += v.nbytes
                    else:
                        stats += v.nbytes
    return stats, draws


# ---- the induction-heads transformer (the case)

def induction_problem(args: argparse.Namespace):
    sys.path.insert(0, str(ROOT / "experiments"))
    import induction_heads as ih
    import susceptibility_study as ss

    model, _ = ss.trained_model(args.checkpoints)
    cfg = ih.QUICK
    train = ih.make_data(cfg)[:args.train]
    loader = DataLoader(TensorDataset(train), batch_size=32, shuffle=True)
    probes = {k: (v,) for k, v in ss.probe_sets(cfg, args.probe).items()}
    heads = slt.restrictions.heads(model)
    config = slt.LLCConfig(num_chains=args.chains, num_draws=args.draws, num_burnin_steps=args.burnin,
                           num_steps_bw_draws=1, lr=3e-4, localization=100.0, nbeta=30.0, seed=0, mala_every=0,
                           on_divergence="exclude")
    run_kw = dict(loss_fn=ih.lm_loss, reference_batch=(train[:args.reference],))
    return model, loader, probes, heads, config, ss.per_token_loss, run_kw


def induction_worker(mode: str, args: argparse.Namespace) -> dict:
    """One contender in this process: a short warm-up, then the timed run(s)."""
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model, loader, probes, heads, config, per_token, kw = induction_problem(args)
    first = next(iter(heads))
    slt.susceptibilities(model, loader, probes, {first: heads[first]}, per_token, config.replace(num_draws=3), **kw)
    before = rss_mib()
    reset = reset_peak_rss()
    t = time.perf_counter()
    if mode == "sequential":
        runs = [slt.susceptibilities(model, loader, probes, {k: r}, per_token, config, **kw)
                for k, r in heads.items()]
        chi = {s: np.concatenate([r.chi[s] for r in runs]) for s in probes}
        stats = [stats_bytes(r) for r in runs]
        state, draws = sum(s for s, _ in stats), sum(d for _, d in stats)
    else:
        sus = slt.susceptibilities(model, loader, probes, heads, per_token, config, keep_draws=mode == "keep_draws",
                                   **kw)
        chi = sus.chi
        state, draws = stats_bytes(sus)
    wall = time.perf_counter() - t
    k_obs = 1 + sum(int(b[0].shape[0]) * (int(b[0].shape[1]) - 1) for b in probes.values())
    return {"mode": mode, "wall_s": wall, "rss_before_mib": before, "peak_rss_mib": peak_rss_mib(),
            "peak_is_of_the_run": reset,
            "statistics_bytes": state, "draw_bytes": draws, "restrictions": len(heads),
            "observable_values": k_obs, "chi": {s: v.tolist() for s, v in chi.items()}}


def induction_case(args: argparse.Namespace) -> dict:
    import susceptibility_study as ss  # noqa: F401  (path set by induction_problem)

    induction_problem(args)  # trains the checkpoint once, here, if absent
    rounds = []
    for rep in range(args.repeats):
        for mode in MODES:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "worker.json"
                cmd = [sys.executable, __file__, "--worker", mode, "--worker-out", str(out), *worker_flags(args)]
                print(f"[induction] round {rep + 1}/{args.repeats}: {mode}", flush=True)
                subprocess.run(cmd, check=True)
                got = json.loads(out.read_text())
            got["round"] = rep
            print(f"  {mode:10s}: {got['wall_s']:7.1f} s, peak RSS {got['peak_rss_mib']:.0f} MiB "
                  f"(before the run {got['rss_before_mib']:.0f}), statistics {got['statistics_bytes'] / 1e6:.2f} MB, "
                  f"draws {got['draw_bytes'] / 1e6:.2f} MB", flush=True)
            rounds.append(got)
    by = {m: [r for r in rounds if r["mode"] == m] for m in MODES}
    ref = by["streamed"][0]["chi"]
    agree = {m: max(float(np.max(np.abs(np.array(r["chi"][s]) - np.array(ref[s])))) for r in by[m] for s in ref)
             for m in MODES}
    wall = {m: [r["wall_s"] for r in by[m]] for m in MODES}
    med = {m: float(np.median(v)) for m, v in wall.items()}
    return {"settings": {"restrictions": "slt.restrictions.heads(model): all 8 heads (2 layers × 4)",
                         "num_chains": args.chains, "num_draws": args.draws, "num_burnin_steps": args.burnin,
                         "num_steps_bw_draws": 1, "probe_sequences_per_set": args.probe,
                         "reference_sequences": args.reference, "train_sequences": args.train, "batch_size": 32,
                         "lr": 3e-4, "localization": 100.0, "nbeta": 30.0, "repeats": args.repeats},
            "observable_values": by["streamed"][0]["observable_values"],
            "wall_s": wall, "median_wall_s": med,
            "speedup_batched_vs_sequential": med["sequential"] / med["streamed"],
            "keep_draws_overhead": med["keep_draws"] / med["streamed"],
            "peak_rss_mib": {m: [r["peak_rss_mib"] for r in by[m]] for m in MODES},
            "rss_before_run_mib": {m: [r["rss_before_mib"] for r in by[m]] for m in MODES},
            "statistics_bytes": {m: by[m][0]["statistics_bytes"] for m in MODES},
            "draw_bytes": {m: by[m][0]["draw_bytes"] for m in MODES},
            "max_abs_chi_diff_vs_streamed": agree}


def worker_flags(args: argparse.Namespace) -> list[str]:
    return ["--chains", str(args.chains), "--draws", str(args.draws), "--burnin", str(args.burnin),
            "--probe", str(args.probe), "--reference", str(args.reference), "--train", str(args.train),
            "--checkpoints", str(args.checkpoints)]


# ---- the deep linear network (seconds)

def dln_case() -> dict:
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
    out: dict = {"settings": {"model": "DeepLinearNetwork((8, 16, 16, 8))", "restrictions": "16 rows of layers.1",
                              "num_chains": 4, "num_draws": 200, "num_burnin_steps": 100, "probe_samples": 256,
                              "reference_size": 128}}
    t = time.perf_counter()
    sus = slt.susceptibilities(model, loader, probes, rs, per_sample, config, reference_size=128)
    out["streamed_s"] = time.perf_counter() - t
    out["statistics_bytes"] = stats_bytes(sus)[0]
    t = time.perf_counter()
    kept = slt.susceptibilities(model, loader, probes, rs, per_sample, config, reference_size=128, keep_draws=True)
    out["keep_draws_s"] = time.perf_counter() - t
    out["draw_bytes"] = stats_bytes(kept)[1]
    t = time.perf_counter()
    seq = [slt.susceptibilities(model, loader, probes, {k: r}, per_sample, config, reference_size=128)
           for k, r in rs.items()]
    out["sequential_s"] = time.perf_counter() - t
    out["max_abs_chi_diff_sequential_vs_batched"] = max(
        float(np.max(np.abs(np.concatenate([s.chi[p] for s in seq]) - sus.chi[p]))) for p in probes)
    out["max_abs_chi_diff_keep_draws_vs_streamed"] = max(
        float(np.max(np.abs(kept.chi[p] - sus.chi[p]))) for p in probes)
    print(f"[dln] R=16: streamed {out['streamed_s']:.2f} s, keep_draws {out['keep_draws_s']:.2f} s, "
          f"16 sequential {out['sequential_s']:.2f} s; statistics {out['statistics_bytes'] / 1e6:.2f} MB, "
          f"draws {out['draw_bytes'] / 1e6:.2f} MB", flush=True)
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", nargs="+", choices=("induction", "dln"), default=["induction", "dln"])
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--burnin", type=int, default=50)
    p.add_argument("--probe", type=int, default=32, help="sequences per probe set")
    p.add_argument("--reference", type=int, default=64)
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds of the three contenders")
    p.add_argument("--checkpoints", type=Path, default=ROOT / "runs" / "induction_heads-quick")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.chains, args.draws, args.burnin, args.probe, args.reference, args.train = 2, 6, 2, 4, 16, 64
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.worker:
        args.worker_out.write_text(json.dumps(induction_worker(args.worker, args)))
        return 0
    out: dict = {"command": " ".join(["experiments/bench_observables.py", *(argv or sys.argv[1:])]),
                 "machine": machine()}
    if "induction" in args.case:
        out["induction"] = induction_case(args)
    if "dln" in args.case:
        out["dln"] = dln_case()
    out["machine"]["load_average_1_5_15_at_end"] = list(os.getloadavg())
    path = args.out or ROOT / "experiments" / "results" / f"bench_observables{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: json.dump(slt.sampling.result.json_safe(out), f, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
