"""The head-factored refined step (slt_tools.sampling.refined_heads) is the plain lift's loss, regrouped: the same
layer output, losses and gradients to float rounding, the same chains, and only where it applies."""
import warnings

import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import slt_tools as slt
from slt_tools.models import Transformer, TransformerConfig
from slt_tools.models.transformer import HEAD_SHAPES, moving_head
from slt_tools.sampling.refined import RefinedProblem
from slt_tools.sampling.refined_heads import factored_lift
from slt_tools.sampling.steps import BatchedLossGrad, scatter_lift

R = slt.restrictions


@pytest.fixture(scope="module", params=["ln_mlp", "attn_only", "mlp"])
def lm(request):
    """Two layers with LayerNorms and MLPs, so the factored layer has a nonlinear model around it; two
    attention-only layers without LayerNorm, the plain residual stream around the factored layer (carried in
    low-rank form from it to the unembedding); and MLPs without LayerNorm (the low-rank stream enters an MLP)."""
    torch.manual_seed(0)
    extra = {"ln_mlp": dict(attn_only=False, d_mlp=12, normalization="LN"),
             "attn_only": dict(attn_only=True, normalization=None),
             "mlp": dict(attn_only=False, d_mlp=12, normalization=None)}[request.param]
    model = Transformer(TransformerConfig(n_layers=2, d_model=8, n_heads=4, d_head=2, d_vocab=7, n_ctx=6,
                                          init_std=0.4, **extra))
    tokens = torch.randint(0, 7, (48, 6), generator=torch.Generator().manual_seed(1))
    return model, DataLoader(TensorDataset(tokens), batch_size=16, shuffle=True)


def test_moving_head_is_the_forward_at_the_moved_weights(lm):
    """attn(x) at w* with head 2's slices replaced by random tensors = the moving_head forward (own heads from w*,
    head 2 from the new tensors), and keep = 1 moves nothing."""
    model, _ = lm
    attn = model.blocks[1].attn
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    star = {k: getattr(attn, k).detach() for k in HEAD_SHAPES}
    new = {k: torch.randn(v[2].shape) for k, v in star.items()}
    moved = {k: v.clone() for k, v in star.items()}
    for k in HEAD_SHAPES:
        moved[k][2] = new[k]
    want = functional_call(attn, moved, (x,))
    keep = torch.tensor([1.0, 1.0, 0.0, 1.0])
    with moving_head(attn, keep, new, star):
        got = attn(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want, attn(x), atol=1e-3)          # the head did move, and the override ended
    with pytest.raises(ValueError, match="n_heads"):
        with moving_head(attn, torch.ones(3), new, star):
            pass


@pytest.mark.parametrize("layer", [0, 1])
def test_logits_with_a_moved_head_are_the_model_at_the_moved_weights(lm, layer, monkeypatch):
    """The whole model's logits under moving_head on either layer (with LayerNorms and MLPs, attention-only
    without LayerNorm, MLPs without LayerNorm) = the model at the moved weights; without LayerNorm the residual
    stream leaves the moved layer in low-rank form (rank 2·d_head) and the next linear maps take it as such; the
    override ends with the block."""
    from slt_tools.models import transformer as T

    model, _ = lm
    attn = model.blocks[layer].attn
    tokens = torch.randint(0, 7, (3, 6), generator=torch.Generator().manual_seed(4))
    star = {k: getattr(attn, k).detach() for k in HEAD_SHAPES}
    new = {k: torch.randn(v[1].shape, generator=torch.Generator().manual_seed(5)) for k, v in star.items()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k in HEAD_SHAPES:
        params[f"blocks.{layer}.attn.{k}"][1] = new[k]
    want = functional_call(model, params, (tokens,))
    ranks = []
    for name in ("__matmul__", "per_head"):      # the linear maps that take the stream in low-rank form
        method = getattr(T.LowRank, name)
        monkeypatch.setattr(T.LowRank, name, lambda x, w, f=method: ranks.append(x.left.shape[-1]) or f(x, w))
    with moving_head(attn, torch.tensor([1.0, 0.0, 1.0, 1.0]), new, star):
        got = model(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, model(tokens), atol=1e-3)
    low_rank = model.cfg.normalization is None
    assert bool(ranks) == low_rank and set(ranks) <= {2 * model.cfg.d_head}


def _step(group, factored, k, gen):
    """(losses, grads) of one batched step of k pairs at w*[idx] + noise, by the plain or the factored lift."""
    rows = torch.arange(k) % len(group.names)
    index = group.index[rows]
    theta = group.theta0[index] + 0.3 * torch.randn(index.shape, generator=gen)
    if factored:
        step, context = BatchedLossGrad(group.factored.loss_at, lift=factored_lift), (index, group.theta0,
                                                                                       group.factored.keep[rows])
    else:
        step, context = BatchedLossGrad(group.loss_at, lift=scatter_lift), (index, group.theta0)
    return step, context, theta


def test_factored_step_equals_the_plain_lift_and_applies_only_to_whole_heads(lm):
    """Per group — every head of each layer, and heads restricted to their W_Q/W_O slices (the other slices from
    w*) — losses and gradients of the factored step equal the plain lift's; a layer restriction and half a head
    take the plain path."""
    model, loader = lm
    qo = {f"qo{h}": R.from_spec(model, {"blocks.0.attn.W_Q": (h,), "blocks.0.attn.W_O": (h,)}, name=f"qo{h}")
          for h in (1, 3)}
    half = R.from_spec(model, {"blocks.1.attn.W_Q": (0, slice(None), slice(0, 1))}, name="half")
    rs = {**R.heads(model), **qo, "half": half, **R.layers(model)}
    problem = RefinedProblem.build(model, loader, slt.losses.causal_lm, rs)
    plain = RefinedProblem.build(model, loader, slt.losses.causal_lm, rs, factor_heads=False)
    assert all(g.factored is None for g in plain.groups)
    factored = {n for g in problem.groups if g.factored is not None for n in g.names}
    assert factored == set(R.heads(model)) | set(qo)
    batch = next(problem.base.data.stream(0))
    gen = torch.Generator().manual_seed(3)
    for group in problem.groups:
        if group.factored is None:
            continue
        assert group.factored.heads == [int(n[-1]) for n in group.names]
        for k in (1, 5):
            step, context, theta = _step(group, True, k, gen)
            got = step(theta, (context, batch))
            ref_step, ref_context, _ = _step(group, False, k, gen)
            want = ref_step(theta, (ref_context, batch))
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
            assert want[1].abs().max() > 1e-3


def test_factored_run_gives_the_plain_runs_chains(lm):
    """estimate_refined_llc with and without the factored step: the same loss traces and observables (evaluated at
    the pair's full weights: only head h's entry of W_Q[:, 0, 0] moves) to float rounding."""
    model, loader = lm
    heads = R.heads(model, layers=[0])
    kw = dict(num_chains=2, num_draws=12, lr=1e-3, localization=100.0, nbeta=10.0, seed=1, mala_every=4,
              chain_chunk_size=3, observables={"wq": lambda m: m.blocks[0].attn.W_Q[:, 0, 0]}, keep_draws=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = slt.estimate_refined_llc(model, loader, slt.losses.causal_lm, heads, **kw)
        plain = slt.estimate_refined_llc(model, loader, slt.losses.causal_lm, heads, factor_heads=False, **kw)
    for name in heads:
        assert fast[name].diagnostics["head_factored"] and not plain[name].diagnostics["head_factored"]
        np.testing.assert_allclose(fast[name].loss_trace, plain[name].loss_trace, rtol=1e-5, atol=1e-7)
        assert fast[name].diagnostics.mala_acceptance == pytest.approx(plain[name].diagnostics.mala_acceptance,
                                                                       rel=1e-4)
        got, want = fast[name].observables["wq"].draws, plain[name].observables["wq"].draws
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        h = int(name[-1])
        w_star = model.blocks[0].attn.W_Q[:, 0, 0].detach().numpy()
        others = np.delete(got, h, axis=-1)
        np.testing.assert_array_equal(others, np.broadcast_to(np.delete(w_star, h), others.shape))
        assert np.abs(got[..., h] - w_star[h]).max() > 1e-4
