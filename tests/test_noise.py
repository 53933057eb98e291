"""The samplers' Gaussian noise: standard normal, independent across chains, coordinates and steps, and a function of
(seed, chain) alone."""
import numpy as np
import pytest
import torch
from scipy import stats

from slt_tools.sampling.noise import NoisePool, gaussian_from_uniforms, pick_noise


def draws(pool: NoisePool, steps: int) -> np.ndarray:
    return np.stack([pool().double().numpy().copy() for _ in range(steps)], axis=1)  # (C, steps, D)


def test_noise_is_independent_standard_normal():
    pool = NoisePool([0, 1, 2], seed=7, dim=20_001, device="cpu", dtype=torch.float32)
    z = draws(pool, 30)  # blocks of 26 steps: the draws span two fills
    assert pool.block == 26
    flat = z.reshape(-1)
    n = flat.size
    assert abs(flat.mean()) < 4 / np.sqrt(n)
    assert abs(flat.var() - 1) < 4 * np.sqrt(2 / n)
    assert stats.kstest(flat[:200_000], "norm").pvalue > 1e-3
    k = (20_001 + 1) // 2  # cosine half and sine half of one step are built from the same uniforms
    halves = [(z[:, :, :k - 1], z[:, :, k:]),  # same pair, cos vs sin
              (z[0], z[1]), (z[1], z[2]),  # chains
              (z[:, :-1], z[:, 1:]),  # consecutive steps
              (z[..., :-1], z[..., 1:])]  # neighbouring coordinates
    for a, b in halves:
        r = np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1]
        assert abs(r) < 4 / np.sqrt(a.size), r
    # r² = x² + y² of one Box–Muller pair is χ²(2), i.e. exponential with mean 2
    r2 = z[:, :, :k - 1] ** 2 + z[:, :, k:] ** 2
    assert stats.kstest(r2.reshape(-1)[:100_000] / 2, "expon").pvalue > 1e-3
    assert np.abs(flat).max() < 5.8  # float32 uniforms: |z| ≤ √(48 ln 2)


def test_noise_depends_only_on_seed_and_chain():
    """Chain 2's noise is the same whether it runs alone or beside others, filled on one thread or two."""
    both = draws(NoisePool([0, 1, 2], 3, 5000, "cpu", torch.float32), 120)
    alone = draws(NoisePool([2], 3, 5000, "cpu", torch.float32), 120)
    np.testing.assert_array_equal(both[2], alone[0])
    serial = NoisePool([0, 1, 2], 3, 5000, "cpu", torch.float32)
    serial.THREADED_FILL = 2**62
    np.testing.assert_array_equal(draws(serial, 120), both)
    other_seed = draws(NoisePool([2], 4, 5000, "cpu", torch.float32), 1)
    assert not np.allclose(other_seed[0, 0], alone[0, 0])


def test_indexed_uniforms_give_the_same_normals():
    """A compiled step turns the pool's uniforms into normals itself: the same numbers the eager path gets."""
    eager = NoisePool([0, 1], 1, 333, "cpu", torch.float32)
    lazy = NoisePool([0, 1], 1, 333, "cpu", torch.float32)
    like = torch.zeros(2, 333)
    for _ in range(2 * eager.block + 3):
        torch.testing.assert_close(pick_noise(lazy.indexed(), like), eager(), rtol=0, atol=1e-6)


def test_float64_chains_get_float64_uniforms():
    pool = NoisePool([0], 0, 10, "cpu", torch.float64)
    assert pool.uniforms.dtype == torch.float64 and pool().dtype == torch.float64


@pytest.mark.parametrize("dim", [1, 2, 7])
def test_box_muller_layout(dim):
    """Coordinate j < K is r_j·cos φ_j, coordinate K + j is r_j·sin φ_j (K = ⌈dim/2⌉)."""
    k = (dim + 1) // 2
    u = torch.rand(3, 2 * k, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z = gaussian_from_uniforms(u, dim)
    r, phi = torch.sqrt(-2 * torch.log1p(-u[:, :k])), 2 * torch.pi * u[:, k:]
    expected = torch.cat([r * torch.cos(phi), r * torch.sin(phi)], dim=1)[:, :dim]
    assert z.shape == (3, dim)
    torch.testing.assert_close(z, expected)
