"""LLC reference suite for issue 16: models nobody tuned the calibration on, each with a gold reference, and the
current default (self-calibrated) path measured against it — the BEFORE table.

    OMP_NUM_THREADS=1 python experiments/llc_reference_suite.py [--phase default|gold|all] [--cases a,b]
        [--default-timeout 240] [--out experiments/results/llc_reference_suite.json]

Cases (all at exact critical points of the *empirical* loss, science-notes "bias trap"):
  * deep linear networks at noise-free points where rank(J)/2 equals Aoyagi's λ (closed form) — gold = closed form,
    with an HMC check at the same (nβ, γ);
  * a ReLU MLP and a tanh MLP whose weights *are* the noise-free teacher's (loss exactly 0, a critical point);
  * a small ReLU CNN (≈ 1.2k parameters) at its own teacher;
  * a tiny attention-only transformer (``slt_tools.models.Transformer``) trained on its own soft predictions
    (soft-label cross-entropy: the minimum is the teacher, where the KL part vanishes).
Gold references for the networks without a closed form are exactly Metropolis-adjusted samples
(:func:`slt_tools.sampling.mala.estimate_llc_mala`, HMC) of p(w) ∝ exp(−nβ L_n(w) − γ/2 ‖w − w*‖²) with nβ = n/log n
and γ the localization the default path chose (the LLC estimate depends on γ), run long enough that doubling the
run moves λ̂ by less than its SE; plus a long SGLD run at a small step as a cross-check. The default path runs in a
subprocess with a hard timeout per case.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))

RESULTS = Path(__file__).parent / "results"


@dataclass
class Case:
    """One suite entry: a model at w*, its data, loss and (where it exists) a closed-form LLC."""

    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: Callable[[Any, Any], torch.Tensor]
    batch_size: int
    closed_form: float | None = None
    closed_form_source: str | None = None
    note: str = ""

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def d(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True)


def mse(m: Any, b: Any) -> torch.Tensor:
    return F.mse_loss(m(b[0]), b[1])


def soft_xent(m: Any, b: Any) -> torch.Tensor:
    """Cross-entropy against the teacher's next-token probabilities (minimised, with zero gradient, at the teacher)."""
    return -(b[1] * torch.log_softmax(m(b[0]), dim=-1)).sum(-1).mean()


def _batch(n: int) -> int:
    return int(min(256, max(32, n // 8)))


def dln_case(widths: tuple[int, ...], rank: int, cut: int, n: int, seed: int) -> Case:
    from bench_llc import dln_point

    model, local, aoyagi = dln_point(widths, rank, cut, seed=seed)
    if local != aoyagi:
        raise ValueError(f"DLN {widths} r={rank} cut={cut}: rank(J)/2 = {local} ≠ Aoyagi {aoyagi}")
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, widths[0], generator=gen)
    with torch.no_grad():
        y = model(x)
    return Case(f"DLN{widths} r{rank} n{n}", model, x, y, mse, _batch(n), local,
                "rank(J)/2 = Aoyagi (2024) global λ (slt_tools.theory)",
                f"noise-free DLN, rank cut in layer {cut}")


class MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int, act: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(torch.relu(h) if self.act == "relu" else torch.tanh(h))


def mlp_case(act: str, n: int, seed: int) -> Case:
    torch.manual_seed(seed)
    model = MLP(4, 12, 2, act)  # d = 4·12 + 12 + 12·2 + 2 = 86
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (1.0 if p.ndim > 1 else 0.5))
    gen = torch.Generator().manual_seed(2000 + seed)
    x = torch.randn(n, 4, generator=gen)
    with torch.no_grad():
        y = model(x)
    return Case(f"{act}-MLP(4,12,2) n{n}", model, x, y, mse, _batch(n),
                note="w* = noise-free teacher (L_n(w*) = 0 exactly, a critical point)")


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 6, 3), nn.Conv2d(6, 12, 3)
        self.fc = nn.Linear(12 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))  # 8×8 → 6×6 → 4×4
        h = F.avg_pool2d(h, 2).flatten(-3)  # 12 × 2 × 2
        return self.fc(h)


def cnn_case(n: int, seed: int) -> Case:
    torch.manual_seed(seed)
    model = CNN()  # d = 60 + 660 + 196 = 916
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    gen = torch.Generator().manual_seed(3000 + seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    with torch.no_grad():
        y = model(x)
    return Case(f"CNN(2 conv) n{n}", model, x, y, mse, _batch(n),
                note="w* = noise-free teacher (L_n(w*) = 0 exactly)")


def transformer_case(n: int, seed: int) -> Case:
    from slt_tools.models import Transformer, TransformerConfig

    torch.manual_seed(seed)
    cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=4, attn_only=True,
                            init_std=0.5)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    gen = torch.Generator().manual_seed(4000 + seed)
    x = torch.randint(0, cfg.d_vocab, (n, cfg.n_ctx), generator=gen)
    with torch.no_grad():
        y = torch.softmax(model(x), dim=-1)
    return Case(f"Transformer(1L attn, V5, T4) n{n}", model, x, y, soft_xent, _batch(n),
                note="w* = teacher under soft-label cross-entropy (KL part 0, zero gradient)")


def build_cases() -> dict[str, Callable[[], Case]]:
    """Name → builder (deterministic: builders are re-run inside the default-path subprocess)."""
    out: dict[str, Callable[[], Case]] = {}
    for n in (1_000, 10_000):
        out[f"dln_a_n{n}"] = lambda n=n: dln_case((9, 4, 6), 1, 1, n, 0)
        out[f"dln_b_n{n}"] = lambda n=n: dln_case((5, 4, 3, 5), 2, 1, n, 1)
        out[f"relu_n{n}"] = lambda n=n: mlp_case("relu", n, 0)
        out[f"tanh_n{n}"] = lambda n=n: mlp_case("tanh", n, 0)
        out[f"transformer_n{n}"] = lambda n=n: transformer_case(n, 0)
    out["cnn_n1000"] = lambda: cnn_case(1_000, 0)
    return out


# ---------------------------------------------------------------------------------------------- the default path
def default_worker(name: str) -> None:
    """Run the default path (``lr``/``localization`` unset) on one case, printing JSON lines: the calibration as soon as
    it returns (so a timeout still records the γ it chose), then the result."""
    import slt_tools as slt
    from slt_tools.sampling import calibration

    case = build_cases()[name]()
    original = calibration.calibrate_llc
    t0 = time.perf_counter()

    def spy(*args: Any, **kwargs: Any) -> Any:
        cal = original(*args, **kwargs)
        print(json.dumps({"event": "calibrated", "lr": cal.lr, "localization": cal.localization,
                          "num_draws": cal.num_draws, "num_burnin_steps": cal.num_burnin_steps,
                          "calibration_wall_s": cal.wall_time_s, "t": time.perf_counter() - t0}), flush=True)
        return cal

    calibration.calibrate_llc = spy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = slt.estimate_llc(case.model, case.loader(), case.loss_fn, seed=0)
    d = res.diagnostics
    print(json.dumps({"event": "result", "llc": res.llc_mean, "llc_sem": res.llc_sem,
                      "converged": bool(d.get("converged")), "extensions": d.get("extensions"),
                      "llc_by_run_length": d.get("llc_by_run_length"),
                      "probe": (d.get("overdispersed_probe") or {}).get("llc_mean"),
                      "nbeta": res.hyperparameters["nbeta"], "localization": res.hyperparameters["localization"],
                      "lr": res.hyperparameters["lr"], "num_draws": res.hyperparameters["num_draws"],
                      "final_run_wall_s": d.get("wall_time_s"), "wall_s": time.perf_counter() - t0}), flush=True)


def run_default(name: str, timeout: float) -> dict[str, Any]:
    """The default path in a subprocess with a hard timeout; returns what it printed (and "timed_out")."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker-default", name]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out, timed_out, rc = proc.stdout, False, proc.returncode
        err = proc.stderr[-2000:]
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        timed_out, rc, err = True, None, ""
    row: dict[str, Any] = {"timed_out": timed_out, "returncode": rc, "wall_s": time.perf_counter() - t0,
                           "timeout_s": timeout}
    for line in out.splitlines():
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        row.update({k: v for k, v in ev.items() if k not in ("event", "wall_s", "t")})
        if ev.get("event") == "calibrated":
            row["calibration_t_s"] = ev["t"]
    if rc not in (0, None):
        row["stderr_tail"] = err
    return row


def atomic_write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def phase_default(names: list[str], timeout: float, path: Path) -> None:
    store = load(path)
    for name in names:
        row = run_default(name, timeout)
        store[name] = row
        atomic_write(path, store)
        print(name, json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------------ gold references
#: HMC settings per case (chains, warm-up, draws of the doubled run, K_max): sized to the 2-core machine's budget
GOLD_SETTINGS: dict[str, dict[str, int]] = {
    "default": dict(num_chains=8, num_warmup=300, num_draws=2000, num_leapfrog=16),
    "big_n": dict(num_chains=8, num_warmup=200, num_draws=800, num_leapfrog=16),
    "slow_model": dict(num_chains=4, num_warmup=150, num_draws=500, num_leapfrog=8),
}


#: cases without an HMC gold: full-data gradients of 10⁴ sequences × chains cost ~1 s per leapfrog step here
NO_HMC = {"transformer_n10000"}


def gold_settings(name: str) -> dict[str, int]:
    if name.startswith(("cnn", "transformer")):
        return GOLD_SETTINGS["slow_model"]
    return GOLD_SETTINGS["big_n" if name.endswith("n10000") else "default"]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def hmc_gold(key: str, case: Case, gamma: float, seed: int = 0, scale: int = 1) -> dict[str, Any]:
    """HMC on the full-data posterior at nβ = n/log n and γ; the doubling check compares λ̂ over the first half of
    the draws (exactly the run of half the length: same seed, same warm-up) with λ̂ over all of them."""
    from slt_tools.sampling.mala import estimate_llc_mala

    cfg = dict(gold_settings(key))
    cfg["num_draws"] *= scale
    res = estimate_llc_mala(case.model, case.loader(), case.loss_fn, localization=gamma, seed=seed, **cfg)
    half = res.llc_trace[:, : cfg["num_draws"] // 2].mean(axis=1)
    half_mean, half_sem = float(half.mean()), float(half.std(ddof=1) / math.sqrt(len(half)))
    moved = abs(res.llc_mean - half_mean)
    return {"method": "HMC (slt_tools.sampling.mala.estimate_llc_mala)", "value": res.llc_mean,
            "sem": res.llc_sem, "sem_ess": res.llc_sem_ess, "std": res.llc_std,
            "half_run_value": half_mean, "half_run_sem": half_sem, "doubling_moved": moved,
            "doubling_ok": bool(moved <= max(res.llc_sem, res.llc_sem_ess)),
            "acceptance": res.acceptance, "step_size": res.step_size, "r_hat": res.r_hat,
            "ess_per_chain": res.ess_per_chain.tolist(), "geweke_max_abs_z": res.geweke_max_abs_z,
            "nbeta": res.nbeta, "localization": gamma, "settings": res.settings, "wall_s": res.wall_time_s}


def sgld_crosscheck(case: Case, gamma: float, lr: float, steps: int, seed: int = 1) -> dict[str, Any]:
    """A long hand-set SGLD run (minibatch, the estimator under test) at a small step, same nβ and γ."""
    import warnings

    import slt_tools as slt

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = slt.estimate_llc(case.model, case.loader(), case.loss_fn, lr=lr, localization=gamma, num_chains=8,
                               num_draws=steps, num_burnin_steps=steps // 4, seed=seed, on_divergence="exclude")
    half = res.llc_trace[:, : steps // 2].mean(axis=1)
    return {"method": "SGLD (slt.estimate_llc, hand-set)", "value": res.llc_mean, "sem": res.llc_sem,
            "half_run_value": float(np.nanmean(half)), "lr": lr, "localization": gamma,
            "nbeta": res.hyperparameters["nbeta"], "num_chains": 8, "num_draws": steps,
            "num_burnin_steps": steps // 4, "seed": seed, "batch_size": case.batch_size,
            "mala_acceptance": res.diagnostics.get("mala_acceptance"), "stationary": res.diagnostics["stationary"],
            "wall_s": time.perf_counter() - t0}


def sgld_steps(lr: float, gamma: float, long: bool, slow_model: bool) -> int:
    """Long pass: diffusion time ε·steps ≥ 10/γ (the localising Gaussian's relaxation time is ~2/(γ)), capped;
    short pass: a fixed length."""
    if not long:
        return 4000 if slow_model else 12000
    return int(min(math.ceil(10.0 / (gamma * lr)), 60_000 if slow_model else 300_000))


def phase_gold(names: list[str], default_store: dict[str, Any], path: Path, long: bool = False,
               previous: dict[str, Any] | None = None) -> None:
    """Gold reference per case at the γ the default path chose (1 if it recorded none). ``long``: an independent
    HMC run (seed 1) of twice the draws and SGLD at the default path's own step for diffusion time ≥ 10/γ; the
    earlier short pass (``previous``) is kept in the row as ``hmc_short`` / ``sgld_short``."""
    for name in names:
        case = build_cases()[name]()
        dflt = default_store.get(name, {})
        gamma = float(dflt.get("localization") or 1.0)
        lr_small = float(dflt.get("lr") or 1e-4) / (1.0 if long else 3.0)
        slow = name.startswith(("cnn", "transformer"))
        row: dict[str, Any] = {"n": case.n, "d": case.d, "nbeta": case.n / math.log(case.n), "localization": gamma,
                               "note": case.note, "commit": commit(), "gamma_source":
                               "chosen by the default path" if dflt.get("localization") else "default γ = 1"}
        if case.closed_form is not None:
            row["closed_form"] = {"value": case.closed_form, "source": case.closed_form_source}
        if name not in NO_HMC and (case.closed_form is None or name.endswith("n1000")):
            row["hmc"] = hmc_gold(name, case, gamma, seed=1 if long else 0, scale=2 if long else 1)
        row["sgld"] = sgld_crosscheck(case, gamma, lr_small, sgld_steps(lr_small, gamma, long, slow))
        for key in ("hmc", "sgld"):
            if long and key in (previous or {}).get(name, {}):
                row[f"{key}_short"] = previous[name][key]
        store = load(path)
        store[name] = row
        atomic_write(path, store)
        shown = {k: v for k, v in row.items() if k in ("closed_form", "hmc", "sgld")}
        print(name, json.dumps(shown, default=str)[:600], flush=True)


def gold_of(g: dict[str, Any]) -> tuple[float | None, float | None, str]:
    """The gold value a case is judged against: the exact finite-(nβ, γ) value from HMC where it was run (the
    quantity every estimator at these settings targets), else the closed form, else the long SGLD run."""
    if "hmc" in g:
        return g["hmc"]["value"], g["hmc"]["sem"], "HMC"
    if "closed_form" in g:
        return g["closed_form"]["value"], 0.0, "closed form"
    return None, None, "none (no HMC: an SGLD run is a cross-check, not a gold)"


def table_row(name: str, dflt: dict[str, Any], g: dict[str, Any]) -> dict[str, Any]:
    """One BEFORE-table row: the default path against the gold, with its verdict classified."""
    value, sem, source = gold_of(g)
    est = dflt.get("llc")
    rel = (est - value) / value if est is not None and value else None
    conv = dflt.get("converged")
    if dflt.get("timed_out"):
        verdict = "timed out"
    elif value is None:
        verdict = "no gold"
    elif rel is None:
        verdict = "no estimate"
    elif conv and abs(rel) > 0.10:
        verdict = "MISS (converged, > 10 % off)"
    elif not conv and abs(rel) <= 0.05:
        verdict = "FALSE ALARM (not converged, within 5 %)"
    else:
        verdict = "correct" if conv else ("not converged (justified: > 10 % off)" if abs(rel) > 0.10
                                          else "not converged (5-10 % off: grey zone)")
    closed = g.get("closed_form", {}).get("value")
    return {"case": name, "n": g.get("n"), "d": g.get("d"), "localization": g.get("localization"),
            "nbeta": g.get("nbeta"), "gold": value, "gold_sem": sem, "gold_source": source, "closed_form": closed,
            "hmc_doubling_ok": g.get("hmc", {}).get("doubling_ok"), "hmc_r_hat": g.get("hmc", {}).get("r_hat"),
            "hmc_short": g.get("hmc_short", {}).get("value"), "sgld": g.get("sgld", {}).get("value"),
            "sgld_eps3": g.get("sgld_eps3", {}).get("value"),
            "sgld_sem": g.get("sgld", {}).get("sem"), "default_llc": est, "default_converged": conv,
            "default_rel_error": rel,
            "default_rel_error_vs_closed_form": (est - closed) / closed if est is not None and closed else None,
            "default_wall_s": dflt.get("wall_s"), "default_timed_out": dflt.get("timed_out"),
            "default_lr": dflt.get("lr"), "default_localization": dflt.get("localization"), "verdict": verdict}


def phase_table(names: list[str], default_path: Path, gold_paths: list[Path], out: Path) -> None:
    dflt = load(default_path)
    gold: dict[str, Any] = {}
    for gp in gold_paths:  # later stores add to (and for equal keys replace) earlier ones, key by key
        for name, row in load(gp).items():
            gold.setdefault(name, {}).update(row)
    rows = [table_row(nm, dflt.get(nm, {}), gold.get(nm, {})) for nm in names]
    errs = sorted(abs(r["default_rel_error"]) for r in rows if r["default_rel_error"] is not None)
    summary = {"false_alarms": sum(r["verdict"].startswith("FALSE") for r in rows),
               "misses": sum(r["verdict"].startswith("MISS") for r in rows),
               "timed_out": sum(r["verdict"] == "timed out" for r in rows),
               "median_abs_rel_error": float(np.median(errs)) if errs else None,
               "max_abs_rel_error": max(errs) if errs else None, "num_cases": len(rows)}
    atomic_write(out, {"rows": rows, "summary": summary, "default_path": dflt, "gold": gold, "commit": commit(),
                       "written_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())})
    print(markdown_table(rows, gold))
    print(json.dumps(summary))


def _fmt(v: Any, spec: str = ".3g") -> str:
    return "—" if v is None else format(v, spec)


def markdown_table(rows: list[dict[str, Any]], gold: dict[str, Any]) -> str:
    """The BEFORE table as Markdown (gold ± SE and provenance, SGLD cross-check, default path, verdict)."""
    head = ("| case | n | d | γ | nβ | gold ± SE (source) | other HMC run | closed form | SGLD cross-checks "
            "| default path | rel. err. | wall | verdict |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        g = gold.get(r["case"], {})
        sgld = "; ".join(f"{sg['value']:.2f} ± {sg['sem']:.2f} ({sg['num_draws'] // 1000}k steps, ε {sg['lr']:.2g})"
                         for sg in (g.get("sgld"), g.get("sgld_eps3")) if sg) or "—"
        gold_txt = "—" if r["gold"] is None else f"{r['gold']:.2f} ± {r['gold_sem']:.2f} ({r['gold_source']})"
        dflt = "timed out" if r["default_timed_out"] else _fmt(r["default_llc"], ".2f")
        rel = "—" if r["default_rel_error"] is None else f"{100 * r['default_rel_error']:+.1f} %"
        lines.append(f"| {r['case']} | {r['n']} | {r['d']} | {_fmt(r['localization'], 'g')} | "
                     f"{_fmt(r['nbeta'], '.0f')} | {gold_txt} | {_fmt(r['hmc_short'], '.2f')} | "
                     f"{_fmt(r['closed_form'], 'g')} | {sgld} | {dflt} | "
                     f"{rel} | {_fmt(r['default_wall_s'], '.0f')} s | {r['verdict']} |")
    return "\n".join(lines)


def phase_stepcheck(names: list[str], default_store: dict[str, Any], path: Path) -> None:
    """Step-size check of the long SGLD cross-check: SGLD at ε/3 (ε = the default path's step) for diffusion time
    ≥ 10/γ (capped at 300k steps), and HMC where a case has only its closed form so far (finite-nβ target)."""
    for name in names:
        case = build_cases()[name]()
        dflt = default_store.get(name, {})
        gamma, lr = float(dflt.get("localization") or 1.0), float(dflt.get("lr") or 1e-4) / 3.0
        row: dict[str, Any] = {}
        if case.closed_form is not None and name.endswith("n10000"):
            row["hmc"] = hmc_gold(name, case, gamma, seed=2, scale=2)
        row["sgld_eps3"] = sgld_crosscheck(case, gamma, lr, sgld_steps(lr, gamma, True,
                                                                      name.startswith(("cnn", "transformer"))))
        store = load(path)
        store[name] = row
        atomic_write(path, store)
        print(name, json.dumps(row, default=str)[:400], flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker-default", default=None, help=argparse.SUPPRESS)
    p.add_argument("--phase", default="all", choices=["default", "gold", "stepcheck", "table", "all"])
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--default-timeout", type=float, default=240.0)
    p.add_argument("--out", type=Path, default=RESULTS / "llc_reference_suite.json")
    p.add_argument("--gold-out", type=Path, default=None, help="gold store (default: <out>_gold.json)")
    p.add_argument("--long", action="store_true", help="gold phase: the long pass (independent, doubled HMC run; "
                   "SGLD for diffusion time ≥ 10/γ); written to <out>_gold_long.json unless --gold-out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker_default:
        default_worker(args.worker_default)
        return 0
    names = args.cases.split(",") if args.cases else list(build_cases())
    default_path = args.out.with_name(args.out.stem + "_default.json")
    if args.phase in ("default", "all"):
        phase_default(names, args.default_timeout, default_path)
    gold_path = args.gold_out or args.out.with_name(args.out.stem + ("_gold_long.json" if args.long else "_gold.json"))
    if args.phase in ("gold", "all"):
        previous = {}
        for gp in sorted(args.out.parent.glob(args.out.stem + "_gold*.json")):
            if "long" not in gp.name:
                previous.update(load(gp))
        phase_gold(names, load(default_path), gold_path, long=args.long, previous=previous)
    if args.phase in ("stepcheck", "all"):
        step_path = args.gold_out or args.out.with_name(args.out.stem + "_gold_step.json")
        phase_stepcheck(names, load(default_path), step_path)
    if args.phase in ("table", "all"):
        stores = sorted(args.out.parent.glob(args.out.stem + "_gold*.json"),
                        key=lambda q: ("long" in q.name, "step" in q.name, q.name))
        phase_table(names, default_path, stores, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
