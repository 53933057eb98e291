"""Self-calibrating LLC estimation: no hand-set ε, γ; clear failures; the choice is recorded."""
import warnings

import pytest
import torch
from helpers import dln_at, dummy_loader, mse, teacher_loader
from torch import nn

import slt_tools as slt
from slt_tools.sampling.calibration import CalibrationError, calibrate_llc


def _auto(model, loader, loss=mse, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slt.estimate_llc(model, loader, loss, num_chains=4, num_draws=500, seed=0, **kw)


def test_regular_model_calibrates_to_half_the_dimension():
    torch.manual_seed(0)
    model = nn.Linear(5, 4, bias=False)
    res = _auto(model, teacher_loader(model, 20000, 200, 5))
    calib = res.diagnostics["calibration"]
    assert abs(res.llc_mean - 10.0) < 0.1 * 10.0, res
    assert res.hyperparameters["calibrated"] and res.diagnostics["converged"]
    assert res.hyperparameters["lr"] == calib["lr"] and res.hyperparameters["localization"] == calib["localization"]
    assert any(c["verdict"].startswith("rejected") for c in calib["candidates"])  # it looked, and said why
    assert "largest step size" in calib["reason"] or "smaller step" in calib["reason"]


def test_dln_calibrates_within_tolerance():
    model = dln_at((9, 4, 6), 1, (1,))
    res = _auto(model, teacher_loader(model, 50000, 500, 9))
    assert abs(res.llc_mean - 14.5) < 0.1 * 14.5, res
    chosen = res.diagnostics["calibration"]
    final = res.hyperparameters["num_draws"] + res.hyperparameters["num_burnin_steps"]
    # calibration costs at most one final estimate, in sequential SGLD steps of at most as many chains
    assert chosen["sgld_steps"] <= final
    probe = res.diagnostics["overdispersed_probe"]  # chains from away from w* reach the same answer
    assert probe["agrees"] and res.diagnostics["converged"]
    assert abs(probe["llc_mean"] - 14.5) < 0.15 * 14.5


def test_user_fixed_values_are_kept():
    model = dln_at((4, 3, 4), 1, (1,))
    calib = calibrate_llc(model, teacher_loader(model, 2000, 100, 4), mse, localization=10.0, num_chains=2,
                          num_draws=100)
    assert calib.localization == 10.0 and {c["localization"] for c in calib.candidates} == {10.0}


class Repeller(nn.Module):
    """Loss −1e9·‖w‖²: every step size runs away from w* (no local minimum to measure)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.full((3,), 1e-3))

    def forward(self):
        return -1e9 * (self.w ** 2).sum()


def test_all_candidates_failing_is_an_error_not_a_number():
    with pytest.raises(CalibrationError, match="no \\(lr, localization\\) setting passed"):
        _auto(Repeller(), dummy_loader(1000), loss=lambda m, b: m())


def test_degenerate_point_is_flagged_not_answered():
    """DLN (4,4,4,4) with every layer cut to rank 1: the local λ is at least Aoyagi's global 13/2, but the flat
    directions relax far slower than any affordable run, so chains from w* underestimate it. The overdispersed probe
    (chains started away from w*) must disagree, and the estimate must be reported as not converged, with a warning."""
    from slt_tools.models import DeepLinearNetwork

    gen = torch.Generator().manual_seed(0)
    model = DeepLinearNetwork((4, 4, 4, 4))
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.copy_(torch.randn(4, 1, generator=gen) @ torch.randn(1, 4, generator=gen))
    x = torch.randn(10_000, 4, generator=gen)
    with torch.no_grad():
        y = model(x)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=500, shuffle=True)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        res = slt.estimate_llc(model, loader, mse, num_chains=4, num_draws=300, seed=0)
    assert not res.diagnostics["converged"]
    probe = res.diagnostics["overdispersed_probe"]
    assert not probe["agrees"] and probe["llc_mean"] > res.llc_mean  # chains from outside stay above
    assert res.llc_mean < 6.5  # (the underestimate that must not pass as an answer)

