"""The batched chain engine: the only hot loop in the package.

All chains of a block advance together: one vmapped forward/backward per step for every chain, in-place updates of
the stacked parameters θ ∈ R^{C×D}, per-step losses written into a device buffer (no host synchronisation in the
loop except a divergence check every ``check_every`` steps). Chain c draws its Gaussian noise from its own generator
seeded by (seed, c) and all chains see the same seeded minibatch sequence, so a chain's trajectory is a function of
(seed, c) alone — independent of how chains are grouped into blocks or spread over processes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from slt_tools.sampling.functional import BatchedLossGrad
from slt_tools.sampling.samplers import Sampler


def chain_seed(seed: int, chain: int) -> int:
    """Independent 63-bit seed for chain ``chain`` (numpy SeedSequence spawn keys)."""
    return int(np.random.SeedSequence(int(seed), spawn_key=(int(chain),)).generate_state(2, np.uint32)
               .astype(np.uint64).dot([1, 2**32]) % (2**63 - 1))


def data_seed(seed: int) -> int:
    """Seed of the minibatch order shared by every chain of a run."""
    return int(np.random.SeedSequence(int(seed), spawn_key=(2**31,)).generate_state(1)[0])


@dataclass
class ChainOutput:
    """Raw output of a block of chains: minibatch losses at the draws and MALA acceptance sums."""

    loss_trace: torch.Tensor  # (C, num_draws)
    mala_sum: torch.Tensor  # (C,)
    mala_count: int
    steps_run: int


def run_chains(
    loss_grad: BatchedLossGrad,
    theta0: torch.Tensor,
    batches: Iterator[Any],
    make_sampler: Callable[[], Sampler],
    chain_ids: Sequence[int],
    seed: int,
    num_draws: int,
    num_burnin_steps: int = 0,
    num_steps_bw_draws: int = 1,
    mala_every: int = 20,
    check_every: int = 256,
    progress: bool = False,
) -> ChainOutput:
    """Run the chains ``chain_ids`` from w* = ``theta0`` (shape (D,)) and record the minibatch loss at each draw."""
    device, dtype = theta0.device, theta0.dtype
    C, D = len(chain_ids), theta0.numel()
    gens = [torch.Generator(device=device).manual_seed(chain_seed(seed, c)) for c in chain_ids]
    noise = torch.empty(C, D, device=device, dtype=dtype)

    def draw_noise() -> torch.Tensor:
        for row, gen in zip(noise, gens):
            torch.randn(D, generator=gen, device=device, dtype=dtype, out=row)
        return noise

    theta = theta0.expand(C, D).clone()
    sampler = make_sampler()
    sampler.init_state(theta, draw_noise())
    use_mala = mala_every > 0 and sampler.kind in ("sgld", "rmsprop_sgld")
    trace = torch.full((C, num_draws), float("nan"), device=device, dtype=dtype)
    mala_sum = torch.zeros(C, device=device, dtype=dtype)
    mala_count = 0
    total = num_burnin_steps + num_draws * num_steps_bw_draws
    bar = tqdm(total=total, desc="SGLD steps", leave=False, disable=not progress)
    t = 0
    for t in range(total):
        batch = next(batches)
        losses, grads = loss_grad(theta, batch)
        k, r = divmod(t - num_burnin_steps, num_steps_bw_draws)
        if t >= num_burnin_steps and r == 0:
            trace[:, k] = losses.detach()
        mala_now = use_mala and t % mala_every == mala_every - 1
        if mala_now:
            theta_prev = theta.clone()
        sampler.step(theta, theta0, grads, draw_noise())
        if mala_now:
            prop_loss, prop_grad = loss_grad(theta, batch)
            log_a = sampler.mala_log_accept(theta_prev, theta0, losses, grads, theta, prop_loss, prop_grad,
                                            sampler.current_preconditioner())
            mala_sum += torch.nan_to_num(log_a.clamp(max=0.0).exp(), nan=0.0)
            mala_count += 1
        if check_every and t % check_every == check_every - 1:
            bar.update(check_every)
            if not bool(torch.isfinite(losses).any()):  # every chain has blown up: stop wasting compute
                break
    bar.close()
    return ChainOutput(trace, mala_sum, mala_count, t + 1)
