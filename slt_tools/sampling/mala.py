"""Exactly Metropolis-adjusted LLC estimation (MALA / HMC) on the full-data localised tempered posterior — a gold
standard for small models against which the SGLD estimator (``slt_tools.sampling.llc``) can be checked.

Target (the same posterior the SGLD estimator samples, Lau et al. arXiv 2308.12108):

    p(w) ∝ exp(−U(w)),   U(w) = nβ·L_n(w) + (γ/2)‖w − w*‖²,

with L_n the FULL-data mean loss (no minibatch noise), and  λ̂ = nβ·(E_p[L_n(w)] − L_n(w*)).

Hamiltonian Monte Carlo (Duane et al. 1987; Neal 2011, "MCMC using Hamiltonian dynamics", Handbook of MCMC ch. 5):
momentum p ~ N(0, I), H(w, p) = U(w) + ½‖p‖²; K leapfrog steps of size h,

    p ← p − (h/2)∇U(w);  w ← w + h·p;  p ← p − (h/2)∇U(w)     (repeated K times, inner half-steps merged),

then accept (w', p') with probability min(1, exp(H(w, p) − H(w', p'))). Leapfrog is volume-preserving and
reversible, so this Metropolis step makes p exactly invariant for any h and K (h and K may be drawn at random each
iteration, independently of the state; here h is jittered by ±``step_jitter`` and K uniform in [1, K_max] to avoid
periodic trajectories).

MALA (Roberts & Tweedie 1996, Bernoulli 2(4):341–363) is HMC with K = 1: the proposal
w' = w − (h²/2)∇U(w) + h·ξ, ξ ~ N(0, I), i.e. Langevin with step ε = h², accepted with probability
min(1, exp(−U(w') + U(w) + log q(w | w') − log q(w' | w))), q(b | a) = N(b; a − (ε/2)∇U(a), ε I) — algebraically
the same number as the HMC energy difference for K = 1.

Step size: adapted during warm-up only by dual averaging (Nesterov 2009 as used by Hoffman & Gelman 2014, JMLR 15,
"The No-U-Turn Sampler", §3.2) of the chain-averaged acceptance probability towards ``target_accept`` (0.57 is
optimal for MALA, Roberts & Rosenthal 1998; 0.65–0.8 for HMC, Beskos et al. 2013), then frozen at the averaged
iterate, so the draws come from a fixed, exactly p-invariant kernel. Warm-up draws are discarded.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import vmap

from slt_tools.sampling.data import BatchStream
from slt_tools.sampling.diagnostics import effective_sample_size, geweke_z, split_rhat
from slt_tools.sampling.functional import FlatParams, LossFn, RestrictTo, make_loss, select_parameters

Potential = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class MALAResult:
    """A Metropolis-adjusted LLC estimate. ``llc_sem`` = chain std / √chains; ``llc_sem_ess`` uses the pooled
    variance of the draws over the total ESS. ``loss_trace`` is L_n(w_t) per chain and draw (full data)."""

    llc_mean: float
    llc_std: float
    llc_sem: float
    llc_sem_ess: float
    llc_per_chain: np.ndarray
    acceptance: float
    acceptance_per_chain: np.ndarray
    step_size: float
    num_leapfrog: int
    r_hat: float
    ess_per_chain: np.ndarray
    geweke_max_abs_z: float
    init_loss: float
    nbeta: float
    localization: float
    loss_trace: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0

    @property
    def llc_trace(self) -> np.ndarray:
        return self.nbeta * (self.loss_trace - self.init_loss)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary without the traces."""
        d = {k: v for k, v in asdict(self).items() if k not in ("loss_trace",)}
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def _full_data(loader: Any, device: torch.device, dtype: torch.dtype, chunk: int | None) -> tuple[list, int]:
    """The whole data set as a list of (batch, size) chunks on ``device``, floating leaves cast to ``dtype``."""
    data = BatchStream.from_loader(loader, device)
    factor = math.ceil(data.num_samples / data.batch_size) if chunk is None else max(1, chunk // data.batch_size)

    def cast(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.to(dtype)
        if isinstance(x, (list, tuple)):
            return type(x)(cast(v) for v in x)
        if isinstance(x, dict):
            return {k: cast(v) for k, v in x.items()}
        return x

    return [(cast(b), s) for b, s in data.full_batches(batch_factor=factor)], data.num_samples


def make_potential(loss_at: Callable[[torch.Tensor, Any], torch.Tensor], chunks: list, n: int, theta0: torch.Tensor,
                   nbeta: float, gamma: float) -> Potential:
    """θ (C, D) ↦ (U(θ) (C,), ∇U(θ) (C, D), L_n(θ) (C,)) with U = nβ·L_n + γ/2‖θ − θ*‖², vmapped over chains."""
    batched = vmap(loss_at, in_dims=(0, None))

    def potential(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            ln = sum(batched(leaf, batch) * (size / n) for batch, size in chunks)
            u = nbeta * ln + 0.5 * gamma * ((leaf - theta0) ** 2).sum(-1)
            (grad,) = torch.autograd.grad(u.sum(), leaf)
        return u.detach(), grad, ln.detach()

    return potential


def hmc_step(potential: Potential, theta: torch.Tensor, u: torch.Tensor, grad: torch.Tensor, ln: torch.Tensor,
             h: torch.Tensor, num_leapfrog: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One HMC transition per chain (K = 1 is MALA). Returns (θ, U, ∇U, L_n, acceptance probability) after it."""
    p = torch.randn(theta.shape, generator=gen, device=theta.device, dtype=theta.dtype)
    h_col = h.reshape(-1, 1) if h.ndim else h
    h0 = 0.5 * (p * p).sum(-1) + u
    q, g = theta, grad
    p = p - 0.5 * h_col * g
    for k in range(num_leapfrog):
        q = q + h_col * p
        u_new, g, ln_new = potential(q)
        p = p - (h_col if k + 1 < num_leapfrog else 0.5 * h_col) * g
    log_ratio = h0 - (0.5 * (p * p).sum(-1) + u_new)
    log_ratio = torch.where(torch.isfinite(log_ratio), log_ratio, torch.full_like(log_ratio, -math.inf))
    accept_prob = torch.exp(torch.clamp(log_ratio, max=0.0))
    unif = torch.rand(u.shape, generator=gen, device=theta.device, dtype=theta.dtype)
    take = unif < accept_prob
    col = take.reshape(-1, 1)
    return (torch.where(col, q, theta), torch.where(take, u_new, u), torch.where(col, g, grad),
            torch.where(take, ln_new, ln), accept_prob)


def mala_step(potential: Potential, theta: torch.Tensor, u: torch.Tensor, grad: torch.Tensor, ln: torch.Tensor,
              h: torch.Tensor, drift_cap: float | None, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One MALA transition per chain with noise scale h (Langevin step ε = h²) and, if ``drift_cap`` is set, the
    truncated drift of Roberts & Tweedie (1996, MALTA): the drift (ε/2)∇U is shortened to length at most
    ``drift_cap``·h·√D. The proposal density q(b | a) = N(b; a − drift(a), h²I) is evaluated with the same
    truncated drift both ways, so the Metropolis–Hastings ratio keeps p exactly invariant; untruncated, this is HMC
    with one leapfrog step. Truncation stops a chain that overshot into a steep tail (L ∝ w⁶: there the untruncated
    proposal jumps absurdly far and is rejected forever — MALA is not geometrically ergodic for such tails,
    Roberts & Tweedie 1996 §4) from getting stuck."""
    h_col = h.reshape(-1, 1) if h.ndim else h
    cap = None if drift_cap is None else drift_cap * h_col * math.sqrt(theta.shape[-1])

    def mean(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        drift = 0.5 * h_col * h_col * g
        if cap is not None:
            norm = drift.norm(dim=-1, keepdim=True)
            drift = drift * torch.clamp(cap / torch.clamp(norm, min=1e-300), max=1.0)
        return w - drift

    noise = torch.randn(theta.shape, generator=gen, device=theta.device, dtype=theta.dtype)
    prop = mean(theta, grad) + h_col * noise
    u_new, g_new, ln_new = potential(prop)
    log_fwd = -0.5 * (noise * noise).sum(-1)
    back = (theta - mean(prop, g_new)) / h_col
    log_ratio = u - u_new + (-0.5 * (back * back).sum(-1)) - log_fwd
    log_ratio = torch.where(torch.isfinite(log_ratio), log_ratio, torch.full_like(log_ratio, -math.inf))
    accept_prob = torch.exp(torch.clamp(log_ratio, max=0.0))
    take = torch.rand(u.shape, generator=gen, device=theta.device, dtype=theta.dtype) < accept_prob
    col = take.reshape(-1, 1)
    return (torch.where(col, prop, theta), torch.where(take, u_new, u), torch.where(col, g_new, grad),
            torch.where(take, ln_new, ln), accept_prob)


class DualAveraging:
    """Hoffman & Gelman (2014) §3.2 dual averaging of log h towards a target acceptance (device tensors only)."""

    def __init__(self, h0: float, target: float, like: torch.Tensor, gamma: float = 0.05, t0: float = 10.0,
                 kappa: float = 0.75) -> None:
        self.mu = math.log(10.0 * h0)
        self.target, self.gamma, self.t0, self.kappa = target, gamma, t0, kappa
        self.hbar = torch.zeros((), dtype=like.dtype, device=like.device)
        self.log_h = torch.full((), math.log(h0), dtype=like.dtype, device=like.device)
        self.log_h_avg = self.log_h.clone()
        self.t = 0

    def update(self, accept: torch.Tensor) -> torch.Tensor:
        self.t += 1
        t = self.t
        w = 1.0 / (t + self.t0)
        self.hbar = (1 - w) * self.hbar + w * (self.target - accept.mean())
        self.log_h = self.mu - math.sqrt(t) / self.gamma * self.hbar
        eta = t ** (-self.kappa)
        self.log_h_avg = eta * self.log_h + (1 - eta) * self.log_h_avg
        return self.log_h.exp()

    def final(self) -> torch.Tensor:
        return self.log_h_avg.exp()


def initial_step_size(potential: Potential, theta: torch.Tensor, u: torch.Tensor, grad: torch.Tensor,
                      ln: torch.Tensor, h0: float, gen: torch.Generator, target: float = 0.5) -> float:
    """Halve or double h until the chain-averaged one-leapfrog acceptance crosses ``target`` (Hoffman & Gelman
    2014, Alg. 4; a few host syncs at start-up only)."""
    h = h0

    def acceptance(step: float) -> float:
        h_t = torch.tensor(step, dtype=theta.dtype, device=theta.device)
        return float(hmc_step(potential, theta, u, grad, ln, h_t, 1, gen)[-1].mean())

    acc = acceptance(h)
    direction = 1.0 if acc > target else -1.0
    for _ in range(60):
        h_next = h * 2.0 ** direction
        acc = acceptance(h_next)
        if (direction > 0 and acc < target) or (direction < 0 and acc > target):
            return h_next if direction < 0 else h
        h = h_next
    return h


def _summarize(trace: np.ndarray, accept: np.ndarray, init_loss: float, nbeta: float) -> dict[str, Any]:
    """Per-chain λ̂, spread, split-R̂, ESS and Geweke z of the (chains × draws) full-data loss trace."""
    llc_trace = nbeta * (trace - init_loss)
    per_chain = llc_trace.mean(axis=1)
    c = len(per_chain)
    std = float(per_chain.std(ddof=1)) if c > 1 else float("nan")
    ess = np.array([effective_sample_size(t) for t in llc_trace])
    pooled_var = float(llc_trace.var())
    return dict(llc_mean=float(per_chain.mean()), llc_std=std, llc_sem=std / math.sqrt(c) if c > 1 else float("nan"),
                llc_sem_ess=math.sqrt(pooled_var / max(float(ess.sum()), 1.0)), llc_per_chain=per_chain,
                acceptance=float(accept.mean()), acceptance_per_chain=accept,
                r_hat=split_rhat(llc_trace) if c > 1 else float("nan"), ess_per_chain=ess,
                geweke_max_abs_z=_nanmax_abs([geweke_z(t) for t in llc_trace]))


def _nanmax_abs(values: list[float]) -> float:
    arr = np.abs(np.asarray(values, dtype=float))
    return float(np.nanmax(arr)) if np.isfinite(arr).any() else float("nan")


def _setup(model: nn.Module, loader: Any, loss_fn: LossFn, restrict_to: RestrictTo, dtype: torch.dtype,
           device: torch.device, chunk: int | None) -> tuple[Callable, torch.Tensor, list, int]:
    """Copy of the model in ``dtype`` on ``device`` (the user's model is never touched), its loss and the data."""
    work = copy.deepcopy(model).to(device=device, dtype=dtype)
    names = select_parameters(work, restrict_to)
    layout = FlatParams.from_model(work, names)
    layout.frozen = {k: v.to(device) for k, v in layout.frozen.items()}
    theta0 = layout.flatten(work).to(device)
    chunks, n = _full_data(loader, device, dtype, chunk)
    return make_loss(work, layout, loss_fn), theta0, chunks, n


def estimate_llc_mala(
    model: nn.Module,
    loader: Any,
    loss_fn: LossFn,
    *,
    localization: float,
    nbeta: float | None = None,
    num_chains: int = 8,
    num_draws: int = 1000,
    num_warmup: int = 500,
    num_leapfrog: int = 1,
    target_accept: float | None = None,
    step_size: float | None = None,
    step_jitter: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    restrict_to: RestrictTo = None,
    data_chunk: int | None = None,
    drift_cap: float | None = 2.0,
) -> MALAResult:
    """Metropolis-adjusted estimate of λ̂(w*) = nβ·(E_p[L_n] − L_n(w*)) at the model's current weights w*.

    Args:
        localization: γ. nbeta: nβ (default n/log n, n = number of samples — the "dataset" convention of
            :func:`slt_tools.estimate_llc`, so both estimators target the same posterior).
        num_leapfrog: K_max; 1 = MALA, > 1 = HMC with K ~ Uniform{1..K_max} per iteration.
        target_accept: dual-averaging target (default 0.57 for MALA, 0.75 for HMC).
        step_size: a fixed leapfrog step h (no adaptation); default: search a start, then adapt in warm-up.
        step_jitter: each iteration uses h·U(1 − j, 1 + j) (state-independent, so exactness is kept).
        dtype: float64 recommended for small models (exact acceptance ratios of large energies).
        data_chunk: evaluate L_n in chunks of about this many samples (default: the whole data set at once).
        drift_cap: MALA only — truncate the drift to ``drift_cap``·h·√D (see :func:`mala_step`; None: plain MALA).
    Every chain starts at w*; warm-up draws are discarded. Chains are batched by ``torch.func.vmap``.
    """
    if localization is None or not localization > 0:
        raise ValueError(f"localization (γ) must be positive, got {localization!r}")
    if num_chains < 1 or num_draws < 4 or num_warmup < 0 or num_leapfrog < 1:
        raise ValueError("need num_chains ≥ 1, num_draws ≥ 4, num_warmup ≥ 0, num_leapfrog ≥ 1")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    t_start = time.perf_counter()
    loss_at, theta0, chunks, n = _setup(model, loader, loss_fn, restrict_to, dtype, dev, data_chunk)
    nbeta = float(n / math.log(n) if nbeta is None else nbeta)
    potential = make_potential(loss_at, chunks, n, theta0, nbeta, float(localization))
    theta = theta0.unsqueeze(0).repeat(num_chains, 1)
    u, grad, ln = potential(theta)
    init_loss = float(ln[0])
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    kgen = np.random.default_rng(int(seed) + 1)  # K per iteration, host-side: no device sync
    target = target_accept if target_accept is not None else (0.57 if num_leapfrog == 1 else 0.75)
    h0 = step_size if step_size is not None else initial_step_size(
        potential, theta, u, grad, ln, 1.0 / math.sqrt(nbeta + localization), gen)
    adapt = DualAveraging(h0, target, theta) if step_size is None and num_warmup > 0 else None
    h = torch.tensor(h0, dtype=dtype, device=dev)
    trace = torch.empty(num_chains, num_draws, dtype=dtype, device=dev)
    acc_sum = torch.zeros(num_chains, dtype=dtype, device=dev)
    for it in range(num_warmup + num_draws):
        if it == num_warmup and adapt is not None:
            h = adapt.final()
        k = int(kgen.integers(1, num_leapfrog + 1))
        jit = float(kgen.uniform(1 - step_jitter, 1 + step_jitter)) if step_jitter > 0 else 1.0
        if num_leapfrog == 1:
            theta, u, grad, ln, acc = mala_step(potential, theta, u, grad, ln, h * jit, drift_cap, gen)
        else:
            theta, u, grad, ln, acc = hmc_step(potential, theta, u, grad, ln, h * jit, k, gen)
        if it < num_warmup:
            if adapt is not None:
                h = adapt.update(acc)
        else:
            trace[:, it - num_warmup] = ln
            acc_sum += acc
    stats = _summarize(trace.double().cpu().numpy(), (acc_sum / num_draws).double().cpu().numpy(), init_loss, nbeta)
    settings = dict(method="HMC" if num_leapfrog > 1 else "MALA", num_chains=num_chains, num_draws=num_draws,
                    num_warmup=num_warmup, num_leapfrog_max=num_leapfrog, target_accept=target,
                    drift_cap=drift_cap if num_leapfrog == 1 else None,
                    step_jitter=step_jitter, seed=int(seed), dtype=str(dtype), num_samples=n,
                    num_params=int(theta0.numel()), initial_step_size=h0, device=str(dev))
    return MALAResult(**stats, step_size=float(h), num_leapfrog=num_leapfrog, init_loss=init_loss, nbeta=nbeta,
                      localization=float(localization), loss_trace=trace.double().cpu().numpy(), settings=settings,
                      wall_time_s=time.perf_counter() - t_start)
