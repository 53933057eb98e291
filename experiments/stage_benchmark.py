"""Benchmark: stage detection on synthetic curves with planted stages, against a generic change-point baseline,
and on the published LLC curve of Hoogland et al.'s 2-layer attention-only language model.

    python experiments/stage_benchmark.py [--seeds 40] [--out experiments/results/stage_benchmark.json]

Metrics per noise level (checkpoint-to-checkpoint scatter of λ̂ relative to its level; the published curve has
≈ 0.07 %): boundary precision / recall / F1 with a tolerance of ±0.5 in ln(step) (one-to-one matching), and type
accuracy (each planted stage compared with the detected stage overlapping it most). Baseline: ``ruptures`` PELT (RBF
cost, penalty 3·log n) on λ̂ against log-step, its segments typed with the same A/B rule (LLC and loss change
across the segment).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from slt_tools.files import atomic_write
from slt_tools.stages import Stage, _classify, _delta_loss, detect_stages
from slt_tools.synthetic import make_synthetic_curves

warnings.simplefilter("ignore")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hoogland2024_lm"


def baseline(steps: np.ndarray, llc: np.ndarray, loss: np.ndarray) -> list[Stage]:
    import ruptures

    x = np.log(steps)
    algo = ruptures.Pelt(model="rbf", min_size=3).fit(llc.reshape(-1, 1))
    ends = algo.predict(pen=3 * math.log(len(llc)))
    starts, stages, rng = [0, *ends[:-1]], [], float(np.ptp(llc))
    for a, b in zip(starts, ends):
        b = b - 1
        d = float(np.mean(llc[max(b - 1, a): b + 1]) - np.mean(llc[a: a + 2]))
        dl = _delta_loss(steps, loss, steps[a], steps[b], "log")
        kind = _classify(d, abs(d) > 0.05 * rng, dl, loss, float(np.ptp(loss)), steps[a], steps, "log", 0.01, 0.2)
        stages.append(Stage(float(steps[a]), float(steps[b]), kind, d, dl, float("nan")))
    del x
    return stages


def score(planted, kinds, steps, stages, tol=0.5):
    found = np.log([s.start for s in stages[1:]]) if len(stages) > 1 else np.array([])
    used, tp = set(), 0
    for b in np.log(planted):
        d = [abs(b - f) if i not in used else np.inf for i, f in enumerate(found)]
        if d and min(d) < tol:
            tp += 1
            used.add(int(np.argmin(d)))
    edges = np.log(np.r_[steps[0], planted, steps[-1]])
    right = 0
    for k, kind in enumerate(kinds):
        overlap = [max(0.0, min(edges[k + 1], math.log(s.end)) - max(edges[k], math.log(max(s.start, 1.0))))
                   for s in stages]
        right += stages[int(np.argmax(overlap))].kind == kind
    return tp, len(found) - tp, len(planted) - tp, right, len(kinds)


def evaluate(method, noise: float, seeds: int) -> dict:
    tp = fp = fn = right = total = 0
    t0 = time.perf_counter()
    for seed in range(seeds):
        c = make_synthetic_curves(seed, noise=noise)
        stages = method(c)
        a, b, d, r, n = score(c.boundaries, c.kinds, c.steps, stages)
        tp, fp, fn, right, total = tp + a, fp + b, fn + d, right + r, total + n
    p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"noise": noise, "precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-12),
            "type_accuracy": right / total, "seconds_per_curve": (time.perf_counter() - t0) / seeds}


def hoogland() -> dict | None:
    if not SHARED.exists():
        return None

    def col(name):
        with open(SHARED / name) as f:
            rows = list(csv.reader(f))[1:]
        return np.array([float(r[0]) for r in rows]), np.array([float(r[1]) for r in rows])

    steps, llc = col("llc_mean.csv")
    _, std = col("llc_std.csv")
    out = {}
    for m in (0.02, 0.04, 0.08):
        out[f"min_lengthscale={m}"] = [s.to_dict() for s in detect_stages(steps, llc, llc_std=std, min_lengthscale=m)]
    out["published_boundaries"] = [900, 6500, 8500, 17700]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stage_benchmark.json")
    args = p.parse_args(argv)
    ours = lambda c: detect_stages(c.steps, c.llc, loss=c.loss, llc_std=c.llc_std)  # noqa: E731
    base = lambda c: baseline(c.steps, c.llc, c.loss)  # noqa: E731
    result = {"seeds": args.seeds, "tolerance_log_step": 0.5, "slt_tools": [], "ruptures_pelt": []}
    for noise in (0.001, 0.01, 0.03):
        for name, method in (("slt_tools", ours), ("ruptures_pelt", base)):
            row = evaluate(method, noise, args.seeds)
            result[name].append(row)
            print(name, json.dumps(row), flush=True)
    result["hoogland2024_lm"] = hoogland()
    if result["hoogland2024_lm"]:
        print("Hoogland et al. LM:", [(round(s["start"]), s["kind"]) for s in
                                       result["hoogland2024_lm"]["min_lengthscale=0.04"]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
