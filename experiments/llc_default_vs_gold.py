"""The self-calibrating path on reference-suite cases, each checked against an HMC gold at the γ it chose.

    OMP_NUM_THREADS=1 python experiments/llc_default_vs_gold.py --cases relu_n1000,tanh_n1000 \
        [--out experiments/results/llc_default_vs_gold.json]

Where the driver raised γ (the calibrated γ's flat directions could not relax in the budget, docs/calibration.md
step 6), the gold is the exact HMC estimate (:func:`slt_tools.sampling.mala.estimate_llc_mala`, via
``llc_reference_suite.hmc_gold``) of the same localised tempered posterior at the raised γ, so the comparison is
like for like; the row also records the value the chains read at the calibrated γ before it was raised.

Golds are cached by (case, γ) in the output JSON (``golds``; seeded from the rows of earlier runs and, at γ = 1, from
``results/llc_reference_suite.json``): a γ not seen before runs HMC. The cost ratio is measured, not inferred: after
the default path each row runs one plain hand-set run with the settings it chose (ε, γ, burn-in, draws, chains; no
extensions, no probe, another seed) and divides the default path's wall time by that run's.

``ROLES``: which cases shaped the driver's rules (``tuned``) and which were only run after (``held_out``); summaries
are given for both.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from llc_reference_suite import atomic_write, build_cases, commit, hmc_gold  # noqa: E402

import slt_tools as slt  # noqa: E402

#: cases the rules were written while looking at (sessions 1-2: relu/tanh/DLNs at n = 1e3; session 3: the
#: batched-probe/continuation change was tried first on dln_a_n1000 and relu_n1000, the "raise only if its
#: relaxation fits half the budget left" rule on the rank-cut test DLN (4,4,4,4) of tests/test_calibration.py, which
#: is not in the suite) vs run only after (held out: no rule or threshold was changed after seeing them)
ROLES = {"relu_n1000": "tuned", "tanh_n1000": "tuned", "dln_a_n1000": "tuned", "dln_b_n1000": "tuned",
         "relu_n10000": "held_out", "tanh_n10000": "held_out", "dln_a_n10000": "held_out",
         "dln_b_n10000": "held_out", "cnn_n1000": "held_out", "transformer_n1000": "held_out"}


def gold_cache(out: dict) -> dict:
    """(case@γ) → gold record: those already in ``out``, then earlier rows' golds, then the reference suite's γ = 1."""
    cache = dict(out.get("golds", {}))
    for name, r in out.get("rows", {}).items():
        cache.setdefault(f"{name}@{float(r['localization']):g}",
                         {"value": r["gold"], "sem": r["gold_sem"], "doubling_ok": r.get("gold_doubling_ok"),
                          "r_hat": r.get("gold_r_hat"), "wall_s": r.get("gold_wall_s"), "from": "earlier row"})
    ref = Path(__file__).parent / "results" / "llc_reference_suite.json"
    if ref.exists():
        for r in json.loads(ref.read_text()).get("rows", []):
            if r.get("gold_source") == "HMC" and r.get("gold") is not None:
                cache.setdefault(f"{r['case']}@{float(r['localization']):g}",
                                 {"value": r["gold"], "sem": r["gold_sem"], "doubling_ok": r.get("hmc_doubling_ok"),
                                  "r_hat": r.get("hmc_r_hat"), "wall_s": None, "from": ref.name})
    return cache


def plain_run_wall(case, h: dict) -> float:
    """Wall time of one hand-set run with the settings the default path chose (no extensions, no probe)."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slt.estimate_llc(case.model, case.loader(), case.loss_fn, lr=h["lr"], localization=h["localization"],
                         num_burnin_steps=h["num_burnin_steps"], num_draws=h["num_draws"],
                         num_chains=h["num_chains"], seed=1, max_extensions=0, convergence_probe=False,
                         on_divergence="exclude", progress=False)
    return time.perf_counter() - t0


def row(name: str, cache: dict) -> dict:
    case = build_cases()[name]()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = slt.estimate_llc(case.model, case.loader(), case.loss_fn, seed=0, progress=False)
    wall = time.perf_counter() - t0
    d, h = res.diagnostics, res.hyperparameters
    key = f"{name}@{float(h['localization']):g}"
    if key not in cache:
        cache[key] = hmc_gold(name, case, float(h["localization"]))
    gold = cache[key]
    plain = plain_run_wall(case, h) if "num_chains" in h and h.get("sampler", "sgld") == "sgld" else float("nan")
    steps = (d.budget or {}).get("steps_spent")
    return {"case": name, "role": ROLES.get(name, "held_out"), "llc": res.llc_mean, "llc_sem": res.llc_sem,
            "converged": d.converged,
            "lr": h["lr"], "localization": h["localization"], "num_burnin_steps": h["num_burnin_steps"],
            "num_draws": h["num_draws"], "llc_by_run_length": d.llc_by_run_length,
            "localization_raised": d.localization_raised, "budget": d.budget, "default_wall_s": wall,
            "final_run_wall_s": d.wall_time_s, "run_wall_s": d.extra.get("run_wall_s"),
            "plain_run_wall_s": plain, "cost_ratio_wall": wall / plain,
            "cost_ratio_steps": steps / (h["num_burnin_steps"] + h["num_draws"]) if steps else None,
            "probe": (d.overdispersed_probe or {}).get("llc_mean") if d.overdispersed_probe else None,
            "degeneracy": d.extra.get("degeneracy"), "sampler": h.get("sampler"),
            "warnings": sorted({type(w.message).__name__ for w in caught}),
            "gold": gold["value"], "gold_sem": gold["sem"], "gold_doubling_ok": gold["doubling_ok"],
            "gold_r_hat": gold["r_hat"], "gold_wall_s": gold["wall_s"],
            "rel_error": (res.llc_mean - gold["value"]) / gold["value"]}


def verdict(r: dict) -> str:
    """correct (converged, within 5 %), FALSE ALARM (flagged but within 5 %), MISS (converged, > 5 % off) or
    flagged (justified: > 5 % off)."""
    off = abs(r["rel_error"]) > 0.05
    if r["converged"]:
        return "MISS" if off else "correct"
    return "flagged (justified)" if off else "FALSE ALARM"


def table(out: dict) -> str:
    """The markdown table and summary of docs/reference_suite.md from the stored rows."""
    lines = ["| case | role | γ (raised?) | default path | HMC gold at that γ | rel. err. | converged | wall | "
             "cost (wall / plain run) | cost (steps / final run) | verdict |", "|" + "---|" * 11]
    rows = [out["rows"][k] for k in ROLES if "cost_ratio_wall" in out["rows"].get(k, {})]  # this format only
    for r in rows:
        raised = r.get("localization_raised")
        g = f"{r['localization']:g}" + (f" ({raised[0]['from']:g} → {r['localization']:g})" if raised else "")
        lines.append(f"| {r['case']} | {r['role']} | {g} | {r['llc']:.2f} ± {r['llc_sem']:.2f} | {r['gold']:.2f} ± "
                     f"{r['gold_sem']:.2f} | {100 * r['rel_error']:+.1f} % | {'yes' if r['converged'] else 'no'} | "
                     f"{r['default_wall_s']:.0f} s | {r['cost_ratio_wall']:.2f}× | {r['cost_ratio_steps']:.2f}× | "
                     f"{verdict(r)} |")
    for role in ("tuned", "held_out", None):
        sel = [r for r in rows if role is None or r["role"] == role]
        if not sel:
            continue
        errs = sorted(abs(r["rel_error"]) for r in sel)
        conv = [abs(r["rel_error"]) for r in sel if r["converged"]]
        near = [r for r in sel if abs(r["rel_error"]) <= 0.05]
        lines.append(f"\n{role or 'all'}: {len(sel)} cases, median |err| {100 * float(np.median(errs)):.1f} %, "
                     f"worst converged {100 * max(conv, default=float('nan')):.1f} %, false alarms "
                     f"{sum(not r['converged'] for r in near)} of {len(near)} within 5 %, misses "
                     f"{sum(r['converged'] and abs(r['rel_error']) > 0.05 for r in sel)}, cost (wall) "
                     f"{min(r['cost_ratio_wall'] for r in sel):.2f}–{max(r['cost_ratio_wall'] for r in sel):.2f}×, "
                     f"(steps) {min(r['cost_ratio_steps'] for r in sel):.2f}–"
                     f"{max(r['cost_ratio_steps'] for r in sel):.2f}×")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="relu_n1000,tanh_n1000")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "llc_default_vs_gold.json")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the stored rows and exit")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = json.loads(args.out.read_text()) if args.out.exists() else {"rows": {}}
    if args.table:
        print(table(out))
        return 0
    cache = gold_cache(out)
    for name in args.cases.split(","):
        r = row(name, cache)
        out["rows"][name] = r
        out["golds"] = cache
        out.update(commit=commit(), written_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
        atomic_write(args.out, out)
        print(f"{name}: λ̂ = {r['llc']:.3f} ± {r['llc_sem']:.3f} (γ = {r['localization']:g}, converged "
              f"{r['converged']}, {r['default_wall_s']:.0f} s) vs HMC {r['gold']:.3f} ± {r['gold_sem']:.3f}: "
              f"{100 * r['rel_error']:+.1f} %; cost {r['cost_ratio_wall']:.2f}× a plain run (wall)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
