"""Observables with streaming statistics, Bayesian influence functions and WBIC (issue 20).

Truth: for linear regression with the MSE per-sample loss ℓ_i(w) = (x_iᵀw − y_i)², L_n = mean ℓ_i and w* the least-
squares solution, the localised tempered posterior p(w) ∝ exp(−nβ·L_n(w) − (γ/2)‖w − w*‖²) is exactly Gaussian,
N(w*, Σ) with Σ = ((2nβ/n)·XᵀX + γI)⁻¹. The residuals r_i = x_iᵀw − y_i are jointly Gaussian with means
m_i = x_iᵀw* − y_i and covariances s_iq = x_iᵀΣx_q, so by Isserlis' theorem

    Cov(ℓ_i, ℓ_q) = Cov(r_i², r_q²) = 2·s_iq² + 4·m_i·m_q·s_iq,

and BIF(z_i, z_q) = −Cov(ℓ_i, ℓ_q) must match it within its standard errors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import slt_tools as slt
from slt_tools.sampling.streaming import CrossMoments

N, D = 64, 3


def per_sample(model, batch):
    x, y = batch
    return (model(x).squeeze(-1) - y) ** 2


def mean_loss(model, batch):
    return per_sample(model, batch).mean()


def linear_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64) + 0.5 * torch.randn(N, generator=gen,
                                                                                    dtype=torch.float64)
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)
    xq = torch.randn(4, D, generator=gen, dtype=torch.float64)
    yq = xq @ torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64) + 0.5 * torch.randn(4, generator=gen,
                                                                                      dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, y), batch_size=N, shuffle=False)
    return model, loader, (x, y), (xq, yq)


def closed_form_cov(model, train, query, nbeta: float, gamma: float) -> np.ndarray:
    """Cov_p(ℓ_i, ℓ_q) = 2 s_iq² + 4 m_i m_q s_iq (module docstring)."""
    x, y = train
    w = model.weight.detach()[0]
    sigma = torch.linalg.inv(2 * nbeta / N * x.T @ x + gamma * torch.eye(D, dtype=torch.float64))
    xq, yq = query
    s = x @ sigma @ xq.T
    m_i, m_q = x @ w - y, xq @ w - yq
    return (2 * s**2 + 4 * m_i[:, None] * m_q[None, :] * s).numpy()


#: ε·p_max/4 ≈ 0.8 %: SGLD's stationary variance exceeds the posterior's by that factor (Euler bias), far below the
#: Monte-Carlo error tested against
CONFIG = dict(num_chains=16, num_draws=600, num_burnin_steps=500, num_steps_bw_draws=10, lr=1e-3, localization=1.0,
              seed=3, mala_every=0)


def test_streaming_moments_equal_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 101, 5, generator=gen, dtype=torch.float64) + 10.0
    y = torch.randn(3, 101, 2, generator=gen, dtype=torch.float64) + x[..., :2]
    acc = CrossMoments(block=7)
    for t in range(101):
        acc.add(x[:, t], y[:, t])
    m = acc.result()
    xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    torch.testing.assert_close(m.mean_x, x.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.cov_xy(), xc.transpose(1, 2) @ yc / 100, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.var_x(), x.var(1), rtol=1e-10, atol=1e-12)


def test_observables_stream_equals_draws_and_leave_the_run_bit_identical():
    model, loader, train, query = linear_problem()
    config = slt.LLCConfig(**{**CONFIG, "num_chains": 4, "num_draws": 50, "num_burnin_steps": 20,
                              "num_steps_bw_draws": 2, "chain_chunk_size": 3})
    plain = slt.sample_llc(model, loader, mean_loss, config)
    obs = {"query_loss": slt.observables.per_sample_loss(query, per_sample).fn,
           "weight_norm": lambda m: m.weight.pow(2).sum()}
    res = slt.sample_llc(model, loader, mean_loss, config, observables=obs, keep_draws=True)
    np.testing.assert_array_equal(res.loss_trace, plain.loss_trace)  # observables do not touch the chains
    assert plain.observables == {}
    for name, k in (("query_loss", 4), ("weight_norm", 1)):
        st = res.observables[name]
        draws = st.draws.reshape(4, 50, k)
        assert draws.shape == (4, 50, k) and st.num_draws == 50
        np.testing.assert_allclose(st.mean_per_chain, draws.mean(axis=1), rtol=1e-12)
        flat, loss = draws.reshape(-1, k), res.loss_trace.reshape(-1)
        np.testing.assert_allclose(st.mean, flat.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(st.var, flat.var(axis=0, ddof=1), rtol=1e-9)
        cov = ((flat - flat.mean(0)) * (loss - loss.mean())[:, None]).sum(0) / (flat.shape[0] - 1)
        np.testing.assert_allclose(st.cov_with_loss, cov, rtol=1e-9, atol=1e-15)
    # a user function of the model agrees with the weights it sees: ‖w‖² at the draws
    back = slt.LLCResult.from_json(res.to_json())
    np.testing.assert_allclose(back.observables["query_loss"].mean, res.observables["query_loss"].mean)


def test_bif_matches_linear_gaussian_closed_form():
    model, loader, train, query = linear_problem()
    config = slt.LLCConfig(**CONFIG)
    out = slt.bif(model, loader, query, per_sample, config, train_chunk_size=40)
    assert out.bif.shape == (N, 4) and out.num_runs == 2
    truth = -closed_form_cov(model, train, query, out.llc.hyperparameters["nbeta"], 1.0)
    z = (out.bif - truth) / out.bif_sem
    assert np.mean(z**2) < 2.5, np.mean(z**2)
    assert np.abs(z).max() < 6.0
    rel = np.linalg.norm(out.bif - truth) / np.linalg.norm(truth)
    assert rel < 0.3, rel  # entries share draws, so their errors are correlated: a loose overall check
    assert np.corrcoef(out.bif.ravel(), truth.ravel())[0, 1] > 0.95
    assert np.all(np.abs(out.correlation) <= 1 + 1e-9)
    # the per-sample variances too: Var ℓ_i = 2 s_ii² + 4 m_i² s_ii
    x, y = train
    w, nbeta = model.weight.detach()[0], out.llc.hyperparameters["nbeta"]
    sigma = torch.linalg.inv(2 * nbeta / N * x.T @ x + torch.eye(D, dtype=torch.float64))
    s_ii, m_i = ((x @ sigma) * x).sum(1), x @ w - y
    var_truth = (2 * s_ii**2 + 4 * m_i**2 * s_ii).numpy()
    assert np.median(np.abs(out.var_train / var_truth - 1)) < 0.1
    # chunking over training samples re-runs the same chains: one run over all samples gives the same numbers
    whole = slt.bif(model, loader, query, per_sample, config)
    assert whole.num_runs == 1
    np.testing.assert_allclose(whole.bif, out.bif, rtol=1e-9, atol=1e-15)


def test_bif_rows_are_dataset_samples_when_the_loader_shuffles():
    """Planted: a query that is training sample k has posterior correlation exactly 1 with row k, and BIF(k, k) =
    −Var ℓ_k; with a shuffling loader the rows must still be the dataset's samples in order."""
    model, loader, train, _ = linear_problem()
    shuffled = DataLoader(loader.dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    ks = [5, 40]
    query = (train[0][ks], train[1][ks])
    config = slt.LLCConfig(**{**CONFIG, "num_chains": 2, "num_draws": 40, "num_burnin_steps": 20})
    out = slt.bif(model, shuffled, query, per_sample, config, train_chunk_size=24)
    for q, k in enumerate(ks):
        assert int(np.argmax(out.correlation[:, q])) == k
        np.testing.assert_allclose(out.correlation[k, q], 1.0, rtol=1e-9)
        np.testing.assert_allclose(out.bif[k, q], -out.var_train[k], rtol=1e-9)


def test_wbic_at_inverse_log_n_temperature_only():
    model, loader, train, _ = linear_problem()
    res = slt.sample_llc(model, loader, mean_loss, slt.LLCConfig(**{**CONFIG, "num_chains": 4, "num_draws": 200}))
    assert math.isclose(res.hyperparameters["nbeta"], N / math.log(N))
    assert res.wbic == pytest.approx(N * res.loss_trace.mean(), rel=1e-12)
    assert res.wbic_sem == pytest.approx(N * res.loss_trace.mean(1).std(ddof=1) / 2, rel=1e-12)
    # truth: n·E_p[L_n] = n·L_n(w*) + tr(XᵀX·Σ) for the Gaussian posterior N(w*, Σ) (module docstring)
    (x, y), nbeta = train, res.hyperparameters["nbeta"]
    sigma = torch.linalg.inv(2 * nbeta / N * x.T @ x + torch.eye(D, dtype=torch.float64))
    truth = float(((x @ model.weight.detach()[0] - y) ** 2).sum() + torch.trace(x.T @ x @ sigma))
    assert abs(res.wbic - truth) < 4 * res.wbic_sem, (res.wbic, truth, res.wbic_sem)
    other = slt.sample_llc(model, loader, mean_loss,
                           slt.LLCConfig(**{**CONFIG, "num_chains": 2, "num_draws": 20, "nbeta": 5.0}))
    assert other.wbic is None and other.wbic_sem is None


def test_combine_results_merges_observables_as_one_run():
    """Chain blocks run apart (out of order) and combined give the one-run statistics: Chan's merge is exact."""
    model, loader, _, query = linear_problem()
    config = slt.LLCConfig(**{**CONFIG, "num_chains": 5, "num_draws": 30, "num_burnin_steps": 10})
    obs = {"query": slt.observables.per_sample_loss(query, per_sample).fn, "norm": lambda m: m.weight.pow(2).sum()}
    whole = slt.sample_llc(model, loader, mean_loss, config, observables=obs, keep_draws=True)
    parts = [slt.sample_llc(model, loader, mean_loss, config, observables=obs, keep_draws=True, chain_ids=ids)
             for ids in ([3, 4], [0], [1, 2])]
    merged = slt.combine_results(parts)
    np.testing.assert_allclose(merged.loss_trace, whole.loss_trace, rtol=1e-12)
    for name, st in whole.observables.items():
        got = merged.observables[name]
        for field in ("mean_per_chain", "mean", "mean_sem", "var", "var_per_chain", "cov_with_loss_per_chain",
                      "cov_with_loss", "cov_with_loss_sem", "partner_mean_per_chain", "draws"):
            np.testing.assert_allclose(getattr(got, field), getattr(st, field), rtol=1e-10, atol=1e-15,
                                       err_msg=f"{name}.{field}")
        assert got.num_draws == st.num_draws and got.shape == st.shape
    # the merged record round-trips through JSON and can be merged again
    again = slt.LLCResult.from_json(merged.to_json())
    np.testing.assert_allclose(again.observables["query"].var_per_chain, merged.observables["query"].var_per_chain)
    with pytest.raises(ValueError, match="different observables"):
        slt.combine_results([parts[0], slt.sample_llc(model, loader, mean_loss, config, chain_ids=[0],
                                                      observables={"query": obs["query"]})])


@pytest.mark.parametrize("checked", [False, True])
def test_estimate_llc_passes_observables_to_its_main_run(checked):
    model, loader, _, query = linear_problem()
    kw = {**CONFIG, "num_chains": 2, "num_draws": 40, "num_burnin_steps": 20}
    if checked:
        kw["max_extensions"] = 1  # the driver's checked path
    obs = [slt.observables.per_sample_loss(query, per_sample, name="query")]
    res = slt.estimate_llc(model, loader, mean_loss, observables=obs, progress=False, **kw)
    st = res.observables["query"]
    assert st.mean.shape == (4,) and st.mean_per_chain.shape == (2, 4)
    assert st.num_draws == res.loss_trace.shape[1]


def test_refined_observables_per_restriction_stream_equals_draws_and_alone_equals_batched():
    from slt_tools.restrictions import Restriction

    model, loader, _, query = linear_problem()

    def coords(*ks):
        mask = torch.zeros(1, D, dtype=torch.bool)
        mask[0, list(ks)] = True
        return {"weight": mask}

    rs = {"a": Restriction("a", coords(0, 1)), "c": Restriction("c", coords(1, 2)), "b": Restriction("b", coords(2))}
    obs = {"w": lambda m: m.weight.reshape(-1), "query": slt.observables.per_sample_loss(query, per_sample).fn}
    kw = {**CONFIG, "num_chains": 3, "num_draws": 30, "num_burnin_steps": 10, "chain_chunk_size": 4}
    res = slt.estimate_refined_llc(model, loader, mean_loss, rs, observables=obs, keep_draws=True, **kw)
    w_star = model.weight.detach().reshape(-1).numpy()
    for name, frozen in (("a", [2]), ("c", [0]), ("b", [0, 1])):
        st = res[name].observables["w"]
        assert st.draws.shape == (3, 30, D) and st.mean_per_chain.shape == (3, D)
        np.testing.assert_array_equal(st.draws[..., frozen], np.broadcast_to(w_star[frozen], (3, 30, len(frozen))))
        q = res[name].observables["query"]
        flat, loss = q.draws.reshape(-1, 4), res[name].loss_trace.reshape(-1)
        np.testing.assert_allclose(q.mean, flat.mean(0), rtol=1e-12)
        cov = ((flat - flat.mean(0)) * (loss - loss.mean())[:, None]).sum(0) / (flat.shape[0] - 1)
        np.testing.assert_allclose(q.cov_with_loss, cov, rtol=1e-9, atol=1e-15)
    alone = slt.estimate_refined_llc(model, loader, mean_loss, {"c": rs["c"]}, observables=obs, **kw)
    np.testing.assert_allclose(alone["c"].observables["query"].mean, res["c"].observables["query"].mean, rtol=1e-9)
    np.testing.assert_allclose(alone["c"].observables["query"].cov_with_loss,
                               res["c"].observables["query"].cov_with_loss, rtol=1e-7, atol=1e-12)


def _restricted_cov(model, x_a, y_a, x_b, y_b, train, nbeta, coords_):
    """Cov(ℓ_a, ℓ_b) under the posterior restricted to coordinates ``coords_`` (the others at w*)."""
    x, _ = train
    prec = 2 * nbeta / N * x.T @ x + torch.eye(D, dtype=torch.float64)
    sigma = torch.zeros(D, D, dtype=torch.float64)
    idx = torch.tensor(coords_)
    sigma[idx[:, None], idx[None, :]] = torch.linalg.inv(prec[idx][:, idx])
    w = model.weight.detach()[0]
    s = x_a @ sigma @ x_b.T
    m_a, m_b = x_a @ w - y_a, x_b @ w - y_b
    return 2 * s**2 + 4 * m_a[:, None] * m_b[None, :] * s


def test_susceptibilities_match_linear_gaussian_closed_form():
    from slt_tools.restrictions import Restriction

    model, loader, train, query = linear_problem()
    masks = {"a": (0, 1), "b": (2,), "all": (0, 1, 2)}
    rs = {}
    for name, ks in masks.items():
        m = torch.zeros(1, D, dtype=torch.bool)
        m[0, list(ks)] = True
        rs[name] = Restriction(name, {"weight": m})
    ref = (train[0][:16], train[1][:16])
    probes = {"query": query, "train_tail": (train[0][-3:], train[1][-3:])}
    config = slt.LLCConfig(**{**CONFIG, "chain_chunk_size": 48})
    out = slt.susceptibilities(model, loader, probes, rs, per_sample, config, reference_batch=ref)
    assert out.restrictions == ["a", "b", "all"] and out.response.shape == (3, 2)
    nbeta = out.refined["a"].hyperparameters["nbeta"]
    zs = []
    for k, (xp, yp) in probes.items():
        for r, name in enumerate(out.restrictions):
            c_ref = _restricted_cov(model, ref[0], ref[1], ref[0], ref[1], train, nbeta, masks[name]).mean()
            c_probe = _restricted_cov(model, ref[0], ref[1], xp, yp, train, nbeta, masks[name]).mean(0)
            truth = (c_ref - c_probe).numpy()
            zs.append((out.chi[k][r] - truth) / out.chi_sem[k][r])
            assert np.allclose(out.chi[k][r], truth, rtol=0.3, atol=0.3 * np.abs(truth).max()), (k, name)
    z = np.concatenate(zs)
    assert np.mean(z**2) < 2.5 and np.abs(z).max() < 5, z
    scores, ratio = out.principal_components(2)
    assert scores.shape == (3, 2) and 0 < ratio[0] <= 1


def _planted_susceptibilities(seed: int = 0) -> slt.SusceptibilityResult:
    """A result with planted per-chain χ: 4 restrictions, 3 chains, probe sets of 5 and 3 samples."""
    gen = np.random.default_rng(seed)
    per_chain = {"a": gen.normal(size=(4, 3, 5)), "b": gen.normal(size=(4, 3, 3)) + 2.0}
    chi = {k: v.mean(axis=1) for k, v in per_chain.items()}
    sem = {k: v.std(axis=1, ddof=1) / math.sqrt(3) for k, v in per_chain.items()}
    return slt.SusceptibilityResult(["r0", "r1", "r2", "r3"], chi, sem, None, per_chain)  # type: ignore[arg-type]


def test_mean_response_se_is_over_chains_and_plot_shows_the_response_and_its_components(tmp_path):
    sus = _planted_susceptibilities()
    mean, se = sus.mean_response("a", [0, 2])
    per_chain = sus.chi_per_chain["a"][:, :, [0, 2]].mean(axis=2)  # (R, C): chains are the independent units
    np.testing.assert_allclose(mean, sus.chi["a"][:, [0, 2]].mean(axis=1))
    np.testing.assert_allclose(se, per_chain.std(axis=1, ddof=1) / math.sqrt(3))
    columns = {"a (0, 2)": ("a", [0, 2]), "b": ("b", slice(None))}
    fig = slt.plots.plot_susceptibilities(sus, columns=columns, groups={"r0": "x", "r1": "y", "r2": "x", "r3": "y"},
                                          path=tmp_path / "sus.png")
    assert (tmp_path / "sus.png").stat().st_size > 0
    heat, pcs = fig.axes[0], fig.axes[1]
    np.testing.assert_allclose(heat.images[0].get_array(), np.stack([mean, sus.response[:, 1]], axis=1))
    scores, ratio = sus.principal_components(2)
    shown = np.concatenate([c.get_offsets() for c in pcs.collections])
    order = [0, 2, 1, 3]  # drawn group by group: x = r0, r2; y = r1, r3
    np.testing.assert_allclose(shown, scores[order])
    # the components of the column-centred per-sample matrix: scores·loadings reproduce it at full rank
    full, ratio_all = sus.principal_components(8)
    m = np.concatenate([sus.chi["a"], sus.chi["b"]], axis=1)
    m = m - m.mean(axis=0)
    assert np.isclose(ratio_all.sum(), 1.0) and np.allclose(full @ full.T, m @ m.T)


def test_plot_bif_shows_sorted_influences_and_top_correlations(tmp_path):
    gen = np.random.default_rng(1)
    n, q = 30, 2
    cov = gen.normal(size=(n, q))
    res = slt.BIFResult(-cov, np.full((n, q), 0.1), np.tanh(cov), np.zeros(n), np.ones(n), np.zeros(q), np.ones(q),
                        4, 10, 1, None)  # type: ignore[arg-type]
    fig = slt.plots.plot_bif(res, labels=["q0", "q1"], k=3, path=tmp_path / "bif.png")
    assert (tmp_path / "bif.png").stat().st_size > 0
    curves, heat = fig.axes[0], fig.axes[1]
    np.testing.assert_allclose(curves.lines[0].get_ydata(), np.sort(res.bif[:, 0]))  # most helpful (negative) first
    tops = list(res.top_influences(0, 3)) + [i for i in res.top_influences(1, 3) if i not in res.top_influences(0, 3)]
    np.testing.assert_allclose(heat.images[0].get_array(), res.correlation[tops].T)


def test_bif_is_the_derivative_of_the_query_loss_under_upweighting():
    """Closed form, no sampling: up-weighting z_i (nβL_n → nβL_n + δℓ_i) keeps the posterior Gaussian, precision
    P + 2δ x_i x_iᵀ and mean (P + 2δ x_i x_iᵀ)⁻¹(P w* + 2δ y_i x_i); dE_δ[ℓ_q]/dδ at 0 (central difference) equals
    −Cov(ℓ_i, ℓ_q) = the BIF's definition. So a negative BIF is a helpful sample (top_influences' order)."""
    model, _, train, query = linear_problem()
    x, y = train
    nbeta, gamma = N / math.log(N), 1.0
    w = model.weight.detach()[0]
    prec = 2 * nbeta / N * x.T @ x + gamma * torch.eye(D, dtype=torch.float64)

    def expected_query_loss(i: int, delta: float) -> torch.Tensor:
        p = prec + 2 * delta * torch.outer(x[i], x[i])
        mu = torch.linalg.solve(p, prec @ w + 2 * delta * y[i] * x[i])
        sigma = torch.linalg.inv(p)
        r = query[0] @ mu - query[1]
        return r**2 + ((query[0] @ sigma) * query[0]).sum(1)

    h = 1e-4
    deriv = torch.stack([(expected_query_loss(i, h) - expected_query_loss(i, -h)) / (2 * h) for i in range(N)])
    bif_truth = -closed_form_cov(model, train, query, nbeta, gamma)
    np.testing.assert_allclose(deriv.numpy(), bif_truth, rtol=1e-5, atol=1e-9)
    res = slt.BIFResult(bif_truth, np.zeros_like(bif_truth), bif_truth, *(np.zeros(k) for k in (N, N, 4, 4)),
                        1, 1, 1, None)  # type: ignore[arg-type]
    helpful = res.top_influences(0, 3)
    assert np.all(deriv[helpful, 0].numpy() <= np.sort(deriv[:, 0].numpy())[2] + 1e-15)  # the 3 largest decreases
    assert np.all(deriv[res.top_harmful(0, 3), 0].numpy() > 0)
