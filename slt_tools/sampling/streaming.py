"""Streaming first and second moments of per-chain draw sequences, in float64, on the sampling device.

For each chain c the accumulator holds the number of draws n, the means x̄_c ∈ R^A (and ȳ_c ∈ R^B), the diagonal
sums of squares M_xx,c = Σ_t (x_t − x̄_c)² and, with a second stream y, the cross sums M_xy,c = Σ_t (x_t − x̄_c)
(y_t − ȳ_c)ᵀ ∈ R^{A×B}. Draws arrive in blocks; a block with its own mean and centred sums is merged by the
pairwise update of Chan, Golub & LeVeque (1979) — for two parts a, b with n = n_a + n_b, δ = x̄_b − x̄_a:

    x̄ = x̄_a + δ_x·n_b/n,    M_xy = M_xy,a + M_xy,b + δ_x δ_yᵀ·n_a n_b / n,

which is exact (a single block is Welford's one-pass update for T draws at once) and numerically stable. The same
merge pools chains: :meth:`CrossMoments.pooled` folds the C per-chain states into the moments of all draws together.
Memory is O(C·A·B), independent of the number of draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Moments:
    """Merged moments of some draws: count, means, diagonal and cross centred sums (per chain: leading C axis)."""

    n: int
    mean_x: torch.Tensor
    mean_y: torch.Tensor | None
    m_xx: torch.Tensor
    m_yy: torch.Tensor | None
    m_xy: torch.Tensor | None

    def cov_xy(self, ddof: int = 1) -> torch.Tensor:
        """Sample cross-covariance M_xy / (n − ddof)."""
        assert self.m_xy is not None
        return self.m_xy / max(self.n - ddof, 1)

    def var_x(self, ddof: int = 1) -> torch.Tensor:
        return self.m_xx / max(self.n - ddof, 1)

    def var_y(self, ddof: int = 1) -> torch.Tensor:
        assert self.m_yy is not None
        return self.m_yy / max(self.n - ddof, 1)


def block_moments(x: torch.Tensor, y: torch.Tensor | None) -> Moments:
    """Moments of one block: x (C, T, A), y (C, T, B) → per-chain means and centred sums (float64)."""
    x = x.double()
    mx = x.mean(dim=1)
    dx = x - mx[:, None]
    if y is None:
        return Moments(x.shape[1], mx, None, (dx * dx).sum(dim=1), None, None)
    y = y.double()
    my = y.mean(dim=1)
    dy = y - my[:, None]
    return Moments(x.shape[1], mx, my, (dx * dx).sum(dim=1), (dy * dy).sum(dim=1), torch.bmm(dx.transpose(1, 2), dy))


def merge(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s pairwise merge of two disjoint sets of draws of the same chains."""
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    fa, fb = a.n / n, b.n / n
    dx = b.mean_x - a.mean_x
    mean_x = a.mean_x + dx * fb
    m_xx = a.m_xx + b.m_xx + dx * dx * (a.n * fb)
    if a.mean_y is None or b.mean_y is None:
        return Moments(n, mean_x, None, m_xx, None, None)
    dy = b.mean_y - a.mean_y
    assert a.m_yy is not None and b.m_yy is not None and a.m_xy is not None and b.m_xy is not None
    return Moments(n, mean_x, a.mean_y * fa + b.mean_y * fb, m_xx, a.m_yy + b.m_yy + dy * dy * (a.n * fb),
                   a.m_xy + b.m_xy + dx[..., :, None] * dy[..., None, :] * (a.n * fb))


def pool_chains(m: Moments) -> Moments:
    """The moments of all chains' draws together (one leading axis of size 1), by merging chain after chain."""
    def chain(c: int) -> Moments:
        pick = (lambda t: None if t is None else t[c:c + 1])  # noqa: E731 - a one-line selector
        return Moments(m.n, m.mean_x[c:c + 1], pick(m.mean_y), m.m_xx[c:c + 1], pick(m.m_yy), pick(m.m_xy))

    out = chain(0)
    for c in range(1, m.mean_x.shape[0]):
        out = merge(out, chain(c))
    return out


class CrossMoments:
    """Streaming per-chain moments of x ∈ R^A (and cross-moments with y ∈ R^B), fed one draw at a time.

    Draws are buffered on the device and merged every ``block`` draws (one batched matrix product per block, no host
    synchronisation). Memory: the buffer (C·block·(A + B)) and the state (C·A·B for the cross sums)."""

    def __init__(self, block: int = 32, keep_draws: bool = False) -> None:
        self.block = int(block)
        self.keep_draws = keep_draws
        self.state: Moments | None = None
        self._xs: list[torch.Tensor] = []
        self._ys: list[torch.Tensor] = []
        self.draws_x: list[torch.Tensor] = []
        self.draws_y: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """One draw: x (C, A), y (C, B) or None."""
        self._xs.append(x.detach())
        if y is not None:
            self._ys.append(y.detach())
        if len(self._xs) >= self.block:
            self.flush()

    def flush(self) -> None:
        if not self._xs:
            return
        x = torch.stack(self._xs, dim=1)
        y = torch.stack(self._ys, dim=1) if self._ys else None
        if self.keep_draws:
            self.draws_x.append(x.double().cpu())
            if y is not None:
                self.draws_y.append(y.double().cpu())
        part = block_moments(x, y)
        self.state = part if self.state is None else merge(self.state, part)
        self._xs.clear()
        self._ys.clear()

    def result(self) -> Moments:
        self.flush()
        if self.state is None:
            raise ValueError("no draws were recorded")
        return self.state
