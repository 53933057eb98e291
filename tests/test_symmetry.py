"""Symmetry utilities: function preservation, idempotence, orbit collapse, weight matching, barriers, errors."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import slt_tools as slt
from slt_tools.models import ResidualMLP, Transformer, TransformerConfig
from slt_tools.symmetry import (
    align,
    canonicalize,
    interpolate,
    loss_barrier,
    parameter_distance,
    permute,
    symmetry_spec,
)
from slt_tools.symmetry.canonical import _scale_units

ACTS = [nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.GELU]


def random_mlp(rng):
    widths = [int(rng.integers(2, 7))] + [int(rng.integers(3, 12)) for _ in range(rng.integers(1, 4))] + [3]
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(ACTS[int(rng.integers(len(ACTS)))]())
    return nn.Sequential(*layers), widths[0]


def symmetry_copy(model, gen, noise=0.0):
    """A random element of the model's symmetry group applied to its parameters (+ optional weight noise)."""
    spec = symmetry_spec(model)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    perms = {}
    for g in spec.heads:
        perms[g.name] = torch.randperm(g.n_heads, generator=gen)
        permute(sd, g.axes, perms[g.name])
        for h in range(g.n_heads):  # within-head regauge: W̃_Q A, W̃_K A^{-T}; W̃_V B, B^{-1} W_O
            d = sd[g.p("W_Q")].shape[-1]
            A = torch.randn(d, d, generator=gen) + 2 * torch.eye(d)
            B = torch.randn(d, d, generator=gen) + 2 * torch.eye(d)
            sd[g.p("W_Q")][h] = sd[g.p("W_Q")][h] @ A
            sd[g.p("b_Q")][h] = sd[g.p("b_Q")][h] @ A
            sd[g.p("W_K")][h] = sd[g.p("W_K")][h] @ torch.linalg.inv(A).T
            sd[g.p("b_K")][h] = sd[g.p("b_K")][h] @ torch.linalg.inv(A).T
            sd[g.p("W_V")][h] = sd[g.p("W_V")][h] @ B
            sd[g.p("b_V")][h] = sd[g.p("b_V")][h] @ B
            sd[g.p("W_O")][h] = torch.linalg.inv(B) @ sd[g.p("W_O")][h]
    for u in spec.units:
        perms[u.name] = torch.randperm(u.size, generator=gen)
        permute(sd, u.axes, perms[u.name])
        if u.gauge == "scale":
            _scale_units(sd, u, torch.rand(u.size, generator=gen) * 3 + 0.3)
        elif u.gauge == "sign":
            _scale_units(sd, u, torch.randint(0, 2, (u.size,), generator=gen).float() * 2 - 1)
    if noise:
        sd = {k: v + noise * v.std() * torch.randn(v.shape, generator=gen) for k, v in sd.items()}
    return sd, perms


def same(a, b, atol=1e-5):
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=1e-4) for k in a)


@pytest.mark.parametrize("seed", range(8))
def test_mlp_canonical_form_properties(seed):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model, d_in = random_mlp(rng)
    x = torch.randn(64, d_in)
    canon = canonicalize(model)
    clone = nn.Sequential(*[type(m)(m.in_features, m.out_features) if isinstance(m, nn.Linear) else type(m)()
                            for m in model])
    clone.load_state_dict(canon)
    assert (clone(x) - model(x)).abs().max() <= 1e-5  # function preserved
    assert same(canonicalize(clone), canon, atol=1e-6)  # idempotent
    moved, _ = symmetry_copy(model, torch.Generator().manual_seed(seed))
    clone.load_state_dict(moved)
    assert (clone(x) - model(x)).abs().max() <= 1e-4  # the copy is the same function ...
    assert same(canonicalize(clone), canon)  # ... and collapses to the same canonical parameters
    assert parameter_distance(model, clone) < 1e-4 < parameter_distance(model, clone, canonical=False)


@pytest.mark.parametrize("attn_only, act", [(True, "relu"), (False, "relu"), (False, "gelu")])
def test_transformer_canonical_form_properties(attn_only, act):
    torch.manual_seed(0)
    cfg = TransformerConfig(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=24, d_vocab=13, n_ctx=8,
                            attn_only=attn_only, act_fn=act, normalization="LN", init_std=0.3)
    model = Transformer(cfg)
    toks = torch.randint(0, 13, (6, 8))
    canon = canonicalize(model)
    other = Transformer(cfg)
    other.load_state_dict(canon)
    assert (other(toks) - model(toks)).abs().max() <= 1e-5
    assert same(canonicalize(other), canon, atol=1e-5)
    moved, _ = symmetry_copy(model, torch.Generator().manual_seed(1))
    other.load_state_dict(moved)
    assert (other(toks) - model(toks)).abs().max() <= 1e-4
    assert same(canonicalize(other), canon, atol=1e-4)


def test_residual_mlp_canonical_form():
    torch.manual_seed(0)
    model = ResidualMLP(4, 6, 10, 2, num_blocks=2)
    x = torch.randn(32, 4)
    moved, _ = symmetry_copy(model, torch.Generator().manual_seed(2))
    other = ResidualMLP(4, 6, 10, 2, num_blocks=2)
    other.load_state_dict(moved)
    assert (other(x) - model(x)).abs().max() <= 1e-5
    assert same(canonicalize(other), canonicalize(model))


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_weight_matching_recovers_planted_permutation(noise):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))
    moved, planted = symmetry_copy(model, torch.Generator().manual_seed(3), noise=noise)
    aligned, perms = align(model, moved, spec=symmetry_spec(model))
    for name, p in planted.items():  # moved unit j = original unit p[j]; matching must put each back
        inverse = torch.argsort(p).numpy()
        np.testing.assert_array_equal(perms[name], inverse)


def test_weight_matching_recovers_attention_heads():
    torch.manual_seed(0)
    cfg = TransformerConfig(n_layers=2, d_model=24, n_heads=6, d_head=4, d_vocab=17, n_ctx=8, init_std=0.3)
    model = Transformer(cfg)
    moved, planted = symmetry_copy(model, torch.Generator().manual_seed(4))
    _, perms = align(model, moved)
    for name, p in planted.items():
        np.testing.assert_array_equal(perms[name], torch.argsort(p).numpy())


def _trained_mlp(seed, x, y):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return model


def test_barrier_vanishes_after_alignment():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=gen)
    y = torch.sin(x @ torch.randn(4, 1, generator=gen))
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    model = _trained_mlp(0, x, y)
    moved, _ = symmetry_copy(model, torch.Generator().manual_seed(5))
    loss = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    before = loss_barrier(model, moved, loss, loader, num_points=11, model=model)
    aligned, _ = align(model, moved)
    reference = canonicalize(model)  # aligned is in the gauge-fixed frame; compare within it
    curve = interpolate(slt.symmetry.fix_gauges(model), aligned, loss, loader, num_points=11, model=model)
    assert before > 0.05 and curve.barrier() < 1e-4, (before, curve.barrier())
    assert curve.barrier("mean") < 1e-4 and len(reference) == len(aligned)


def test_llc_of_canonical_form_agrees():
    """Sign flips and permutations are exact symmetries of SGLD too (isotropic noise), so the LLC estimate of a tanh
    network and of its canonical form agree within chain noise."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    x = torch.randn(4000, 3)
    with torch.no_grad():
        y = teacher(x)
    loader = DataLoader(TensorDataset(x, y), batch_size=200)
    loss = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    canon = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    canon.load_state_dict(canonicalize(teacher))
    kw = {"num_chains": 6, "num_draws": 800, "num_burnin_steps": 200, "lr": 1e-4, "localization": 10.0, "seed": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = slt.estimate_llc(teacher, loader, loss, **kw)
        b = slt.estimate_llc(canon, loader, loss, **{**kw, "seed": 1})
    assert abs(a.llc_mean - b.llc_mean) < 3 * np.hypot(a.llc_sem, b.llc_sem) + 0.05 * a.llc_mean


def test_unsupported_architectures_are_named():
    with pytest.raises(ValueError, match="Conv2d"):
        symmetry_spec(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no symmetry spec for LSTM"):
        symmetry_spec(nn.LSTM(3, 4))
    with pytest.raises(ValueError, match="spec="):
        canonicalize({"w": torch.zeros(2)})
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="0.weight has 5 entries on axis 0"):
        align(model, nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).state_dict(),
              spec=symmetry_spec(model))
    with pytest.raises(ValueError, match="definition"):
        interpolate(model, model, lambda m, b: m(b[0]).sum(), [(torch.zeros(2, 3),)], 3).barrier("max")
