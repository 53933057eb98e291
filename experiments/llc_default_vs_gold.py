"""The self-calibrating path on reference-suite cases, each checked against an HMC gold at the γ it chose.

    OMP_NUM_THREADS=1 python experiments/llc_default_vs_gold.py --cases relu_n1000,tanh_n1000 \
        [--out experiments/results/llc_default_vs_gold.json]

Where the driver raised γ (the calibrated γ's flat directions could not relax in the budget, docs/calibration.md
step 6), the gold is the exact HMC estimate (:func:`slt_tools.sampling.mala.estimate_llc_mala`, via
``llc_reference_suite.hmc_gold``) of the same localised tempered posterior at the raised γ, so the comparison is
like for like; the row also records the value the chains read at the calibrated γ before it was raised.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from llc_reference_suite import atomic_write, build_cases, commit, hmc_gold  # noqa: E402

import slt_tools as slt  # noqa: E402


def row(name: str) -> dict:
    case = build_cases()[name]()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = slt.estimate_llc(case.model, case.loader(), case.loss_fn, seed=0, progress=False)
    wall = time.perf_counter() - t0
    d, h = res.diagnostics, res.hyperparameters
    gold = hmc_gold(name, case, float(h["localization"]))
    return {"case": name, "llc": res.llc_mean, "llc_sem": res.llc_sem, "converged": d.converged,
            "lr": h["lr"], "localization": h["localization"], "num_burnin_steps": h["num_burnin_steps"],
            "num_draws": h["num_draws"], "llc_by_run_length": d.llc_by_run_length,
            "localization_raised": d.localization_raised, "budget": d.budget, "default_wall_s": wall,
            "final_run_wall_s": d.wall_time_s,
            "warnings": sorted({type(w.message).__name__ for w in caught}),
            "gold": gold["value"], "gold_sem": gold["sem"], "gold_doubling_ok": gold["doubling_ok"],
            "gold_r_hat": gold["r_hat"], "gold_wall_s": gold["wall_s"],
            "rel_error": (res.llc_mean - gold["value"]) / gold["value"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="relu_n1000,tanh_n1000")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "llc_default_vs_gold.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = json.loads(args.out.read_text()) if args.out.exists() else {"rows": {}}
    for name in args.cases.split(","):
        r = row(name)
        out["rows"][name] = r
        out.update(commit=commit(), written_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
        atomic_write(args.out, out)
        print(f"{name}: λ̂ = {r['llc']:.3f} ± {r['llc_sem']:.3f} (γ = {r['localization']:g}, converged "
              f"{r['converged']}, {r['default_wall_s']:.0f} s) vs HMC {r['gold']:.3f} ± {r['gold_sem']:.3f}: "
              f"{100 * r['rel_error']:+.1f} %", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
