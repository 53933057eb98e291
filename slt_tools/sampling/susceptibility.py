"""Susceptibilities of weight restrictions to probe data (Baker, Wang, Hoogland, Murfet, "Structural Inference:
Interpreting Small Language Models with Susceptibilities", arXiv 2504.18274).

Shifting the data distribution q toward a probe distribution q′, q_h = (1 − h)q + hq′, changes the posterior
expectation of an observable φ_C localised on a component C to first order in h; the susceptibility is that linear
response, a posterior covariance (the paper's linear-response formula; its equation number could not be checked
here — devinterp 2.0.1 cites the paper's appendix C.4):

    χ_C = −Cov_{β}[φ_C, ΔL],   ΔL(w) = L_{q′}(w) − L_q(w),

and it factorises over the probe samples (per token for a language model): χ_{C,j} = −Cov[φ_C, ℓ_j − L_q]. As in
the paper (and devinterp 2.x's ``susceptibilities``), C is a weight restriction sampled on its own — the localised
posterior over C's coordinates with everything else at w* — and φ_C(w) = L_q(w), the mean loss on a fixed reference
batch of the training data, so

    χ_{C,j} = Var_C[L_q] − Cov_C[L_q, ℓ_j]      (no factor nβ: the convention of devinterp 2.0.1).

All restrictions run in one batched refined run (:func:`slt_tools.sampling.refined.sample_refined`); the covariances
are streamed (:mod:`slt_tools.sampling.observables`, with the reference loss as every observable's covariance
partner). SEs are the spread of the per-chain values over √C.

devinterp 2.0.1 (``devinterp.slt.susceptibilities.compute_susceptibilities``, read from its PyPI wheel) stores every
draw and computes E[φ·L_q] − E[φ·ℓ_j] − E[φ]·Δ̄ with φ = L_q − L_q(w*) and Δ̄ = the mean of L_q − ℓ_j under the
*unrestricted* ("full") posterior: this equals our −Cov_C[φ, ℓ_j − L_q] when Δ̄ is replaced by the restricted
posterior's own mean of L_q − ℓ_j, and differs from it by E_C[φ]·(E_C[L_q − ℓ_j] − E_full[L_q − ℓ_j]) otherwise.
We centre within the restricted posterior (an exact covariance, testable in closed form) and need no full run.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from slt_tools.sampling.bif import PerSampleLossFn, concat_batches, slice_batch
from slt_tools.sampling.config import LLCConfig
from slt_tools.sampling.estimate import model_mode
from slt_tools.sampling.observables import Observable
from slt_tools.sampling.observables import prepare as prepare_observables
from slt_tools.sampling.refined import RefinedProblem, Restrictions, sample_refined
from slt_tools.sampling.refined_result import RefinedLLCResult

REFERENCE = "reference_loss"


@dataclass
class SusceptibilityResult:
    """χ per restriction and probe sample: ``chi[probe_set]`` (R, P_k), ``chi_sem`` likewise, rows in
    ``restrictions`` order; ``chi_per_chain[probe_set]`` (R, C, P_k) the within-chain estimates the SEs come from;
    ``response`` (R, number of probe sets) the mean over each set's samples; ``refined`` the batched run
    (per-restriction LLCs too)."""

    restrictions: list[str]
    chi: dict[str, np.ndarray]
    chi_sem: dict[str, np.ndarray]
    refined: RefinedLLCResult
    chi_per_chain: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def response(self) -> np.ndarray:
        """Restriction × probe-set response matrix: each set's per-sample χ averaged."""
        return np.stack([self.chi[k].mean(axis=1) for k in self.chi], axis=1)

    def mean_response(self, probe_set: str, samples: Any = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(χ averaged over the probe samples ``samples`` of ``probe_set``, its SE) per restriction (R,): the SE is
        the spread over chains of the within-chain averages / √C (chains are independent; the probe samples of one
        chain are not, so averaging the per-sample SEs would be wrong)."""
        mean = self.chi[probe_set][:, samples].mean(axis=1)
        per_chain = self.chi_per_chain[probe_set][:, :, samples].mean(axis=2)
        c = per_chain.shape[1]
        sem = per_chain.std(axis=1, ddof=1) / math.sqrt(c) if c > 1 else np.full_like(mean, np.nan)
        return mean, sem

    def principal_components(self, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """(scores (R, k), explained variance ratios (k,)) of the column-centred per-sample response matrix
        (restrictions × all probe samples), as the paper's PCA of the response matrix."""
        m = np.concatenate([self.chi[s] for s in self.chi], axis=1)
        m = m - m.mean(axis=0, keepdims=True)
        u, s, _ = np.linalg.svd(m, full_matrices=False)
        k = min(k, len(s))
        return u[:, :k] * s[:k], (s[:k] ** 2) / max(float((s**2).sum()), 1e-300)


def _observables(probe_sets: Mapping[str, Any], reference: Any, fn: PerSampleLossFn) -> list[Observable]:
    obs = [Observable(REFERENCE, lambda m: fn(m, reference).mean().reshape(1))]
    return obs + [Observable(f"probe:{k}", lambda m, b=b: fn(m, b)) for k, b in probe_sets.items()]


def susceptibilities(model: nn.Module, train_loader: Any, probe_sets: Mapping[str, Any], restrictions: Restrictions,
                     loss_per_sample_fn: PerSampleLossFn, config: LLCConfig, *,
                     loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, reference_batch: Any = None,
                     reference_size: int = 1024, device: str | torch.device | None = None,
                     keep_draws: bool = False) -> SusceptibilityResult:
    """χ_{r,j} = Var_r[L_q] − Cov_r[L_q, ℓ_j] for every restriction r and every sample j of every probe set, from one
    batched run of all restrictions (module docstring).

    Args:
        probe_sets: ``{name: batch}``; ``loss_per_sample_fn(model, batch)`` gives its per-sample (or, flattened,
            per-token) losses ℓ_j.
        config: sampling settings with ``lr`` and ``localization`` set (shared by all restrictions).
        loss_fn: the mean minibatch loss the chains sample (default the mean of ``loss_per_sample_fn``).
        reference_batch: the fixed batch whose mean loss is L_q (default the first ``reference_size`` training
            samples).
        keep_draws: also keep every draw of every observable (``result.refined[r].observables[name].draws``,
            (C, T, K) float64; memory grows with the draws) — the statistics are streamed either way.
    """
    if loss_fn is None:
        def loss_fn(m: Any, b: Any) -> torch.Tensor:
            return loss_per_sample_fn(m, b).mean()
    with model_mode(model, config.model_mode):
        problem = RefinedProblem.build(model, train_loader, loss_fn, restrictions, False, device)
        move = (lambda t: t.to(problem.base.device) if isinstance(t, torch.Tensor) else t)  # noqa: E731
        if reference_batch is None:
            reference_batch = slice_batch(concat_batches(train_loader), slice(0, reference_size))
        ref = torch.utils._pytree.tree_map(move, reference_batch)
        probes = {k: torch.utils._pytree.tree_map(move, b) for k, b in probe_sets.items()}
        obs = _observables(probes, ref, loss_per_sample_fn)
        prepared = [prepare_observables(model, g.layout, g.theta0, obs) for g in problem.groups]
        res = sample_refined(problem, config, observables=prepared, reference=REFERENCE, keep_draws=keep_draws)
    names = list(res.keys())
    chi, sem, chains = {}, {}, {}
    for k in probe_sets:
        per_chain = np.stack([res[r].observables[REFERENCE].cov_with_loss_per_chain[:, :1]
                              - res[r].observables[f"probe:{k}"].cov_with_loss_per_chain for r in names])
        pooled = np.stack([res[r].observables[REFERENCE].cov_with_loss[:1]
                           - res[r].observables[f"probe:{k}"].cov_with_loss for r in names])
        c = per_chain.shape[1]
        chi[k], chains[k] = pooled, per_chain
        sem[k] = per_chain.std(axis=1, ddof=1) / math.sqrt(c) if c > 1 else np.full_like(pooled, np.nan)
    return SusceptibilityResult(names, chi, sem, res, chains)
