"""LLC estimator: closed-form truths, chain independence, reproducibility, honesty under failure, bad input."""
import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import Monomial, dln_at, dummy_loader, jacobian_rank_half, mse, teacher_loader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import slt_tools as slt
from slt_tools.sampling.llc import LLCDivergenceError, LLCResult, combine_results, summarize


def quiet_llc(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slt.estimate_llc(*args, **kwargs)


# ---------------------------------------------------------------- closed-form truths
def test_regular_model_gives_half_the_dimension():
    """Linear regression (d = 20 parameters) at its noise-free optimum: λ = d/2 = 10."""
    model = nn.Linear(5, 4, bias=False)
    loader = teacher_loader(model, 20000, 200, 5)
    res = quiet_llc(model, loader, mse, num_chains=4, num_draws=1500, num_burnin_steps=300, lr=1e-4,
                    localization=1.0, seed=0)
    assert abs(res.llc_mean - 10.0) < 0.07 * 10.0, res
    assert res.diagnostics["stationary"]
    assert 0.5 < res.diagnostics["mala_acceptance"] <= 1.0


@pytest.mark.parametrize("k, truth", [((1,), 0.5), ((2,), 0.25)])
def test_monomial_learning_coefficients(k, truth):
    """K(w) = w^{2k} at w* = 0: λ = 1/(2k). In one dimension this holds at every nβ, not just asymptotically:
    under p(w) ∝ exp(−nβ w^{2k}), E[nβ w^{2k}] = 1/(2k) (a Gamma integral)."""
    model = Monomial(k)
    res = quiet_llc(model, dummy_loader(1000), lambda m, b: m(), num_chains=64, num_draws=4000,
                    num_burnin_steps=2000, lr=5e-5, localization=1.0, nbeta=1e3, seed=1, mala_every=0)
    assert abs(res.llc_mean - truth) < 0.15 * truth, (k, res)


@pytest.mark.parametrize("cut, truth", [((1,), 14.5), ((0,), 19.0)])
def test_dln_local_learning_coefficient(cut, truth):
    """DLN (9,4,6), product rank 1, noise-free data (w* is an exact minimum).

    Cut in the last layer: rank(J)/2 = Aoyagi's global λ = 29/2. Cut in the first layer: a Morse–Bott point whose
    local value rank(J)/2 = 19 exceeds the global 29/2 — the estimator must find the local value.
    """
    model = dln_at((9, 4, 6), 1, cut)
    assert jacobian_rank_half(model) == truth
    loader = teacher_loader(model, 50000, 500, 9)
    res = quiet_llc(model, loader, mse, num_chains=8, num_draws=3000, num_burnin_steps=1500, lr=5e-6,
                    localization=1.0, seed=0)
    # per-chain scatter is ≈ 1.3 here: the bound is 8 % or 3 standard errors of the 8-chain mean, whichever is larger
    assert abs(res.llc_mean - truth) < max(0.08 * truth, 3 * res.llc_sem), res


def test_restricted_llc_is_the_submodel_truth():
    """Only the last layer of DLN (9,4,6) moves: f = W_2·(W_1 x) is linear regression in W_2 with
    rank(W_1) = 4 identifiable input directions, so λ = 6·4/2 = 12 (the other directions of W_2 are flat)."""
    model = dln_at((9, 4, 6), 1, (1,))
    loader = teacher_loader(model, 50000, 500, 9)
    # 1500 draws after 300 burn-in steps read 3-6 % low on average over seeds (the flat directions of W_2 relax
    # slowly); 3000 after 1000 are within 5 % for seeds 0-5
    res = quiet_llc(model, loader, mse, num_chains=8, num_draws=3000, num_burnin_steps=1000, lr=5e-6,
                    localization=1.0, seed=0, restrict_to=["layers.1.weight"])
    assert res.hyperparameters["num_params"] == 24
    assert abs(res.llc_mean - 12.0) < 0.08 * 12.0, res
    pred = quiet_llc(model, loader, mse, num_chains=2, num_draws=50, lr=5e-6, localization=1.0, seed=0,
                     restrict_to=lambda name: name.startswith("layers.1"))
    assert pred.hyperparameters["restrict_to"] == ["layers.1.weight"]


@pytest.mark.parametrize("sampler, kwargs", [("rmsprop_sgld", {}), ("sgnht", {})])
def test_other_samplers_on_regular_model(sampler, kwargs):
    model = nn.Linear(5, 4, bias=False)
    loader = teacher_loader(model, 20000, 200, 5)
    lr = 1e-4 if sampler == "sgnht" else 1e-5
    res = quiet_llc(model, loader, mse, num_chains=4, num_draws=2000, num_burnin_steps=500, lr=lr,
                    localization=1.0, seed=0, sampler=sampler, sampler_kwargs=kwargs)
    assert abs(res.llc_mean - 10.0) < 0.1 * 10.0, (sampler, res)


def test_sgnht_thermostat_is_applied():
    """The thermostat must move: ξ adapts so that the kinetic energy ‖p‖²/D tracks 1."""
    from slt_tools.sampling.samplers import Sampler, update

    s = Sampler("sgnht", lr=1e-2, localization=1.0, nbeta=1.0)
    theta = torch.zeros(2, 50)
    s.init_state(theta, torch.randn(2, 50) * 3.0)  # far too hot
    xi0 = s.state["xi"].clone()
    _, state = update("sgnht", theta, torch.zeros(50), torch.zeros(2, 50), torch.zeros(2, 50), s.state,
                      s.hyperparameters())
    assert (state["xi"] > xi0).all()


# ---------------------------------------------------------------- structure and reproducibility
@pytest.fixture(scope="module")
def small_problem():
    model = dln_at((4, 3, 4), 1, (1,))
    return model, teacher_loader(model, 2000, 100, 4)


def test_seed_reproducible_and_chains_independent(small_problem):
    model, loader = small_problem
    kw = dict(num_chains=4, num_draws=100, lr=1e-4, localization=10.0, seed=3)
    a = quiet_llc(model, loader, mse, **kw)
    b = quiet_llc(model, loader, mse, **kw)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    c = quiet_llc(model, loader, mse, **{**kw, "seed": 4})
    assert not np.allclose(a.loss_trace, c.loss_trace)
    # chains differ from each other (independent noise streams)
    assert np.corrcoef(a.loss_trace)[0, 1] < 0.9
    # chain blocks and subsets reproduce the same chains
    chunked = quiet_llc(model, loader, mse, **kw, chain_chunk_size=3)
    np.testing.assert_allclose(chunked.loss_trace, a.loss_trace, rtol=1e-5, atol=1e-9)
    sub = quiet_llc(model, loader, mse, **{**kw, "chain_ids": [2, 3]})
    np.testing.assert_allclose(sub.loss_trace, a.loss_trace[2:], rtol=1e-5, atol=1e-9)
    merged = combine_results([quiet_llc(model, loader, mse, **{**kw, "chain_ids": [0, 1]}), sub])
    np.testing.assert_allclose(merged.llc_per_chain, a.llc_per_chain, rtol=1e-5)
    assert merged.llc_mean == pytest.approx(a.llc_mean, rel=1e-5)
    # the Stein step-bias bound is per chain too: the merged blocks give the one-run bound
    assert merged.diagnostics.step_bias_bound == pytest.approx(a.diagnostics.step_bias_bound, rel=1e-4)


def test_model_is_not_modified(small_problem):
    model, loader = small_problem
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quiet_llc(model, loader, mse, num_chains=2, num_draws=50, lr=1e-4, localization=10.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_loop_fallback_matches_vmap(small_problem):
    model, loader = small_problem
    kw = dict(num_chains=3, num_draws=60, lr=1e-4, localization=10.0, seed=0)
    a = quiet_llc(model, loader, mse, **kw)
    b = quiet_llc(model, loader, mse, **kw, vectorize=False)
    assert b.diagnostics["vectorized"] is False
    np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=1e-4, atol=1e-9)


class NotVmappable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        if self.lin.weight.sum().item() > 1e9:  # data-dependent Python control flow
            return x[:, :2]
        return self.lin(x)


def test_unvmappable_model_falls_back_with_warning():
    model = NotVmappable()
    loader = teacher_loader(model, 500, 50, 3)
    with pytest.warns(RuntimeWarning, match="could not be vmapped"):
        res = slt.estimate_llc(model, loader, mse, num_chains=2, num_draws=30, lr=1e-5, localization=10.0)
    assert res.diagnostics["vectorized"] is False and math.isfinite(res.llc_mean)


def test_nbeta_conventions(small_problem):
    model, loader = small_problem
    res = quiet_llc(model, loader, mse, num_chains=2, num_draws=20, lr=1e-4, localization=10.0)
    assert res.hyperparameters["nbeta"] == pytest.approx(2000 / math.log(2000))
    res = quiet_llc(model, loader, mse, num_chains=2, num_draws=20, lr=1e-4, localization=10.0,
                    nbeta_convention="batch")
    assert res.hyperparameters["nbeta"] == pytest.approx(100 / math.log(100))


def test_result_json_round_trip(small_problem):
    model, loader = small_problem
    res = quiet_llc(model, loader, mse, num_chains=2, num_draws=20, lr=1e-4, localization=10.0)
    text = res.to_json()
    json.loads(text)  # strict JSON
    back = LLCResult.from_json(text)
    assert back.llc_mean == pytest.approx(res.llc_mean)
    np.testing.assert_allclose(back.loss_trace, res.loss_trace)
    assert back.hyperparameters == res.hyperparameters


# ---------------------------------------------------------------- honesty under failure
def test_divergence_raises(small_problem):
    model, loader = small_problem
    with pytest.raises(LLCDivergenceError, match="diverged"):
        quiet_llc(model, loader, mse, num_chains=2, num_draws=300, lr=10.0, localization=1.0)


def _hp():
    return dict(nbeta=100.0, explode_threshold=100.0, lr=1e-3)


def test_diverged_chains_excluded_on_request():
    rng = np.random.default_rng(0)
    trace = 0.01 + 0.001 * rng.standard_normal((4, 200))
    trace[1, 150:] = np.nan
    trace[2, 100:] = 1e4  # exploding but finite
    with pytest.raises(LLCDivergenceError):
        summarize(trace, 0.0, _hp(), [0, 1, 2, 3])
    with pytest.warns(RuntimeWarning, match="excluded"):
        res = summarize(trace, 0.0, _hp(), [0, 1, 2, 3], on_divergence="exclude")
    assert res.diagnostics["excluded_chains"] == [1, 2]
    assert math.isfinite(res.llc_mean) and res.llc_mean == pytest.approx(1.0, rel=0.05)
    assert np.isnan(res.llc_per_chain[[1, 2]]).all()


def test_negative_and_unsettled_estimates_warn():
    t = np.linspace(0, 1, 400)
    with pytest.warns(RuntimeWarning, match="< 0"):
        summarize(np.tile(-0.01 + 0.0 * t, (3, 1)) + 1e-4 * np.random.default_rng(0).standard_normal((3, 400)),
                  0.0, _hp(), [0, 1, 2])
    drifting = np.tile(0.01 + 0.05 * t, (3, 1)) + 1e-4 * np.random.default_rng(1).standard_normal((3, 400))
    with pytest.warns(RuntimeWarning, match="not settled"):
        res = summarize(drifting, 0.0, _hp(), [0, 1, 2])
    assert res.diagnostics["stationary"] is False


# ---------------------------------------------------------------- bad input
def test_bad_input_errors(small_problem):
    model, loader = small_problem
    empty = DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, 4)), batch_size=10)
    base = dict(num_chains=2, num_draws=10, lr=1e-4, localization=1.0)
    with pytest.raises(ValueError, match="empty"):
        slt.estimate_llc(model, empty, mse, **base)
    with pytest.raises(ValueError, match="scalar"):
        slt.estimate_llc(model, loader, lambda m, b: (m(b[0]) - b[1]) ** 2, **base)
    frozen = dln_at((4, 3, 4), 1, (1,)).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        slt.estimate_llc(frozen, loader, mse, **base)
    with pytest.raises(ValueError, match="unknown"):
        slt.estimate_llc(model, loader, mse, **base, restrict_to=["nope.weight"])
    for bad in (dict(lr=-1.0), dict(lr=0.0), dict(localization=-1.0), dict(num_chains=0), dict(num_draws=0),
                dict(nbeta=0.0)):
        with pytest.raises(ValueError):
            slt.estimate_llc(model, loader, mse, **{**base, **bad})
    with pytest.raises(ValueError, match="sampler"):
        slt.estimate_llc(model, loader, mse, **base, sampler="hmc")


def test_tensor_dataset_fast_path_matches_batchwise_cache(small_problem):
    """A DataLoader over a TensorDataset is cached from the dataset's tensors directly; any other loader over the
    same data is cached batch by batch. Both must give bit-identical chains (and honour drop_last)."""
    model, loader = small_problem
    x, y = loader.dataset.tensors
    kw = dict(num_chains=2, num_draws=40, lr=1e-4, localization=10.0, seed=1)
    fast = quiet_llc(model, DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True), mse, **kw)
    pairs = [(x[i], y[i]) for i in range(len(x))]  # a plain list dataset: batches collated one by one
    slow = quiet_llc(model, DataLoader(pairs, batch_size=100, shuffle=True), mse, **kw)
    np.testing.assert_array_equal(fast.loss_trace, slow.loss_trace)
    assert fast.init_loss == slow.init_loss
    dropped = quiet_llc(model, DataLoader(TensorDataset(x[:1050], y[:1050]), batch_size=100, drop_last=True), mse,
                        **kw)
    assert dropped.hyperparameters["num_samples"] == 1000


def test_overdispersed_start_contracts_and_is_reproducible(small_problem):
    """init_spread > 0: chains start away from w* (no farther than s·u), the first drift step contracts, the start
    is a function of (seed, chain) alone, and burn-in brings the chains back to the same λ̂ as chains from w*."""
    from slt_tools.sampling.engine import NoisePool, overdispersed_start
    from slt_tools.sampling.functional import FlatParams, make_loss
    from slt_tools.sampling.samplers import Sampler
    from slt_tools.sampling.steps import BatchedLossGrad

    model, loader = small_problem
    kw = dict(num_chains=4, num_draws=400, num_burnin_steps=400, lr=1e-4, localization=10.0, seed=2)
    a = quiet_llc(model, loader, mse, init_spread=0.3, **kw)
    b = quiet_llc(model, loader, mse, init_spread=0.3, **{**kw, "chain_ids": [2, 3]})
    np.testing.assert_allclose(b.loss_trace, a.loss_trace[2:], rtol=1e-5, atol=1e-9)
    dist = np.array(a.diagnostics["start_distance"])
    assert (dist > 0).all() and a.hyperparameters["init_spread"] == 0.3
    inside = quiet_llc(model, loader, mse, **kw)
    assert abs(a.llc_mean - inside.llc_mean) < 3 * math.hypot(a.llc_sem, inside.llc_sem) + 0.1 * inside.llc_mean

    names = [n for n, _ in model.named_parameters()]
    layout = FlatParams.from_model(model, names)
    theta0 = layout.flatten(model)
    grad = BatchedLossGrad(make_loss(model, layout, mse))
    batch = next(iter(loader))
    sampler = Sampler("sgld", lr=1e-2, localization=1.0, nbeta=1e4)  # a step far too large for a far start
    u = NoisePool([0, 1, 2], 0, theta0.numel(), theta0.device, theta0.dtype)().clone() * 3.0
    start = overdispersed_start(grad, theta0, batch, sampler, u)
    disp = start - theta0
    _, g = grad(start, batch)
    assert (disp.norm(dim=1) < u.norm(dim=1)).all()  # shrunk …
    assert (sampler.first_move(start, theta0, g) <= 0.5 * disp.norm(dim=1)).all()  # … until the first step contracts
    with pytest.raises(ValueError, match="init_spread"):
        slt.estimate_llc(model, loader, mse, lr=1e-4, localization=1.0, init_spread=-1.0)


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld", "sgnht"])
def test_compiled_steps_match_eager(small_problem, sampler):
    """compile=True fuses loss, gradient and update rule into one graph: the same chains to float rounding, for every
    rule, with MALA steps (which reuse the graph at the proposal) in between. Observables (issue 20) are evaluated
    eagerly at the compiled run's draws: their statistics equal the eager run's to float rounding too."""
    model, loader = small_problem
    probe = next(iter(loader))
    obs = {"probe": lambda m: ((m(probe[0]) - probe[1]) ** 2).mean(-1), "norm": lambda m: m.layers[0].weight.norm()}
    kw = dict(num_chains=3, num_draws=40, lr=1e-4, localization=10.0, seed=0, sampler=sampler, mala_every=7,
              observables=obs)
    eager = quiet_llc(model, loader, mse, **kw)
    compiled = quiet_llc(model, loader, mse, compile=True, **kw)
    assert compiled.diagnostics["compiled"], compiled.diagnostics["compile_error"]
    np.testing.assert_allclose(compiled.loss_trace, eager.loss_trace, rtol=1e-4, atol=1e-7)
    for name, st in eager.observables.items():
        got = compiled.observables[name]
        np.testing.assert_allclose(got.mean, st.mean, rtol=1e-4)
        np.testing.assert_allclose(got.var, st.var, rtol=1e-2, atol=1e-12)
        np.testing.assert_allclose(got.cov_with_loss, st.cov_with_loss, rtol=1e-2,
                                   atol=1e-3 * np.abs(st.cov_with_loss).max())
    assert compiled.llc_mean == pytest.approx(eager.llc_mean, rel=1e-3)
    if sampler != "sgnht":
        assert compiled.diagnostics["mala_acceptance"] == pytest.approx(eager.diagnostics["mala_acceptance"],
                                                                        rel=1e-3)


def test_graph_rewrites_are_exact():
    """The compiled step's post-grad rewrites (one-hot scatter of cross-entropy's gradient under vmap, transposed
    narrow batched matmuls) apply to the graphs batched chains produce and leave their values unchanged."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    from slt_tools.sampling.compiled import rewrite_graph

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=gen), torch.randint(0, 50, (64,), generator=gen)
    W1, W2 = torch.randn(8, 16, 50, generator=gen), torch.randn(8, 50, 10, generator=gen)

    def step(W1, W2, x, y):
        def total(W1, W2):
            def loss(w1, w2):
                h = x @ w1
                return torch.nn.functional.cross_entropy(h, y) + (h @ w2).pow(2).mean()
            return torch.vmap(loss)(W1, W2).sum()
        return torch.func.grad(total, argnums=(0, 1))(W1, W2)

    gm = make_fx(step, decomposition_table=select_decomp_table(), tracing_mode="fake")(W1, W2, x, y)
    counts = rewrite_graph(gm.graph)
    gm.graph.lint()
    gm.recompile()
    assert counts == {"one_hot_scatter_add": 1, "narrow_bmm_first": 2}, counts
    assert not any(n.target is torch.ops.aten.scatter_add.default for n in gm.graph.nodes)
    for got, want in zip(gm(W1, W2, x, y), step(W1, W2, x, y)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compiled_cross_entropy_matches_eager():
    """A classifier with cross-entropy (the loss whose gradient the one-hot rewrite touches), compiled and eager."""
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5))
    x = torch.randn(600, 6, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    loader = DataLoader(TensorDataset(x, y), batch_size=60, shuffle=True)

    def xent(m, batch):
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    kw = dict(num_chains=3, num_draws=40, lr=1e-4, localization=10.0, seed=0, mala_every=0)
    eager = quiet_llc(model, loader, xent, **kw)
    compiled = quiet_llc(model, loader, xent, compile=True, **kw)
    assert compiled.diagnostics["compiled"], compiled.diagnostics["compile_error"]
    np.testing.assert_allclose(compiled.loss_trace, eager.loss_trace, rtol=1e-4, atol=1e-7)


def test_compiled_graph_choice_survives_skipped_guards():
    """Compiled loops skip torch.compile's guards after their first step: runs that alternate between models of one
    class with other shapes, chain counts and step sizes must still pick the right graph (= the eager answer)."""
    small, big = dln_at((4, 3, 4), 1, (1,)), dln_at((5, 4, 3, 5), 2, (1,))
    problems = [(small, teacher_loader(small, 2000, 100, 4), 3, 1e-4), (big, teacher_loader(big, 1000, 50, 5), 2, 5e-5),
                (small, teacher_loader(small, 2000, 100, 4), 2, 2e-4)]
    for model, loader, chains, lr in problems + problems[:1]:
        kw = dict(num_chains=chains, num_draws=30, lr=lr, localization=10.0, seed=1)
        compiled = quiet_llc(model, loader, mse, compile=True, **kw)
        np.testing.assert_allclose(compiled.loss_trace, quiet_llc(model, loader, mse, **kw).loss_trace,
                                   rtol=1e-4, atol=1e-7)


def test_guard_skipping_ends_with_the_loop(small_problem):
    """The guard-skipping stance is scoped to the sampling loop, also when the loop is interrupted by an error."""
    import torch._dynamo.eval_frame as eval_frame

    from slt_tools.sampling.engine import run_chains
    from slt_tools.sampling.functional import FlatParams, make_loss, select_parameters
    from slt_tools.sampling.samplers import Sampler
    from slt_tools.sampling.steps import BatchedLossGrad

    model, loader = small_problem
    layout = FlatParams.from_model(model, select_parameters(model))
    loss_grad = BatchedLossGrad(make_loss(model, layout, mse), compile=True)
    x, y = loader.dataset.tensors

    def batches(fail_after):
        for _ in range(fail_after):
            yield x[:100], y[:100]
        raise RuntimeError("data source broke")

    def run(fail_after):
        return run_chains(loss_grad, layout.flatten(model), batches(fail_after),
                          lambda: Sampler("sgld", 1e-4, 10.0, 100.0), [0, 1], seed=0, num_draws=10, fixed_shapes=True)

    assert run(20).steps_run == 10 and loss_grad.compiled
    assert not eval_frame._stance.skip_guard_eval_unsafe
    with pytest.raises(RuntimeError, match="data source broke"):
        run(5)
    assert not eval_frame._stance.skip_guard_eval_unsafe



def _pinning_run(loss_fn, batches, model, mala_every=0, steps=30, restrict_to=None):
    """(loss trace, dynamo-path calls, pin_error) of a compiled fixed-shape loop, and the eager loop's trace."""
    from slt_tools.sampling.engine import run_chains
    from slt_tools.sampling.functional import FlatParams, make_loss, select_parameters
    from slt_tools.sampling.samplers import Sampler
    from slt_tools.sampling.steps import BatchedLossGrad

    layout = FlatParams.from_model(model, select_parameters(model, restrict_to))
    out = {}
    for compiled in (False, True):
        loss_grad = BatchedLossGrad(make_loss(model, layout, loss_fn), compile=compiled)
        calls: list[int] = []
        if compiled:
            path = loss_grad.compiled_path
            path.fn = lambda *a, f=path.fn, log=calls: log.append(1) or f(*a)
        res = run_chains(loss_grad, layout.flatten(model), itertools.cycle(batches),
                         lambda: Sampler("sgld", 1e-4, 10.0, 100.0), [0, 1, 2], seed=0, num_draws=steps,
                         mala_every=mala_every, fixed_shapes=True)
        out[compiled] = (res.loss_trace.numpy(), len(calls), loss_grad.pin_error)
    np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-4, atol=1e-7)
    return out[True][1:]


def test_pinned_compiled_steps(small_problem):
    """After its first step, a compiled fixed-shape loop calls the step's graph directly (no torch.compile frame
    machinery) — including the MALA proposals and a restricted LLC, whose frozen weights are inputs of the graph but
    not of the step — with the eager answer."""
    model, loader = small_problem
    x, y = loader.dataset.tensors
    batches = [(x[i:i + 100].clone(), y[i:i + 100].clone()) for i in range(0, 2000, 100)]
    assert _pinning_run(mse, batches, model) == (1, None)
    assert _pinning_run(mse, batches, model, mala_every=7) == (1, None)
    assert _pinning_run(mse, batches, model, restrict_to=["layers.0.weight"]) == (1, None)


def test_pinning_refuses_what_it_cannot_place(small_problem):
    """Steps split by a graph break, or a batch that passes one tensor twice, are not pinned (every step then goes
    through torch.compile) and still give the eager answer."""
    model, loader = small_problem
    x, y = loader.dataset.tensors

    def broken(m, batch):
        out = m(batch[0])
        torch._dynamo.graph_break()
        return ((out - batch[1]) ** 2).mean()

    batches = [(x[i:i + 100].clone(), y[i:i + 100].clone()) for i in range(0, 1000, 100)]
    calls, why = _pinning_run(broken, batches, model, steps=10)
    assert calls == 10 and why  # (inside vmap and grad the break leaves the functorch part eager: no graph output)
    twice = [(b, b) for b, _ in batches]  # (x, x): an autoencoder-style batch holding one tensor in two places
    calls, why = _pinning_run(mse, twice, model, steps=10)
    assert calls == 10 and "2 of the step's inputs" in why


def test_loop_stops_when_every_chain_has_diverged(small_problem):
    """The engine stops at the first divergence check after every chain's loss is non-finite; the draws recorded up to
    there stay in the trace (the first one finite) and the rest are NaN."""
    from slt_tools.sampling.engine import run_chains
    from slt_tools.sampling.functional import FlatParams, make_loss, select_parameters
    from slt_tools.sampling.samplers import Sampler
    from slt_tools.sampling.steps import BatchedLossGrad

    model, loader = small_problem
    layout = FlatParams.from_model(model, select_parameters(model))
    x, y = loader.dataset.tensors
    out = run_chains(BatchedLossGrad(make_loss(model, layout, mse)), layout.flatten(model),
                     itertools.repeat((x[:100], y[:100])), lambda: Sampler("sgld", 1.0, 10.0, 1e4), [0, 1], seed=0,
                     num_draws=400, check_every=8, mala_every=0)
    trace = out.loss_trace.numpy()
    assert out.steps_run < 400 and out.steps_run % 8 == 0
    assert np.isfinite(trace[:, 0]).all() and not np.isfinite(trace[:, out.steps_run - 1]).any()
    assert np.isnan(trace[:, out.steps_run:]).all()


def test_default_burnin_is_the_flat_directions_relaxation_time_capped_by_the_run():
    """num_burnin_steps unset: min(4/(εγ), sampling steps) once ε and γ are known; 0 stays 0 (devinterp's default)."""
    assert slt.LLCConfig(lr=1e-4, localization=100.0, num_draws=1000).num_burnin_steps == 400
    assert slt.LLCConfig(lr=5e-7, localization=1.0, num_draws=200, num_steps_bw_draws=2).num_burnin_steps == 400
    assert slt.LLCConfig(lr=1e-4, localization=100.0, num_burnin_steps=0).num_burnin_steps == 0
    assert slt.LLCConfig(lr=1e-4).num_burnin_steps is None  # γ left to calibration: decided there
    assert slt.LLCConfig(lr=1e-4, localization=0.0, num_draws=300).num_burnin_steps == 300


def test_rank_normalized_rhat_sees_distributions_not_outliers():
    """Vehtari et al. (2021) R̂: invariant under a monotone transform of the draws; ≈ 1 for iid chains; > 1.1 for
    chains that differ in location even when one huge draw inflates the within-chain variance and hides the shift
    from plain split-R̂, and — through the folded draws — for chains that differ only in scale."""
    from slt_tools.sampling.diagnostics import rank_normalized_split_rhat, split_rhat

    rng = np.random.default_rng(0)
    iid = rng.normal(size=(4, 1000))
    r = rank_normalized_split_rhat(iid)
    assert r < 1.01 and r == pytest.approx(rank_normalized_split_rhat(np.exp(iid)), abs=1e-12)
    shifted = iid + np.array([[0.0], [0.0], [0.0], [1.0]])
    assert rank_normalized_split_rhat(shifted) > 1.1
    spiked = shifted.copy()
    spiked[0, 10] = 1e4  # one heavy-tailed draw
    assert split_rhat(spiked) < 1.05 and rank_normalized_split_rhat(spiked) > 1.1
    scaled = iid * np.array([[1.0], [1.0], [1.0], [4.0]])
    assert split_rhat(scaled) < 1.05 and rank_normalized_split_rhat(scaled) > 1.1
