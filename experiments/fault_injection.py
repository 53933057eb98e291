"""Fault injection against sweeps, results stores and checkpoints (issue 18): a matrix of (attempts, held).

Each scenario injects one kind of fault — a kill -9 at a random moment, a random truncation, duplicated or corrupt
lines, a symlinked / device-node / FIFO store, a second writer, a store deleted mid-run, a mistyped CLI argument, bad
checkpoints, ambiguous checkpoint names, loaders with their own generators, a failing rename, bad arguments — and
checks one promise ("held"). Random choices are seeded (``--seed``). Only public APIs that exist before and after the
issue-18 change are used, so the same harness measures both:

    python experiments/fault_injection.py --label after
    PYTHONPATH=/path/to/pristine/checkout python experiments/fault_injection.py --label before

Results are merged into ``experiments/results/fault_injection.json`` under the label. Runs as root can create device
nodes; the device-node scenario then uses a private copy of /dev/null's node (``mknod c 1 3``) in a temporary
directory — never the real ``/dev/null``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from torch.utils.data import DataLoader, Dataset, TensorDataset  # noqa: E402

HERE = Path(__file__).resolve().parent
FIX = HERE.parent / "tests" / "fixtures" / "tiny_problem.py"
sys.path.insert(0, str(FIX.parent))
import tiny_problem as tp  # noqa: E402

import slt_tools as slt  # noqa: E402
from slt_tools.cli import main as cli  # noqa: E402
from slt_tools.trajectory import ResultsStore, discover_checkpoints  # noqa: E402

warnings.simplefilter("ignore")
PY = sys.executable
KW = {**tp.LLC_KW, "num_draws": 40}


class Fail(Exception):
    """The promise did not hold (the message says how)."""


def check(cond: bool, why: str) -> None:
    if not cond:
        raise Fail(why)


def sweep(ckpts: Path, store: Path | str | None, **kw) -> slt.Trajectory:
    return slt.llc_trajectory(ckpts, tp.make_model, tp.make_loader(), tp.loss_fn, results=store, progress=False,
                              on_divergence="exclude", chain_chunk_size=kw.pop("chain_chunk_size", 1), **{**KW, **kw})


def unit_values(store: Path) -> dict:
    _, units = ResultsStore.read_units(store)
    return {(u["checkpoint"], tuple(u["chains"])): u["result"]["llc_mean"] for u in units}


def raw_unit_keys(store: Path) -> list:
    keys = []
    for line in store.read_bytes().split(b"\n"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("type") == "unit":
            keys.append((rec["checkpoint"], tuple(rec["chains"])))
    return keys


def same_as_reference(store: Path, ref: dict) -> None:
    got = unit_values(store)
    check(set(got) == set(ref), f"units differ from a fresh run: {len(got)} vs {len(ref)}")
    for k, v in ref.items():
        check(abs(got[k] - v) <= 1e-6 * max(1.0, abs(v)), f"value of {k} differs: {got[k]} vs {v}")
    keys = raw_unit_keys(store)
    check(len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} duplicated unit lines in the file")


def sub_sweep(ckpts: Path, store: Path) -> subprocess.Popen:
    return subprocess.Popen([PY, __file__, "--child", str(ckpts), str(store)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.01)


# ---------------------------------------------------------------- scenarios: each returns None (held) or raises Fail
def s_kill_resume(ctx: dict, rng: random.Random, tmp: Path) -> None:
    store = tmp / "k.jsonl"
    proc = sub_sweep(ctx["ckpts"], store)
    if rng.random() < 0.25:
        time.sleep(rng.uniform(0.5, 4.0))
    else:
        wait_lines(store, rng.randint(1, len(ctx["ref"])), proc)
        time.sleep(rng.uniform(0.0, 0.15))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    sweep(ctx["ckpts"], store)
    same_as_reference(store, ctx["ref"])


def _complete_copy(ctx: dict, tmp: Path) -> Path:
    store = tmp / "s.jsonl"
    shutil.copyfile(ctx["ref_store"], store)
    return store


def s_truncate_resume(ctx: dict, rng: random.Random, tmp: Path) -> None:
    store = _complete_copy(ctx, tmp)
    data = store.read_bytes()
    header_end = data.index(b"\n") + 1
    cut = rng.randint(header_end, len(data) - 1)
    store.write_bytes(data[:cut])
    sweep(ctx["ckpts"], store)
    same_as_reference(store, ctx["ref"])
    check(len(slt.Trajectory.from_store(store)) == ctx["n_ckpt"], "from_store lost checkpoints")


def s_duplicate_lines(ctx: dict, rng: random.Random, tmp: Path) -> None:
    store = _complete_copy(ctx, tmp)
    lines = store.read_bytes().split(b"\n")[:-1]
    for _ in range(rng.randint(1, 3)):
        lines.insert(rng.randint(2, len(lines)), lines[rng.randint(1, len(lines) - 1)])
    store.write_bytes(b"\n".join(lines) + b"\n")
    traj = slt.Trajectory.from_store(store)
    check(len(traj) == ctx["n_ckpt"], "from_store lost checkpoints")
    np.testing.assert_allclose(traj.llc_mean, ctx["traj"].llc_mean, rtol=1e-6)


def s_missing_newline(ctx: dict, rng: random.Random, tmp: Path) -> None:
    store = _complete_copy(ctx, tmp)
    lines = store.read_bytes().split(b"\n")[:-1]
    keep = rng.randint(2, len(lines) - 1)  # drop some units so the resume appends after the unterminated line
    store.write_bytes(b"\n".join(lines[:keep]))
    sweep(ctx["ckpts"], store)
    same_as_reference(store, ctx["ref"])


def s_corrupt_line(ctx: dict, rng: random.Random, tmp: Path) -> None:
    store = _complete_copy(ctx, tmp)
    lines = store.read_bytes().split(b"\n")[:-1]
    kind = rng.choice(["non-utf8", "partial json", "unit without result"])
    bad = {"non-utf8": bytes(rng.randrange(128, 256) for _ in range(20)),
           "partial json": lines[1][: len(lines[1]) // 2],
           "unit without result": json.dumps({"type": "unit", "checkpoint": "x.pt", "step": 1,
                                              "chains": [0]}).encode()}[kind]
    lines.insert(rng.randint(2, len(lines)), bad)
    store.write_bytes(b"\n".join(lines) + b"\n")
    traj = slt.Trajectory.from_store(store)
    check(len(traj) == ctx["n_ckpt"], f"{kind}: from_store lost checkpoints")
    sweep(ctx["ckpts"], store)  # resuming works too
    check(set(unit_values(store)) == set(ctx["ref"]), f"{kind}: units lost after resume")


def s_symlink_store(ctx: dict, rng: random.Random, tmp: Path) -> None:
    variant = ctx["variant"]
    (tmp / "real").mkdir()
    target, link = tmp / "real" / "store.jsonl", tmp / "link.jsonl"
    if variant == "symlink, torn-line recovery":
        data = ctx["ref_store"].read_bytes()
        target.write_bytes(data[: len(data) - 30])
    link.symlink_to(target)
    sweep(ctx["ckpts"], link)
    check(link.is_symlink() and os.readlink(link) == str(target), "the symlink was replaced by a file")
    same_as_reference(target, ctx["ref"])


def _node_store(ctx: dict, tmp: Path) -> Path:
    node = tmp / "node"
    if ctx["variant"] == "device node":
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    else:
        os.mkfifo(node)
    return node


def s_special_store(ctx: dict, rng: random.Random, tmp: Path) -> None:
    node = _node_store(ctx, tmp)
    before = os.lstat(node)
    try:
        sweep(ctx["ckpts"], node)
    except Exception:  # noqa: BLE001 - refusing is fine; replacing is not
        pass
    after = os.lstat(node)
    check(stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_rdev == before.st_rdev
          and stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode), "the node was replaced or chmod-ed")


def s_two_writers(ctx: dict, rng: random.Random, tmp: Path) -> None:
    store = tmp / "two.jsonl"
    a = sub_sweep(ctx["ckpts"], store)  # started together: both are importing torch, then both sweep
    time.sleep(rng.uniform(0.0, 0.5))
    b = sub_sweep(ctx["ckpts"], store)
    a.wait()
    b.wait()
    keys = raw_unit_keys(store)
    check(len(keys) == len(set(keys)), f"both wrote: {len(keys) - len(set(keys))} duplicated unit lines")
    if a.returncode != 0 and b.returncode != 0:
        raise Fail("both sweeps failed")


def s_deleted_mid_run(ctx: dict, rng: random.Random, tmp: Path) -> None:
    store = tmp / "del.jsonl"
    proc = sub_sweep(ctx["ckpts"], store)
    wait_lines(store, rng.randint(2, 6), proc)
    store.unlink()
    proc.wait()
    if store.exists():
        first = store.read_bytes().split(b"\n", 1)[0]
        try:
            headed = json.loads(first).get("type") == "header"
        except ValueError:
            headed = False
        check(headed, "the store was silently recreated without its header")


def s_umask(ctx: dict, rng: random.Random, tmp: Path) -> None:
    old = os.umask(0o022)
    try:
        variant = ctx["variant"]
        if variant == "results store":
            path = tmp / "u.jsonl"
            sweep(ctx["ckpts"], path)
        elif variant == "CSV":
            path = tmp / "u.csv"
            ctx["traj"].to_csv(path)
        else:
            path = tmp / "u.safetensors"
            slt.save_checkpoint(path, tp.make_model(), step=1)
    finally:
        os.umask(old)
    mode = stat.S_IMODE(path.stat().st_mode)
    check(mode == 0o644, f"{variant} created with mode {oct(mode)} under umask 022")


BAD_CLI = [["--lr", "-1"], ["--lr", "nan"], ["--num-draws", "0"], ["--num-chains", "0"], ["--localization", "-5"]]


def s_cli_bad_args(ctx: dict, rng: random.Random, tmp: Path) -> None:
    runner, out, spec = CliRunner(), tmp / "cli.jsonl", str(FIX)
    base = ["llc", str(ctx["ckpts"]), "--model", f"{spec}:make_model", "--data", f"{spec}:make_loader", "--loss",
            f"{spec}:loss_fn", "--num-chains", "2", "--num-draws", "20", "--lr", "1e-4", "--localization", "10",
            "--out", str(out)]
    bad = ctx["variant"].split()
    res = runner.invoke(cli, base + bad)
    text = (res.output or "").strip()
    check(res.exit_code == 2, f"{bad}: exit code {res.exit_code}, not 2")
    check(len(text.splitlines()) == 1 and "Traceback" not in text, f"{bad}: error is not one line: {text[:200]!r}")
    res = runner.invoke(cli, base)
    check(res.exit_code == 0, f"the corrected rerun after {bad} failed: {str(res.exception)[:200]}")


def _bad_checkpoint(ctx: dict, d: Path) -> None:
    variant, good = ctx["variant"], tp.make_model().state_dict()
    if variant == "NaN weights":
        sd = {k: torch.full_like(v, float("nan")) for k, v in good.items()}
        slt.save_checkpoint(d / "step_00099.safetensors", sd, step=99)
    elif variant == "non-integer step entry":
        torch.save({"step": "abc", "state_dict": good}, d / "step_00099.pt")
    elif variant == "no step in the name":
        torch.save(good, d / "model.pt")
    else:  # "unreadable file"
        (d / "step_00099.pt").write_bytes(b"garbage")


def s_bad_checkpoint_skip(ctx: dict, rng: random.Random, tmp: Path) -> None:
    d = tmp / "ck"
    shutil.copytree(ctx["ckpts"], d)
    _bad_checkpoint(ctx, d)
    traj = sweep(d, tmp / "b.jsonl", on_error="skip")
    check(len(traj) == ctx["n_ckpt"], f"{ctx['variant']}: {len(traj)} of {ctx['n_ckpt']} good checkpoints")


def s_step_reading(ctx: dict, rng: random.Random, tmp: Path) -> None:
    variant, good = ctx["variant"], tp.make_model().state_dict()
    if variant == "step_10.pt + step_010.pt":
        torch.save(good, tmp / "step_10.pt")
        torch.save(good, tmp / "step_010.pt")
        try:
            refs = discover_checkpoints(tmp)
        except ValueError as exc:
            check("step_10.pt" in str(exc) and "step_010.pt" in str(exc), f"error does not name both: {exc}")
            return
        raise Fail(f"two checkpoints at one step accepted: {[(r.id, r.step) for r in refs]}")
    name, saved, truth = {"model_v2.pt with step=500": ("model_v2.pt", {"step": 500, "state_dict": good}, 500),
                          "step600_seed0.pt": ("step600_seed0.pt", good, 600),
                          "step_1e3.pt": ("step_1e3.pt", good, 1000),
                          "step_-1.pt": ("step_-1.pt", good, None)}[variant]
    torch.save(saved, tmp / name)
    try:
        refs = discover_checkpoints(tmp / name)
    except ValueError:
        check(truth is None or not isinstance(saved, dict) or "step" not in saved, "refused despite its metadata")
        return  # refusing an ambiguous name is right
    check(refs[0].step == truth, f"{name}: read as step {refs[0].step}, truth {truth}")


class _DictData(Dataset):
    """Batches with a non-tensor field (the estimator cannot cache them and iterates the loader)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, tag: bool) -> None:
        self.x, self.y, self.tag = x, y, tag

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {"x": self.x[i], "y": self.y[i], "name": f"s{i}"} if self.tag else (self.x[i], self.y[i])


def _loader(kind: str) -> DataLoader:
    base = tp.make_loader().dataset.tensors
    gen = torch.Generator().manual_seed(1)
    if kind == "TensorDataset + generator":
        return DataLoader(TensorDataset(*base), batch_size=64, shuffle=True, generator=gen)
    if kind == "custom Dataset + generator":
        return DataLoader(_DictData(*base, tag=False), batch_size=64, shuffle=True, generator=gen)
    return DataLoader(_DictData(*base, tag=True), batch_size=64, shuffle=True, generator=gen)


def _loss(model, batch):
    x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
    return torch.nn.functional.mse_loss(model(x), y)


def _train(kind: str, tracker_kw: dict | None, steps: int = 12) -> list[float]:
    torch.manual_seed(0)
    model, loader = tp.make_model(), _loader(kind)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = None if tracker_kw is None else slt.LLCTracker(loader, _loss, schedule=[3, 7], **tracker_kw)
    losses, it = [], iter(loader)
    for step in range(1, steps + 1):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        loss = _loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if tracker is not None:
            tracker.maybe_estimate(step, model, opt)
    return losses


def s_tracker(ctx: dict, rng: random.Random, tmp: Path) -> None:
    kw = {**KW, "num_chains": 2, "num_draws": 20, "on_divergence": "exclude"}
    check(_train(ctx["variant"], None) == _train(ctx["variant"], kw), "training changed by the tracker")


def s_tmp_cleanup(ctx: dict, rng: random.Random, tmp: Path) -> None:
    variant, real = ctx["variant"], os.replace
    if variant == "store recovery":
        data = ctx["ref_store"].read_bytes()
        (tmp / "s.jsonl").write_bytes(data[: len(data) - 30])

    def broken(*a, **k):
        raise OSError("injected: rename failed")

    os.replace = broken
    try:
        if variant == "CSV":
            ctx["traj"].to_csv(tmp / "t.csv")
        elif variant == "checkpoint":
            slt.save_checkpoint(tmp / "c.safetensors", tp.make_model(), step=1)
        else:
            ResultsStore(tmp / "s.jsonl", ctx["config"])
    except OSError:
        pass
    finally:
        os.replace = real
    left = [p.name for p in tmp.iterdir() if p.name.endswith(".tmp")]
    check(not left, f"{variant}: temporary files left behind: {left}")


BAD_ARGS = {"mala_every=-1": {"mala_every": -1}, "explode_threshold=-1": {"explode_threshold": -1.0},
            "chain_chunk_size=0": {"chain_chunk_size": 0}, "chain_chunk_size=-1": {"chain_chunk_size": -1},
            "num_draws=2.5": {"num_draws": 2.5}, "seed=1.5": {"seed": 1.5}, "lr=nan": {"lr": float("nan")}}


def s_bad_args(ctx: dict, rng: random.Random, tmp: Path) -> None:
    store = tmp / "a.jsonl"
    try:
        sweep(ctx["ckpts"], store, **BAD_ARGS[ctx["variant"]])
    except (ValueError, TypeError) as exc:
        check(not store.exists(), f"raised ({exc}) but only after creating the store")
        return
    raise Fail("accepted")


SCENARIOS: list[tuple[str, Callable, list[str] | None, int]] = [
    ("kill -9 at a random moment, resume", s_kill_resume, None, 6),
    ("random truncation of the store, resume", s_truncate_resume, None, 10),
    ("duplicated result lines, read", s_duplicate_lines, None, 5),
    ("last line without newline, resume", s_missing_newline, None, 4),
    ("corrupt line (non-UTF-8 / partial / no result), read + resume", s_corrupt_line, None, 6),
    ("symlinked store", s_symlink_store, ["symlink", "dangling symlink", "symlink, torn-line recovery"], 1),
    ("store is a device node or FIFO", s_special_store, ["device node", "FIFO"], 1),
    ("two sweeps on one store", s_two_writers, None, 4),
    ("store deleted mid-run", s_deleted_mid_run, None, 2),
    ("new files respect the umask (022)", s_umask, ["results store", "CSV", "checkpoint"], 1),
    ("mistyped CLI argument, then corrected rerun", s_cli_bad_args, [" ".join(b) for b in BAD_CLI], 1),
    ("one bad checkpoint with on_error=skip", s_bad_checkpoint_skip,
     ["NaN weights", "non-integer step entry", "no step in the name", "unreadable file"], 1),
    ("step read right or refused", s_step_reading, ["model_v2.pt with step=500", "step600_seed0.pt", "step_1e3.pt",
                                                    "step_-1.pt", "step_10.pt + step_010.pt"], 1),
    ("tracker leaves training bit-identical", s_tracker,
     ["TensorDataset + generator", "custom Dataset + generator", "non-tensor field (iterated) + generator"], 1),
    ("no .tmp left when a rename fails", s_tmp_cleanup, ["CSV", "checkpoint", "store recovery"], 1),
    ("bad argument refused before any file", s_bad_args, list(BAD_ARGS), 1),
]


def setup(root: Path) -> dict:
    ckpts = root / "ckpts"
    ckpts.mkdir()
    tp.write_checkpoints(ckpts, num=4)
    ref_store = root / "ref.jsonl"
    traj = sweep(ckpts, ref_store)
    header = json.loads(ref_store.read_text().split("\n", 1)[0])
    return {"ckpts": ckpts, "ref_store": ref_store, "ref": unit_values(ref_store), "traj": traj,
            "n_ckpt": len(traj), "config": header["config"]}


def run(seed: int, only: str | None) -> dict:
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="fault18_"))
    base = setup(root)
    matrix = {}
    for name, fn, variants, attempts in SCENARIOS:
        if only and only not in name:
            continue
        rows = []
        for variant in variants or [None]:
            for i in range(attempts):
                tmp = Path(tempfile.mkdtemp(dir=root))
                t0 = time.perf_counter()
                try:
                    fn({**base, "variant": variant}, random.Random(rng.random()), tmp)
                    held, why = True, ""
                except Fail as exc:
                    held, why = False, str(exc)
                except Exception as exc:  # noqa: BLE001 - a crash is a failure of the promise
                    held, why = False, f"{type(exc).__name__}: {exc}"[:300]
                    if os.environ.get("FAULT_TRACE"):
                        traceback.print_exc()
                rows.append({"variant": variant, "attempt": i, "held": held, "why": why,
                             "seconds": round(time.perf_counter() - t0, 2)})
                print(f"{'held' if held else 'FAIL'}  {name}" + (f" [{variant}]" if variant else "")
                      + (f": {why}" if why else ""), flush=True)
        matrix[name] = {"attempts": len(rows), "held": sum(r["held"] for r in rows), "runs": rows}
    shutil.rmtree(root, ignore_errors=True)
    return matrix


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="after", help="key under which this run is stored (e.g. before / after)")
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--only", default=None, help="run only scenarios whose name contains this")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fault_injection.json")
    ap.add_argument("--child", nargs=2, metavar=("CKPTS", "STORE"), help=argparse.SUPPRESS)  # a sweep to kill
    args = ap.parse_args()
    if args.child:
        sweep(Path(args.child[0]), Path(args.child[1]))
        return 0
    t0 = time.time()
    matrix = run(args.seed, args.only)
    entry = {"code": str(Path(slt.__file__).resolve().parent.parent), "seed": args.seed,
             "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "seconds": round(time.time() - t0, 1),
             "attempts": sum(m["attempts"] for m in matrix.values()), "held": sum(m["held"] for m in matrix.values()),
             "matrix": matrix}
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc[args.label] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1)
    try:
        from slt_tools.files import atomic_write
    except ImportError:  # the pristine checkout has no slt_tools.files
        args.out.write_text(text)
    else:
        atomic_write(args.out, text)
    for name, m in matrix.items():
        print(f"{m['held']:>3}/{m['attempts']:<3} {name}")
    print(f"total {entry['held']}/{entry['attempts']} held, {entry['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
