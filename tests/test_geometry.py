"""Hessian and eNTK tools against dense computations on small models where everything is exact."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slt_tools.geometry import (
    HessianConvergenceWarning,
    HessianOperator,
    empirical_ntk,
    hessian_eigenvalues,
    hessian_spectral_density,
    hessian_summary,
    hessian_trace,
    kernel_distance,
    kernel_target_alignment,
    kernel_velocity,
    lanczos,
)
from slt_tools.symmetry import permute, symmetry_spec


def loss_fn(m, b):
    return F.mse_loss(m(b[0]), b[1])


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(64, 3, dtype=torch.float64)
    y = torch.randn(64, 2, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def flat_loss(theta):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(np.prod(s))
            parts[n] = theta[i:i + k].reshape(s)
            i += k
        return F.mse_loss(torch.func.functional_call(model, parts, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    H = torch.autograd.functional.hessian(flat_loss, theta)
    return model, loader, H


def test_eigenvalues_match_dense(problem):
    model, loader, H = problem
    dense = np.linalg.eigvalsh(H.numpy())
    spec = hessian_eigenvalues(model, loader, loss_fn, k=5, num_iter=H.shape[0])
    np.testing.assert_allclose(spec.top, dense[::-1][:5], rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(spec.bottom, dense[:5], rtol=1e-6, atol=1e-10)
    assert spec.bottom[0] < 0 < spec.top[0]  # signed: a tanh network at a random point is not convex


def test_unconverged_bottom_eigenvalues_are_flagged_and_bounded(problem):
    """A short Lanczos run: each reported value is within its residual bound of a true eigenvalue (Parlett 4.5.1),
    and values whose bound is large are flagged with a warning; the adaptive default converges to the dense ones."""
    model, loader, H = problem
    dense = np.linalg.eigvalsh(H.numpy())
    with pytest.warns(HessianConvergenceWarning, match="not converged"):
        short = hessian_eigenvalues(model, loader, loss_fn, k=3, num_iter=6)
    assert not short.converged
    for vals, res in ((short.bottom, short.bottom_residual), (short.top, short.top_residual)):
        for v, r in zip(vals, res):
            assert np.min(np.abs(dense - v)) <= r * (1 + 1e-6) + 1e-12  # the residual bound holds
    assert np.any(short.bottom_residual > short.tol)
    spec = hessian_eigenvalues(model, loader, loss_fn, k=3, rtol=1e-8)  # default: doubles until converged
    assert spec.converged and spec.num_iter <= H.shape[0]
    np.testing.assert_allclose(spec.bottom, dense[:3], rtol=1e-5, atol=1e-8)


def test_hvp_matches_dense(problem):
    model, loader, H = problem
    op = HessianOperator(model, loader, loss_fn)
    v = torch.randn(op.dim, dtype=torch.float64)
    torch.testing.assert_close(op(v), H @ v, rtol=1e-9, atol=1e-12)


def test_slq_moments_are_exact(problem):
    model, loader, H = problem
    op = HessianOperator(model, loader, loss_fn)
    m = 6
    for seed in range(3):
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        a, b, _ = lanczos(op, v, m)
        from scipy.linalg import eigh_tridiagonal

        theta, vecs = eigh_tridiagonal(a, b)
        w = vecs[0] ** 2
        u = (v / v.norm()).numpy()
        Hn = H.numpy()
        for k in range(2 * m):
            exact = u @ np.linalg.matrix_power(Hn, k) @ u
            assert np.isclose((w * theta**k).sum(), exact, rtol=1e-7, atol=1e-9), k
    dens = hessian_spectral_density(model, loader, loss_fn, num_vectors=3, num_iter=10)
    assert np.isclose(np.trapezoid(dens.density, dens.grid), 1.0, atol=1e-3)
    np.testing.assert_allclose(dens.weights.sum(axis=1), 1.0, rtol=1e-8)


def test_trace_estimators_are_unbiased(problem):
    model, loader, H = problem
    truth = float(torch.trace(H))
    for method in ("hutchinson", "hutch++"):
        est = hessian_trace(model, loader, loss_fn, num_samples=60, method=method, seed=1)
        assert abs(est.trace - truth) < 4 * est.stderr + 1e-9, (method, est, truth)
        assert est.num_hvps <= 60
    summary = hessian_summary(model, loader, loss_fn, k=2, trace_samples=12)
    assert summary["hessian/top_0"] == pytest.approx(float(np.linalg.eigvalsh(H.numpy())[-1]), rel=1e-4)


def test_ntk_equals_explicit_jacobian_product_and_is_permutation_invariant():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    params = dict(model.named_parameters())
    J = torch.autograd.functional.jacobian(
        lambda *ps: torch.func.functional_call(model, dict(zip(params, ps)), (x,)), tuple(params.values()))
    J = torch.cat([j.reshape(10, 2, -1) for j in J], dim=-1)
    K = empirical_ntk(model, x, chunk_size=3)
    torch.testing.assert_close(K, torch.einsum("iop,jqp->ijoq", J, J))
    Kt = empirical_ntk(model, x, trace_outputs=True, chunk_size=4)
    torch.testing.assert_close(Kt, torch.einsum("iop,jop->ij", J, J))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for _, size, axes, block in symmetry_spec(model).permutation_groups():
        permute(sd, axes, torch.randperm(size), block)
    other = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    other.load_state_dict(sd)
    torch.testing.assert_close(empirical_ntk(other, x), K)
    assert kernel_distance(K, K) == pytest.approx(0.0, abs=1e-12)
    K2 = empirical_ntk(nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double(), x)
    d = kernel_distance(K, K2)
    assert 0 <= d <= 1 and d == pytest.approx(kernel_distance(K2, K))
    v = kernel_velocity([K, K2, K2], [10, 100, 1000])
    assert v[1] == pytest.approx(0.0, abs=1e-12) and v[0] > 0
    a = kernel_target_alignment(Kt, x[:, 0])
    assert -1 <= a <= 1


def test_bad_input(problem):
    model, loader, _ = problem
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(model, loader, lambda m, b: (m(b[0]) - b[1]) ** 2)
    with pytest.raises(ValueError, match="k must be"):
        hessian_eigenvalues(model, loader, loss_fn, k=10_000)
    with pytest.raises(ValueError, match="probe"):
        empirical_ntk(model, torch.randn(4, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="different shapes"):
        kernel_distance(torch.eye(2), torch.eye(3))
