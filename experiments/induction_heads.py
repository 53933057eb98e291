"""Study: induction heads in a small attention-only transformer, tracked by the LLC.

A 2-layer attention-only transformer (TransformerLens naming, slt_tools.models.Transformer) is trained on sequences
whose second half repeats the first half (random tokens), so in-context copying pays: once an induction circuit forms
(a previous-token head in layer 0 composing with an induction head in layer 1; Olsson et al. 2022) the loss on the
repeated half collapses. We track the loss, an in-context-learning score (loss on the repeated half minus loss on the
first half; more negative = more in-context learning), the induction score of each layer-1 head (attention from a
repeated token to the token after its earlier copy), and the LLC over log-spaced checkpoints; the formation should
show up as a stage.

    python experiments/induction_heads.py [--quick] [--out runs/induction_heads] [--no-wandb] [--per-head]

``--per-head`` adds the refined LLC of every head over the same checkpoints (issue 19 req 6): one batched run of
all heads × chains per checkpoint (``llc_trajectory(..., restrictions=slt.restrictions.heads)``, resumable store
``rllc.jsonl``), stages detected on each head's curve, and one panel per layer with each head's curve, the heads
whose induction score exceeds 0.3 at the last checkpoint and previous-token heads (attention to the previous token
> 0.3) marked (``figures/per_head_llc.png``, ``per_head`` in the summary). With repeats of a fixed length a layer-0
head can score as an "induction" head by attending at the fixed offset q − half + 1 from position alone (no
previous-token head needed); the summary lists each head's scores so this is visible.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_common import (  # noqa: E402
    analyse,
    log_spaced_steps,
    report,
    stage_flags,
    study_main,
    train_with_checkpoints,
    write_json_atomic,
)

import slt_tools as slt  # noqa: E402
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


#: refined-LLC settings of the per-head analysis (full, quick): the whole-model ε, γ, nβ, fewer draws
PER_HEAD = {"num_chains": 4, "num_draws": 200, "num_burnin_steps": 100, "lr": 3e-4, "localization": 100.0,
            "nbeta": 30.0, "seed": 0, "on_divergence": "exclude"}
PER_HEAD_QUICK = {**PER_HEAD, "num_chains": 2, "num_draws": 100, "num_burnin_steps": 50}
ROLE_THRESHOLD = 0.3

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


def run(cfg: InductionConfig, out: Path, use_wandb: bool = True, per_head_llc: bool = False) -> dict:
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
    if per_head_llc:
        summary["per_head"] = per_head(cfg, out, loader, PER_HEAD_QUICK if cfg == QUICK else PER_HEAD)
        print(json.dumps(summary["per_head"]["comparison"], indent=1), flush=True)
    summary["wall_time_s"] = time.perf_counter() - t0
    write_json_atomic(out / "summary.json", summary)
    intro = (f"2-layer attention-only transformer (d_model {cfg.d_model}, {cfg.n_heads} heads), sequences of "
             f"{cfg.half} random tokens repeated once, Adam lr {cfg.lr}, {cfg.train_steps} steps. A layer-1 head's "
             f"induction score first exceeds 0.3 at step {formed}. LLC by SGLD: {cfg.llc}. "
             f"Wall time {summary['wall_time_s']:.0f} s.")
    report(out, "Induction heads study", intro, summary)
    return summary


def head_scores(model: Transformer, toks: torch.Tensor, half: int) -> dict[str, float]:
    """Per head ``l{layer}h{head}``: induction score (attention from a repeated token to the token after its earlier
    copy) and previous-token score (attention to the previous position, over the first half)."""
    with torch.no_grad():
        patterns = model.attention_patterns(toks[:, :-1])
    q_rep, q_first = torch.arange(half, 2 * half - 1), torch.arange(1, half)
    out = {}
    for layer, pattern in enumerate(patterns):
        ind = pattern[:, :, q_rep, q_rep - half + 1].mean(dim=(0, 2))
        prev = pattern[:, :, q_first, q_first - 1].mean(dim=(0, 2))
        for h in range(pattern.shape[1]):
            out[f"l{layer}h{h}"] = {"induction": float(ind[h]), "previous_token": float(prev[h])}
    return out


def per_head(cfg: InductionConfig, out: Path, loader: DataLoader, llc: dict) -> dict:
    """Refined LLC of every head at every checkpoint (one batched run each), stages per head, one panel per layer."""
    t0 = time.perf_counter()
    factory = lambda: Transformer(model_config(cfg))  # noqa: E731
    print(f"[rllc] refined LLC of every head at every checkpoint (resumable store {out / 'rllc.jsonl'})", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traj = slt.llc_trajectory(out / "checkpoints", factory, loader, lm_loss, results=out / "rllc.jsonl",
                                  restrictions=slt.restrictions.heads, progress=False, **llc)
    probe = make_data(cfg, 1)[:256]
    scores = []
    for step in traj.steps:
        model = factory()
        path = out / "checkpoints" / f"step_{int(step):07d}.safetensors"
        model.load_state_dict(slt.trajectory.read_checkpoint(path)[0])
        scores.append(head_scores(model, probe, cfg.half))
    heads = {}
    for name, t in traj.items():
        final = scores[-1][name]
        role = ("induction" if final["induction"] > ROLE_THRESHOLD else
                "previous_token" if final["previous_token"] > ROLE_THRESHOLD else "other")
        ok = np.isfinite(t.llc_mean)
        flags, policy = stage_flags(t.results, ok)  # flagged estimates are not evidence: left out, and listed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stages = slt.detect_stages(t.steps[ok], t.llc_mean[ok], loss=t.loss[ok], llc_std=t.llc_std[ok],
                                       flags=flags)
        heads[name] = {"role": role, "final_scores": final, "llc": t.llc_mean.tolist(), "llc_std": t.llc_std.tolist(),
                       "stages": [st.to_dict() for st in stages], "stage_kinds": [st.kind for st in stages],
                       "stage_flag_policy": policy, "excluded": stages.excluded,
                       "induction_score": [sc[name]["induction"] for sc in scores],
                       "previous_token_score": [sc[name]["previous_token"] for sc in scores]}
    plot_per_head(traj.steps, heads, cfg.n_layers, out / "figures" / "per_head_llc.png")
    return {"steps": traj.steps.tolist(), "heads": heads, "llc_settings": llc,
            "wall_time_s": time.perf_counter() - t0, "comparison": compare_roles(traj.steps, heads)}


def compare_roles(steps: np.ndarray, heads: dict) -> dict:
    """Do the heads that become induction (previous-token) heads have distinct rLLC curves? Final rLLC and the
    step of the largest rise, per role."""
    out = {}
    for role in ("induction", "previous_token", "other"):
        names = [n for n, h in heads.items() if h["role"] == role]
        if names:
            curves = np.array([heads[n]["llc"] for n in names])
            rise = [int(steps[1:][int(np.nanargmax(np.diff(c)))]) if len(c) > 1 else None for c in curves]
            out[role] = {"heads": names, "final_llc": curves[:, -1].tolist(), "max_llc": np.nanmax(curves, 1).tolist(),
                         "step_of_largest_rise": rise}
    return out


def plot_per_head(steps: np.ndarray, heads: dict, n_layers: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_layers, figsize=(5.5 * n_layers, 4), sharey=True)
    styles = {"induction": dict(lw=2.6, ls="-"), "previous_token": dict(lw=2.6, ls="--"), "other": dict(lw=1.0)}
    for layer, ax in enumerate(np.atleast_1d(axes)):
        for name, h in heads.items():
            if name.startswith(f"l{layer}h"):
                label = name + {"induction": " (induction)", "previous_token": " (prev-token)"}.get(h["role"], "")
                ax.errorbar(steps, h["llc"], yerr=h["llc_std"], label=label, capsize=2, **styles[h["role"]])
        ax.set_xscale("log")
        ax.set_title(f"layer {layer}: refined LLC per head")
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    np.atleast_1d(axes)[0].set_ylabel("rLLC λ̂_h")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    runner = partial(run, per_head_llc="--per-head" in argv)
    return study_main(__doc__, "induction_heads", InductionConfig(), QUICK, runner,
                      ["stage_kinds", "induction_head_formed_at", "stages"], [a for a in argv if a != "--per-head"])


if __name__ == "__main__":
    sys.exit(main())
