"""``slt-tools`` command line: thin wrappers over the library (no logic of its own)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import click


def _load_object(spec: str) -> Any:
    """Resolve ``package.module:name`` or ``path/to/file.py:name``."""
    if ":" not in spec:
        raise click.BadParameter(f"expected MODULE:NAME or FILE.py:NAME, got {spec!r}")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.exists():
            raise click.BadParameter(f"file {target} does not exist")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
        sys.modules[path.stem] = module
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise click.BadParameter(f"cannot import module {target!r}: {exc}") from exc
    if not hasattr(module, name):
        raise click.BadParameter(f"{target} has no attribute {name!r}")
    return getattr(module, name)


class _OneLineErrors(click.Group):
    """Errors reach the user as one line on stderr and exit code 2, never as a traceback
    (``SLT_TOOLS_TRACEBACK=1`` shows the traceback instead)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - reported as one line
            if os.environ.get("SLT_TOOLS_TRACEBACK"):
                raise
            name = ctx.invoked_subcommand or ctx.info_name
            if isinstance(exc, click.ClickException):
                message = exc.format_message()
            else:
                message = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
            click.echo(f"slt-tools {name}: error: " + " ".join(message.split()), err=True)
            ctx.exit(2)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="slt_tools")
def main() -> None:
    """slt-tools: local learning coefficients (LLC) over training, developmental stages, and plots.

    \b
    Typical use:
      slt-tools llc runs/ckpts --model mypkg.models:make_model --data mypkg.data:train_loader \\
                --loss mypkg.data:loss_fn --lr 1e-4 --localization 100 --out runs/llc.jsonl
      slt-tools stages runs/llc.jsonl
      slt-tools plot runs/llc.jsonl --out runs/llc.png
    """


@main.command()
@click.argument("checkpoints")
@click.option("--model", "model_spec", required=True, metavar="MODULE:FACTORY",
              help="callable returning an untrained model of the checkpoints' architecture")
@click.option("--data", "data_spec", required=True, metavar="MODULE:FACTORY",
              help="callable returning the training DataLoader (the data the LLC is measured on)")
@click.option("--loss", "loss_spec", required=True, metavar="MODULE:FN",
              help="loss_fn(model, batch) -> scalar mean loss")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/llc.jsonl"), show_default=True,
              help="results store (JSON lines); re-running skips finished checkpoints")
@click.option("--num-chains", type=int, default=8, show_default=True)
@click.option("--num-draws", type=int, default=200, show_default=True)
@click.option("--num-burnin-steps", type=int, default=None,
              help="burn-in steps; default min(4/(lr·localization), sampling steps), 0 for none")
@click.option("--lr", type=float, default=None, help="SGLD step size ε (default: calibrate automatically)")
@click.option("--localization", type=float, default=None, help="γ (default: calibrate automatically)")
@click.option("--nbeta", type=float, default=None, help="inverse temperature nβ (default n / log n)")
@click.option("--sampler", type=click.Choice(["sgld", "rmsprop_sgld", "sgnht"]), default="sgld", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chain-chunk-size", type=int, default=None, help="chains per work unit (resume/shard granularity)")
@click.option("--on-error", type=click.Choice(["skip", "raise"]), default="skip", show_default=True,
              help="what to do with an unreadable or mismatching checkpoint")
@click.option("--compile/--no-compile", "use_compile", default=False, show_default=True,
              help="torch.compile each SGLD step: a one-off compile, then faster steps "
                   "(measured in docs/benchmarks.md; worth it for sweeps)")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), default=None, help="also write a CSV")
@click.option("--wandb/--no-wandb", "use_wandb", default=False, show_default=True,
              help="log to Weights & Biases (offline unless WANDB_MODE says otherwise)")
def llc(checkpoints: str, model_spec: str, data_spec: str, loss_spec: str, out: Path, num_chains: int,
        num_draws: int, num_burnin_steps: int | None, lr: float | None, localization: float | None, nbeta: float | None,
        sampler: str, seed: int, chain_chunk_size: int | None, on_error: str, use_compile: bool,
        csv_path: Path | None, use_wandb: bool) -> None:
    """Estimate the LLC at every checkpoint in CHECKPOINTS (a directory or a glob).

    Works unchanged under `torchrun --nproc_per_node=N slt-tools llc ...`: checkpoints and chain blocks are shared
    out across the processes and rank 0 writes the results.
    """
    import slt_tools as slt
    from slt_tools.files import resolve_target
    from slt_tools.trajectory.arguments import check_int, check_llc_kwargs

    llc_kwargs = dict(num_chains=num_chains, num_draws=num_draws, num_burnin_steps=num_burnin_steps, lr=lr,
                      localization=localization, nbeta=nbeta, sampler=sampler, seed=seed, compile=use_compile)
    # every check before anything is loaded, created or logged: a typo must not leave a store behind
    check_llc_kwargs(llc_kwargs)
    check_int("--chain-chunk-size", chain_chunk_size, 1, optional=True)
    for path in (out, csv_path):
        if path is not None:
            resolve_target(path)
    model_factory, data_factory, loss_fn = (_load_object(s) for s in (model_spec, data_spec, loss_spec))
    logger = _logger(use_wandb, {"checkpoints": checkpoints, "model": model_spec})
    traj = slt.llc_trajectory(checkpoints, model_factory, data_factory(), loss_fn, results=out, on_error=on_error,
                              chain_chunk_size=chain_chunk_size, logger=logger, **llc_kwargs)
    if csv_path is not None:
        traj.to_csv(csv_path)
    if logger is not None:
        logger.finish()
    click.echo(f"{len(traj)} checkpoints -> {out}")


def _logger(use_wandb: bool, config: dict) -> Any:
    if not use_wandb:
        return None
    try:
        from slt_tools.logging import WandbLogger
    except ImportError as exc:
        click.echo(f"W&B logging unavailable ({exc}); results are still saved locally", err=True)
        return None
    return WandbLogger(config=config)


@main.command()
@click.argument("store", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="also save a figure with the stages shaded")
@click.option("--json", "as_json", is_flag=True, help="print the stages as JSON")
@click.option("--wandb/--no-wandb", "use_wandb", default=False, show_default=True)
def stages(store: Path, plot_path: Path | None, as_json: bool, use_wandb: bool) -> None:
    """Detect developmental stages (type A: loss falls, LLC rises; type B: loss flat, LLC falls) in a results store."""
    import slt_tools as slt

    traj = slt.Trajectory.from_store(store)
    found = slt.detect_stages(traj)  # flagged estimates (λ̂ < 0, diverged, not converged) are left out
    if as_json:
        click.echo(json.dumps(found.to_dict(), indent=2))
    else:
        click.echo(f"{'start':>10} {'end':>10}  type  {'Δλ̂':>9} {'Δloss':>10}  P(type)  boundary interval, P(exists), "
                   f"found again in replicates")
        support = {b.step: b.replicate_support for b in found.boundaries}
        for s in found:
            rs = support.get(s.start, float("nan"))
            b = "" if s.start_interval is None else (f"[{s.start_interval[0]:g}, {s.start_interval[1]:g}], "
                                                     f"{s.start_probability:.2f}, {rs:.2f}")
            click.echo(f"{s.start:>10g} {s.end:>10g}  {s.kind:<4}  {s.delta_llc:>+9.3g} {s.delta_loss:>+10.3g}  "
                       f"{s.confidence:>7.2f}  {b}")
        for e in found.excluded:
            click.echo(f"excluded step {e['step']:g}: {e['reason']}")
    if plot_path is not None:
        from slt_tools.plots import plot_stages

        plot_stages(traj.steps, traj.llc_mean, traj.loss, traj.llc_std, stages=found, path=plot_path)
        click.echo(f"figure -> {plot_path}")
    logger = _logger(use_wandb, {"store": str(store)})
    if logger is not None:
        logger.log_stages(found, traj)
        logger.finish()


@main.command()
@click.argument("store", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="PNG path (default: next to the store, same name with .png)")
def plot(store: Path, out: Path | None) -> None:
    """Plot the LLC (mean ± std over chains) and the loss against training step (log axis)."""
    import slt_tools as slt
    from slt_tools.plots import plot_trajectory

    out = out or store.with_suffix(".png")
    plot_trajectory(slt.Trajectory.from_store(store), path=out)
    click.echo(f"figure -> {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
