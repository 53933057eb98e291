"""slt.symmetry.connect: Bézier / polygonal-chain mode connectivity before and after alignment."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import slt_tools as slt
from slt_tools.symmetry import connect, interpolate, permute, symmetry_spec
from slt_tools.symmetry.connect import curve_point

pytestmark = pytest.mark.usefixtures("one_thread")


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, generator=gen)
    y = torch.sin(2 * x @ torch.randn(3, 1, generator=gen))
    return x, y, DataLoader(TensorDataset(x, y), batch_size=64)


def _trained(seed, x, y, width=16, steps=300):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return model


def _loss(m, b):
    return F.mse_loss(m(b[0]), b[1])


def _permuted(model, seed):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    for u in symmetry_spec(model).units:
        permute(sd, u.axes, torch.randperm(u.size, generator=gen))
    return sd


def test_midpoint_bend_is_the_line():
    a, b = torch.randn(7), torch.randn(7)
    for curve in ("bezier", "polychain"):
        for t in (0.0, 0.2, 0.5, 0.9, 1.0):
            torch.testing.assert_close(curve_point(a, 0.5 * (a + b), b, t, curve), (1 - t) * a + t * b)
    with pytest.raises(ValueError, match="unknown curve"):
        curve_point(a, a, b, 0.5, "spline")


def test_planted_permutation_has_no_barrier_after_alignment(tmp_path):
    x, y, loader = _data()
    model = _trained(0, x, y)
    moved = _permuted(model, 3)
    res = connect(model, moved, loader, _loss, curve="bezier", num_points=11, steps=60)
    bar = res.barriers
    assert bar["line/raw"] > 0.05, bar
    assert abs(bar["line/aligned"]) < 1e-4 and abs(bar["curve/aligned"]) < 1e-4, bar
    assert bar["curve/raw"] <= bar["line/raw"]
    assert res.aligned is not None and set(res.permutations) == {u.name for u in symmetry_spec(model).units}
    # the line is the one interpolate() reports: connect reuses it
    ref = interpolate(model, moved, loader, _loss, num_points=11)
    np.testing.assert_allclose(res.raw.line.losses, ref.losses)
    fig = slt.plots.plot_connection(res, path=tmp_path / "connect.png")
    assert (tmp_path / "connect.png").stat().st_size > 0 and len(fig.axes[0].lines) == 4


@pytest.mark.parametrize("curve", ["bezier", "polychain"])
def test_curve_barrier_never_above_line(curve):
    x, y, loader = _data()
    a, b = _trained(0, x, y), _trained(1, x, y)
    res = connect(a, b, loader, _loss, curve=curve, num_points=11, steps=250, lr=2e-2, align=False)
    fit = res.raw
    assert res.aligned is None and set(res.barriers) == {"line/raw", "curve/raw"}
    assert fit.line_barrier() > 0.02, fit.line.losses
    # the optimiser itself lowers the barrier (no fallback to the midpoint needed) ...
    assert not fit.kept_line and fit.barrier() < 0.5 * fit.line_barrier(), (fit.barrier(), fit.line_barrier())
    for d in ("linear", "mean"):
        assert fit.barrier(d) <= fit.line_barrier(d) + 1e-9
    # ... the end points are untouched and the curve ends there
    np.testing.assert_allclose(fit.path.losses[[0, -1]], fit.line.losses[[0, -1]], rtol=1e-5)
    assert len(fit.fit_losses) == 250 and np.isfinite(fit.fit_losses).all()


def test_fallback_keeps_the_line_when_the_fit_hurts():
    x, y, loader = _data()
    a, b = _trained(0, x, y), _trained(1, x, y)
    res = connect(a, b, loader, _loss, num_points=7, steps=5, lr=50.0, align=False)  # a wild step ruins the bend
    assert res.raw.kept_line
    np.testing.assert_array_equal(res.raw.path.losses, res.raw.line.losses)
    assert res.raw.barrier() == res.raw.line_barrier()


def test_bad_input():
    x, y, loader = _data()
    a = _trained(0, x, y, steps=1)
    other = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(ValueError, match="same architecture"):
        connect(a, other, loader, _loss, steps=1)
    wider = _trained(1, x, y, width=12, steps=1)
    with pytest.raises(ValueError, match="shapes differ"):
        connect(a, wider, loader, _loss, steps=1)
    with pytest.raises(ValueError, match="unknown curve"):
        connect(a, a, loader, _loss, curve="spline")
    with pytest.raises(ValueError, match="definition"):
        connect(a, a, loader, _loss, definition="max")
    with pytest.raises(TypeError, match="swapped"):
        connect(a, a, _loss, loader)
    assert slt.symmetry.connect is connect


def test_log_connection_offline(tmp_path, monkeypatch):
    from slt_tools.logging import WandbLogger, read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    x, y, loader = _data()
    a = _trained(0, x, y, steps=50)
    res = connect(a, _permuted(a, 1), loader, _loss, num_points=5, steps=10)
    logger = WandbLogger(save_dir=tmp_path / "figs")
    slt.symmetry.log_connection(res, logger)
    logger.finish()
    assert (tmp_path / "figs" / "connect_bezier.png").exists()
    run = read_offline_run(next((tmp_path / "wandb").glob("offline-run-*")))
    ts = [r["connect/t"] for r in run["history"] if "connect/t" in r]
    assert ts == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert run["summary"]["connect/barrier/line/raw"] == pytest.approx(res.barriers["line/raw"])
