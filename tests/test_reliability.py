"""Issue 18: sweeps, stores and checkpoints never lose, corrupt or misread a result, and never touch what is not theirs.

Property-style fault injection (seeded): random kill points inside a write, random truncations, random duplicates.
"""
import importlib.util
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader, Dataset, TensorDataset

import slt_tools as slt
from slt_tools import files
from slt_tools.cli import main as cli
from slt_tools.trajectory import CheckpointError, ResultsStore, StoreError, discover_checkpoints, find_checkpoints
from slt_tools.trajectory.arguments import check_llc_kwargs
from slt_tools.trajectory.checkpoints import step_from_name

FIX = Path(__file__).parent / "fixtures" / "tiny_problem.py"
sys.path.insert(0, str(FIX.parent))
import tiny_problem as tp  # noqa: E402

KW = {**tp.LLC_KW, "num_draws": 30}
CONFIG = {"llc": {"num_chains": 2, "seed": 0}, "chain_chunk_size": 1}


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def sweep(ckpts, store, **kw):
    return slt.llc_trajectory(ckpts, tp.make_model, tp.make_loader(), tp.loss_fn, results=store, progress=False,
                              **{"on_divergence": "exclude", **KW, **kw})


def fake_result(i):
    return {"llc_mean": float(i), "chain": i}


def filled_store(path, n=6):
    with ResultsStore(path, CONFIG) as store:
        for i in range(n):
            store.append(f"c{i}.pt", i, (0,), fake_result(i))
    return path


@pytest.fixture()
def ckpts(tmp_path):
    d = tmp_path / "ckpts"
    d.mkdir()
    tp.write_checkpoints(d, num=3)
    return d


# ------------------------------------------------------------------------------------------------ slt_tools.files
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_new_files_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        a = files.atomic_write(tmp_path / "a.txt", "x")
        fd = files.append_to(tmp_path / "b.txt")
        os.close(fd)
        store = filled_store(tmp_path / "s.jsonl", n=1)
    finally:
        os.umask(old)
    for p in (a, tmp_path / "b.txt", store):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


def test_replaced_file_keeps_its_mode_and_symlinks_are_written_through(tmp_path):
    target = tmp_path / "real" / "t.txt"
    target.parent.mkdir()
    target.write_text("old")
    os.chmod(target, 0o640)
    link, dangling = tmp_path / "link.txt", tmp_path / "dangling.txt"
    link.symlink_to(target)
    dangling.symlink_to(tmp_path / "real" / "new.txt")
    files.atomic_write(link, "new")
    files.atomic_write(dangling, b"bytes")
    assert link.is_symlink() and target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert dangling.is_symlink() and (tmp_path / "real" / "new.txt").read_bytes() == b"bytes"


def _special_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = [fifo, tmp_path]
    if os.geteuid() == 0:  # a private copy of /dev/null's node: never the real one
        node = tmp_path / "null"
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        out.append(node)
    link = tmp_path / "to_fifo"
    link.symlink_to(fifo)
    return [*out, link]


def test_device_nodes_fifos_and_directories_are_refused_untouched(tmp_path):
    for path in _special_files(tmp_path):
        before = os.lstat(path)
        with pytest.raises(files.UnsafeTargetError, match="not a regular file"):
            files.atomic_write(path, "x")
        with pytest.raises(files.UnsafeTargetError):
            files.append_to(path)
        with pytest.raises(files.UnsafeTargetError):
            ResultsStore(path, CONFIG)
        after = os.lstat(path)
        assert (after.st_mode, after.st_rdev, after.st_ino) == (before.st_mode, before.st_rdev, before.st_ino)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_failed_write_leaves_old_content_and_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def boom(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        files.atomic_write(path, boom)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("rename failed")))
    with pytest.raises(OSError):
        files.atomic_write(path, "new")
    with pytest.raises(OSError):
        slt.save_checkpoint(tmp_path / "c.safetensors", tp.make_model(), step=1)
    traj = slt.Trajectory.from_results([(1, "a", _result())])
    with pytest.raises(OSError):
        traj.to_csv(tmp_path / "t.csv")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    monkeypatch.undo()
    with pytest.raises(FileExistsError):
        files.atomic_write(path, "x", exclusive=True)


def _result():
    model = tp.make_model()
    return quiet(slt.estimate_llc, model, tp.make_loader(), tp.loss_fn, on_divergence="exclude",
                 **{**KW, "num_chains": 2, "num_draws": 10})


CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("files", sys.argv[1]); files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
i = 0
print("ready", flush=True)
while True:
    i += 1
    files.atomic_write(sys.argv[2], (str(i) + "\\n") * 20000)
"""


def test_atomic_write_survives_random_kill_points(tmp_path):
    """A process rewriting a file in a loop is SIGKILLed at random moments: the file is always whole."""
    rng = random.Random(18)
    target = tmp_path / "f.txt"
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, files.__file__, str(target)], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.02, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        lines = target.read_text().split("\n")
        assert lines[-1] == "" and len(lines) == 20001 and len(set(lines[:-1])) == 1
    # (a kill between mkstemp and rename can orphan one hidden .tmp file; the target itself is never torn)


# ------------------------------------------------------------------------------------------------ the results store
def test_random_kill_points_inside_an_append(tmp_path):
    """The process dies after writing a random prefix of a random unit's line: reopening keeps every earlier unit,
    drops the torn one (with a warning), and appends cleanly after it."""
    rng = random.Random(0)
    real_write = os.write
    for trial in range(25):
        path = tmp_path / f"s{trial}.jsonl"
        store = ResultsStore(path, CONFIG)
        die_at = rng.randint(0, 5)
        for i in range(6):
            if i == die_at:
                line = json.dumps({"type": "unit", "checkpoint": f"c{i}.pt", "step": i, "chains": [0],
                                   "result": fake_result(i)}).encode()
                real_write(store._fd, line[: rng.randint(1, len(line))])  # the kill: a prefix, no newline
                break
            store.append(f"c{i}.pt", i, (0,), fake_result(i))
        store.close()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reopened = ResultsStore(path, CONFIG)
        assert {k[0] for k in reopened.units} == {f"c{i}.pt" for i in range(die_at)}
        assert any("unreadable last line" in str(w.message) for w in caught)
        reopened.append("new.pt", 99, (0,), fake_result(99))
        reopened.close()
        _, units = ResultsStore.read_units(path)
        assert [u["checkpoint"] for u in units] == [f"c{i}.pt" for i in range(die_at)] + ["new.pt"]


def test_random_truncations_of_a_real_sweep_resume_to_the_same_answer(ckpts, tmp_path):
    ref = tmp_path / "ref.jsonl"
    reference = quiet(sweep, ckpts, ref, chain_chunk_size=1)
    data = ref.read_bytes()
    rng = random.Random(1)
    for trial in range(6):
        path = tmp_path / f"t{trial}.jsonl"
        path.write_bytes(data[: rng.randint(data.index(b"\n") + 1, len(data) - 1)])
        again = quiet(sweep, ckpts, path, chain_chunk_size=1)
        np.testing.assert_allclose(again.llc_mean, reference.llc_mean, rtol=1e-6)
        lines = path.read_bytes().split(b"\n")
        assert lines[-1] == b"" and all(json.loads(x) for x in lines[:-1])  # a clean file again
        assert len(lines) - 2 == len(reference) * KW["num_chains"]  # no unit twice


def test_duplicates_are_deduplicated_or_refused(tmp_path):
    path = filled_store(tmp_path / "s.jsonl")
    lines = path.read_text().splitlines(keepends=True)
    rng = random.Random(2)
    dup = lines + [lines[rng.randint(1, len(lines) - 1)] for _ in range(3)]
    rng.shuffle(dup[1:])
    path.write_text("".join(dup))
    _, units = ResultsStore.read_units(path)
    assert sorted(u["checkpoint"] for u in units) == [f"c{i}.pt" for i in range(6)]
    conflict = json.loads(lines[2])
    conflict["result"]["llc_mean"] = -1.0
    path.write_text("".join(lines) + json.dumps(conflict) + "\n")
    with pytest.raises(StoreError, match=r"lines 3 and 8 hold different results for checkpoint 'c1.pt'"):
        ResultsStore.read_units(path)


def test_missing_final_newline_is_repaired_before_appending(tmp_path):
    path = filled_store(tmp_path / "s.jsonl", n=2)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    with ResultsStore(path, CONFIG) as store:
        assert len(store.units) == 2
        store.append("c9.pt", 9, (0,), fake_result(9))
    _, units = ResultsStore.read_units(path)
    assert [u["checkpoint"] for u in units] == ["c0.pt", "c1.pt", "c9.pt"]


def test_undecodable_and_malformed_lines_are_skipped_with_their_line_numbers(tmp_path):
    path = filled_store(tmp_path / "s.jsonl", n=3)
    lines = path.read_bytes().split(b"\n")
    lines.insert(2, b"\xff\xfe garbage \xc0")
    lines.insert(4, json.dumps({"type": "unit", "checkpoint": "x.pt", "step": 1, "chains": [0]}).encode())
    path.write_bytes(b"\n".join(lines))
    with pytest.warns(RuntimeWarning, match=r"skipping 2 unreadable line\(s\) \(line 3, 5\)"):
        _, units = ResultsStore.read_units(path)
    assert [u["checkpoint"] for u in units] == ["c0.pt", "c1.pt", "c2.pt"]
    with pytest.warns(RuntimeWarning, match="line 3, 5.*recomputed"):
        ResultsStore(path, CONFIG).close()


def test_version_and_header_are_checked(tmp_path):
    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps({"type": "header", "version": 2, "config": CONFIG}) + "\n")
    with pytest.raises(StoreError, match="newer slt_tools"):
        ResultsStore.read_units(path)
    with pytest.raises(StoreError, match="newer slt_tools"):
        ResultsStore(path, CONFIG)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    with pytest.raises(StoreError, match="not an slt_tools results store"):
        ResultsStore(notes, CONFIG)
    assert notes.read_text() == "my notes\n"
    with pytest.raises(StoreError, match="not an slt_tools results store"):
        slt.Trajectory.from_store(notes)


LOCKER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); print("locked", flush=True); time.sleep(60)
"""


def test_one_writer_per_store(tmp_path):
    path = tmp_path / "s.jsonl"
    first = ResultsStore(path, CONFIG)
    with pytest.raises(StoreError, match=f"in use by process {os.getpid()}"):
        ResultsStore(path, CONFIG)
    first.close()
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        with pytest.raises(StoreError, match=f"in use by process {proc.pid}"):
            ResultsStore(path, CONFIG)
    finally:
        proc.kill()
        proc.wait()
    ResultsStore(path, CONFIG).close()  # released when the holder dies


def test_deleted_or_replaced_store_stops_instead_of_writing_headless(tmp_path):
    path = tmp_path / "s.jsonl"
    store = ResultsStore(path, CONFIG)
    store.append("a.pt", 1, (0,), fake_result(1))
    path.unlink()
    with pytest.raises(StoreError, match="was deleted"):
        store.append("b.pt", 2, (0,), fake_result(2))
    assert not path.exists()
    store.close()
    store = ResultsStore(path, CONFIG)
    (tmp_path / "other").write_text("x")
    os.replace(tmp_path / "other", path)
    with pytest.raises(StoreError, match="replaced"):
        store.append("b.pt", 2, (0,), fake_result(2))
    store.close()
    assert path.read_text() == "x"


def test_sweep_stops_when_its_store_is_deleted_mid_run(ckpts, tmp_path):
    path = tmp_path / "s.jsonl"
    calls = []

    def metrics(model):
        calls.append(1)
        if len(calls) == 2:
            path.unlink()
        return {"n": float(len(calls))}

    with pytest.raises(StoreError, match="was deleted"):
        quiet(slt.llc_trajectory, ckpts, tp.make_model, tp.make_loader(), tp.loss_fn, results=path, metrics=metrics,
              progress=False, on_divergence="exclude", **KW)
    assert not path.exists() and len(calls) == 2
    quiet(sweep, ckpts, path)  # and the store's lock was released: a rerun starts afresh


def test_symlinked_store_stays_a_symlink_through_recovery(ckpts, tmp_path):
    (tmp_path / "real").mkdir()
    target, link = tmp_path / "real" / "s.jsonl", tmp_path / "s.jsonl"
    link.symlink_to(target)
    first = quiet(sweep, ckpts, link)
    target.write_bytes(target.read_bytes()[:-25])  # a torn last line
    with pytest.warns(RuntimeWarning, match="unreadable last line"):
        again = sweep(ckpts, link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    np.testing.assert_allclose(again.llc_mean, first.llc_mean, rtol=1e-6)
    assert len(ResultsStore.read_units(target)[1]) == len(first)


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name,step", [
    ("step_001200.pt", 1200), ("ckpt-1200.safetensors", 1200), ("1200.pt", 1200), ("model.step1200.pt", 1200),
    ("global_step_7.pt", 7), ("checkpoint-500.bin", 500), ("run-a_iter_3.pth", 3), ("STEP_5.pt", 5),
    ("model_v2.pt", None), ("step600_seed0.pt", None), ("step_1e3.pt", None), ("step_-1.pt", None),
    ("epoch_3.pt", None), ("model_1200.pt", None), ("model.pt", None), ("step.pt", None), ("v2_step_10.pt", None),
])
def test_one_naming_rule(name, step):
    assert step_from_name(Path(name)) == step


def test_metadata_step_comes_first_and_bad_metadata_is_an_error(tmp_path):
    sd = tp.make_model().state_dict()
    torch.save({"step": 500, "state_dict": sd}, tmp_path / "model_v2.pt")
    torch.save({"global_step": torch.tensor(40), "model": sd}, tmp_path / "step_3.pt")
    slt.save_checkpoint(tmp_path / "final.safetensors", sd, step=900)
    assert [(r.id, r.step) for r in discover_checkpoints(tmp_path)] == [
        ("step_3.pt", 40), ("model_v2.pt", 500), ("final.safetensors", 900)]
    for bad in ("abc", -1, 2.5, True, "12.5"):
        torch.save({"step": bad, "state_dict": sd}, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match="bad.pt.*non-negative integer"):
            discover_checkpoints(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError):
        slt.save_checkpoint(tmp_path / "x.safetensors", sd, step=-3)


def test_duplicate_steps_name_both_files(tmp_path):
    sd = tp.make_model().state_dict()
    torch.save(sd, tmp_path / "step_10.pt")
    torch.save(sd, tmp_path / "step_010.pt")
    with pytest.raises(CheckpointError, match=r"step 10: .*step_010.pt and .*step_10.pt"):
        find_checkpoints(tmp_path)


def test_skip_every_bad_checkpoint_and_report_them_all(ckpts, tmp_path):
    sd = tp.make_model().state_dict()
    slt.save_checkpoint(ckpts / "step_00090.safetensors", {k: torch.full_like(v, float("nan")) for k, v in sd.items()},
                        step=90)
    torch.save({"step": "abc", "state_dict": sd}, ckpts / "step_00091.pt")
    torch.save(sd, ckpts / "model_v2.pt")
    store = tmp_path / "s.jsonl"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traj = sweep(ckpts, store)
    assert len(traj) == 3 and sorted(traj.skipped) == ["model_v2.pt", "step_00090.safetensors", "step_00091.pt"]
    report = [str(w.message) for w in caught if "skipping checkpoints" in str(w.message)]
    assert len(report) == 1 and "3 of 6" in report[0] and "non-finite" in report[0] and "model_v2.pt" in report[0]
    with pytest.raises(CheckpointError, match="model_v2.pt|step_00091"):
        sweep(ckpts, tmp_path / "r.jsonl", on_error="raise")
    assert not (tmp_path / "r.jsonl").exists()  # refused before the store was created


# ------------------------------------------------------------------------------------------------ arguments
BAD = [({"mala_every": -1}, ValueError), ({"explode_threshold": -1.0}, ValueError),
       ({"explode_threshold": float("nan")}, ValueError), ({"chain_chunk_size": 0}, ValueError),
       ({"chain_chunk_size": -1}, ValueError), ({"chain_chunk_size": True}, ValueError),
       ({"num_draws": 2.5}, ValueError), ({"seed": 1.5}, ValueError), ({"seed": -1}, ValueError),
       ({"num_chains": 0}, ValueError), ({"lr": float("nan")}, ValueError), ({"lr": -1e-4}, ValueError),
       ({"num_burnin_steps": -1}, ValueError), ({"sampler": "hmc"}, ValueError), ({"lrr": 1.0}, TypeError),
       ({"on_divergence": "ignore"}, ValueError), ({"chain_ids": [0]}, ValueError)]


@pytest.mark.parametrize("bad,exc", BAD, ids=[next(iter(b)) + "=" + repr(next(iter(b.values()))) for b, _ in BAD])
def test_bad_arguments_fail_before_any_file_is_touched(ckpts, tmp_path, bad, exc):
    store = tmp_path / "s.jsonl"
    with pytest.raises(exc, match=next(iter(bad))):
        sweep(ckpts, store, **bad)
    if "chain_chunk_size" not in bad and "chain_ids" not in bad:
        with pytest.raises(exc):
            slt.LLCTracker(tp.make_loader(), tp.loss_fn, schedule=5, results=store, **{**KW, **bad})
    assert not store.exists()


def test_argument_checker_accepts_the_documented_defaults():
    check_llc_kwargs({**KW, "mala_every": 0, "explode_threshold": None, "nbeta": 10.0, "compile": True})


def _invoke(args):
    spec = str(FIX)
    return CliRunner().invoke(cli, ["llc", args[0], "--model", f"{spec}:make_model", "--data", f"{spec}:make_loader",
                                    "--loss", f"{spec}:loss_fn", "--num-chains", "2", "--num-draws", "20", *args[1:]])


def test_cli_errors_are_one_line_exit_2_and_leave_no_store(ckpts, tmp_path):
    out = tmp_path / "o.jsonl"
    for bad in (["--lr", "-1"], ["--lr", "nan"], ["--num-draws", "0"], ["--seed", "x"], ["--chain-chunk-size", "0"]):
        res = _invoke([str(ckpts), "--lr", "1e-4", "--localization", "10", "--out", str(out), *bad])
        assert res.exit_code == 2, res.output
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
        assert not out.exists()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    res = _invoke([str(ckpts), "--lr", "1e-4", "--localization", "10", "--out", str(fifo)])
    assert res.exit_code == 2 and "FIFO" in res.output and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    res = _invoke([str(ckpts), "--lr", "1e-4", "--localization", "10", "--out", str(out)])
    assert res.exit_code == 0, res.output  # the corrected rerun is not refused
    lines = out.read_text().splitlines()
    (tmp_path / "dup.jsonl").write_text("\n".join(lines + lines[1:3]) + "\n")
    res = CliRunner().invoke(cli, ["plot", str(tmp_path / "dup.jsonl"), "--out", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    (tmp_path / "junk.jsonl").write_bytes(b"\xff\xfe not a store\n")
    res = CliRunner().invoke(cli, ["stages", str(tmp_path / "junk.jsonl")])
    assert res.exit_code == 2 and "junk.jsonl is not an slt_tools results store" in res.output


# ------------------------------------------------------------------------------------------------ the tracker
class _Pairs(Dataset):
    def __init__(self, x, y, tag):
        self.x, self.y, self.tag = x, y, tag

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "id": f"s{i}"} if self.tag else (self.x[i], self.y[i])


class _NumpyShuffled:
    """A custom iterable with its own numpy generator (not a DataLoader)."""

    def __init__(self, x, y):
        self.x, self.y, self.rng = x, y, np.random.default_rng(3)

    def __iter__(self):
        order = torch.as_tensor(self.rng.permutation(len(self.x)))
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            yield {"x": self.x[idx], "y": self.y[idx], "id": "batch"}


def _loader(kind):
    x, y = tp.make_loader().dataset.tensors
    gen = torch.Generator().manual_seed(5)
    return {"tensor dataset": lambda: DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=gen),
            "custom dataset": lambda: DataLoader(_Pairs(x, y, False), batch_size=64, shuffle=True, generator=gen),
            "non-tensor field": lambda: DataLoader(_Pairs(x, y, True), batch_size=64, shuffle=True, generator=gen),
            "custom iterable": lambda: _NumpyShuffled(x, y),
            "list of batches": lambda: [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]}[kind]()


def _loss(model, batch):
    x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
    return torch.nn.functional.mse_loss(model(x), y)


def _train(kind, track, steps=10):
    torch.manual_seed(0)
    model, loader = tp.make_model(), _loader(kind)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    tracker = slt.LLCTracker(loader, _loss, schedule=[2, 6], num_chains=2, num_draws=10, lr=1e-4,
                             localization=10.0, on_divergence="exclude") if track else None
    losses, it = [], iter(loader)
    for step in range(1, steps + 1):
        batch = next(it, None)
        if batch is None:
            it = iter(loader)
            batch = next(it)
        loss = _loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if tracker is not None:
            quiet(tracker.maybe_estimate, step, model, opt)
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["tensor dataset", "custom dataset", "non-tensor field", "custom iterable",
                                  "list of batches"])
def test_tracker_leaves_training_bit_identical_for_every_loader_kind(kind):
    plain_losses, plain_params = _train(kind, False)
    tracked_losses, tracked_params = _train(kind, True)
    assert tracked_losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(plain_params, tracked_params))


def test_files_module_is_importable_without_the_package():
    spec = importlib.util.spec_from_file_location("standalone_files", files.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.current_umask() == files.current_umask()


def test_torchrun_ranks_stop_together_when_the_store_is_locked(ckpts, tmp_path):
    """Rank 0 cannot take the store's lock: every rank exits with the error instead of waiting in a collective."""
    path = tmp_path / "d.jsonl"
    ResultsStore(path, {"x": 1}).close()
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        torchrun = Path(sys.executable).parent / "torchrun"
        proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(FIX), str(ckpts), str(path),
                               "2"], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=150)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert f"in use by process {holder.pid}" in proc.stderr
    assert "rank 0 could not open the results store" in proc.stderr  # rank 1 was told, not left waiting
