"""Shared builders for tests: models at known critical points with noise-free data."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slt_tools.models import DeepLinearNetwork


def mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def low_rank(shape, rank, gen):
    a = torch.randn(shape[0], rank, generator=gen)
    b = torch.randn(rank, shape[1], generator=gen)
    return a @ b / rank**0.5


def dln_at(widths, rank, cut_layers, seed=0):
    """DLN whose layers in ``cut_layers`` have rank ``rank`` and the others full rank (noise-free teacher = itself)."""
    gen = torch.Generator().manual_seed(seed)
    model = DeepLinearNetwork(widths)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            shape = layer.weight.shape
            if i in cut_layers:
                w = low_rank(shape, rank, gen)
            else:  # well-conditioned full-rank layer (all singular values 1)
                q, _ = torch.linalg.qr(torch.randn(max(shape), max(shape), generator=gen, dtype=torch.float64))
                w = q[: shape[0], : shape[1]].float()
            layer.weight.copy_(w)
    return model


def teacher_loader(model, n, batch_size, in_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=gen)
    with torch.no_grad():
        y = model(x)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


def jacobian_rank_half(model: nn.Module) -> float:
    """rank(J)/2 with J the Jacobian of the end-to-end matrix with respect to all weights (Morse–Bott LLC)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().double() for n, p in model.named_parameters()}

    def product(*ws):
        out = ws[0]
        for w in ws[1:]:
            out = w @ out
        return out.reshape(-1)

    jac = torch.autograd.functional.jacobian(product, tuple(params[n] for n in names))
    J = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)
    return torch.linalg.matrix_rank(J, rtol=1e-5).item() / 2


class Monomial(nn.Module):
    """K(w) = Π_j w_j^{2k_j} as a "model" whose forward returns the loss itself (w* = 0)."""

    def __init__(self, k):
        super().__init__()
        self.k = torch.tensor(k, dtype=torch.float32)
        self.w = nn.Parameter(torch.zeros(len(k)))

    def forward(self):
        return torch.prod(self.w ** (2 * self.k))


def dummy_loader(n, batch_size=100):
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch_size)
