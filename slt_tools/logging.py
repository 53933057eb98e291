"""Weights & Biases logging for LLC estimates, trajectories, stages and calibration — one entry point.

``WandbLogger`` is passed to :func:`slt_tools.estimate_llc` (``logger=``), to :func:`slt_tools.llc_trajectory` and the
in-training :class:`slt_tools.LLCTracker`, and used directly for stages (``logger.log_stages(stages, traj)``).

* **Offline by default.** The mode is, in order: the ``mode=`` argument, ``WANDB_MODE``, ``"online"`` if an API key is
  configured (``WANDB_API_KEY`` or a netrc entry for the W&B host), else ``"offline"``. Nothing contacts a server
  unless the user configured one. ``WANDB_PROJECT`` and ``WANDB_DIR`` are respected.
* **The user's run.** If a run is already active (``wandb.run``), everything goes into it; otherwise a new run is
  started on first use and finished by :meth:`finish`.
* **Training step as x-axis.** Trajectory points are logged as ``{"train/step": step, "llc/mean": …}`` with
  ``wandb.define_metric("llc/*", step_metric="train/step")`` and *without* ``step=``; in a user's run also with
  ``commit=False``, so W&B's own step counter (which the user's loop drives) is never advanced by us.
* **Figures** are matplotlib PNGs saved under ``save_dir`` (so people without W&B get them too) and logged as images.
* **W&B unavailable** (not installed, or ``wandb.init`` fails): one warning, then local results only.

``wandb`` and matplotlib are imported only when a logger is used (``import slt_tools`` stays light).
"""
from __future__ import annotations

import json
import math
import netrc
import os
import struct
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

STEP_KEY = "train/step"


def _flatten(d: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Finite numeric leaves of a nested dict as {"prefix/a/b": value}."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}/{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        elif isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger:
    """Log LLC results, trajectories, stages and calibrations to W&B (offline by default) and to PNG files."""

    def __init__(self, project: str | None = None, name: str | None = None, config: Mapping[str, Any] | None = None,
                 mode: str | None = None, dir: str | Path | None = None, save_dir: str | Path | None = None,
                 run: Any = None, tags: Sequence[str] | None = None) -> None:
        self.project = project or os.environ.get("WANDB_PROJECT", "slt_tools")
        self.name, self.config, self.tags = name, dict(config or {}), list(tags or [])
        self.mode = mode or os.environ.get("WANDB_MODE") or ("online" if _has_api_key() else "offline")
        self.dir = Path(dir) if dir is not None else (Path(os.environ["WANDB_DIR"]) if "WANDB_DIR" in os.environ
                                                      else None)
        self.save_dir = Path(save_dir) if save_dir is not None else Path("runs") / "slt_tools_figures"
        self._run = run
        self._owns_run = False
        self._disabled = False
        self._metrics_defined = False
        self._n_llc = 0

    # ------------------------------------------------------------------ run handling
    @property
    def run(self) -> Any:
        """The active W&B run (started on first use), or None when W&B is unavailable."""
        if self._run is not None or self._disabled:
            return self._run
        try:
            import wandb
        except ImportError as exc:
            return self._disable(f"wandb is not importable ({exc})")
        if wandb.run is not None:
            self._run = wandb.run
            return self._run
        try:
            settings = wandb.Settings(init_timeout=60, silent=True, console="off")
            self._run = wandb.init(project=self.project, name=self.name, config=self.config, mode=self.mode,
                                   dir=str(self.dir) if self.dir else None, tags=self.tags or None,
                                   settings=settings, reinit="create_new")
            self._owns_run = True
        except Exception as exc:  # noqa: BLE001 - any init failure falls back to local results
            return self._disable(f"wandb.init failed ({type(exc).__name__}: {exc})")
        return self._run

    def add_config(self, values: Mapping[str, Any]) -> None:
        """Record settings in the run's config (before the run starts: passed to ``wandb.init``)."""
        if self._run is None:
            self.config.update(values)
        else:
            self._run.config.update(dict(values), allow_val_change=True)

    def _disable(self, why: str) -> None:
        self._disabled = True
        warnings.warn(f"W&B logging unavailable: {why}. Results and figures are still saved under {self.save_dir}.",
                      RuntimeWarning, stacklevel=4)
        return None

    def _log(self, data: Mapping[str, Any]) -> None:
        self.save_dir.mkdir(parents=True, exist_ok=True)
        plain = {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool))}
        with open(self.save_dir / "logged.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(plain) + "\n")
        run = self.run
        if run is not None:
            # in a user's run, don't advance W&B's step counter: commit=False attaches our values to the user's
            # current step (written with their next log, or at finish), so their step axis gets no phantom steps
            run.log(dict(data), commit=None if self._owns_run else False)

    def image(self, fig: Any, filename: str) -> Any:
        """Save ``fig`` under the logger's directory as ``filename`` (closing it); a ``wandb.Image`` of it when a run
        is active, else None."""
        path = self.save_dir / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=140, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        if self.run is None:
            return None
        import wandb

        return wandb.Image(str(path))

    def _summary(self, values: Mapping[str, Any]) -> None:
        run = self.run
        if run is not None:
            for k, v in values.items():
                run.summary[k] = v

    def finish(self) -> None:
        """Finish the run if this logger started it (a user's own run is left open)."""
        if self._run is not None and self._owns_run:
            self._run.finish()
        self._run, self._owns_run = None, False

    # ------------------------------------------------------------------ what gets logged
    def log_llc(self, result: Any, step: int | None = None, prefix: str = "llc") -> None:
        """λ̂ mean/std/sem, per-chain values, diagnostics and a chain-trace figure of one estimate."""
        from slt_tools.plots import plot_chain_traces

        self._n_llc += 1
        data: dict[str, Any] = {f"{prefix}/mean": result.llc_mean, f"{prefix}/std": result.llc_std,
                                f"{prefix}/sem": result.llc_sem, f"{prefix}/init_loss": result.init_loss}
        for c, v in zip(result.chain_ids or range(len(result.llc_per_chain)), result.llc_per_chain):
            if math.isfinite(v):
                data[f"{prefix}/per_chain/{c}"] = float(v)
        data.update(_flatten({k: v for k, v in result.diagnostics.items() if k != "per_chain"},
                             f"{prefix}/diagnostics"))
        if step is not None:
            self._define_step_metric()
            data[STEP_KEY] = step
        tag = f"_step{step}" if step is not None else (f"_{self._n_llc}" if self._n_llc > 1 else "")
        image = self.image(plot_chain_traces(result, title=f"λ̂ = {result.llc_mean:.4g} ± {result.llc_std:.2g}"),
                            f"{prefix}_traces{tag}.png")
        if image is not None:
            data[f"{prefix}/traces"] = image
        self._log(data)
        if step is None:
            self._summary({f"{prefix}/mean": result.llc_mean, f"{prefix}/std": result.llc_std})

    def _define_step_metric(self) -> None:
        run = self.run
        if run is not None and not self._metrics_defined:
            run.define_metric(STEP_KEY)
            for pattern in ("llc/*", "stages/*", "calibration/*", "hessian/*", "ntk/*"):
                run.define_metric(pattern, step_metric=STEP_KEY)
            self._metrics_defined = True

    def log_trajectory_point(self, step: int, result: Any, metrics: Mapping[str, float] | None = None) -> None:
        """One checkpoint's λ̂ (and optional extra metrics, e.g. Hessian/eNTK statistics) against the training step
        (the x-axis is ``train/step``)."""
        self._define_step_metric()
        self._log({STEP_KEY: int(step), "llc/mean": result.llc_mean, "llc/std": result.llc_std,
                   "llc/sem": result.llc_sem, "llc/init_loss": result.init_loss,
                   "llc/mala_acceptance": result.diagnostics.get("mala_acceptance", float("nan")),
                   "llc/stationary": float(bool(result.diagnostics.get("stationary", False))),
                   **{f"llc/{k}" if "/" not in k else k: float(v) for k, v in (metrics or {}).items()}})

    def log_trajectory(self, traj: Any, stages: Sequence[Any] | None = None, log_points: bool = True) -> None:
        """Every point of a trajectory plus the trajectory figure (with stages if given)."""
        from slt_tools.plots import plot_trajectory

        if log_points:
            for step, res in zip(traj.steps, traj.results):
                self.log_trajectory_point(int(step), res)
        image = self.image(plot_trajectory(traj, stages=stages), "llc_trajectory.png")
        if image is not None:
            self._log({"llc/trajectory": image})

    def log_stages(self, stages: Sequence[Any], traj: Any = None) -> None:
        """A table of stages, boundaries and kinds in the summary, and (given the curves) a figure."""
        rows = [s.to_dict() for s in stages]
        self._summary({"stages/boundaries": [r["start"] for r in rows[1:]], "stages/kinds": [r["kind"] for r in rows],
                       "stages/count": len(rows)})
        data: dict[str, Any] = {}
        run = self.run
        if run is not None:
            import wandb

            cols = ["start", "end", "kind", "delta_llc", "delta_loss", "confidence"]
            data["stages/table"] = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])
        if traj is not None:
            from slt_tools.plots import plot_trajectory

            image = self.image(plot_trajectory(traj, stages=stages, title="LLC over training with stages"),
                                "stages.png")
            if image is not None:
                data["stages/figure"] = image
        self.save_dir.mkdir(parents=True, exist_ok=True)
        (self.save_dir / "stages.json").write_text(json.dumps(rows, indent=2))
        if data:
            self._log(data)

    def log_calibration(self, calib: Any) -> None:
        """The chosen hyperparameters (summary) and the candidate table of a calibration."""
        d = calib.to_dict() if hasattr(calib, "to_dict") else dict(calib)
        self._summary({f"calibration/{k}": v for k, v in d.items() if isinstance(v, (int, float, str))})
        self.save_dir.mkdir(parents=True, exist_ok=True)
        (self.save_dir / "calibration.json").write_text(json.dumps(d, indent=2, default=str))


# ---------------------------------------------------------------------- reading offline runs back
_BLOCK = 32768
_HEADER = 7  # ":W&B" + magic 0xBEE1 + version byte


def _record_payloads(path: Path) -> Iterator[bytes]:
    """Records of a W&B transaction log: LevelDB-log framing (32 KiB blocks; 7-byte record headers crc32c(4),
    length(2), type(1) with FULL=1, FIRST=2, MIDDLE=3, LAST=4), after a 7-byte file header."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        if kind == 1:
            yield payload
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pending + payload
            pending = b""


def read_offline_run(run_dir: str | Path, wait: float = 30.0) -> dict[str, Any]:
    """Parse an offline run (its ``run-*.wandb`` file) into ``{"history": [...], "summary": {...}, "config": {...}}``.

    History rows map keys (nested keys joined with "/") to decoded JSON values; summary and config likewise.
    ``run.finish()`` can return before wandb's service process has written the whole file, so the file is re-read
    (up to ``wait`` seconds) until the run's exit record is there.
    """
    import time as _time

    deadline = _time.monotonic() + wait
    while True:
        out = _read_offline_once(run_dir)
        if out.pop("_complete") or _time.monotonic() > deadline:
            return out
        _time.sleep(0.2)


def _read_offline_once(run_dir: str | Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2

    run_dir = Path(run_dir)
    files = [run_dir] if run_dir.suffix == ".wandb" else sorted(run_dir.glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"no .wandb file in {run_dir}")

    def key(item: Any) -> str:
        return "/".join(item.nested_key) if item.nested_key else item.key

    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}, "_complete": False}
    for payload in _record_payloads(files[0]):
        rec = wandb_internal_pb2.Record()
        try:
            rec.ParseFromString(payload)
        except Exception:  # noqa: BLE001 - a record still being written: the caller re-reads
            break
        which = rec.WhichOneof("record_type")
        if which == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in rec.history.item})
        elif which == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in rec.summary.update})
        elif which == "config":
            out["config"].update({key(i): json.loads(i.value_json) for i in rec.config.update})
        elif which == "run":
            out["config"].update({key(i): json.loads(i.value_json) for i in rec.run.config.update})
        elif which == "exit":
            out["_complete"] = True
    return out
