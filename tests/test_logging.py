"""W&B logging, for real, offline, read back from the run's transaction log; figures; degraded operation."""
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from helpers import dln_at, mse, teacher_loader

import slt_tools as slt
from slt_tools.logging import WandbLogger, read_offline_run
from slt_tools.synthetic import make_synthetic_curves


@pytest.fixture()
def wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def _run_dir(root):
    dirs = sorted((root / "wandb").glob("offline-run-*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def _estimate(seed=0, **kw):
    model = dln_at((4, 3, 4), 1, (1,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slt.estimate_llc(model, teacher_loader(model, 1000, 100, 4), mse, num_chains=3, num_draws=40,
                                lr=1e-4, localization=10.0, seed=seed, **kw)


def test_llc_and_trajectory_logged_with_training_step(wandb_env):
    logger = WandbLogger(project="t", name="run", config={"what": "test"}, save_dir=wandb_env / "figs")
    res = _estimate(logger=logger)
    points = [(100, _estimate(1)), (1000, _estimate(2)), (10000, _estimate(3))]
    for step, r in points:
        logger.log_trajectory_point(step, r)
    c = make_synthetic_curves(0, noise=0.001)
    stages = slt.detect_stages(c.steps, c.llc, loss=c.loss, llc_std=c.llc_std)
    traj = slt.Trajectory(steps=c.steps, llc_mean=c.llc, llc_std=c.llc_std, llc_sem=c.llc_std, loss=c.loss)
    logger.log_stages(stages, traj)
    logger.finish()

    run = read_offline_run(_run_dir(wandb_env))
    assert run["config"]["what"] == "test"
    first = run["history"][0]
    assert first["llc/mean"] == pytest.approx(res.llc_mean)
    assert first["llc/std"] == pytest.approx(res.llc_std)
    assert first["llc/per_chain/2"] == pytest.approx(res.llc_per_chain[2])
    assert first["llc/diagnostics/mala_acceptance"] == pytest.approx(res.diagnostics["mala_acceptance"])
    traj_rows = [h for h in run["history"] if "train/step" in h and "llc/mean" in h]
    assert [h["train/step"] for h in traj_rows] == [100, 1000, 10000]
    assert [h["llc/mean"] for h in traj_rows] == pytest.approx([r.llc_mean for _, r in points])
    steps = [h["_step"] for h in run["history"]]
    assert steps == sorted(steps)  # W&B's own step stays monotone
    assert run["summary"]["stages/kinds"] == [s.kind for s in stages]
    assert run["summary"]["stages/boundaries"] == pytest.approx([s.start for s in stages[1:]])
    (row,) = [h for h in run["history"] if h.get("stages/table/_type") == "table-file"]
    assert row["stages/table/nrows"] == len(stages)
    table = json.loads((_run_dir(wandb_env) / "files" / row["stages/table/path"]).read_text())
    assert [r[table["columns"].index("kind")] for r in table["data"]] == [s.kind for s in stages]
    assert any(h.get("llc/traces/_type") == "image-file" for h in run["history"])
    for name in ("llc_traces.png", "stages.png"):
        path = wandb_env / "figs" / name
        assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_logs_into_the_users_active_run(wandb_env):
    import wandb

    run = wandb.init(project="user", mode="offline", dir=str(wandb_env))
    for i in range(3):
        run.log({"train/loss": 1.0 / (i + 1)})
    logger = WandbLogger(save_dir=wandb_env / "figs")
    logger.log_trajectory_point(500, _estimate())
    logger.finish()  # must not finish the user's run
    assert wandb.run is run
    run.log({"train/loss": 0.1})
    run.finish()
    history = read_offline_run(_run_dir(wandb_env))["history"]
    assert [h.get("train/step") for h in history if "llc/mean" in h] == [500]
    assert len([h for h in history if "train/loss" in h]) == 4
    assert len(history) == 4  # the LLC point joined the user's next row: no phantom step in their step axis


def test_wandb_unavailable_still_saves_locally(wandb_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    logger = WandbLogger(save_dir=wandb_env / "figs")
    res = _estimate()
    with pytest.warns(RuntimeWarning, match="W&B logging unavailable") as rec:
        logger.log_llc(res)
        logger.log_trajectory_point(10, res)
    assert len([w for w in rec if "unavailable" in str(w.message)]) == 1  # said once
    assert (wandb_env / "figs" / "llc_traces.png").exists()
    lines = (wandb_env / "figs" / "logged.jsonl").read_text().splitlines()
    assert len(lines) == 2


def test_init_failure_falls_back(wandb_env):
    logger = WandbLogger(mode="not-a-mode", save_dir=wandb_env / "figs")
    with pytest.warns(RuntimeWarning, match="wandb.init failed"):
        logger.log_trajectory_point(1, _estimate())
    assert (wandb_env / "figs" / "logged.jsonl").exists()


def test_import_is_light():
    code = "import sys, slt_tools; print('wandb' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_chain_trace_figure():
    from slt_tools.plots import plot_chain_traces

    res = _estimate()
    fig = plot_chain_traces(res)
    ax1, ax2 = fig.axes
    assert ax1.get_ylabel().startswith("minibatch loss") and ax1.get_xlabel() == "draw"
    assert len(ax1.lines) == 3 + 1 and np.isclose(ax1.lines[-1].get_ydata()[0], res.init_loss)
    assert "λ̂" in ax2.get_ylabel()


def test_users_explicit_steps_are_not_disturbed(wandb_env):
    """A loop logging with explicit consecutive steps loses nothing and gains no phantom steps when the tracker logs
    in between (W&B drops a log whose step is below its counter)."""
    import wandb

    run = wandb.init(project="user", mode="offline", dir=str(wandb_env))
    logger = WandbLogger(save_dir=wandb_env / "figs")
    res = _estimate()
    for step in range(4):
        run.log({"train/loss": 1.0 / (step + 1)}, step=step)
        if step == 1:
            logger.log_trajectory_point(step, res)
    run.finish()
    history = read_offline_run(_run_dir(wandb_env))["history"]
    assert [h["train/loss"] for h in history if "train/loss" in h] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert [h.get("train/step") for h in history if "llc/mean" in h] == [1]
    assert [h["_step"] for h in history] == [0, 1, 2, 3]


def test_tracker_run_config_holds_the_llc_settings(wandb_env):
    """The tracker's W&B run used to get an empty config; it now records the estimates' settings."""
    model = dln_at((4, 3, 4), 1, (1,))
    logger = WandbLogger(save_dir=wandb_env / "figs")
    slt.LLCTracker(teacher_loader(model, 500, 50, 4), mse, schedule=[1], logger=logger, num_chains=2,
                   num_draws=10, lr=1e-4, localization=10.0)
    logger.log_trajectory_point(1, _estimate())
    logger.finish()
    config = read_offline_run(_run_dir(wandb_env))["config"]
    flat = {k.replace("/", "."): v for k, v in config.items()}
    assert flat.get("llc.lr", config.get("llc", {}).get("lr") if isinstance(config.get("llc"), dict) else None) == 1e-4
