"""Deep linear networks f(x) = W_L ⋯ W_1 x (no biases), the model class with a closed-form learning coefficient
(Aoyagi 2024, see :func:`slt_tools.theory.dln_learning_coefficient`)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class DeepLinearNetwork(nn.Module):
    """Bias-free linear layers with widths ``(H_0, …, H_L)``; parameters are named ``layers.{i}.weight``
    with shape ``(H_{i+1}, H_i)``."""

    def __init__(self, widths: Sequence[int], init_scale: float | None = None) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"DeepLinearNetwork needs at least two positive widths, got {widths}")
        self.widths = tuple(widths)
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:]))
        if init_scale is not None:
            with torch.no_grad():
                for layer in self.layers:
                    layer.weight.normal_(0.0, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def product(self) -> torch.Tensor:
        """End-to-end matrix W_L ⋯ W_1 of shape (H_L, H_0)."""
        out = self.layers[0].weight
        for layer in self.layers[1:]:
            out = layer.weight @ out
        return out
