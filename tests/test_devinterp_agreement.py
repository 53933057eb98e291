"""Cross-check against devinterp 1.3.2 on the same model, data, hyperparameters and nβ convention."""
import math
import warnings

import numpy as np
import pytest
import torch.nn.functional as F
from helpers import dln_at, mse, teacher_loader

import slt_tools as slt

devinterp_sampler = pytest.importorskip("devinterp.slt.sampler", reason="devinterp (dev dependency) not installed")
from devinterp.optim import SGLD  # noqa: E402


def test_same_estimate_as_devinterp():
    """DLN (9,4,6) at a noise-free rank-1 point (true λ = 29/2): both libraries run SGLD with
    Δw = −(ε/2)(nβ∇L_B + γ(w − w*)) + N(0, ε); with identical ε, γ, nβ (n/log n, passed explicitly so devinterp's
    batch-size default does not apply) and L_n(w*) ≈ 0, their λ̂ must agree within the combined chain error."""
    model = dln_at((9, 4, 6), 1, (1,))
    loader = teacher_loader(model, 20000, 500, 9)
    hp = {"lr": 1e-5, "localization": 1.0, "nbeta": 20000 / math.log(20000)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = devinterp_sampler.estimate_learning_coeff_with_summary(
            model, loader, evaluate=lambda m, batch: F.mse_loss(m(batch[0]), batch[1]), sampling_method=SGLD,
            optimizer_kwargs=dict(hp), num_chains=4, num_draws=400, num_burnin_steps=400, seed=0, verbose=False)
        ours = slt.estimate_llc(model, loader, mse, num_chains=4, num_draws=400, num_burnin_steps=400, seed=0, **hp)
    their_chains = np.array([theirs[f"llc-chain/{c}"] for c in range(4)])
    their_sem = their_chains.std(ddof=1) / 2
    assert abs(ours.llc_mean - their_chains.mean()) < 2.5 * math.hypot(ours.llc_sem, their_sem) + 0.5, (
        ours, their_chains)
    for value in (ours.llc_mean, their_chains.mean()):
        assert abs(value - 14.5) < 0.2 * 14.5
