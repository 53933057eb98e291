"""Figures (matplotlib, imported lazily inside each function so ``import slt_tools`` stays light).

Every function returns the matplotlib Figure and, with ``path=``, saves a PNG (parent directories created).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

STAGE_COLOURS = {"A": "#2ca02c", "B": "#9467bd", "flat": "#bbbbbb", "other": "#ff7f0e", "up": "#2ca02c",
                 "down": "#9467bd"}


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        try:
            matplotlib.use("Agg")
        except Exception:  # noqa: BLE001 - keep the user's backend if it cannot be switched
            pass
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path | None) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=140, bbox_inches="tight")


def _log_x(ax: Any, steps: np.ndarray) -> None:
    if np.all(steps > 0):
        ax.set_xscale("log")
    elif np.all(steps >= 0):
        ax.set_xscale("symlog", linthresh=max(1.0, float(np.min(steps[steps > 0])) if np.any(steps > 0) else 1.0))
    ax.grid(alpha=0.3, which="both", lw=0.4)


def shade_stages(ax: Any, stages: Sequence[Any], label: bool = True) -> None:
    """Shade each stage by type and write its label (A, B, …) at the top of the axes."""
    for k, s in enumerate(stages):
        colour = STAGE_COLOURS.get(s.kind, "#bbbbbb")
        ax.axvspan(s.start, s.end, color=colour, alpha=0.12 if k % 2 == 0 else 0.2, lw=0, zorder=0)
        if k:
            ax.axvline(s.start, color="0.35", lw=0.8, ls="--", zorder=1)
        if label:
            xm = np.sqrt(max(s.start, 1e-12) * s.end) if ax.get_xscale() == "log" else 0.5 * (s.start + s.end)
            ax.text(xm, 0.97, s.kind, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=10,
                    fontweight="bold", color=colour if s.kind in ("A", "B") else "0.3")


def _llc_and_loss(ax: Any, steps: np.ndarray, llc: np.ndarray, llc_std: np.ndarray | None,
                  loss: np.ndarray | None) -> Any:
    if llc_std is not None:
        ax.fill_between(steps, llc - llc_std, llc + llc_std, color="C0", alpha=0.25, lw=0, label="± std over chains")
    ax.plot(steps, llc, "o-", color="C0", ms=3, lw=1.4, label="LLC λ̂")
    ax.set_xlabel("training step")
    ax.set_ylabel("LLC λ̂", color="C0")
    _log_x(ax, steps)
    handles, labels = ax.get_legend_handles_labels()
    ax2 = None
    if loss is not None:
        ax2 = ax.twinx()
        ax2.plot(steps, loss, "s-", color="C3", ms=2.5, lw=1.1, alpha=0.85, label="loss L_n(w*)")
        ax2.set_ylabel("loss", color="C3")
        if np.all(loss > 0) and loss.max() / max(loss.min(), 1e-300) > 30:
            if loss.min() > 1e-6 * loss.max():
                ax2.set_yscale("log")
            else:  # a loss that reaches ~0 would squash a log axis: linear near zero, log above
                ax2.set_yscale("symlog", linthresh=1e-3 * float(loss.max()))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="lower left", fontsize=8, framealpha=0.85)
    return ax2


def plot_stages(steps: Any, llc: Any, loss: Any = None, llc_std: Any = None, stages: Sequence[Any] | None = None,
                *, ax: Any = None, path: str | Path | None = None, title: str | None = None,
                details: Any = None) -> Any:
    """LLC (± std band) and loss (twin axis) against training step on a log axis, stages shaded and labelled.

    Arguments in the order of :func:`slt_tools.detect_stages` (``steps, llc, loss, llc_std``). When ``stages`` comes
    from ``detect_stages`` each boundary's interval is drawn as a bracket with its existence probability, and the
    checkpoints it left out (``stages.excluded``: flagged or NaN estimates) as black crosses.
    """
    plt = _plt()
    steps = np.asarray(steps, dtype=float)
    llc = np.asarray(llc, dtype=float)
    std = None if llc_std is None else np.asarray(llc_std, dtype=float)
    lo = None if loss is None else np.asarray(loss, dtype=float)
    if lo is not None and len(lo) != len(steps):
        lo = None  # a loss on its own step grid (e.g. per step) is not drawn against the checkpoints
    fig = ax.figure if ax is not None else plt.figure(figsize=(8, 4.2))
    ax = ax if ax is not None else fig.add_subplot(111)
    left_out = {e["step"] for e in getattr(stages, "excluded", None) or []}
    out_mask = np.array([s in left_out for s in steps], bool)
    if out_mask.any():  # estimates left out of stage detection (flagged, NaN) are not evidence: marked as such
        ax.scatter(steps[out_mask], llc[out_mask], marker="x", color="k", s=28, zorder=5,
                   label=f"left out of stages ({int(out_mask.sum())})")
    _llc_and_loss(ax, steps, llc, std, lo)
    details = details if details is not None else getattr(stages, "details", None)
    if details is not None:
        ax.plot(details.grid_steps, details.llc_smooth, color="k", lw=1, alpha=0.7, label="smoothed (GP)")
    if stages:
        shade_stages(ax, stages)
        for b in getattr(stages, "boundaries", []):
            ax.annotate("", xy=(b.interval[0], 0.04), xytext=(b.interval[1], 0.04), xycoords=ax.get_xaxis_transform(),
                        arrowprops={"arrowstyle": "|-|", "color": "0.25", "lw": 1.0, "shrinkA": 0, "shrinkB": 0})
            ax.text(b.step, 0.07, f"p={b.probability:.2f}", transform=ax.get_xaxis_transform(), ha="center",
                    fontsize=7, color="0.25")
    ax.set_title(title or "LLC over training" + (f" — {len(stages)} stages" if stages else ""))
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_essential_dynamics(ed: Any, stages: Sequence[Any] | None = None, *, ax: Any = None,
                            path: str | Path | None = None, title: str | None = None) -> Any:
    """PC1–PC2 trajectory of an :func:`slt_tools.essential_dynamics` result: the smoothed curve, every checkpoint as a
    dot coloured by its stage (one colour per stage, its type in the legend; grey: in no stage, e.g. left out of
    stage detection as flagged), LLC stage boundaries as open diamonds on the smoothed curve, and ED milestones as
    crosses labelled with their steps."""
    plt = _plt()
    fig = ax.figure if ax is not None else plt.figure(figsize=(5.8, 4.9))
    ax = ax if ax is not None else fig.add_subplot(111)
    pcs, sm, steps = np.asarray(ed.scores), np.asarray(ed.smoothed), np.asarray(ed.steps, dtype=float)
    palette = plt.get_cmap("tab10").colors
    ax.plot(sm[:, 0], sm[:, 1], color="0.6", lw=1.0, zorder=1, label="smoothed")
    ax.plot(pcs[:, 0], pcs[:, 1], color="0.85", lw=0.6, zorder=0)
    inside = np.zeros(len(steps), bool)
    for k, s in enumerate(stages or []):
        sel = (steps >= s.start) & (steps <= s.end) & ~inside
        inside |= sel
        ax.scatter(pcs[sel, 0], pcs[sel, 1], color=palette[k % 10], s=18, zorder=2, edgecolors="none",
                   label=f"stage {k + 1}: {s.kind} ({s.start:.4g}–{s.end:.4g})")
    if (~inside).any():
        ax.scatter(pcs[~inside, 0], pcs[~inside, 1], color="0.55", s=12, zorder=2, edgecolors="none",
                   label="in no stage" if stages else "checkpoints")
    for k, s in enumerate(list(stages or [])[1:]):
        i = int(np.argmin(np.abs(np.log1p(steps) - np.log1p(s.start))))
        ax.scatter([sm[i, 0]], [sm[i, 1]], marker="D", facecolors="none", edgecolors="C3", s=60, zorder=3,
                   label="LLC boundary" if k == 0 else None)
    for m in ed.milestones:
        i = int(np.argmin(np.abs(np.log1p(steps) - np.log1p(m.step))))
        ax.scatter([sm[i, 0]], [sm[i, 1]], marker="x", color="k", s=60, zorder=4)
        ax.annotate(f"{m.step:,.0f}", (sm[i, 0], sm[i, 1]), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.scatter([], [], marker="x", color="k", label="ED milestone (step)")
    ev = ed.explained_variance_ratio
    ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f}% var.)")
    ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f}% var.)" if len(ev) > 1 else "PC2")
    ax.set_title(title or "essential dynamics")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3, lw=0.4)
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_trajectory(traj: Any, stages: Sequence[Any] | None = None, path: str | Path | None = None,
                    title: str | None = None) -> Any:
    """The LLC trajectory of a ``Trajectory`` (mean ± std over chains) with the loss on a twin axis."""
    return plot_stages(traj.steps, traj.llc_mean, traj.loss, traj.llc_std, stages=stages, path=path,
                       title=title or f"LLC over training ({len(traj.steps)} checkpoints)")


def plot_chain_traces(result: Any, path: str | Path | None = None, title: str | None = None) -> Any:
    """Per-chain minibatch loss at each draw with the initial loss L_n(w*) line, and the running λ̂ per chain."""
    plt = _plt()
    trace = np.asarray(result.loss_trace, dtype=float)
    nbeta = float(result.hyperparameters["nbeta"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    draws = np.arange(trace.shape[1])
    for c, row in enumerate(trace):
        a1.plot(draws, row, lw=0.8, alpha=0.8, label=f"chain {result.chain_ids[c] if result.chain_ids else c}")
        running = nbeta * (np.cumsum(row) / (draws + 1) - result.init_loss)
        a2.plot(draws, running, lw=1.0, alpha=0.85)
    a1.axhline(result.init_loss, color="k", ls="--", lw=1.2, label="L_n(w*) (initial loss)")
    a1.set_xlabel("draw")
    a1.set_ylabel("minibatch loss L_B(w_t)")
    a1.set_title("chain traces")
    a1.legend(fontsize=7, ncol=2, loc="upper right")
    a2.axhline(result.llc_mean, color="k", ls="--", lw=1.2, label=f"λ̂ = {result.llc_mean:.3g} ± {result.llc_std:.2g}")
    a2.set_xlabel("draw")
    a2.set_ylabel("running λ̂ = nβ(mean L_B − L_n(w*))")
    a2.set_title("running LLC estimate per chain")
    a2.legend(fontsize=8, loc="lower right")
    for a in (a1, a2):
        a.grid(alpha=0.3, lw=0.4)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_interpolation(curves: dict[str, Any], path: str | Path | None = None, title: str | None = None) -> Any:
    """Loss along straight lines between two networks, one curve per label (e.g. before vs after alignment),
    with each curve's loss barrier (definition "linear") in the legend."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, (label, curve) in enumerate(curves.items()):
        ax.plot(curve.ts, curve.losses, "o-", ms=3, color=f"C{k}",
                label=f"{label} (barrier {curve.barrier('linear'):.3g})")
    ax.set_xlabel("interpolation t  (θ = (1−t)·θ_A + t·θ_B)")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, lw=0.4)
    ax.legend(fontsize=9, loc="best", framealpha=0.9)
    ax.set_title(title or "Linear interpolation between two networks")
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_calibration(calib: Any, path: str | Path | None = None, title: str | None = None) -> Any:
    """λ̂ of every pilot against the step size ε (one colour per γ; crosses: rejected), the chosen setting circled,
    and the MALA acceptance of each pilot below."""
    plt = _plt()
    d = calib.to_dict() if hasattr(calib, "to_dict") else dict(calib)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    gammas = sorted({c["localization"] for c in d["candidates"]})
    for k, g in enumerate(gammas):
        rows = [c for c in d["candidates"] if c["localization"] == g]
        ok = [c for c in rows if c.get("llc_mean") is not None and c["verdict"] == "ok"]
        bad = [c for c in rows if c.get("llc_mean") is not None and c["verdict"] != "ok"]
        if ok:
            a1.errorbar([c["lr"] for c in ok], [c["llc_mean"] for c in ok], [c.get("llc_sem") or 0 for c in ok],
                        fmt="o", color=f"C{k}", label=f"γ = {g:g}", capsize=2)
        if bad:
            a1.plot([c["lr"] for c in bad], [c["llc_mean"] for c in bad], "x", color=f"C{k}", ms=7)
        acc = sorted((c for c in rows if c.get("mala_acceptance") is not None), key=lambda c: c["lr"])
        a2.plot([c["lr"] for c in acc], [c["mala_acceptance"] for c in acc], "o-", color=f"C{k}", ms=3)
        rejected = [c["lr"] for c in rows if c.get("mala_acceptance") is None]
        a2.plot(rejected, [0.0] * len(rejected), "v", color=f"C{k}", ms=5, alpha=0.6)
    a1.axvline(d["lr"], color="k", ls="--", lw=1, label=f"chosen ε = {d['lr']:.2g}, γ = {d['localization']:g}")
    a2.axvline(d["lr"], color="k", ls="--", lw=1)
    a2.axhline(0.95, color="0.5", ls=":", lw=1)
    a1.set_ylabel("pilot λ̂")
    a1.legend(fontsize=8)
    a2.set_ylabel("MALA acceptance")
    a2.set_xlabel("SGLD step size ε   (▼: diverged,  ×: rejected pilot)")
    a2.set_ylim(-0.05, 1.05)
    for a in (a1, a2):
        a.set_xscale("log")
        a.grid(alpha=0.3, which="both", lw=0.4)
    a1.set_title(title or "LLC calibration sweep")
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_metrics_trajectory(traj: Any, keys: Sequence[str], path: str | Path | None = None,
                            title: str | None = None) -> Any:
    """LLC and extra per-checkpoint metrics (e.g. ``hessian/top_0``, ``hessian/trace``, ``ntk/distance_to_reference``)
    in stacked panels on one log-step axis."""
    plt = _plt()
    steps = np.asarray(traj.steps, dtype=float)
    fig, axes = plt.subplots(1 + len(keys), 1, figsize=(7.5, 2.4 * (1 + len(keys))), sharex=True)
    axes = np.atleast_1d(axes)
    llc, std = np.asarray(traj.llc_mean), np.asarray(traj.llc_std)
    axes[0].fill_between(steps, llc - std, llc + std, color="C0", alpha=0.25, lw=0)
    axes[0].plot(steps, llc, "o-", color="C0", ms=3)
    axes[0].set_ylabel("LLC λ̂")
    for k, (ax, key) in enumerate(zip(axes[1:], keys)):
        vals = [m.get(key, np.nan) for m in traj.metrics]
        ax.plot(steps, vals, "o-", color=f"C{k + 1}", ms=3)
        ax.set_ylabel(key.replace("/", "\n"))
    for ax in axes:
        _log_x(ax, steps)
    axes[-1].set_xlabel("training step")
    axes[0].set_title(title or "LLC and landscape geometry over training")
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_connection(conn: Any, path: str | Path | None = None, title: str | None = None) -> Any:
    """Loss along the straight line and the fitted curve (:func:`slt_tools.symmetry.connect`), before and after
    alignment, with each path's barrier (the connection's definition) in the legend."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    fits = [("raw", conn.raw)] + ([("aligned", conn.aligned)] if conn.aligned is not None else [])
    for k, (which, fit) in enumerate(fits):
        for path_, style, kind in ((fit.line, "--", "line"), (fit.path, "-", conn.curve)):
            ax.plot(path_.ts, path_.losses, style, marker="o", ms=3, color=f"C{k}",
                    label=f"{kind}, {which} (barrier {path_.barrier(conn.definition):.3g})")
    ax.set_xlabel("t along the path")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, lw=0.4)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    ax.set_title(title or f"Mode connectivity: line vs {conn.curve}")
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_kernel_gap(gap: Any, path: str | Path | None = None, title: str | None = None) -> Any:
    """Test loss of eNTK regression with each checkpoint's kernel vs the network at that checkpoint
    (:func:`slt_tools.geometry.kernel_gap`), over training."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = np.asarray(gap.steps, dtype=float)
    ax.plot(steps, gap.kernel_loss, "o-", ms=3, label="eNTK regression (kernel frozen at the checkpoint)")
    ax.plot(steps, gap.network_loss, "s-", ms=3, label="network at the checkpoint")
    ax.axhline(gap.network_loss[-1], color="grey", lw=0.8, ls=":", label="final network")
    _log_x(ax, steps)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("test loss")
    ax.grid(alpha=0.3, lw=0.4)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    ax.set_title(title or "Kernel gap over training")
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_susceptibilities(sus: Any, columns: Any = None, groups: Any = None, path: str | Path | None = None,
                          title: str | None = None) -> Any:
    """Restriction × probe-set response matrix (:func:`slt_tools.susceptibilities`) and its leading principal
    components.

    Left: χ averaged over each column's probe samples, per restriction, annotated with z = mean / SE (SE over chains,
    :meth:`~slt_tools.sampling.susceptibility.SusceptibilityResult.mean_response`). ``columns`` maps a label to
    ``(probe_set, samples)`` (default: one column per probe set, all its samples). Right: the restrictions' scores
    on the first two principal components of the per-sample response matrix (restrictions × every probe sample,
    column-centred), coloured by ``groups`` (``{restriction: group label}``) when given."""
    plt = _plt()
    columns = columns or {k: (k, slice(None)) for k in sus.chi}
    names = list(sus.restrictions)
    cells = [sus.mean_response(s, sel) for s, sel in columns.values()]
    mat = np.stack([m for m, _ in cells], axis=1)
    sem = np.stack([e for _, e in cells], axis=1)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(5.0 + 0.9 * len(columns), 0.42 * len(names) + 2.4),
                                 gridspec_kw={"width_ratios": [1.2 + 0.25 * len(columns), 1.6]})
    lim = float(np.nanmax(np.abs(mat))) or 1.0
    im = ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            z = mat[i, j] / sem[i, j] if sem[i, j] > 0 else float("nan")
            ax.text(j, i, f"{mat[i, j]:.2g}\nz={z:.1f}", ha="center", va="center", fontsize=6.5)
    ax.set_xticks(range(len(columns)), list(columns), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), [f"{n} ({groups[n]})" if groups else n for n in names], fontsize=8)
    ax.set_title("mean χ per probe set", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    scores, ratio = sus.principal_components(2)
    scores = np.pad(scores, ((0, 0), (0, 2 - scores.shape[1])))
    labels = sorted(set(groups.values())) if groups else [None]
    for k, g in enumerate(labels):
        idx = [i for i, n in enumerate(names) if groups is None or groups[n] == g]
        bx.scatter(scores[idx, 0], scores[idx, 1], color=f"C{k}", label=g, s=30)
    for i, n in enumerate(names):
        bx.annotate(n, scores[i], fontsize=7, xytext=(3, 3), textcoords="offset points")
    ratio = np.pad(ratio, (0, 2 - len(ratio)))
    bx.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}% of variance)")
    bx.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}%)")
    bx.axhline(0, color="0.7", lw=0.6)
    bx.axvline(0, color="0.7", lw=0.6)
    bx.grid(alpha=0.3, lw=0.4)
    if groups:
        bx.legend(fontsize=8)
    bx.set_title("principal components of the per-sample response", fontsize=9)
    fig.suptitle(title or "Susceptibilities", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_bif(result: Any, labels: Sequence[str] | None = None, k: int = 5, path: str | Path | None = None,
             title: str | None = None) -> Any:
    """Bayesian influence functions (:func:`slt_tools.bif`): per query, every training sample's BIF sorted in
    increasing order — most helpful (most negative, :meth:`~slt_tools.sampling.bif.BIFResult.top_influences`)
    first — with ±1 SE (left; the top ``k`` marked), and the posterior correlation of the queries with the union of
    their top-``k`` helpful training samples (right)."""
    plt = _plt()
    n, q = result.bif.shape
    labels = list(labels) if labels is not None else [f"query {j}" for j in range(q)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1.3, 1]})
    tops = []
    for j in range(q):
        order = np.argsort(result.bif[:, j], kind="stable")
        rank = np.arange(1, n + 1)
        v, e = result.bif[order, j], result.bif_sem[order, j]
        ax.fill_between(rank, v - e, v + e, color=f"C{j}", alpha=0.2, lw=0)
        ax.plot(rank, v, color=f"C{j}", lw=1, label=labels[j])
        ax.plot(rank[:k], v[:k], "o", color=f"C{j}", ms=4)
        tops.extend(int(i) for i in order[:k] if int(i) not in tops)
    ax.set_xscale("log")
    ax.axhline(0, color="0.6", lw=0.6)
    ax.set_xlabel("training samples ranked by BIF (most helpful first)")
    ax.set_ylabel("BIF = −Cov(ℓ_i, ℓ_q)  (±1 SE)")
    ax.grid(alpha=0.3, which="both", lw=0.4)
    ax.legend(fontsize=7)
    corr = result.correlation[tops].T
    im = bx.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    bx.set_xticks(range(len(tops)), [str(i) for i in tops], rotation=90, fontsize=6)
    bx.set_yticks(range(q), labels, fontsize=7)
    bx.set_xlabel(f"training sample (union of each query's {k} most helpful)")
    bx.set_title("posterior correlation of losses", fontsize=9)
    fig.colorbar(im, ax=bx, fraction=0.046, pad=0.04)
    fig.suptitle(title or "Bayesian influence functions", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return fig
