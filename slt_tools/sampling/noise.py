"""Per-chain Gaussian noise for SGMCMC steps: uniforms from each chain's own generator, made N(0, 1) by Box–Muller.

Box & Muller (1958): for independent u₁, u₂ ~ U[0, 1), r = √(−2 ln(1 − u₁)) and φ = 2πu₂ give two independent
standard normals r·cos φ and r·sin φ. A step's D normals use 2K uniforms, K = ⌈D/2⌉: uniform j sets the radius of
pair j and uniform K + j its angle; the cosines fill coordinates 0…K−1, the sines the rest.

Chain c draws its uniforms from its own generator seeded by (seed, c): numpy's PCG64DXSM on the CPU (≈ 1–2 ns per
number, where torch's CPU ``randn`` takes 4–5), torch's generator of the device elsewhere. Turning uniforms into
normals is pure tensor arithmetic, so a compiled sampler step does it inside its fused graph (the normals never go
through memory), while an eager loop converts a whole block of steps at once; the two give the same numbers up to
float rounding. Float32 uniforms lie on a 2⁻²⁴ grid, which caps |z| at √(48 ln 2) ≈ 5.77 (the normal's mass beyond
is 8·10⁻⁹); float64 chains get float64 uniforms.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def chain_seed(seed: int, chain: int) -> int:
    """Independent 63-bit seed for chain ``chain`` (numpy SeedSequence spawn keys)."""
    return int(np.random.SeedSequence(int(seed), spawn_key=(int(chain),)).generate_state(2, np.uint32)
               .astype(np.uint64).dot([1, 2**32]) % (2**63 - 1))


def restriction_chain_seed(seed: int, restriction: str, chain: int) -> int:
    """Independent 63-bit seed for chain ``chain`` of the restriction named ``restriction`` in a refined run: a
    SeedSequence spawn key (2³¹ + 1, 32-bit digest of the name, chain), disjoint from :func:`chain_seed`'s keys and
    the data order's (2³¹,). A restriction's chains are a function of (seed, name, chain) alone, whichever other
    restrictions are sampled beside it."""
    digest = int.from_bytes(hashlib.sha256(restriction.encode()).digest()[:4], "little")
    return int(np.random.SeedSequence(int(seed), spawn_key=(2**31 + 1, digest, int(chain))).generate_state(2, np.uint32)
               .astype(np.uint64).dot([1, 2**32]) % (2**63 - 1))


def gaussian_from_uniforms(u: torch.Tensor, dim: int) -> torch.Tensor:
    """Box–Muller: (…, 2⌈dim/2⌉) uniforms on [0, 1) ↦ (…, dim) independent N(0, 1) (layout in the module docstring)."""
    k = u.shape[-1] // 2
    radius = torch.sqrt(-2.0 * torch.log(1.0 - u[..., :k]))
    angle = (2.0 * math.pi) * u[..., k:]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)[..., :dim]


_THREADS: dict[int, ThreadPoolExecutor] = {}


def _fill_threads() -> ThreadPoolExecutor:
    """Two worker threads of this process (keyed by pid: a forked child must not inherit its parent's dead pool)."""
    pid = os.getpid()
    if pid not in _THREADS:
        _THREADS.clear()
        _THREADS[pid] = ThreadPoolExecutor(2, thread_name_prefix="slt-noise")
    return _THREADS[pid]


class NoisePool:
    """Per-chain N(0, I) noise, drawn ``block`` steps at a time from each chain's own generator.

    One generator call per chain and block instead of per step removes most of the per-step overhead. The block
    length depends only on D (≤ 2^19 numbers per chain), so chain c's noise sequence is a function of (seed, c, D)
    alone — not of how many chains run beside it. ``seeds`` replaces the per-chain seeds (seed, c) by given ones (a
    refined run seeds its (restriction, chain) pairs: :func:`restriction_chain_seed`). ``__call__`` gives a step's
    normals; ``indexed`` gives the uniforms they are made from, for a compiled step to transform inside its graph.
    """

    #: fills of at least this many numbers run on two threads (numpy's generators release the GIL)
    THREADED_FILL = 2**20

    def __init__(self, chain_ids: Sequence[int], seed: int, dim: int, device: torch.device, dtype: torch.dtype,
                 max_block_numel: int = 2**19, max_block: int = 64, seeds: Sequence[int] | None = None) -> None:
        device = torch.device(device)
        self.dim = dim
        self.dtype = dtype
        self.block = max(1, min(max_block, max_block_numel // max(dim, 1)))
        width = 2 * ((dim + 1) // 2)
        udtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.uniforms = torch.empty(len(chain_ids), self.block, width, device=device, dtype=udtype)
        if seeds is None:
            seeds = [chain_seed(seed, c) for c in chain_ids]
        elif len(seeds) != len(chain_ids):
            raise ValueError(f"{len(seeds)} noise seeds for {len(chain_ids)} chains")
        on_cpu = device.type == "cpu"
        self._rngs = [np.random.Generator(np.random.PCG64DXSM(s)) for s in seeds] if on_cpu else []
        self._rows = [row.numpy().reshape(-1) for row in self.uniforms] if on_cpu else []  # views of the pool
        self._gens = [] if on_cpu else [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self._normals: torch.Tensor | None = None
        self.i = self.block
        self._index = [torch.tensor(i, device=device) for i in range(self.block)]  # 0-d, each its own storage

    def _fill(self) -> None:
        def one(c: int) -> None:
            self._rngs[c].random(dtype=self._rows[c].dtype, out=self._rows[c])

        if len(self._rngs) > 1 and self.uniforms.numel() >= self.THREADED_FILL:
            list(_fill_threads().map(one, range(len(self._rngs))))
        else:
            for c in range(len(self._rngs)):
                one(c)
        for row, gen in zip(self.uniforms, self._gens):
            torch.rand(row.shape, generator=gen, device=row.device, dtype=row.dtype, out=row)
        self._normals = None

    def _advance(self) -> None:
        if self.i == self.block:
            self._fill()
            self.i = 0
        self.i += 1

    def __call__(self) -> torch.Tensor:
        """Noise for the next step of every chain, shape (C, D) (a view into the pool: use before the next call)."""
        self._advance()
        if self._normals is None:  # the whole block at once: a few large kernels instead of a few small ones per step
            self._normals = gaussian_from_uniforms(self.uniforms, self.dim).to(self.dtype)
        return self._normals[:, self.i - 1]

    def indexed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next step's uniforms as (pool (C, block, 2⌈D/2⌉), 0-d index); ``pick_noise`` makes them the normals
        ``__call__`` would return. A compiled step takes this pair, so its inputs keep one storage layout and it never
        recompiles."""
        self._advance()
        return self.uniforms, self._index[self.i - 1]


def pick_noise(noise: torch.Tensor | tuple[torch.Tensor, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A step's (C, D) normals, of ``like``'s dtype, from a tensor or from a :meth:`NoisePool.indexed` pair."""
    if isinstance(noise, tuple):
        pool, index = noise
        uniforms = pool.index_select(1, index.reshape(1)).squeeze(1)
        return gaussian_from_uniforms(uniforms, like.shape[-1]).to(like.dtype)
    return noise
