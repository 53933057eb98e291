"""A residual MLP: x ↦ W_in x, then blocks h ← h + W2·act(W1·h + b1) + b2, then W_out h."""
from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, d: int, hidden: int, act: str = "relu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.act = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "gelu": nn.GELU()}[act]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.act(self.fc1(h)))


class ResidualMLP(nn.Module):
    def __init__(self, d_in: int, d: int, hidden: int, d_out: int, num_blocks: int = 2, act: str = "relu") -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(ResidualBlock(d, hidden, act) for _ in range(num_blocks))
        self.out = nn.Linear(d, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)
