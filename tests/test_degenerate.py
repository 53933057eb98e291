"""Issue 16 items 6–7: underdamped Langevin at degenerate points, the degeneracy detector, steep-potential steps."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import slt_tools as slt
from slt_tools.sampling.degenerate import (
    degeneracy_check,
    estimate_llc_degenerate,
    stein_step_size,
    uld_settings,
)
from slt_tools.sampling.rules import RULES
from slt_tools.theory import dln_learning_coefficient, finite_nbeta_monomial_llc


class Monomial(nn.Module):
    def __init__(self, k: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("k", torch.tensor(k, dtype=torch.float32))
        self.w = nn.Parameter(torch.zeros(len(k)))

    def forward(self, x=None):
        return torch.prod(self.w ** (2 * self.k))


def _param_loss(m, b):
    return m()


def _dummy_loader(n: int = 1000) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=100)


def _tiny_dln():
    """DLN (1,1,1) at w* = 0 (both layers rank 0 = the product rank: the deepest stratum) on x with mean(x²) = 1 and
    y = 0: L_n(a, b) = a²b² exactly, the normal crossing k = (1, 1) (Aoyagi's λ = 1/2, m = 2)."""
    model = slt.models.DeepLinearNetwork((1, 1, 1))
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.zero_()
    x = torch.randn(1000, 1, generator=torch.Generator().manual_seed(0))
    x = x / x.pow(2).mean().sqrt()
    return model, DataLoader(TensorDataset(x, torch.zeros(1000, 1)), batch_size=1000)


def _mse(m, b):
    return torch.nn.functional.mse_loss(m(b[0]), b[1])


def test_uld_is_registered_and_samples_a_gaussian_exactly():
    """On a quadratic U = nβ·‖w‖²/2 + γ/2‖w‖² BAOAB's position marginal is exact (Leimkuhler & Matthews 2013), so
    λ̂ = nβ·E[‖w‖²/2] = d/2 · nβ/(nβ + γ) up to Monte Carlo error."""
    assert "uld" in RULES and RULES["uld"].defaults["friction"] == 1.0

    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(6))

        def forward(self):
            return 0.5 * self.w.pow(2).sum()

    nbeta, gamma = 100.0, 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = slt.estimate_llc(Quad(), _dummy_loader(), _param_loss, lr=0.15 ** 2 / (nbeta + gamma),
                               localization=gamma, nbeta=nbeta, num_chains=16, num_draws=3000,
                               num_burnin_steps=300, sampler="uld", sampler_kwargs={"friction": 10.0}, seed=0)
    truth = 3.0 * nbeta / (nbeta + gamma)
    assert res.llc_mean == pytest.approx(truth, rel=0.05)


def test_uld_gets_the_deepest_stratum_of_a_tiny_dln_right():
    """DLN (1,1,1) at the origin: ULD within 10 % of the exact finite-(nβ, γ) value by quadrature
    (``finite_nbeta_monomial_llc((1, 1), ...)``), which tends to Aoyagi's λ = 1/2 as nβ → ∞."""
    model, loader = _tiny_dln()
    assert dln_learning_coefficient((1, 1, 1), 0)[0] == 0.5
    nbeta, gamma = 100.0, 1.0
    target = finite_nbeta_monomial_llc((1, 1), nbeta, gamma)
    steep = stein_step_size(model, loader, _mse, localization=gamma, nbeta=nbeta, num_steps=200, lr0=1e-3)
    cfg = uld_settings(model, loader, _mse, localization=gamma, nbeta=nbeta, stiffness=steep["mean_curvature"],
                       burnin_time=3.0, draw_time=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = estimate_llc_degenerate(model, loader, _mse, num_chains=16, settings=cfg)
    assert res.llc_mean == pytest.approx(target, rel=0.10)


def test_degeneracy_check_flags_an_sgld_value_far_below_uld_and_passes_an_agreeing_one():
    model, loader = _tiny_dln()
    steep = stein_step_size(model, loader, _mse, localization=1.0, nbeta=100.0, num_steps=200, lr0=1e-3)
    kw = dict(localization=1.0, nbeta=100.0, stiffness=steep["mean_curvature"], draw_time=6.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low = degeneracy_check(model, loader, _mse, llc_sgld=0.1, llc_sgld_sem=0.005, **kw)
        same = degeneracy_check(model, loader, _mse, llc_sgld=low.llc_uld, llc_sgld_sem=low.llc_uld_sem, **kw)
    assert low.degenerate and low.gap > 0.5
    assert not same.degenerate and abs(same.gap) < 0.15


def test_stein_step_size_makes_sgld_right_on_a_quartic():
    """w⁴ at nβ = 1000/log 1000, γ = 1: the Stein rule (ε = 0.1/κ̄, κ̄ = E‖∇U‖²/d) picks ε ≈ 2e-3 (the mean
    curvature is 12·nβ·E[w²] ≈ 48), and SGLD there is within 10 % of the exact finite-nβ target; ε = 0.01 (what the
    calibration sometimes picked) reads ≈ 19 % high."""
    loader = _dummy_loader()
    nbeta = 1000 / math.log(1000)
    rule = stein_step_size(Monomial((2,)), loader, _param_loss, localization=1.0, seed=0, lr0=5e-3)
    assert 1.5e-3 < rule["lr"] < 3e-3
    assert rule["mean_curvature"] == pytest.approx(12 * nbeta * 0.0284, rel=0.25)
    steps = int(10 / rule["lr"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = slt.estimate_llc(Monomial((2,)), loader, _param_loss, lr=rule["lr"], localization=1.0, num_chains=32,
                               num_draws=steps, num_burnin_steps=steps // 5, seed=0)
    assert res.llc_mean == pytest.approx(finite_nbeta_monomial_llc((2,), nbeta, 1.0), rel=0.10)
