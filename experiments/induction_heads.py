"""Study: induction heads in a small attention-only transformer, tracked by the LLC.

A 2-layer attention-only transformer (TransformerLens naming, slt_tools.models.Transformer) is trained on sequences
whose second half repeats the first half (random tokens), so in-context copying pays: once an induction circuit forms
(a previous-token head in layer 0 composing with an induction head in layer 1; Olsson et al. 2022) the loss on the
repeated half collapses. We track the loss, an in-context-learning score (loss on the repeated half minus loss on the
first half; more negative = more in-context learning), the induction score of each layer-1 head (attention from a
repeated token to the token after its earlier copy), and the LLC over log-spaced checkpoints; the formation should
show up as a stage.

    python experiments/induction_heads.py [--quick] [--out runs/induction_heads] [--no-wandb]
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
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

from slt_tools.models import Transformer, TransformerConfig  # noqa: E402


@dataclass(frozen=True)
class InductionConfig:
    d_vocab: int = 48
    half: int = 12
    n_layers: int = 2
    d_model: int = 48
    n_heads: int = 4
    d_head: int = 12
    num_sequences: int = 4096
    batch_size: int = 64
    lr: float = 3e-3
    train_steps: int = 3000
    num_checkpoints: int = 28
    seed: int = 0
    llc: dict = field(default_factory=lambda: {"num_chains": 4, "num_draws": 300, "num_burnin_steps": 100,
                                               "lr": 3e-4, "localization": 100.0, "nbeta": 30.0, "seed": 0,
                                               "on_divergence": "exclude"})


QUICK = InductionConfig(train_steps=2000, num_checkpoints=16,
                        llc={"num_chains": 2, "num_draws": 150, "num_burnin_steps": 50, "lr": 3e-4,
                             "localization": 100.0, "nbeta": 30.0, "seed": 0, "on_divergence": "exclude"})


def model_config(cfg: InductionConfig) -> TransformerConfig:
    return TransformerConfig(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head,
                             d_vocab=cfg.d_vocab, n_ctx=2 * cfg.half, attn_only=True, init_std=0.05)


def make_data(cfg: InductionConfig, seed_offset: int = 0) -> torch.Tensor:
    """Sequences [x_1 … x_h, x_1 … x_h] of random tokens (+1 for the next-token target)."""
    gen = torch.Generator().manual_seed(cfg.seed + seed_offset)
    first = torch.randint(0, cfg.d_vocab, (cfg.num_sequences, cfg.half), generator=gen)
    return torch.cat([first, first], dim=1)


def lm_loss(model, batch):
    toks = batch[0]
    logits = model(toks[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1))


def evaluate(model: Transformer, toks: torch.Tensor, half: int) -> dict:
    with torch.no_grad():
        logits = model(toks[:, :-1])
        per_tok = F.cross_entropy(logits.transpose(1, 2), toks[:, 1:], reduction="none")  # (batch, 2h-1)
        first, repeat = per_tok[:, : half - 1].mean(), per_tok[:, half:].mean()
        pattern = model.attention_patterns(toks[:, :-1])[-1]  # (batch, head, q, k)
        q = torch.arange(half, 2 * half - 1)
        ind = pattern[:, :, q, q - half + 1].mean(dim=(0, 2))  # attention to the token after the earlier copy
    return {"train_loss": float(per_tok.mean()), "icl_score": float(repeat - first),
            "repeat_loss": float(repeat), "induction_score_max": float(ind.max()),
            **{f"induction_score_head{h}": float(v) for h, v in enumerate(ind)}}


def train(cfg: InductionConfig, out: Path) -> list[dict]:
    data, probe = make_data(cfg), make_data(cfg, 1)[:256]

    def make_state():
        torch.manual_seed(cfg.seed)
        model = Transformer(model_config(cfg))
        return {"model": model, "opt": torch.optim.Adam(model.parameters(), lr=cfg.lr),
                "gen": torch.Generator().manual_seed(cfg.seed + 2)}

    def train_step(state, step):
        idx = torch.randint(0, cfg.num_sequences, (cfg.batch_size,), generator=state["gen"])
        loss = lm_loss(state["model"], (data[idx],))
        state["opt"].zero_grad()
        loss.backward()
        state["opt"].step()

    steps = log_spaced_steps(10, cfg.train_steps, cfg.num_checkpoints)
    return train_with_checkpoints(out, steps, make_state, train_step, lambda s: s["model"],
                                  lambda s: evaluate(s["model"], probe, cfg.half))


def run(cfg: InductionConfig, out: Path, use_wandb: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[train] attention-only transformer, {cfg.train_steps} Adam steps on repeated random spans", flush=True)
    rows = train(cfg, out)
    loader = DataLoader(TensorDataset(make_data(cfg)[:1024]), batch_size=32, shuffle=True)
    name = "induction_heads" + ("-quick" if cfg == QUICK else "")
    summary = analyse(name, out, asdict(cfg), lambda: Transformer(model_config(cfg)), loader, lm_loss, cfg.llc,
                      rows, use_wandb, extra_series={"train_loss": "train loss", "icl_score": "ICL score",
                                                     "induction_score_max": "max induction score"},
                      probe=(make_data(cfg)[:32], None))
    summary["train_log"] = rows
    formed = next((int(r["step"]) for r in rows if r["induction_score_max"] > 0.3), None)
    summary["induction_head_formed_at"] = formed
    summary["wall_time_s"] = time.perf_counter() - t0
    write_json_atomic(out / "summary.json", summary)
    intro = (f"2-layer attention-only transformer (d_model {cfg.d_model}, {cfg.n_heads} heads), sequences of "
             f"{cfg.half} random tokens repeated once, Adam lr {cfg.lr}, {cfg.train_steps} steps. A layer-1 head's "
             f"induction score first exceeds 0.3 at step {formed}. LLC by SGLD: {cfg.llc}. "
             f"Wall time {summary['wall_time_s']:.0f} s.")
    report(out, "Induction heads study", intro, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    return study_main(__doc__, "induction_heads", InductionConfig(), QUICK, run,
                      ["stage_kinds", "induction_head_formed_at", "stages"], argv)


if __name__ == "__main__":
    sys.exit(main())
