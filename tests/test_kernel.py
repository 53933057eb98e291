"""eNTK kernel ridge regression: the linear-model closed form, CG vs Cholesky, classification, kernel_gap."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slt_tools as slt
from slt_tools.geometry import kernel_gap, kernel_regression

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear_data(n=60, m=40, d=5, o=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, o, generator=g)
    xtr, xte = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    ytr = xtr @ w + 0.3 * torch.randn(n, o, generator=g)
    yte = xte @ w + 0.3 * torch.randn(m, o, generator=g)
    return (xtr.double(), ytr.double()), (xte.double(), yte.double())


def _ridge_primal(model, train, test, lam):
    """f₀ + ridge regression on features [x, 1] of the residual, in the primal (weights) form."""
    (xtr, ytr), (xte, yte) = train, test
    phi = lambda x: torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1).numpy()  # noqa: E731
    with torch.no_grad():
        r = (ytr - model(xtr)).numpy()
        f_te = model(xte).numpy()
    P = phi(xtr)
    beta = np.linalg.solve(P.T @ P + lam * np.eye(P.shape[1]), P.T @ r)
    return float(((f_te + phi(xte) @ beta - yte.numpy()) ** 2).mean())


@pytest.mark.parametrize("kernel", ["per_output", "traced"])
def test_linear_model_is_ridge_regression(kernel):
    train, test = _linear_data()
    torch.manual_seed(0)
    model = nn.Linear(5, 2).double()
    lam = 0.7
    res = kernel_regression(model, train, test, ridge=lam, kernel=kernel, solver="cholesky")
    # per-output eNTK of a linear map: δ_oo'(x·x' + 1); traced: O (x·x' + 1) → ridge with λ/O
    eff = lam if kernel == "per_output" else lam / 2
    assert res.test_loss == pytest.approx(_ridge_primal(model, train, test, eff), rel=1e-8)
    assert res.test_accuracy is None and res.solver == "cholesky" and res.n_train == 60
    model.train()
    kernel_regression(model, train, test, ridge=lam, kernel=kernel)
    assert model.training  # the caller's mode is restored


def test_cg_matches_cholesky():
    g = torch.Generator().manual_seed(1)
    x, xte = torch.randn(80, 3, generator=g), torch.randn(30, 3, generator=g)
    y, yte = torch.sin(x.sum(1, keepdim=True)), torch.sin(xte.sum(1, keepdim=True))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    y2, yte2 = torch.cat([y, -y], 1).double(), torch.cat([yte, -yte], 1).double()
    for kernel in ("traced", "per_output"):
        kw = {"ridge": 1e-2, "kernel": kernel, "chunk_size": 32}
        a = kernel_regression(net, (x.double(), y2), (xte.double(), yte2), solver="cholesky", **kw)
        b = kernel_regression(net, (x.double(), y2), (xte.double(), yte2), solver="cg", rtol=1e-10, **kw)
        c = kernel_regression(net, (x.double(), y2), (xte.double(), yte2), solver="cg", rtol=1e-10,
                              max_cache_bytes=0, **kw)  # Jacobians recomputed per product
        assert b.cg_iterations and b.cg_iterations > 1
        assert b.test_loss == pytest.approx(a.test_loss, rel=1e-6), (kernel, a, b)
        assert c.test_loss == pytest.approx(a.test_loss, rel=1e-6)
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-5, abs=1e-9)


def test_classification_and_kernel_gap(tmp_path):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 2, generator=g)
    labels = (x[:, 0] * x[:, 1] > 0).long()
    train, test = (x[:120], labels[:120]), (x[120:], labels[120:])
    factory = lambda: nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))  # noqa: E731
    torch.manual_seed(0)
    net = factory()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    ckpts = [{k: v.clone() for k, v in net.state_dict().items()}]
    for _ in range(300):
        opt.zero_grad()
        F.mse_loss(net(train[0]), F.one_hot(train[1], 2).float()).backward()
        opt.step()
    ckpts.append({k: v.clone() for k, v in net.state_dict().items()})
    res = kernel_regression(net, train, test, ridge=1e-2)
    assert 0.5 < res.test_accuracy <= 1.0 and res.test_loss < 0.5
    gap = kernel_gap(ckpts, factory, train, test, steps=[0, 300], ridge=1e-2)
    assert gap.kernel_loss.shape == (2,) and gap.network_accuracy[-1] > 0.8
    assert gap.network_loss[0] > gap.network_loss[-1]
    np.testing.assert_allclose(gap.gap, gap.kernel_loss - gap.network_loss[-1])
    assert gap.kernel_loss[-1] == pytest.approx(res.test_loss, rel=1e-5)
    assert slt.geometry.kernel_regression is kernel_regression
    slt.plots.plot_kernel_gap(gap, path=tmp_path / "gap.png")
    assert (tmp_path / "gap.png").stat().st_size > 0


def test_bad_input():
    train, test = _linear_data(n=10, m=5)
    model = nn.Linear(5, 2).double()
    with pytest.raises(ValueError, match="kernel must be"):
        kernel_regression(model, train, test, kernel="diag")
    with pytest.raises(ValueError, match="solver"):
        kernel_regression(model, train, test, solver="lu")
    with pytest.raises(ValueError, match="columns"):
        kernel_regression(model, (train[0], train[1][:, :1]), test)
    with pytest.raises(ValueError, match="rows"):
        kernel_regression(model, (train[0], train[1][:3]), test)
