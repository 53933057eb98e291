"""A/B speed of two versions of slt_tools on bench_llc's models, in one run, interleaved.

    python experiments/bench_versions.py --old 9945d65 [--new HEAD] [--rounds 5] [--calls 3]
        [--models dln,mlp,transformer] [--modes eager,compiled] [--out experiments/results/bench_versions.json]

Each version is exported with ``git archive`` into a temporary directory and imported from there in its own
subprocess (one process per (version, model, mode) and round, so neither version inherits the other's caches or
compiled graphs); rounds alternate old → new → old → … so that this shared VM's speed drifts hit both alike.
Every process times one warm-up call and then ``--calls`` timed calls of ``estimate_llc`` with the same hand-set
settings (ε, γ, nβ, chains, draws, seed, ``num_burnin_steps=0``, no MALA checks) and keeps the best; the table reports
the best over rounds and the new/old ratio. The models, data and settings are bench_llc's (DLN (10,10,10,10,10),
ReLU MLP 20-64-10, the 2-layer d_model-128 transformer), rebuilt here so the script does not
depend on either version's experiments/ code.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, math, sys, time, warnings
warnings.simplefilter("ignore")
import torch, torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import slt_tools as slt
from slt_tools.models import DeepLinearNetwork, Transformer, TransformerConfig

name, mode, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
gen = torch.Generator().manual_seed(0)
def mse(m, b):
    return F.mse_loss(m(b[0]), b[1])
def xent(m, b):
    t = b[0]; lg = m(t[:, :-1])
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), t[:, 1:].reshape(-1))
torch.manual_seed(0)
if name == "dln":
    model = DeepLinearNetwork((10, 10, 10, 10, 10)); x = torch.randn(10000, 10, generator=gen)
    with torch.no_grad(): data = (x, model(x))
    bs, lf, draws, lr = 100, mse, 300, 1e-5
elif name == "mlp":
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10)); x = torch.randn(10000, 20, generator=gen)
    with torch.no_grad(): data = (x, model(x))
    bs, lf, draws, lr = 100, mse, 300, 1e-5
else:
    cfg = TransformerConfig(n_layers=2, d_model=128, n_heads=4, d_head=32, d_mlp=512, d_vocab=2048, n_ctx=32,
                            attn_only=False, normalization="LN")
    model = Transformer(cfg); data = (torch.randint(0, cfg.d_vocab, (1024, cfg.n_ctx + 1), generator=gen),)
    bs, lf, draws, lr = 16, xent, 40, 1e-6
loader = DataLoader(TensorDataset(*data), batch_size=bs, shuffle=True)
n = len(data[0])
kw = dict(num_chains=8, num_draws=draws, lr=lr, localization=100.0, nbeta=n / math.log(n), seed=0,
          on_divergence="exclude", mala_every=0, num_burnin_steps=0, compile=(mode == "compiled"))
slt.estimate_llc(model, loader, lf, **{**kw, "num_draws": 5})
best, value = math.inf, None
for _ in range(calls):
    t0 = time.perf_counter(); r = slt.estimate_llc(model, loader, lf, **kw)
    best = min(best, time.perf_counter() - t0); value = float(r.llc_mean)
print(json.dumps({"best_s": best, "llc_mean": value}))
"""


def export(rev: str, into: Path) -> Path:
    """``git archive`` of ``rev`` unpacked under ``into``; returns the tree's root."""
    root = into / rev.replace("/", "_")
    root.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


def time_once(tree: Path, model: str, mode: str, calls: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, "-c", WORKER, model, mode, str(calls)], env=env, check=True,
                         capture_output=True, text=True, cwd=tree).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True)
    p.add_argument("--new", default="HEAD")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--models", default="dln,mlp", help="comma-separated: dln, mlp, transformer")
    p.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled")
    p.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "bench_versions.json")
    a = p.parse_args()
    revs = {"old": a.old, "new": a.new}
    shas = {k: subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", v], check=True, capture_output=True,
                              text=True).stdout.strip() for k, v in revs.items()}
    models, modes = a.models.split(","), a.modes.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = {k: export(v, Path(tmp)) for k, v in revs.items()}
        for model in models:
            for mode in modes:
                runs: dict[str, list[dict]] = {"old": [], "new": []}
                for r in range(a.rounds):
                    for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
                        runs[k].append(time_once(trees[k], model, mode, a.calls))
                best = {k: min(x["best_s"] for x in v) for k, v in runs.items()}
                row = {"model": model, "mode": mode, "old_s": best["old"], "new_s": best["new"],
                       "new_over_old": best["new"] / best["old"],
                       "old_all_s": [x["best_s"] for x in runs["old"]], "new_all_s": [x["best_s"] for x in runs["new"]],
                       "llc_old": runs["old"][0]["llc_mean"], "llc_new": runs["new"][0]["llc_mean"]}
                rows.append(row)
                print(f"{model:12s} {mode:9s} old {best['old']:.3f} s  new {best['new']:.3f} s  "
                      f"new/old {row['new_over_old']:.2f}  λ̂ old {row['llc_old']:.4f} new {row['llc_new']:.4f}",
                      flush=True)
    result = {"old": shas["old"], "new": shas["new"], "rounds": a.rounds, "calls_per_round": a.calls,
              "threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
