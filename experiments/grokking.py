"""Study: grokking modular addition — the LLC rises while the training set is memorised (type A), then falls while
the network generalises and the training loss barely moves (type B).

A one-hidden-layer ReLU network on embeddings of (a, b) predicts (a + b) mod p (p = 53) from 40 % of all pairs, trained
full-batch with AdamW and strong weight decay (Power et al. 2022; Nanda et al. 2023). LLC by SGLD with the devinterp
grokking example's hyperparameters (ε = 3e-3, nβ = 2, γ = 5), on the training set.

    python experiments/grokking.py [--quick] [--out runs/grokking] [--no-wandb]
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_common import (  # noqa: E402
    analyse,
    log_spaced_steps,
    report,
    study_main,
    train_with_checkpoints,
    write_json_atomic,
)


class ModularAdditionMLP(nn.Module):
    """Embed a and b (shared table), concatenate, one ReLU hidden layer, logits over Z_p."""

    def __init__(self, p: int, d_embed: int = 64, d_hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(p, d_embed)
        self.hidden = nn.Linear(2 * d_embed, d_hidden)
        self.out = nn.Linear(d_hidden, p)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        e = self.embed(pairs)  # (batch, 2, d_embed)
        return self.out(F.relu(self.hidden(e.flatten(1))))


@dataclass(frozen=True)
class GrokkingConfig:
    p: int = 53
    train_fraction: float = 0.4
    lr: float = 3e-3
    weight_decay: float = 1.0
    train_steps: int = 8000
    num_checkpoints: int = 30
    seed: int = 0
    llc: dict = field(default_factory=lambda: {"num_chains": 8, "num_draws": 500, "num_burnin_steps": 200,
                                               "lr": 3e-3, "localization": 5.0, "nbeta": 2.0, "seed": 0,
                                               "on_divergence": "exclude"})


QUICK = GrokkingConfig(train_steps=6000, num_checkpoints=14,
                       llc={"num_chains": 4, "num_draws": 250, "num_burnin_steps": 100, "lr": 3e-3,
                            "localization": 5.0, "nbeta": 2.0, "seed": 0, "on_divergence": "exclude"})


def make_data(cfg: GrokkingConfig):
    gen = torch.Generator().manual_seed(cfg.seed)
    a, b = torch.meshgrid(torch.arange(cfg.p), torch.arange(cfg.p), indexing="ij")
    pairs = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
    labels = pairs.sum(1) % cfg.p
    perm = torch.randperm(len(pairs), generator=gen)
    n_train = int(cfg.train_fraction * len(pairs))
    tr, te = perm[:n_train], perm[n_train:]
    return pairs[tr], labels[tr], pairs[te], labels[te]


def xent(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def train(cfg: GrokkingConfig, out: Path) -> list[dict]:
    xtr, ytr, xte, yte = make_data(cfg)

    def make_state():
        torch.manual_seed(cfg.seed)
        model = ModularAdditionMLP(cfg.p)
        return {"model": model, "opt": torch.optim.AdamW(model.parameters(), lr=cfg.lr,
                                                         weight_decay=cfg.weight_decay)}

    def train_step(state, step):
        loss = F.cross_entropy(state["model"](xtr), ytr)
        state["opt"].zero_grad()
        loss.backward()
        state["opt"].step()

    def evaluate(state):
        m = state["model"]
        with torch.no_grad():
            ltr, lte = m(xtr), m(xte)
            return {"train_loss": float(F.cross_entropy(ltr, ytr)), "test_loss": float(F.cross_entropy(lte, yte)),
                    "train_acc": float((ltr.argmax(-1) == ytr).float().mean()),
                    "test_acc": float((lte.argmax(-1) == yte).float().mean())}

    steps = log_spaced_steps(10, cfg.train_steps, cfg.num_checkpoints)
    return train_with_checkpoints(out, steps, make_state, train_step, lambda s: s["model"], evaluate)


def run(cfg: GrokkingConfig, out: Path, use_wandb: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[train] modular addition p = {cfg.p}, {cfg.train_steps} full-batch AdamW steps", flush=True)
    rows = train(cfg, out)
    xtr, ytr, _, _ = make_data(cfg)
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=256, shuffle=True)
    name = "grokking" + ("-quick" if cfg == QUICK else "")
    summary = analyse(name, out, asdict(cfg), lambda: ModularAdditionMLP(cfg.p), loader, xent, cfg.llc, rows,
                      use_wandb, extra_series={"train_loss": "train loss", "test_loss": "test loss",
                                               "test_acc": "test accuracy"})
    summary["train_log"] = rows
    summary["wall_time_s"] = time.perf_counter() - t0
    write_json_atomic(out / "summary.json", summary)
    first_gen = next((int(r["step"]) for r in rows if r["test_acc"] > 0.9), None)
    intro = (f"p = {cfg.p}, train fraction {cfg.train_fraction}, AdamW lr {cfg.lr}, weight decay "
             f"{cfg.weight_decay}, {cfg.train_steps} steps. Test accuracy first exceeds 90 % at step {first_gen}. "
             f"LLC by SGLD: {cfg.llc}. Wall time {summary['wall_time_s']:.0f} s.")
    report(out, "Grokking study (modular addition)", intro, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    return study_main(__doc__, "grokking", GrokkingConfig(), QUICK, run, ["stage_kinds", "stages"], argv)


if __name__ == "__main__":
    sys.exit(main())
