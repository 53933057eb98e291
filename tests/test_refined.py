"""Refined LLCs: every (restriction, chain) pair in one batched run equals each restriction sampled alone, moves only
its coordinates, estimates d_r/2 on a regular model, and refuses bad input before sampling."""
import json
import warnings

import numpy as np
import pytest
import torch
from helpers import mse, teacher_loader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import slt_tools as slt
from slt_tools.models import Transformer, TransformerConfig

R = slt.restrictions


def quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slt.estimate_refined_llc(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(n_layers=2, d_model=8, n_heads=4, d_head=2, d_vocab=7, n_ctx=6,
                                          attn_only=True, init_std=0.4))
    tokens = torch.randint(0, 7, (64, 6), generator=torch.Generator().manual_seed(1))
    return model, DataLoader(TensorDataset(tokens), batch_size=16, shuffle=True)


KW = dict(num_chains=2, num_draws=25, lr=1e-3, localization=100.0, nbeta=10.0, seed=3, mala_every=5)


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld", "sgnht"])
def test_batched_run_equals_each_restriction_alone(tiny_lm, sampler):
    """All 8 heads × 2 chains advance together; each head sampled by itself (same seed) gives the same loss traces
    and MALA acceptances to float rounding, also when the (restriction, chain) pairs are chunked unevenly."""
    model, loader = tiny_lm
    heads = R.heads(model)
    kw = {**KW, "sampler": sampler}
    together = quiet(model, loader, slt.losses.causal_lm, heads, **kw)
    chunked = quiet(model, loader, slt.losses.causal_lm, heads, chain_chunk_size=3, **kw)
    assert together.keys() == list(heads)
    for name in (["l0h1", "l1h3"] if sampler != "sgld" else list(heads)):
        alone = quiet(model, loader, slt.losses.causal_lm, heads[name], **kw)[name]
        for other in (together[name], chunked[name]):
            np.testing.assert_allclose(other.loss_trace, alone.loss_trace, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(other.llc_per_chain, alone.llc_per_chain, rtol=1e-4, atol=1e-6)
        if sampler != "sgnht":
            assert together[name].diagnostics.mala_acceptance == pytest.approx(alone.diagnostics.mala_acceptance,
                                                                               rel=1e-4)
        assert together[name].hyperparameters["num_params"] == heads[name].numel
    # different restrictions get independent noise: their traces differ
    assert not np.allclose(together["l1h0"].loss_trace, together["l1h1"].loss_trace)


def test_coordinates_outside_the_restriction_stay_exactly_at_w_star(tiny_lm):
    """In the chain loop (vectorize=False: the loss sees plain tensors) every evaluated weight equals w* exactly
    outside the sampled head's slice and moves inside it; the loop gives the vmapped run's numbers."""
    model, loader = tiny_lm
    r = R.head(model, 1, 2)
    w_star = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    def recording_loss(m, batch):
        seen.append({n: p.detach().clone() for n, p in m.named_parameters()})
        return slt.losses.causal_lm(m, batch)

    loop = quiet(model, loader, recording_loss, r, vectorize=False, **KW)
    moved = torch.zeros(())
    for params in seen:
        for n, w in params.items():
            outside = ~r.masks[n] if n in r.masks else torch.ones_like(w, dtype=torch.bool)
            assert torch.equal(w[outside], w_star[n][outside]), n
            if n in r.masks:
                moved = torch.maximum(moved, (w[r.masks[n]] - w_star[n][r.masks[n]]).abs().max())
    assert moved > 1e-3
    assert all(torch.equal(p, w_star[n]) for n, p in model.named_parameters())  # the model is not modified
    vmapped = quiet(model, loader, slt.losses.causal_lm, r, **KW)
    np.testing.assert_allclose(loop[r.name].loss_trace, vmapped[r.name].loss_trace, rtol=1e-5, atol=1e-7)


def test_lift_of_every_coordinate_is_the_plain_engine():
    """The refined engine on the restricted space is the ordinary engine: lifting θ through an index that covers
    every coordinate, with the whole-model noise seeds, reproduces the unrestricted run exactly."""
    from slt_tools.sampling.engine import run_chains
    from slt_tools.sampling.functional import FlatParams, make_loss, select_parameters
    from slt_tools.sampling.noise import chain_seed
    from slt_tools.sampling.samplers import Sampler
    from slt_tools.sampling.steps import BatchedLossGrad, scatter_lift

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    loader = teacher_loader(model, 200, 20, 3)
    layout = FlatParams.from_model(model, select_parameters(model))
    theta0, x, y = layout.flatten(model), *loader.dataset.tensors
    batches = [(x[i:i + 20], y[i:i + 20]) for i in range(0, 200, 20)] * 4
    index = torch.arange(theta0.numel()).expand(3, -1)

    def run(lift):
        grad = BatchedLossGrad(make_loss(model, layout, mse), lift=scatter_lift if lift else None)
        data = (((index, theta0), b) for b in batches) if lift else iter(batches)
        return run_chains(grad, theta0[index] if lift else theta0, data, lambda: Sampler("sgld", 1e-3, 10.0, 50.0),
                          [0, 1, 2], seed=5, num_draws=30, noise_seeds=[chain_seed(5, c) for c in range(3)] if lift
                          else None)

    torch.testing.assert_close(run(True).loss_trace, run(False).loss_trace, rtol=0, atol=0)


def test_refined_llc_of_a_regular_model_is_half_its_restricted_dimension():
    """Linear regression at its noise-free optimum is regular: sampling d_r of its coordinates (w* elsewhere) gives
    λ_r = d_r/2 — a row (5 coordinates), a scattered mask (8) and the whole matrix (20) in one batched run."""
    model = nn.Linear(5, 4, bias=False)
    loader = teacher_loader(model, 20000, 200, 5)
    scattered = torch.zeros(4, 5, dtype=torch.bool)
    scattered.view(-1)[::5] = True
    scattered[0, 1:5] = True
    rs = [R.from_spec(model, {"weight": (0,)}, name="row0"), R.from_spec(model, {"weight": scattered}, "mask8"),
          R.from_spec(model, {"weight": True}, name="all")]
    res = quiet(model, loader, mse, rs, num_chains=4, num_draws=1500, num_burnin_steps=300, lr=1e-4,
                localization=1.0, seed=0)
    for name, d in (("row0", 5), ("mask8", 8), ("all", 20)):
        assert res[name].hyperparameters["num_params"] == d
        assert abs(res[name].llc_mean - d / 2) < 0.08 * d / 2 + 2 * res[name].llc_sem, (name, res[name])


def test_result_table_and_json_round_trip(tiny_lm):
    model, loader = tiny_lm
    res = quiet(model, loader, slt.losses.causal_lm, R.heads(model, layers=[1]), **KW)
    rows = res.table()
    assert [r["restriction"] for r in rows] == ["l1h0", "l1h1", "l1h2", "l1h3"]
    assert set(rows[0]) == set(slt.sampling.refined_result.TABLE_COLUMNS)
    assert rows[2]["llc_mean"] == res["l1h2"].llc_mean and rows[2]["num_chains"] == 2
    back = slt.RefinedLLCResult.from_json(json.dumps(res.to_dict()))
    assert back.keys() == res.keys() and back.table() == rows
    np.testing.assert_array_equal(back["l1h1"].loss_trace, res["l1h1"].loss_trace)
    assert back.restrictions["l1h1"]["numel"] == R.head(model, 1, 1).numel
    assert "l1h2" in repr(res) and res.llc_means["l1h0"] == res["l1h0"].llc_mean
    with pytest.raises(KeyError, match="no restriction named 'l0h0'"):
        res["l0h0"]


def test_bad_input_is_a_value_error_before_sampling(tiny_lm):
    model, loader = tiny_lm
    heads = R.heads(model)
    run = dict(KW, num_draws=1)
    with pytest.raises(ValueError, match="do not exist"):
        R.heads(model, layers=[1], heads=[4])  # a head that does not exist
    with pytest.raises(ValueError, match="empty"):
        R.Restriction("none", {"blocks.0.attn.W_Q": torch.zeros(4, 8, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no restrictions"):
        slt.estimate_refined_llc(model, loader, slt.losses.causal_lm, {}, **run)
    overlapping = [heads["l0h0"], heads["l0h0"] | heads["l0h1"]]
    with pytest.raises(ValueError, match="share .* coordinates"):
        slt.estimate_refined_llc(model, loader, slt.losses.causal_lm, overlapping, partition=True, **run)
    wrong = R.Restriction("wrong", {"blocks.0.attn.W_Q": torch.ones(4, 8, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="has shape"):
        slt.estimate_refined_llc(model, loader, slt.losses.causal_lm, wrong, **run)
    with pytest.raises(ValueError, match="stored under the key"):
        slt.estimate_refined_llc(model, loader, slt.losses.causal_lm, {"x": heads["l0h0"]}, **run)
    with pytest.raises(ValueError, match="not restrict_to"):
        slt.estimate_refined_llc(model, loader, slt.losses.causal_lm, heads, restrict_to=["unembed.W_U"], **run)
    tokens = torch.randint(0, 7, (8, 6))
    ragged = [{"input_ids": tokens[:4]}, {"input_ids": tokens[4:, :5]}]
    with pytest.raises(ValueError, match="ragged batches: 'input_ids'"):
        slt.estimate_refined_llc(model, ragged, slt.losses.causal_lm, heads, **run)


def test_dict_batches_are_cached_and_sampled(tiny_lm):
    """{"input_ids", "attention_mask"} batches: cached on the device, minibatches drawn from the cache."""
    model, loader = tiny_lm
    tokens = loader.dataset.tensors[0]
    batches = [{"input_ids": tokens[i:i + 16], "attention_mask": torch.ones(16, 6)} for i in range(0, 64, 16)]
    res = quiet(model, batches, slt.losses.causal_lm, R.heads(model, layers=[0], heads=[1]), **KW)
    plain = quiet(model, loader, slt.losses.causal_lm, R.heads(model, layers=[0], heads=[1]), **KW)
    assert res["l0h1"].diagnostics.data_cached
    assert res.init_loss == pytest.approx(plain.init_loss, rel=1e-6)


def test_compiled_refined_run_matches_eager():
    """compile=True: one fused graph per group serves every chunk of the same size; same chains to rounding."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    loader = teacher_loader(model, 400, 40, 4)
    rows = [R.from_spec(model, {"0.weight": (i,), "0.bias": [i]}, name=f"unit{i}") for i in range(6)]
    kw = dict(num_chains=2, num_draws=30, lr=1e-3, localization=10.0, nbeta=50.0, seed=2, chain_chunk_size=4)
    eager = quiet(model, loader, mse, rows, **kw)
    compiled = quiet(model, loader, mse, rows, compile=True, **kw)
    for name in eager:
        assert compiled[name].diagnostics.compiled, compiled[name].diagnostics.compile_error
        np.testing.assert_allclose(compiled[name].loss_trace, eager[name].loss_trace, rtol=1e-4, atol=1e-7)


def test_refined_trajectory_is_resumable_and_equals_per_checkpoint_runs(tiny_lm, tmp_path):
    """llc_trajectory(restrictions=heads): one batched unit per (checkpoint, chain block); per restriction a
    Trajectory equal to estimate_refined_llc at each checkpoint; a rerun reads the store instead of sampling."""
    model, loader = tiny_lm
    gen = torch.Generator().manual_seed(4)
    ckpts = [(s, {k: v + 0.05 * s * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()})
             for s in (0, 10)]

    def factory():
        return Transformer(model.cfg)

    calls = []

    def counting_loss(m, batch):
        calls.append(1)
        return slt.losses.causal_lm(m, batch)

    kw = dict(KW, num_draws=10)
    store = tmp_path / "rllc.jsonl"
    layer1 = lambda m: R.heads(m, layers=[1])  # noqa: E731 - a builder, called on each checkpoint's model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traj = slt.llc_trajectory(ckpts, factory, loader, counting_loss, results=store, restrictions=layer1,
                                  chain_chunk_size=1, progress=False, **kw)
        assert isinstance(traj, slt.trajectory.RefinedTrajectory) and traj.keys() == ["l1h0", "l1h1", "l1h2", "l1h3"]
        m10 = factory()
        m10.load_state_dict(ckpts[1][1])
        direct = quiet(m10, loader, slt.losses.causal_lm, layer1(m10), **kw)
        np.testing.assert_allclose(traj["l1h2"].llc_mean[1], direct["l1h2"].llc_mean, rtol=1e-5)
        np.testing.assert_array_equal(traj["l1h2"].steps, [0, 10])
        n_calls = len(calls)
        again = slt.llc_trajectory(ckpts, factory, loader, counting_loss, results=store, restrictions=layer1,
                                   chain_chunk_size=1, progress=False, **kw)
        assert len(calls) == n_calls  # every unit came from the store
        np.testing.assert_array_equal(again["l1h3"].llc_mean, traj["l1h3"].llc_mean)
        back = slt.trajectory.RefinedTrajectory.from_store(store)
        np.testing.assert_array_equal(back["l1h0"].llc_mean, traj["l1h0"].llc_mean)
        assert len(back.rows()) == 2 * 4 and back.rows()[0]["restriction"] == "l1h0"
        with pytest.raises(ValueError, match="different|differ|header|settings"):
            slt.llc_trajectory(ckpts, factory, loader, counting_loss, results=store, restrictions=R.heads,
                               chain_chunk_size=1, progress=False, **kw)


def test_unset_step_size_is_calibrated_once_on_the_whole_model():
    """lr/localization left unset: calibrate_llc's choice for the whole model, used for every restriction."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    loader = teacher_loader(model, 2000, 100, 4)
    rows = [R.from_spec(model, {"0.weight": (i,), "0.bias": [i]}, name=f"unit{i}") for i in range(2)]
    res = quiet(model, loader, mse, rows, num_chains=2, num_draws=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = slt.calibrate_llc(model, loader, mse, num_chains=2, num_draws=60)
    assert res.calibration["lr"] == whole.lr == res["unit1"].hyperparameters["lr"]
    assert res.hyperparameters["localization"] == whole.localization
