"""Quick versions of the developmental studies: the qualitative result each study exists to show."""
import importlib.util
import sys
import time
from pathlib import Path

import pytest

EXP = Path(__file__).resolve().parents[1] / "experiments"


def _load(name):
    sys.path.insert(0, str(EXP))
    spec = importlib.util.spec_from_file_location(name, EXP / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_dln_staircase_quick(offline):
    study = _load("dln_staircase")
    out = offline / "dln"
    summary = study.run(study.QUICK, out)
    # three rises are visible (ranks 1→2→3→4; rank 0's estimates are invalid, far from a minimum). With 3 checkpoints
    # per upper plateau the quick run resolves 2 or 3 of them depending on the noise realisation (LLC seeds 0, 1, 2:
    # 2, 3, 2 stages; with the previous noise generator seed 0 gave 3 and seeds 1-3 gave 2), so the test asks for
    # ≥ 2 stages, all type A, and for the staircase itself: plateau medians rising with the learned rank, each within
    # 20 % of Aoyagi's λ.
    assert summary["num_type_A"] >= 2 and set(summary["stage_kinds"]) == {"A"}
    medians = [row["llc_median"] for row in summary["plateaus"][1:]]  # rank 0: not near a minimum, excluded
    assert all(m is not None for m in medians) and medians == sorted(medians), summary["plateaus"]
    for row in summary["plateaus"][1:]:
        assert abs(row["rel_error"]) <= 0.2, row
    final = summary["self_calibrated"][-1]  # the self-calibrating path at the exact minimum: λ(4) = 32 (issue 16)
    assert final["rank"] == 4 and abs(final["rel_error"]) <= 0.05 and final["converged"], final
    assert (out / "report.md").exists() and (out / "figures" / "stages.png").stat().st_size > 10_000
    assert list((offline / "wandb").glob("offline-run-*/*.wandb"))
    t0 = time.perf_counter()  # a second run reuses the checkpoints and the results store
    again = study.run(study.QUICK, out, use_wandb=False)
    assert time.perf_counter() - t0 < 0.5 * summary["wall_time_s"]
    assert again["checkpoints"] == summary["checkpoints"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_grokking_quick(offline):
    study = _load("grokking")
    summary = study.run(study.QUICK, offline / "grok", use_wandb=False)
    kinds = summary["stage_kinds"]
    assert kinds[0] == "A" and "B" in kinds[1:], kinds
    first_b = next(s for s in summary["stages"] if s["kind"] == "B")
    rows = summary["train_log"]
    train_at = {int(r["step"]): r["train_loss"] for r in rows}
    # the type-B stage starts after memorisation: train loss already small, test accuracy still ~0 there
    start = min(train_at, key=lambda s: abs(s - first_b["start"]))
    assert train_at[start] < 0.2 * rows[0]["train_loss"]
    assert rows[-1]["test_acc"] > 0.9


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_induction_heads_quick(offline):
    study = _load("induction_heads")
    summary = study.run(study.QUICK, offline / "ind", use_wandb=False)
    formed = summary["induction_head_formed_at"]
    assert formed is not None and summary["train_log"][-1]["icl_score"] < -2.0
    # the induction-head formation happens inside a type-A stage in which the LLC rises substantially
    (stage,) = [s for s in summary["stages"] if s["start"] <= formed <= s["end"]]
    assert stage["kind"] == "A" and stage["delta_llc"] > 10


def test_susceptibility_study_logs_figures_and_contrasts_to_wandb(offline):
    """``log_wandb`` of the susceptibility study, offline, read back from the run file: the config, every contrast's
    estimate and SE in the summary, each figure as an image in the history and as a PNG on disk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slt_tools.logging import read_offline_run

    study = _load("susceptibility_study")
    contrasts = {"repeated_minus_non_repeated": {"induction_minus_other": {"estimate": -6.5e-5, "se": 1.5e-4},
                                                 "induction_minus_other_layer1": {"estimate": 2.0e-4, "se": 5e-5}}}
    summary = {"study_config": {"num_probe": 8, "seeds": [0, 3]},
               "susceptibilities": {"seed0": {"contrasts": contrasts},
                                    "seed3": {"contrasts": {"repeated": {"induction_minus_other":
                                                                         {"estimate": 0.25, "se": 0.5}}}}}}
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    study.log_wandb(summary, {"susceptibility_heads_test": fig}, offline / "figs")
    (run_dir,) = sorted((offline / "wandb").glob("offline-run-*"))
    run = read_offline_run(run_dir)
    assert run["config"]["num_probe"] == 8 and run["config"]["seeds"] == [0, 3]
    got = run["summary"]
    for seed, res in summary["susceptibilities"].items():
        for g, c in res["contrasts"].items():
            for k, v in c.items():
                assert got[f"{seed}/{g}/{k}/estimate"] == pytest.approx(v["estimate"], rel=1e-12)
                assert got[f"{seed}/{g}/{k}/se"] == pytest.approx(v["se"], rel=1e-12)
    assert sum(k.endswith(("/estimate", "/se")) for k in got) == 2 * 3
    (row,) = [h for h in run["history"] if "figures/susceptibility_heads_test/_type" in h]
    assert row["figures/susceptibility_heads_test/_type"] == "image-file"
    png = offline / "figs" / "susceptibility_heads_test.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
