"""Checkpoint sweeps: resume after a kill, corrupt stores, settings changes, torchrun, the tracker, safety, the CLI."""
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import slt_tools as slt
from slt_tools.cli import main as cli
from slt_tools.trajectory import CheckpointError, ResultsStore, discover_checkpoints, read_checkpoint

FIX = Path(__file__).parent / "fixtures" / "tiny_problem.py"
sys.path.insert(0, str(FIX.parent))
import tiny_problem as tp  # noqa: E402

PY = sys.executable


@pytest.fixture()
def ckpts(tmp_path):
    d = tmp_path / "ckpts"
    d.mkdir()
    tp.write_checkpoints(d, num=4)
    return d


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def test_sweep_matches_single_estimates_and_is_order_independent(ckpts, tmp_path):
    traj = quiet(tp.sweep, ckpts, tmp_path / "a.jsonl")
    assert list(traj.steps) == sorted(traj.steps) and len(traj) == 4
    # a checkpoint's estimate does not depend on the rest of the sweep
    ref = discover_checkpoints(ckpts)[2]
    model = tp.make_model()
    model.load_state_dict(ref.load())
    single = quiet(slt.estimate_llc, model, tp.make_loader(), tp.loss_fn, on_divergence="exclude", **tp.LLC_KW)
    assert traj.llc_mean[2] == pytest.approx(single.llc_mean, rel=1e-6)
    pairs = [(r.step, r.load()) for r in discover_checkpoints(ckpts)][::-1]
    again = quiet(slt.llc_trajectory, pairs, tp.make_model, tp.make_loader(), tp.loss_fn, progress=False,
                  on_divergence="exclude", **tp.LLC_KW)
    np.testing.assert_allclose(again.llc_mean, traj.llc_mean, rtol=1e-6)
    # resume: nothing recomputed, same answer; store round trip
    t0 = time.perf_counter()
    resumed = quiet(tp.sweep, ckpts, tmp_path / "a.jsonl")
    assert time.perf_counter() - t0 < 2.0
    np.testing.assert_array_equal(resumed.llc_mean, traj.llc_mean)
    np.testing.assert_allclose(slt.Trajectory.from_store(tmp_path / "a.jsonl").llc_mean, traj.llc_mean)
    traj.to_csv(tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith("step,checkpoint,llc_mean")


def test_chain_chunks_equal_the_whole(ckpts, tmp_path):
    whole = quiet(tp.sweep, ckpts, tmp_path / "w.jsonl")
    chunked = quiet(tp.sweep, ckpts, tmp_path / "c.jsonl", chain_chunk_size=2)
    np.testing.assert_allclose(chunked.llc_mean, whole.llc_mean, rtol=1e-5)
    units = ResultsStore.read_units(tmp_path / "c.jsonl")[1]
    assert len(units) == 8 and {tuple(u["chains"]) for u in units} == {(0, 1), (2, 3)}


def test_resume_after_kill(ckpts, tmp_path):
    for i in range(6):  # more work so the kill lands mid-sweep
        tp.write_checkpoints(ckpts, num=1, seed=10 + i)
    store = tmp_path / "k.jsonl"
    proc = subprocess.Popen([PY, str(FIX), str(ckpts), str(store), "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        if store.exists() and len(store.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = ResultsStore.read_units(store)[1]
    n_ckpt = len(discover_checkpoints(ckpts))
    assert 0 < len(before) < n_ckpt * 4, "the kill should land mid-sweep"
    with open(store, "a") as f:  # and a torn last line, as a kill mid-write leaves
        f.write('{"type": "unit", "checkpoint": "step_0')
    with pytest.warns(RuntimeWarning, match="unreadable last line"):
        traj = tp.sweep(ckpts, store, chain_chunk_size=1)
    units = ResultsStore.read_units(store)[1]
    keys = [(u["checkpoint"], tuple(u["chains"])) for u in units]
    assert len(keys) == len(set(keys)) == n_ckpt * 4  # nothing lost, nothing duplicated
    for u in before:  # finished units were kept, not recomputed
        assert u in units
    fresh = quiet(tp.sweep, ckpts, tmp_path / "fresh.jsonl", chain_chunk_size=1)
    np.testing.assert_allclose(traj.llc_mean, fresh.llc_mean, rtol=1e-6)


def test_changed_settings_are_refused(ckpts, tmp_path):
    quiet(tp.sweep, ckpts, tmp_path / "s.jsonl")
    with pytest.raises(ValueError, match="different settings.*lr"):
        slt.llc_trajectory(ckpts, tp.make_model, tp.make_loader(), tp.loss_fn, results=tmp_path / "s.jsonl",
                           progress=False, **{**tp.LLC_KW, "lr": 2e-4})


def test_torchrun_two_processes_equal_single(ckpts, tmp_path):
    torchrun = Path(PY).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun picks a free rendezvous port (a fixed port can be taken or in TIME_WAIT on a busy machine)
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(FIX), str(ckpts),
                           str(tmp_path / "d.jsonl"), "2"], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    single = quiet(tp.sweep, ckpts, tmp_path / "s.jsonl", chain_chunk_size=2)
    dist = slt.Trajectory.from_store(tmp_path / "d.jsonl")
    np.testing.assert_array_equal(dist.steps, single.steps)
    np.testing.assert_allclose(dist.llc_mean, single.llc_mean, rtol=1e-6)
    units = ResultsStore.read_units(tmp_path / "d.jsonl")[1]
    assert len(units) == len(single) * 2


def _train(tracker=None, steps=30):
    torch.manual_seed(0)
    model = tp.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = tp.make_loader()
    losses = []
    it = iter(loader)
    for step in range(1, steps + 1):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        loss = tp.loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if tracker is not None:
            tracker.maybe_estimate(step, model, opt)
    return model, losses


def test_tracker_leaves_training_bit_identical(tmp_path):
    plain_model, plain_losses = _train()
    tracker = slt.LLCTracker(tp.make_loader(), tp.loss_fn, schedule=slt.log_schedule(30, num=5),
                             results=tmp_path / "tr.jsonl", on_divergence="exclude", **tp.LLC_KW)
    tracked_model, tracked_losses = quiet(_train, tracker)
    assert tracked_losses == plain_losses
    for a, b in zip(plain_model.parameters(), tracked_model.parameters()):
        assert torch.equal(a, b)
    assert [s for s, _ in tracker.history] == slt.log_schedule(30, num=5)
    assert len(slt.Trajectory.from_store(tmp_path / "tr.jsonl")) == len(tracker.history)
    every = slt.LLCTracker(tp.make_loader(), tp.loss_fn, schedule=10, **tp.LLC_KW)
    assert [s for s in range(1, 31) if every.due(s)] == [10, 20, 30]


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/slt_tools_pwned",))


def test_weights_only_refuses_pickles(tmp_path):
    path = tmp_path / "step_10.pt"
    torch.save({"state_dict": tp.make_model().state_dict(), "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    assert not Path("/tmp/slt_tools_pwned").exists()
    torch.save({"step": 7, "state_dict": tp.make_model().state_dict()}, tmp_path / "ok.pt")
    sd, step = read_checkpoint(tmp_path / "ok.pt")
    assert step == 7 and set(sd) == set(tp.make_model().state_dict())


def test_bad_checkpoints_are_named(ckpts, tmp_path):
    wrong = slt.save_checkpoint(ckpts / "step_99999.safetensors", torch.nn.Linear(4, 4), step=99999)
    (ckpts / "step_5.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="skipping checkpoint") as rec:
        traj = tp.sweep(ckpts, tmp_path / "b.jsonl")
    text = " ".join(str(w.message) for w in rec)
    assert "step_99999.safetensors does not fit the model" in text and "missing keys" in text
    assert "step_5.pt" in text and len(traj) == 4
    with pytest.raises(CheckpointError, match="step_99999"):
        slt.llc_trajectory([wrong], tp.make_model, tp.make_loader(), tp.loss_fn, on_error="raise", progress=False,
                           **tp.LLC_KW)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        slt.llc_trajectory(empty, tp.make_model, tp.make_loader(), tp.loss_fn, progress=False, **tp.LLC_KW)


def test_cli_end_to_end(ckpts, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.jsonl"
    spec = f"{FIX}"
    res = runner.invoke(cli, ["llc", str(ckpts), "--model", f"{spec}:make_model", "--data", f"{spec}:make_loader",
                              "--loss", f"{spec}:loss_fn", "--num-chains", "2", "--num-draws", "40", "--lr", "1e-4",
                              "--localization", "10", "--out", str(out), "--csv", str(tmp_path / "c.csv")])
    assert res.exit_code == 0, res.output
    assert len(slt.Trajectory.from_store(out)) == 4 and (tmp_path / "c.csv").exists()
    res = runner.invoke(cli, ["stages", str(out), "--json"])  # 4 checkpoints are too few: a clear error
    assert res.exit_code == 2 and "at least 6 checkpoints" in res.output  # one line, no traceback
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(cli, ["plot", str(out), "--out", str(tmp_path / "p.png")])
    assert res.exit_code == 0 and (tmp_path / "p.png").stat().st_size > 5000
    assert "Estimate the LLC" in runner.invoke(cli, ["llc", "--help"]).output
    script = shutil.which("slt-tools", path=str(Path(PY).parent))
    assert script is not None
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    assert "stages" in proc.stdout and "plot" in proc.stdout


def test_geometry_metrics_recorded_beside_the_llc(ckpts, tmp_path):
    from slt_tools.geometry import hessian_summary
    from slt_tools.plots import plot_metrics_trajectory

    loader = tp.make_loader()

    def metrics(model):
        return hessian_summary(model, loader, tp.loss_fn, k=2, trace_samples=6)

    traj = quiet(slt.llc_trajectory, ckpts, tp.make_model, loader, tp.loss_fn, results=tmp_path / "g.jsonl",
                 metrics=metrics, progress=False, on_divergence="exclude", chain_chunk_size=2, **tp.LLC_KW)
    assert all("hessian/top_0" in m and "hessian/trace" in m for m in traj.metrics)
    again = slt.Trajectory.from_store(tmp_path / "g.jsonl")
    assert again.metrics == traj.metrics
    fig = plot_metrics_trajectory(traj, ["hessian/top_0", "hessian/trace"], path=tmp_path / "m.png")
    assert len(fig.axes) == 3 and (tmp_path / "m.png").stat().st_size > 5000


def test_sweep_warns_once_per_kind_not_per_checkpoint(ckpts):
    """The fixture's checkpoints are mid-training (λ̂ < 0 at every one): a sweep in chain blocks says so in one
    warning per kind listing the steps, instead of repeating the estimator's warning per block and checkpoint."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traj = tp.sweep(ckpts, None, chain_chunk_size=2)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    negative = [m for m in messages if "λ̂ < 0" in m]
    assert (traj.llc_mean < 0).all() and len(negative) == 1
    assert f"at {len(traj)} of {len(traj)} checkpoints" in negative[0]
    assert all(str(s) in negative[0] for s in traj.steps)
    assert not any(m.startswith("λ̂ = ") for m in messages)  # no per-checkpoint copies
