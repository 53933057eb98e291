"""Study (issue 20 req 6): per-head susceptibilities and Bayesian influence functions of the induction transformer.

The model is the induction-heads study's 2-layer attention-only transformer (experiments/induction_heads.py) at its
final checkpoint, trained with the study's quick settings if no checkpoint is stored (about 20 s on one core).

1. **Susceptibilities** (:func:`slt_tools.susceptibilities`): one batched refined run of all 8 heads (restriction = a
   head's Q/K/V/O weights, ``slt.restrictions.heads``), per-token χ_{h,j} = Var_h[L_q] − Cov_h[L_q, ℓ_j] with L_q the
   mean loss on training sequences, for two probe sets: *repeated* sequences [x, x] (the training distribution,
   held-out draws) and *non-repeated* sequences (2h i.i.d. random tokens: nothing to copy). Heads are labelled by
   the induction study's own score (attention from a repeated token to the token after its earlier copy, > 0.3 =
   induction head). Question: do induction heads respond differently to the two probe sets? Reported per head: the
   mean χ over each set's tokens and over the copyable tokens (second half of a repeated sequence) with standard
   errors over chains, and the contrast (induction heads − other heads) of (repeated − non-repeated) with its SE.
   The run is repeated with a second sampling seed (independent chains) to show what replicates.
2. **BIF** (:func:`slt_tools.bif`): per-sequence loss covariance between the 1024 training sequences and a few query
   sequences under the full-model localised posterior. A planted check: one query is a training sequence itself
   (its own row should rank first); for the others we report whether the top-influence training sequences share
   more tokens with the query than training sequences do on average.

    OMP_NUM_THREADS=1 python experiments/susceptibility_study.py [--quick] [--wandb]

Writes experiments/results/susceptibility_study[_quick].json and docs/figures/susceptibility_*.png, bif_*.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import induction_heads as ih  # noqa: E402

import slt_tools as slt  # noqa: E402
from slt_tools.models import Transformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class StudyConfig:
    num_probe: int = 24          # sequences per probe set
    num_reference: int = 128     # training sequences whose mean loss is L_q
    num_train: int = 1024        # training sequences (the sampler's data; the BIF's rows)
    seeds: tuple[int, ...] = (0, 1)
    llc: tuple[tuple[str, float], ...] = (("num_chains", 4), ("num_draws", 200), ("num_burnin_steps", 100),
                                          ("num_steps_bw_draws", 2), ("lr", 3e-4), ("localization", 100.0),
                                          ("nbeta", 30.0), ("on_divergence", "exclude"))
    bif_llc: tuple[tuple[str, float], ...] = (("num_chains", 4), ("num_draws", 200), ("num_burnin_steps", 100),
                                              ("num_steps_bw_draws", 2), ("lr", 3e-4), ("localization", 100.0),
                                              ("nbeta", 30.0), ("on_divergence", "exclude"))


QUICK = StudyConfig(num_probe=8, num_reference=64, num_train=256, seeds=(0,),
                    llc=(("num_chains", 2), ("num_draws", 30), ("num_burnin_steps", 20), ("num_steps_bw_draws", 1),
                         ("lr", 3e-4), ("localization", 100.0), ("nbeta", 30.0), ("on_divergence", "exclude")),
                    bif_llc=(("num_chains", 2), ("num_draws", 30), ("num_burnin_steps", 20),
                             ("num_steps_bw_draws", 1), ("lr", 3e-4), ("localization", 100.0), ("nbeta", 30.0),
                             ("on_divergence", "exclude")))


def per_token_loss(model, batch) -> torch.Tensor:
    """ℓ_j for every target token j of every sequence, flattened (B·(2h − 1),)."""
    toks = batch[0]
    logits = model(toks[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), toks[:, 1:], reduction="none").reshape(-1)


def per_sequence_loss(model, batch) -> torch.Tensor:
    """Mean next-token loss of each sequence (B,)."""
    toks = batch[0]
    logits = model(toks[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), toks[:, 1:], reduction="none").mean(dim=1)


def trained_model(out: Path, cfg: ih.InductionConfig = ih.QUICK) -> tuple[Transformer, Path]:
    """The induction study's final checkpoint under ``out`` (trained with its settings first if absent)."""
    steps = ih.log_spaced_steps(10, cfg.train_steps, cfg.num_checkpoints)
    path = out / "checkpoints" / f"step_{max(steps):07d}.safetensors"
    if not path.exists():
        print(f"[train] no checkpoint at {path}: training the induction study ({cfg.train_steps} steps)", flush=True)
        ih.train(cfg, out)
    model = Transformer(ih.model_config(cfg))
    model.load_state_dict(slt.trajectory.read_checkpoint(path)[0])
    return model.eval(), path


def probe_sets(cfg: ih.InductionConfig, n: int) -> dict[str, torch.Tensor]:
    """Held-out repeated sequences [x, x] and non-repeated ones (2h i.i.d. tokens)."""
    gen = torch.Generator().manual_seed(cfg.seed + 101)
    repeated = ih.make_data(cfg, 7)[:n]
    non_repeated = torch.randint(0, cfg.d_vocab, (n, 2 * cfg.half), generator=gen)
    return {"repeated": repeated, "non_repeated": non_repeated}


def token_masks(cfg: ih.InductionConfig, n: int) -> dict[str, np.ndarray]:
    """Which flattened target tokens of a probe set are in the first half / are copyable (the repeat)."""
    pos = np.tile(np.arange(2 * cfg.half - 1), n)
    return {"first_half": pos < cfg.half - 1, "copyable": pos >= cfg.half}


def susceptibility_run(model, loader, ref, probes, scfg: StudyConfig, seed: int) -> slt.SusceptibilityResult:
    heads = slt.restrictions.heads(model)
    config = slt.LLCConfig(**dict(scfg.llc), seed=seed, mala_every=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slt.susceptibilities(model, loader, {k: (v,) for k, v in probes.items()}, heads, per_token_loss,
                                    config, loss_fn=ih.lm_loss, reference_batch=(ref,))


def _contrast(per_chain: np.ndarray, rows: list[int], others: list[int]) -> dict:
    """Mean over ``rows`` minus mean over ``others`` of a per-head, per-chain statistic (R, C), with its SE (heads'
    chains are independent, so the variances of the per-head means add)."""
    c = per_chain.shape[1]
    mean, var = per_chain.mean(axis=1), per_chain.var(axis=1, ddof=1) / c
    est = mean[rows].mean() - mean[others].mean()
    se = float(np.sqrt(var[rows].sum() / len(rows) ** 2 + var[others].sum() / len(others) ** 2))
    return {"estimate": float(est), "se": se, "z": float(est / se) if se > 0 else float("nan")}


def analyse_susceptibilities(sus: slt.SusceptibilityResult, scores: dict, masks: dict[str, np.ndarray]) -> dict:
    """Per head: mean χ on each probe set / token group ± SE over chains; the induction-vs-other contrasts."""
    names = sus.restrictions
    groups = {"repeated": ("repeated", slice(None)), "repeated_first_half": ("repeated", masks["first_half"]),
              "repeated_copyable": ("repeated", masks["copyable"]), "non_repeated": ("non_repeated", slice(None))}
    per_chain = {g: sus.chi_per_chain[s][:, :, sel].mean(axis=2) for g, (s, sel) in groups.items()}
    per_chain["repeated_minus_non_repeated"] = per_chain["repeated"] - per_chain["non_repeated"]
    per_chain["copyable_minus_first_half"] = per_chain["repeated_copyable"] - per_chain["repeated_first_half"]
    heads = {}
    for i, name in enumerate(names):
        row = {"role": role(scores[name]), **scores[name], "llc": sus.refined[name].llc_mean}
        for g, v in per_chain.items():
            row[g] = {"mean": float(v[i].mean()), "se": float(v[i].std(ddof=1) / np.sqrt(v.shape[1]))}
        heads[name] = row
    ind = [i for i, n in enumerate(names) if heads[n]["role"] == "induction"]
    other = [i for i in range(len(names)) if i not in ind]
    l1_other = [i for i in other if names[i].startswith("l1")]
    contrasts = {}
    if ind and other:
        for g in ("repeated_minus_non_repeated", "copyable_minus_first_half", "repeated", "non_repeated"):
            contrasts[g] = {"induction_minus_other": _contrast(per_chain[g], ind, other)}
            if l1_other:
                contrasts[g]["induction_minus_other_layer1"] = _contrast(per_chain[g], ind, l1_other)
    scores_pc, explained = sus.principal_components(2)
    return {"heads": heads, "induction_heads": [names[i] for i in ind], "contrasts": contrasts,
            "pca": {"scores": {n: scores_pc[i].tolist() for i, n in enumerate(names)},
                    "explained": explained.tolist()}}


def role(s: dict) -> str:
    return ("induction" if s["induction"] > ih.ROLE_THRESHOLD else
            "previous_token" if s["previous_token"] > ih.ROLE_THRESHOLD else "other")


def bif_queries(train: torch.Tensor, cfg: ih.InductionConfig) -> tuple[torch.Tensor, list[str], int]:
    """Queries: a training sequence itself (planted: it should rank itself first), two held-out repeated
    sequences, one non-repeated sequence."""
    planted = 17
    held_out = ih.make_data(cfg, 9)[:2]
    gen = torch.Generator().manual_seed(cfg.seed + 202)
    non_rep = torch.randint(0, cfg.d_vocab, (1, 2 * cfg.half), generator=gen)
    q = torch.cat([train[planted:planted + 1], held_out, non_rep])
    return q, [f"train[{planted}] (planted)", "held-out repeated 0", "held-out repeated 1", "non-repeated"], planted


def shared_tokens(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Distinct tokens shared by sequence a and each row of b."""
    sa = set(a.tolist())
    return np.array([len(sa & set(row.tolist())) for row in b])


def analyse_bif(out: slt.BIFResult, train: torch.Tensor, queries: torch.Tensor, labels: list[str], planted: int,
                k: int = 5) -> dict:
    """Top-k helpful (most negative BIF) and harmful training sequences per query, their token overlap with the
    query vs the training average, the planted query's own rank among the helpful (by BIF and by correlation; 0 =
    first), and the Spearman correlation of BIF with overlap (negative: more shared tokens, more helpful)."""
    from scipy.stats import spearmanr

    rows = []
    for q, label in enumerate(labels):
        top = out.top_influences(q, k)
        overlap = shared_tokens(queries[q], train)
        rank_corr = np.argsort(-out.correlation[:, q])
        row = {"query": label, "tokens": queries[q].tolist(), "top": top.tolist(),
               "top_bif": out.bif[top, q].tolist(), "top_bif_sem": out.bif_sem[top, q].tolist(),
               "top_correlation": out.correlation[top, q].tolist(), "top_tokens": train[top].tolist(),
               "top_shared_tokens": overlap[top].tolist(), "mean_shared_tokens_all": float(overlap.mean()),
               "spearman_bif_vs_shared_tokens": float(spearmanr(out.bif[:, q], overlap).statistic)}
        row["top_harmful"] = out.top_harmful(q, k).tolist()
        row["top_harmful_shared_tokens"] = overlap[out.top_harmful(q, k)].tolist()
        if q == 0:
            row["planted_rank_by_bif"] = int(np.where(np.argsort(out.bif[:, q]) == planted)[0][0])
            row["planted_rank_by_correlation"] = int(np.where(rank_corr == planted)[0][0])
        rows.append(row)
    return {"queries": rows, "num_chains": out.num_chains, "num_draws": out.num_draws, "num_runs": out.num_runs,
            "llc": out.llc.llc_mean}


def run(scfg: StudyConfig, out: Path, tag: str) -> tuple[dict, dict]:
    """The whole study; returns (JSON summary, {figure name: matplotlib figure})."""
    from slt_tools.plots import plot_bif, plot_susceptibilities

    t0 = time.perf_counter()
    cfg = ih.QUICK
    model, ckpt = trained_model(out)
    data = ih.make_data(cfg)
    train = data[:scfg.num_train]
    loader = DataLoader(TensorDataset(train), batch_size=32, shuffle=True)
    probes = probe_sets(cfg, scfg.num_probe)
    scores = ih.head_scores(model, ih.make_data(cfg, 1)[:256], cfg.half)
    masks = token_masks(cfg, scfg.num_probe)
    summary: dict = {"checkpoint": str(ckpt.relative_to(ROOT) if ckpt.is_relative_to(ROOT) else ckpt),
                     "induction_config": asdict(cfg), "study_config": asdict(scfg), "head_scores": scores,
                     "susceptibilities": {}}
    figures, first = {}, None
    for seed in scfg.seeds:
        t = time.perf_counter()
        print(f"[χ] all {len(scores)} heads in one batched run, sampling seed {seed}", flush=True)
        sus = susceptibility_run(model, loader, train[:scfg.num_reference], probes, scfg, seed)
        res = analyse_susceptibilities(sus, scores, masks)
        res["wall_time_s"] = time.perf_counter() - t
        summary["susceptibilities"][f"seed{seed}"] = res
        print(json.dumps(res["contrasts"], indent=1), flush=True)
        first = first or (sus, res)
    sus, res = first
    columns = {"repeated": ("repeated", slice(None)), "rep. first half": ("repeated", masks["first_half"]),
               "rep. copyable": ("repeated", masks["copyable"]), "non-repeated": ("non_repeated", slice(None))}
    roles = {n: h["role"] for n, h in res["heads"].items()}
    figures[f"susceptibility_heads_{tag}"] = plot_susceptibilities(
        sus, columns=columns, groups=roles, title=f"Per-head susceptibilities (seed {scfg.seeds[0]})")
    t = time.perf_counter()
    queries, labels, planted = bif_queries(train, cfg)
    print(f"[BIF] {len(train)} training × {len(labels)} query sequences", flush=True)
    config = slt.LLCConfig(**dict(scfg.bif_llc), seed=0, mala_every=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = slt.bif(model, loader, (queries,), per_sequence_loss, config, loss_fn=ih.lm_loss)
    summary["bif"] = analyse_bif(b, train, queries, labels, planted)
    summary["bif"]["wall_time_s"] = time.perf_counter() - t
    figures[f"bif_{tag}"] = plot_bif(b, labels=labels, k=5, title="BIF: training sequences × query sequences")
    summary["wall_time_s"] = time.perf_counter() - t0
    return summary, figures


def log_wandb(summary: dict, figures: dict, save_dir: Path) -> None:
    """Figures and the headline numbers through :class:`slt_tools.logging.WandbLogger` (offline unless configured)."""
    from slt_tools.logging import WandbLogger

    logger = WandbLogger(project="slt_tools-studies", name="susceptibility_study", config=summary["study_config"],
                         save_dir=save_dir)
    images = {f"figures/{name}": logger.image(fig, f"{name}.png") for name, fig in figures.items()}
    run = logger.run
    if run is not None:
        run.log({k: v for k, v in images.items() if v is not None})
        for seed, res in summary["susceptibilities"].items():
            for g, c in res["contrasts"].items():
                for k, v in c.items():
                    run.summary[f"{seed}/{g}/{k}/estimate"] = v["estimate"]
                    run.summary[f"{seed}/{g}/{k}/se"] = v["se"]
    logger.finish()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "induction_heads-quick",
                   help="the induction study's run directory (its checkpoints; trained there if absent)")
    p.add_argument("--results", type=Path, default=None, help="JSON path (default experiments/results/...)")
    p.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    p.add_argument("--wandb", action="store_true", help="log figures and contrasts to W&B (offline by default)")
    args = p.parse_args(argv)
    tag = "quick" if args.quick else "study"
    summary, figures = run(QUICK if args.quick else StudyConfig(), args.out, tag)
    name = "susceptibility_study" + ("_quick" if args.quick else "")
    results = args.results or ROOT / "experiments" / "results" / f"{name}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(summary, indent=1))
    args.figures.mkdir(parents=True, exist_ok=True)
    if args.wandb:
        log_wandb(summary, figures, args.figures)
    else:
        import matplotlib.pyplot as plt

        for name, fig in figures.items():
            fig.savefig(args.figures / f"{name}.png", dpi=130, bbox_inches="tight")
            plt.close(fig)
    print(f"results: {results}; figures: {sorted(figures)} in {args.figures}; wall {summary['wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
