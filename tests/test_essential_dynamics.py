"""Essential dynamics: planted turns in an output trajectory are found; models and checkpoints are accepted."""
import math

import numpy as np
import torch

import slt_tools as slt
from slt_tools.plots import plot_essential_dynamics


def _planted(seed=0):
    """Outputs moving along direction d1, then d2 from step 100, then d3 from step 1000 (log-time), plus noise."""
    rng = np.random.default_rng(seed)
    steps = np.unique(np.geomspace(1, 1e4, 60).round())
    x = np.log(steps + 1)
    d = rng.standard_normal((3, 200))
    t1, t2 = math.log(101), math.log(1001)
    a = np.minimum(x, t1)
    b = np.clip(x - t1, 0, t2 - t1)
    c = np.clip(x - t2, 0, None)
    out = a[:, None] * d[0] + b[:, None] * d[1] + c[:, None] * d[2]
    return steps, out + 0.05 * rng.standard_normal(out.shape)


def test_planted_turns_are_milestones(tmp_path):
    steps, out = _planted()
    ed = slt.essential_dynamics(outputs=out, steps=steps)
    assert ed.scores.shape == (len(steps), 3) and 0.9 < ed.explained_variance_ratio.sum() <= 1.0
    found = [m.step for m in ed.milestones]
    assert len(found) == 2, found
    for truth, f in zip([100, 1000], found):
        assert abs(math.log10(f) - math.log10(truth)) <= 0.15
    # as a second signal for stage detection: agreement is reported
    st = slt.detect_stages(steps, 10 + np.log(steps + 1), milestones=ed)
    assert st.agreement is not None and set(st.agreement) >= {"agree", "milestones_without_boundary"}
    fig = plot_essential_dynamics(ed, st, path=tmp_path / "ed.png")
    assert (tmp_path / "ed.png").stat().st_size > 5_000 and "PC1" in fig.axes[0].get_xlabel()


def test_models_and_checkpoint_dirs(tmp_path):
    torch.manual_seed(0)
    base = torch.nn.Linear(4, 3)
    models, steps = [], [1, 3, 10, 30, 100, 300]
    for k, s in enumerate(steps):
        m = torch.nn.Linear(4, 3)
        with torch.no_grad():
            m.weight.copy_(base.weight * (1 + 0.1 * k))
            m.bias.copy_(base.bias)
        models.append(m)
        slt.save_checkpoint(tmp_path / f"step-{s}.safetensors", m, step=s)
    probe = torch.randn(16, 4)
    a = slt.essential_dynamics(models, probe, steps=steps)
    b = slt.essential_dynamics(tmp_path, probe, model_factory=lambda: torch.nn.Linear(4, 3))
    assert np.allclose(np.abs(a.scores[:, 0]), np.abs(b.scores[:, 0]), atol=1e-5)
    assert a.explained_variance_ratio[0] > 0.99  # a straight line in output space
