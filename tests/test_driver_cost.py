"""The self-calibrating driver's cost: continued chains and batched probe chains (slt_tools.sampling.auto)."""
import warnings

import pytest
import torch
from helpers import dln_at, mse, teacher_loader
from torch import nn

import slt_tools as slt
from slt_tools.sampling.estimate import LLCProblem, overdispersed_starts, run_raw, sample

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(n=2000, batch=None):
    torch.manual_seed(0)
    model = nn.Linear(5, 4, bias=False)
    loader = teacher_loader(model, n, batch or n, 5)
    return model, loader, LLCProblem.build(model, loader, mse)


def test_a_run_continues_from_the_state_another_ended_in():
    """Full-batch data: the first recorded loss of a run started at S is L_n(S), and a run started at another run's
    final_theta records L_n(final_theta) first — the continuation hands over the chains' state exactly."""
    model, loader, problem = _problem()
    cfg = slt.LLCConfig(lr=1e-4, localization=1.0, num_chains=3, num_draws=5, num_burnin_steps=0)
    far = problem.theta0 + 0.3 * torch.randn(3, problem.theta0.numel(), generator=torch.Generator().manual_seed(1))
    first = run_raw(problem, cfg, [0, 1, 2], start=far)
    batch = next(iter(loader))
    expected = torch.stack([problem.loss_at(t, batch) for t in far])
    assert torch.allclose(torch.as_tensor(first.loss_trace[:, 0]), expected.double(), rtol=1e-5)
    second = run_raw(problem, cfg.replace(seed=7), [0, 1, 2], start=first.final_theta)
    expected = torch.stack([problem.loss_at(t, batch) for t in first.final_theta])
    assert torch.allclose(torch.as_tensor(second.loss_trace[:, 0]), expected.double(), rtol=1e-5)
    assert not torch.equal(first.final_theta, far)  # the chains moved


def test_overdispersed_starts_are_the_engines_own():
    """overdispersed_starts gives chains the start a run with init_spread gives them (same ‖w₀ − w*‖ per chain)."""
    _, _, problem = _problem()
    cfg = slt.LLCConfig(lr=1e-4, localization=2.0, num_chains=3, num_draws=2, num_burnin_steps=0, init_spread=0.3)
    ids = [1_000_000, 1_000_001, 1_000_002]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sample(problem, cfg, chain_ids=ids)
    starts = overdispersed_starts(problem, cfg, ids)
    dist = (starts - problem.theta0).norm(dim=1)
    assert torch.allclose(dist.double(), torch.tensor(res.diagnostics.start_distance, dtype=torch.float64),
                          rtol=1e-5)


def test_driver_pays_only_for_the_steps_it_adds():
    """DLN (9,4,6) r = 1 (λ = 14.5), a run that is extended once: calibration + the final run's own steps is all the
    driver spends when it neither raises γ nor steps ε down — the extension continues the chains (a from-scratch
    doubled run would cost the first run's steps again), the probe chains ride in the same batch."""
    model = dln_at((9, 4, 6), 1, (1,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = slt.estimate_llc(model, teacher_loader(model, 2000, 500, 9), mse, num_chains=4, num_draws=300, seed=0)
    d, h = res.diagnostics, res.hyperparameters
    assert d.converged and abs(res.llc_mean - 14.5) < 0.1 * 14.5
    assert d.localization_raised is None and "lr_reduced_after_divergence" not in d.extra
    segments = d.extra["segments"]
    assert len(segments) >= 2 and [s["continued"] for s in segments] == [False] + [True] * (len(segments) - 1)
    assert sum(s["steps"] for s in segments) == h["num_burnin_steps"] + h["num_draws"]
    assert d.budget["steps_spent"] == d.calibration["sgld_steps"] + h["num_burnin_steps"] + h["num_draws"]
    assert d.overdispersed_probe["agrees"] and d.overdispersed_probe["num_chains"] == 2


def test_a_closing_bracket_doubles_the_run_instead_of_raising_gamma():
    """_bracket_closing: the main chains rising and the probe chains falling towards each other fast enough that one
    more doubling brings them within 10 % (the main job's final minimum: 58.4/29.6 → 36.2/32.2) → True; a bracket
    that shrinks too slowly, widens, or crosses → False; without the batched probe's record per run → False."""
    from slt_tools.sampling.auto import _bracket_closing, _Budget, _Chains, _Checks
    from slt_tools.sampling.result import ProbeRecord

    def checks(main, probe, batched=True):
        c = _Checks(None, _Budget(30_000, None), status=None)
        c.history = list(main)
        c.probes = [ProbeRecord(llc_mean=p) for p in probe]
        c.chains = _Chains(4, 2) if batched else None
        return c

    assert _bracket_closing(checks([29.6, 32.2], [58.4, 36.2]))
    assert not _bracket_closing(checks([29.6, 30.0], [58.4, 50.0]))  # 28.8 → 20: one doubling leaves ≈ 14 > 3
    assert not _bracket_closing(checks([29.6, 30.0], [40.0, 45.0]))  # widening
    assert not _bracket_closing(checks([29.6, 32.2], [35.0, 31.0]))  # crossed: the probe is below the main chains
    assert not _bracket_closing(checks([32.2], [36.2]))  # one run at this γ: no rate yet
    assert not _bracket_closing(checks([29.6, 32.2], [58.4, 36.2], batched=False))
