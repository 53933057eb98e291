"""The batched chain engine: the only hot loop in the package.

All chains of a block advance together: one vmapped forward/backward per step for every chain, in-place updates of
the stacked parameters θ ∈ R^{C×D}, per-step losses written into a device buffer (no host synchronisation in the
loop except a divergence check every ``check_every`` steps). Chain c draws its Gaussian noise from its own generator
seeded by (seed, c) (:mod:`slt_tools.sampling.noise`) and all chains see the same seeded minibatch sequence, so a
chain's trajectory is a function of (seed, c) alone — independent of how chains are grouped into blocks or spread
over processes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from slt_tools.sampling.host_memory import retained_host_memory
from slt_tools.sampling.noise import NoisePool
from slt_tools.sampling.samplers import Sampler
from slt_tools.sampling.steps import BatchedLossGrad


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
    start_distance: torch.Tensor | None = None  # (C,) ‖w₀ − w*‖ of overdispersed starts
    final_theta: torch.Tensor | None = None  # (C, D) the chains' state after the last step (to continue them)
    drift_sq_sum: torch.Tensor | None = None  # (C,) Σ ‖∇U_B(w)‖² at the MALA points of the draw phase
    drift_count: int = 0


def overdispersed_start(
    loss_grad: BatchedLossGrad,
    theta0: torch.Tensor,
    batch: Any,
    sampler: Sampler,
    direction: torch.Tensor,
    max_halvings: int = 40,
) -> torch.Tensor:
    """Starting points w₀ = w* + s_c·u_c for chains c, u_c = ``direction[c]``, with s_c = 2^{-k_c} for the smallest
    k_c ≥ 0 at which the loss is finite and the first drift step contracts: ‖noise-free move‖ ≤ ½‖w₀ − w*‖.

    The localised posterior is narrower than its localising Gaussian N(w*, γ⁻¹I) in every direction (its density is
    that Gaussian times exp(−nβ(L_n(w) − L_n(w*))) ≤ 1 near a minimum), so u ~ N(0, γ⁻¹I) is an overdispersed start
    in the sense of Gelman & Rubin (1992); the contraction rule keeps an SGLD step from overshooting where the loss is
    steep far from w*. Such chains approach the posterior from outside while chains started at w* approach it from
    inside: if the two disagree at the end of a run, neither has reached it.
    """
    scale = torch.ones(direction.shape[0], 1, device=theta0.device, dtype=theta0.dtype)
    for _ in range(max_halvings):
        theta = theta0 + scale * direction
        losses, grads = loss_grad(theta, batch)
        move = sampler.first_move(theta, theta0, grads)
        ok = torch.isfinite(losses) & torch.isfinite(move) & (move <= 0.5 * (scale * direction).norm(dim=1))
        if bool(ok.all()):
            break
        scale[~ok] *= 0.5
    return theta0 + scale * direction


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
    init_spread: float = 0.0,
    fixed_shapes: bool = False,
    noise_seeds: Sequence[int] | None = None,
    on_draw: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    init_theta: torch.Tensor | None = None,
) -> ChainOutput:
    """Run the chains ``chain_ids`` from w* = ``theta0`` (shape (D,)) and record the minibatch loss at each draw.

    With ``init_spread`` > 0 the chains start from :func:`overdispersed_start` with directions
    u_c ~ N(0, (init_spread²/γ)·I) drawn from each chain's own generator (one batch of the stream is used for the
    contraction check). ``fixed_shapes`` promises that every batch has the same structure and shapes (a cached data
    set): the step path may then specialise to it (:meth:`BatchedLossGrad.session`: a compiled step is pinned after
    its first step). The loop does not know which path it drives.

    ``theta0`` may also be (C, D), one centre per chain: a refined run samples each (restriction, chain) pair in its
    restriction's own coordinates (:mod:`slt_tools.sampling.refined`), with the centres w*[idx_r] and the noise
    streams ``noise_seeds`` (default: (seed, c) for chain c).

    ``on_draw(θ, losses)``, if given, is called at every draw with the chains' (C, D) parameters of that draw and
    their (C,) minibatch losses (e.g. :class:`slt_tools.sampling.observables.ObservableHook`: observables on a probe
    set into device-side streaming accumulators). It must not change θ and should not synchronise with the host;
    without it the loop is unchanged. ``init_theta`` (C, D), if given, is where the chains start instead of w* (e.g.
    the ``final_theta`` of an earlier run, to continue its chains; ``init_spread`` is then ignored); the localization
    stays centred at ``theta0``."""
    device, dtype = theta0.device, theta0.dtype
    C, D = len(chain_ids), theta0.shape[-1]
    draw_noise = NoisePool(chain_ids, seed, D, device, dtype, seeds=noise_seeds)

    theta = theta0.expand(C, D).clone() if init_theta is None else init_theta.to(device, dtype).clone()
    sampler = make_sampler()
    start_distance = None
    if init_spread > 0 and init_theta is None:
        direction = draw_noise().clone().mul_(init_spread / sampler.localization ** 0.5)
        theta = overdispersed_start(loss_grad, theta0, next(batches), sampler, direction)
        start_distance = (theta - theta0).norm(dim=1)
    sampler.init_state(theta, draw_noise())
    use_mala = mala_every > 0 and sampler.rule.langevin
    trace = torch.full((C, num_draws), float("nan"), device=device, dtype=dtype)
    recorded = 0
    pending: list[torch.Tensor] = []  # draws' (C,) losses, copied into the trace in blocks (a copy per step: ≈ 6 µs)

    def flush() -> None:
        nonlocal recorded
        if pending:
            trace[:, recorded:recorded + len(pending)] = torch.stack(pending, dim=1)
            recorded += len(pending)
            pending.clear()

    mala_sum = torch.zeros(C, device=device, dtype=dtype)
    mala_count = 0
    drift_sq_sum = torch.zeros(C, device=device, dtype=dtype)  # Stein's E‖∇U‖² (= E ΔU) for the step-bias bound
    drift_count = 0
    total = num_burnin_steps + num_draws * num_steps_bw_draws
    bar = tqdm(total=total, desc="SGLD steps", leave=False, disable=not progress)
    hp = sampler.hyperparameters()
    t = 0
    # whatever the path specialises to ends with the loop, whatever happens; on the CPU freed memory is kept for reuse
    with loss_grad.session(fixed_shapes), retained_host_memory(device):
        for t in range(total):
            batch = next(batches)
            noise = loss_grad.draw(draw_noise)
            losses, grads, new_theta, new_state = loss_grad.step(theta, theta0, batch, noise, sampler.kind,
                                                                 sampler.state, hp)
            if t >= num_burnin_steps and (t - num_burnin_steps) % num_steps_bw_draws == 0:
                pending.append(losses)
                if on_draw is not None:
                    on_draw(theta, losses)
            if use_mala and t % mala_every == mala_every - 1:
                # loss and gradient at the proposal on the same batch (through the same graph; its update is dropped)
                prop_loss, prop_grad, _, _ = loss_grad.step(new_theta, theta0, batch, noise, sampler.kind,
                                                            new_state, hp)
                sampler.state = new_state
                log_a = sampler.mala_log_accept(theta, theta0, losses, grads, new_theta, prop_loss, prop_grad,
                                                sampler.current_preconditioner())
                mala_sum += torch.nan_to_num(log_a.clamp(max=0.0).exp(), nan=0.0)
                mala_count += 1
                if t >= num_burnin_steps:
                    drift_sq_sum += sampler.drift(theta, theta0, grads).pow(2).sum(dim=1)
                    drift_count += 1
            theta, sampler.state = new_theta, new_state
            if check_every and t % check_every == check_every - 1:
                flush()
                bar.update(check_every)
                if not bool(torch.isfinite(losses).any()):  # every chain has blown up: stop wasting compute
                    break
    bar.close()
    flush()
    return ChainOutput(trace, mala_sum, mala_count, t + 1, start_distance, theta, drift_sq_sum, drift_count)
