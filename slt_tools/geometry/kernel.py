"""Kernel ridge regression with a network's empirical NTK, and the gap between the kernel and the network.

With J(x) = ∂f(x; w)/∂w at the checkpoint w (the eNTK of :mod:`slt_tools.geometry.ntk`), the eNTK predictor is

    f̂(x) = f₀(x) + K(x, X) (K(X, X) + λ I)⁻¹ (Y − f₀(X)),

the linearised network f₀(x) + J(x)(v − w) fitted by ridge regression (penalty λ‖v − w‖²), i.e. trained to
convergence; ``offset=False`` drops f₀ (plain kernel regression on Y, as usually done when comparing kernels).

* ``kernel="per_output"``: K(x, x') is the (O × O) block J(x) J(x')ᵀ, the system has N·O unknowns;
* ``kernel="traced"``: K(x, x') = Σ_o J_o(x)·J_o(x') (neural-tangents' ``trace_axes=(-1,)``), one N × N system
  solved for all O target columns.

Solvers: ``"cholesky"`` forms K(X, X) with :func:`empirical_ntk` and factors it (``scipy.linalg.cho_factor``);
``"cg"`` never forms a kernel: the kernel–vector product is K v = J (Jᵀ v), computed chunk by chunk from the
per-example Jacobians (cached in memory when they fit in ``max_cache_bytes``, recomputed per product otherwise), and
(K + λI)α = r is solved by conjugate gradients (``scipy.sparse.linalg.cg``, one column at a time). Test predictions
use K(x, X)α = J(x)(J(X)ᵀα) in both cases, so memory is O(N·O + P) on top of the Jacobian chunks. ``"auto"`` picks
Cholesky for N·O ≤ 4096.

Integer targets are class labels: they become one-hot regression targets (the squared-loss convention of kernel
regression; Vyas et al. 2022, "Limitations of the NTK for Understanding Generalization in Deep Learning") and the
accuracy is that of argmax f̂. The loss reported is the test mean squared error per output, mean_{x,o}(f̂ − y)².
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from slt_tools.geometry.ntk import empirical_ntk, output_jacobian

Data = tuple[torch.Tensor, torch.Tensor]


@dataclass
class KernelRegression:
    """Test metrics of eNTK kernel ridge regression (``accuracy`` None for regression targets)."""

    test_loss: float
    test_accuracy: float | None
    train_loss: float
    n_train: int
    kernel: str
    solver: str
    ridge: float
    cg_iterations: int | None = None


def _split(data: Any) -> Data:
    if isinstance(data, torch.utils.data.TensorDataset):
        data = data.tensors
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError("train/test must be (inputs, targets) tensors or a TensorDataset of two tensors")
    x, y = data
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"inputs and targets have {len(x)} and {len(y)} rows (need equal, non-zero)")
    return x, y


def _targets(y: torch.Tensor, out_dim: int) -> tuple[torch.Tensor, bool]:
    """(N, O) float64 targets; integer labels → one-hot."""
    if not y.is_floating_point():
        if y.ndim != 1 or int(y.max()) >= out_dim or int(y.min()) < 0:
            raise ValueError(f"integer targets must be labels in [0, {out_dim}) of shape (N,)")
        return torch.nn.functional.one_hot(y.long().cpu(), out_dim).double(), True
    y = y.reshape(len(y), -1).double().cpu()
    if y.shape[1] != out_dim:
        raise ValueError(f"targets have {y.shape[1]} columns, the model {out_dim} outputs")
    return y, False


class _Jacobians:
    """Per-example Jacobians J(x) (n, O, P) of a model on ``x``, by chunks; cached when small enough."""

    def __init__(self, model: nn.Module, x: torch.Tensor, chunk_size: int, max_cache_bytes: float) -> None:
        all_params = dict(model.named_parameters())
        self.params = {k: v.detach() for k, v in all_params.items()}
        self.frozen = {k: v.detach() for k, v in model.named_buffers()}
        self.model, self.chunks = model, list(torch.split(x, chunk_size))
        n_par = sum(v.numel() for v in self.params.values())
        with torch.no_grad():
            out = model(x[:1]).reshape(1, -1)
        self.out_dim = out.shape[1]
        self.cache = None
        if len(x) * self.out_dim * n_par * 8 <= max_cache_bytes:
            self.cache = [self._compute(c) for c in self.chunks]

    def _compute(self, c: torch.Tensor) -> torch.Tensor:
        return output_jacobian(self.model, self.params, self.frozen, c).double()

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.cache) if self.cache is not None else (self._compute(c) for c in self.chunks)

    def t_matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Jᵀ v for v of shape (n, O) → (P,)."""
        out, start = None, 0
        for j in self:
            part = torch.einsum("iop,io->p", j, v[start:start + len(j)].to(j.device))
            out, start = (part if out is None else out + part), start + len(j)
        return out

    def matvec(self, u: torch.Tensor) -> torch.Tensor:
        """J u for u of shape (P,) → (n, O), on the CPU."""
        return torch.cat([(j @ u.to(j.device)).cpu() for j in self])


def _kernel_matvec(jac: _Jacobians, kernel: str, n: int) -> Callable[[np.ndarray], np.ndarray]:
    o = jac.out_dim

    def mv(v: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.asarray(v, dtype=np.float64).reshape(-1))
        if kernel == "per_output":
            return jac.matvec(jac.t_matvec(v.reshape(n, o))).reshape(-1).numpy()
        return _traced_column(jac, jac, v).numpy()

    return mv


def _solve_cholesky(model: nn.Module, x: torch.Tensor, r: torch.Tensor, kernel: str, ridge: float,
                    chunk_size: int) -> torch.Tensor:
    import scipy.linalg

    n, o = r.shape
    K = empirical_ntk(model, x, trace_outputs=kernel == "traced", chunk_size=chunk_size).double().cpu()
    if kernel == "per_output":
        K = K.permute(0, 2, 1, 3).reshape(n * o, n * o)
    A = K.numpy() + ridge * np.eye(K.shape[0])
    rhs = r.numpy() if kernel == "traced" else r.reshape(-1, 1).numpy()
    alpha = scipy.linalg.cho_solve(scipy.linalg.cho_factor(A, lower=True), rhs)
    return torch.from_numpy(np.ascontiguousarray(alpha)).reshape(n, o) if kernel == "per_output" else \
        torch.from_numpy(alpha)


def _solve_cg(jac: _Jacobians, r: torch.Tensor, kernel: str, ridge: float, rtol: float, maxiter: int | None
              ) -> tuple[torch.Tensor, int]:
    from scipy.sparse.linalg import LinearOperator, cg

    n, o = r.shape
    mv = _kernel_matvec(jac, kernel, n)
    size = n * o if kernel == "per_output" else n
    op = LinearOperator((size, size), matvec=lambda v: mv(v) + ridge * np.asarray(v).reshape(-1), dtype=np.float64)
    iters = [0]

    def count(_: np.ndarray) -> None:
        iters[0] += 1

    cols = [r.reshape(-1).numpy()] if kernel == "per_output" else [r[:, k].numpy() for k in range(o)]
    sols = []
    for col in cols:
        sol, info = cg(op, col, rtol=rtol, atol=0.0, maxiter=maxiter, callback=count)
        if info > 0:
            raise RuntimeError(f"conjugate gradients did not reach rtol={rtol} in {info} iterations: raise ridge or "
                               "maxiter")
        sols.append(sol)
    alpha = np.stack(sols, axis=1)
    return torch.from_numpy(alpha.reshape(n, o) if kernel == "per_output" else alpha), iters[0]


def _traced_column(jac_train: _Jacobians, jac_test: _Jacobians, a: torch.Tensor) -> torch.Tensor:
    """Σ_o J_o(x)·(Σ_x' J_o(x') a(x')) at the points of ``jac_test``: the traced kernel times one coefficient vector."""
    o = jac_train.out_dim
    total = None
    for k in range(o):
        e = torch.zeros(len(a), o, dtype=torch.float64)
        e[:, k] = a
        part = jac_test.matvec(jac_train.t_matvec(e))[:, k]
        total = part if total is None else total + part
    return total


def _predict(jac_train: _Jacobians, jac_test: _Jacobians, alpha: torch.Tensor, kernel: str) -> torch.Tensor:
    """K(X_test, X) α = J_test (J_trainᵀ α), never forming the cross kernel."""
    if kernel == "per_output":
        return jac_test.matvec(jac_train.t_matvec(alpha))
    return torch.stack([_traced_column(jac_train, jac_test, alpha[:, k]) for k in range(alpha.shape[1])], dim=1)


def _metrics(pred: torch.Tensor, y: torch.Tensor, labels: torch.Tensor | None) -> tuple[float, float | None]:
    loss = float(((pred - y) ** 2).mean())
    acc = None if labels is None else float((pred.argmax(1) == labels.to(pred.device)).double().mean())
    return loss, acc


def kernel_regression(model: nn.Module, train: Any, test: Any, ridge: float = 1e-3, kernel: str = "traced",
                      solver: str = "auto", offset: bool = True, chunk_size: int = 256, rtol: float = 1e-8,
                      maxiter: int | None = None, max_cache_bytes: float = 1e9) -> KernelRegression:
    """eNTK kernel ridge regression at ``model``'s current weights (see the module docstring for the predictor,
    kernels, solvers and metrics). ``train``/``test``: (inputs, targets) or TensorDatasets; ``ridge`` is λ in
    (K + λI)α = Y − f₀(X) (not rescaled by N)."""
    if kernel not in ("traced", "per_output"):
        raise ValueError(f"kernel must be 'traced' or 'per_output', got {kernel!r}")
    if solver not in ("auto", "cholesky", "cg"):
        raise ValueError(f"solver must be 'auto', 'cholesky' or 'cg', got {solver!r}")
    if ridge < 0:
        raise ValueError("ridge must be non-negative")
    was_training = model.training
    model.eval()
    try:
        return _kernel_regression(model, _split(train), _split(test), ridge, kernel, solver, offset, chunk_size, rtol,
                                  maxiter, max_cache_bytes)
    finally:
        model.train(was_training)


def _kernel_regression(model: nn.Module, train: Data, test: Data, ridge: float, kernel: str, solver: str,
                       offset: bool, chunk_size: int, rtol: float, maxiter: int | None, max_cache_bytes: float
                       ) -> KernelRegression:
    (xtr, ytr), (xte, yte) = train, test
    jac_tr = _Jacobians(model, xtr, chunk_size, max_cache_bytes)
    o = jac_tr.out_dim
    ytr_, is_cls = _targets(ytr, o)
    yte_, _ = _targets(yte, o)
    with torch.no_grad():
        f_tr = model(xtr).reshape(len(xtr), -1).double() if offset else torch.zeros_like(ytr_)
        f_te = model(xte).reshape(len(xte), -1).double() if offset else torch.zeros_like(yte_)
    r = (ytr_ - f_tr.cpu()).cpu()
    if solver == "auto":
        solver = "cholesky" if len(xtr) * (o if kernel == "per_output" else 1) <= 4096 else "cg"
    iters = None
    if solver == "cholesky":
        alpha = _solve_cholesky(model, xtr, r, kernel, ridge, chunk_size)
    else:
        alpha, iters = _solve_cg(jac_tr, r, kernel, ridge, rtol, maxiter)
    jac_te = _Jacobians(model, xte, chunk_size, max_cache_bytes)
    pred_te = f_te.cpu() + _predict(jac_tr, jac_te, alpha, kernel).cpu()
    pred_tr = f_tr.cpu() + _predict(jac_tr, jac_tr, alpha, kernel).cpu()
    test_loss, test_acc = _metrics(pred_te, yte_, yte if is_cls else None)
    train_loss, _ = _metrics(pred_tr, ytr_, None)
    return KernelRegression(test_loss, test_acc, train_loss, len(xtr), kernel, solver, float(ridge), iters)


@dataclass
class KernelGap:
    """eNTK regression from each checkpoint vs the network at that checkpoint and the final network.

    ``gap[i] = kernel_loss[i] − network_loss[-1]``: how much worse (> 0) the kernel frozen at checkpoint i
    generalises than the trained network (the last checkpoint) — Vyas et al.'s comparison.
    """

    steps: np.ndarray
    kernel_loss: np.ndarray
    network_loss: np.ndarray
    kernel_accuracy: np.ndarray | None
    network_accuracy: np.ndarray | None

    @property
    def gap(self) -> np.ndarray:
        return self.kernel_loss - self.network_loss[-1]


def kernel_gap(checkpoints: Iterable[Mapping[str, torch.Tensor]] | Iterable[nn.Module],
               model_factory: Callable[[], nn.Module], train: Any, test: Any, steps: Iterable[float] | None = None,
               **kwargs: Any) -> KernelGap:
    """Over training: :func:`kernel_regression` with the eNTK of each checkpoint (state dicts, loaded into
    ``model_factory()``, or models) against the network's own test loss/accuracy (same metric, module docstring).
    ``kwargs`` go to :func:`kernel_regression`."""
    ckpts = list(checkpoints)
    if not ckpts:
        raise ValueError("need at least one checkpoint")
    xte, yte = _split(test)
    rows = []
    for ck in ckpts:
        net = ck if isinstance(ck, nn.Module) else model_factory()
        if not isinstance(ck, nn.Module):
            net.load_state_dict(ck)
        net.eval()
        kr = kernel_regression(net, train, (xte, yte), **kwargs)
        with torch.no_grad():
            pred = net(xte).reshape(len(xte), -1).double().cpu()
        y_, is_cls = _targets(yte, pred.shape[1])
        rows.append((kr.test_loss, kr.test_accuracy, *_metrics(pred, y_, yte if is_cls else None)))
    s = np.arange(len(ckpts), dtype=float) if steps is None else np.asarray(list(steps), dtype=float)
    if len(s) != len(ckpts):
        raise ValueError(f"{len(s)} steps for {len(ckpts)} checkpoints")
    cls = rows[0][1] is not None
    col = lambda i: np.array([r[i] for r in rows], dtype=float)  # noqa: E731
    return KernelGap(s, col(0), col(2), col(1) if cls else None, col(3) if cls else None)
