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
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker-default", default=None, help=argparse.SUPPRESS)
    p.add_argument("--phase", default="all", choices=["default", "gold", "table", "all"])
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--default-timeout", type=float, default=240.0)
    p.add_argument("--out", type=Path, default=RESULTS / "llc_reference_suite.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker_default:
        default_worker(args.worker_default)
        return 0
    names = args.cases.split(",") if args.cases else list(build_cases())
    default_path = args.out.with_name(args.out.stem + "_default.json")
    if args.phase in ("default", "all"):
        phase_default(names, args.default_timeout, default_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
