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


pytestmark = pytest.mark.usefixtures("one_thread")


def random_mlp(rng):
    widths = [int(rng.integers(2, 7))] + [int(rng.integers(3, 12)) for _ in range(rng.integers(1, 4))] + [3]
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(ACTS[int(rng.integers(len(ACTS)))]())
    return nn.Sequential(*layers), widths[0]


def symmetry_copy(model, gen, noise=0.0, spec=None):
    """A random element of the model's symmetry group applied to its parameters (+ optional weight noise)."""
    spec = spec or symmetry_spec(model)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    perms = {}
    for u in spec.residual:
        perms[u.name] = torch.randperm(u.size, generator=gen)
        permute(sd, u.axes, perms[u.name])
    for g in spec.heads:
        perms[g.name] = torch.randperm(g.n_heads, generator=gen)
        permute(sd, g.axes, perms[g.name])
        d = sd[g.p("W_Q")].shape[-1]
        for h in range(g.n_heads):  # within-head regauge: W̃_Q A, W̃_K A^{-T}; W̃_V B, B^{-1} W_O (A, B invertible)
            A = torch.linalg.matrix_exp(0.7 * torch.randn(d, d, generator=gen, dtype=torch.float64))
            B = torch.linalg.matrix_exp(0.7 * torch.randn(d, d, generator=gen, dtype=torch.float64))
            for key, M in (("W_Q", A), ("b_Q", A), ("W_K", torch.linalg.inv(A).T), ("b_K", torch.linalg.inv(A).T),
                           ("W_V", B), ("b_V", B)):
                sd[g.p(key)][h] = (sd[g.p(key)][h].double() @ M).float()
            sd[g.p("W_O")][h] = (torch.linalg.inv(B) @ sd[g.p("W_O")][h].double()).float()
    for u in spec.units:
        perms[u.name] = torch.randperm(u.size, generator=gen)
        permute(sd, u.axes, perms[u.name])
        if u.gauge == "scale":
            _scale_units(sd, u, torch.rand(u.size, generator=gen) * 3 + 0.3)
        elif u.gauge == "sign":
            _scale_units(sd, u, torch.randint(0, 2, (u.size,), generator=gen).float() * 2 - 1)
    if noise:
        sd = {k: v + noise * v.std() * torch.randn(v.shape, generator=gen) if v.numel() > 1 else v
              for k, v in sd.items()}
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


def random_transformer(rng):
    ln = rng.random() < 0.5
    cfg = TransformerConfig(n_layers=int(rng.integers(1, 3)), d_model=int(rng.integers(2, 13)),
                            n_heads=int(rng.integers(1, 5)), d_head=int(rng.integers(1, 7)),
                            d_mlp=int(rng.integers(3, 20)), d_vocab=11, n_ctx=6, attn_only=bool(rng.random() < 0.4),
                            act_fn=["relu", "gelu"][int(rng.integers(2))], normalization="LN" if ln else None,
                            init_std=0.4)
    return Transformer(cfg), bool(rng.random() < 0.5)


@pytest.mark.parametrize("seed", range(8))
def test_transformer_canonical_form_properties(seed):
    """Random configs (incl. d_model + 1 < d_head, LN or not, MLP or not, residual-stream permutation or not)."""
    rng = np.random.default_rng(100 + seed)
    torch.manual_seed(seed)
    model, residual = random_transformer(rng)
    cfg = model.cfg
    for name, p in model.named_parameters():  # non-trivial biases and LN weights: every gauge is exercised
        if p.ndim == 1 or ".b_" in name:
            p.data += 0.3 * torch.randn(p.shape)
    spec = symmetry_spec(model, residual_stream=residual)
    toks = torch.randint(0, cfg.d_vocab, (5, cfg.n_ctx))
    canon = canonicalize(model, spec)
    other = Transformer(cfg)
    other.load_state_dict(canon)
    assert model(toks).abs().max() > 0.3
    assert (other(toks) - model(toks)).abs().max() <= 1e-5  # function preserved
    assert same(canonicalize(other, spec), canon, atol=1e-5)  # idempotent
    moved, _ = symmetry_copy(model, torch.Generator().manual_seed(seed), spec=spec)
    other.load_state_dict(moved)
    assert (other(toks) - model(toks)).abs().max() <= 1e-4  # the regauged copy is the same function ...
    assert not same(moved, model.state_dict(), atol=1e-3)  # ... at different parameters ...
    assert same(canonicalize(other, spec), canon, atol=1e-4)  # ... and collapses to the same canonical form


def test_transformer_is_vmappable_and_patterns_are_causal():
    """functional_call + vmap over stacked parameters (the LLC engine's path) equals a loop over the models."""
    from torch.func import functional_call, stack_module_state, vmap

    cfg = TransformerConfig(n_layers=2, d_model=12, n_heads=3, d_head=4, d_mlp=16, d_vocab=9, n_ctx=5,
                            attn_only=False, normalization="LN")
    models = [Transformer(cfg) for _ in range(3)]
    params, buffers = stack_module_state(models)
    toks = torch.randint(0, 9, (4, 5))
    out = vmap(lambda p, b: functional_call(models[0], (p, b), (toks,)))(params, buffers)
    ref = torch.stack([m(toks) for m in models])
    assert out.shape == (3, 4, 5, 9) and torch.allclose(out, ref, atol=1e-6)
    pats = models[0].attention_patterns(toks)
    assert len(pats) == 2 and pats[0].shape == (4, 3, 5, 5)
    assert torch.allclose(pats[1].sum(-1), torch.ones(4, 3, 5))
    assert (pats[1].triu(1) == 0).all()  # causal: no query attends to a later key
    with pytest.raises(ValueError, match="exceeds n_ctx"):
        models[0](torch.zeros(1, 6, dtype=torch.long))


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


@pytest.mark.parametrize("noise, residual", [(0.0, False), (0.1, False), (0.0, True)])
def test_weight_matching_recovers_attention_heads(noise, residual):
    """Planted head permutations (+ within-head regauging, MLP unit permutations/rescalings and optionally a
    residual-stream permutation) are recovered exactly, also under 10% weight noise."""
    torch.manual_seed(0)
    cfg = TransformerConfig(n_layers=2, d_model=24, n_heads=6, d_head=4, d_mlp=32, d_vocab=17, n_ctx=8,
                            attn_only=False, init_std=0.3)
    model = Transformer(cfg)
    spec = symmetry_spec(model, residual_stream=residual)
    moved, planted = symmetry_copy(model, torch.Generator().manual_seed(4), noise=noise, spec=spec)
    aligned, perms = align(model, moved, spec=spec)
    assert set(perms) == set(planted)
    for name, p in planted.items():
        np.testing.assert_array_equal(perms[name], torch.argsort(p).numpy())
    if not noise:  # aligned is the same function as the copy, and (in the reference's frame) the same parameters
        other = Transformer(cfg)
        other.load_state_dict(aligned)
        toks = torch.randint(0, 17, (4, 8))
        assert (other(toks) - model(toks)).abs().max() <= 1e-4
        assert same(aligned, model.state_dict(), atol=1e-4)
        canonical_frame, _ = align(model, moved, spec=spec, frame="canonical")
        assert same(canonical_frame, slt.symmetry.fix_gauges(model, spec), atol=1e-4)


def test_head_matching_is_two_level():
    """Two-level head matching: when a copy's QK singular values come in a different order (so its balanced
    factorisation has swapped, sign-flipped columns), the head permutation is still found and the within-head
    orthogonal gauge (Procrustes) lines the columns up again; matching with the identity gauge could not."""
    torch.manual_seed(1)
    cfg = TransformerConfig(n_layers=1, d_model=16, n_heads=5, d_head=4, d_vocab=7, n_ctx=4, init_std=0.3)
    spec = symmetry_spec(Transformer(cfg))
    g = spec.heads[0]
    ref = slt.symmetry.fix_gauges(Transformer(cfg), spec)
    target = torch.tensor([1.0, 0.96, 0.5, 0.2])  # QK singular values of every head: the first two nearly tied
    s = (ref[g.p("W_Q")].double().square().sum(1) + ref[g.p("b_Q")].double().square())  # (h, e) = S
    for key in ("W_Q", "W_K"):
        ref[g.p(key)] = (ref[g.p(key)] * (target / s.float()).sqrt()[:, None, :]).contiguous()
    for key in ("b_Q", "b_K"):
        ref[g.p(key)] = ref[g.p(key)] * (target / s.float()).sqrt()
    moved = {k: v.clone() for k, v in ref.items()}
    swap = torch.tensor([0.955, 1.0 / 0.955, 1.0, 1.0]).sqrt()  # singular values (0.955, 1.005, …): order flips
    for key in ("W_Q", "W_K"):
        moved[g.p(key)] = moved[g.p(key)] * swap
    for key in ("b_Q", "b_K"):
        moved[g.p(key)] = moved[g.p(key)] * swap
    planted = torch.randperm(5, generator=torch.Generator().manual_seed(3))
    permute(moved, g.axes, planted)
    aligned, perms = align(ref, moved, spec=spec)
    np.testing.assert_array_equal(perms[g.name], torch.argsort(planted).numpy())
    gauged = slt.symmetry.fix_gauges(moved, spec)  # the copy's own balanced form: columns 0 and 1 swapped
    gauged_in_order = {k: v[torch.argsort(planted)] if k.startswith(g.prefix) and k != g.p("b_O") else v
                       for k, v in gauged.items()}
    wq = g.p("W_Q")
    assert (gauged_in_order[wq] - ref[wq]).abs().max() > 0.5 * ref[wq].abs().max()
    assert (aligned[wq] - ref[wq]).abs().max() < 0.05 * ref[wq].abs().max()


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
    before = loss_barrier(model, moved, loader, loss, num_points=11, model=model)
    aligned, _ = align(model, moved)  # in the reference's gauge: interpolate against the raw model
    curve = interpolate(model, aligned, loader, loss, num_points=11, model=model)
    assert before > 0.05 and curve.barrier() < 1e-4, (before, curve.barrier())
    assert curve.barrier("mean") < 1e-4
    canonical_frame, _ = align(model, moved, frame="canonical")
    curve = interpolate(slt.symmetry.fix_gauges(model), canonical_frame, loader, loss, num_points=11, model=model)
    assert curve.barrier() < 1e-4


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


def test_tie_rules_dead_units_and_rank_deficient_heads():
    """Units with identical incoming weights are ordered by their outgoing weights (so copies still collapse);
    dead ReLU units (zero incoming weights and bias) and rank-deficient heads are handled function-preservingly and
    idempotently (a dead unit's outgoing weights are unidentifiable and left alone, see docs/symmetry.md)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[1] = model[0].weight[0]
        model[0].bias[1] = model[0].bias[0]  # units 0 and 1 have the same incoming vector ...
        model[2].weight[:, 1] = -2 * model[2].weight[:, 0]  # ... but different outgoing weights
    canon = canonicalize(model)
    for seed in range(4):
        moved, _ = symmetry_copy(model, torch.Generator().manual_seed(seed))
        assert same(canonicalize(moved, symmetry_spec(model)), canon)
    with torch.no_grad():
        model[0].weight[4] = 0.0
        model[0].bias[4] = 0.0  # a dead unit
    x = torch.randn(16, 3)
    clone = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    clone.load_state_dict(canonicalize(model))
    assert (clone(x) - model(x)).abs().max() <= 1e-5
    assert same(canonicalize(clone), canonicalize(model), atol=1e-6)

    cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=3, d_head=4, d_vocab=5, n_ctx=4, init_std=0.5)
    tf = Transformer(cfg)
    with torch.no_grad():
        tf.blocks[0].attn.W_Q[1] = 0.0  # head 1: QK rank 0 (uniform attention)
        tf.blocks[0].attn.W_V[2, :, 2:] = 0.0  # head 2: OV rank 2 < d_head
    other = Transformer(cfg)
    other.load_state_dict(canonicalize(tf))
    toks = torch.randint(0, 5, (3, 4))
    assert (other(toks) - tf(toks)).abs().max() <= 1e-5
    assert same(canonicalize(other), canonicalize(tf), atol=1e-6)
    aligned, _ = align(tf, other)  # a rank-deficient reference head cannot be mapped back exactly: still the function
    other.load_state_dict(aligned)
    assert (other(toks) - tf(toks)).abs().max() <= 1e-5


def test_axes_to_perm_view():
    cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=5, n_ctx=4,
                            attn_only=False, normalization="LN")
    spec = symmetry_spec(Transformer(cfg), residual_stream=True)
    view = spec.axes_to_perm()
    assert view["blocks.0.attn.W_O"] == {0: "blocks.0.heads", 2: "residual"}
    assert view["blocks.0.mlp.W_in"] == {0: "residual", 1: "blocks.0.mlp.units"}
    assert view["ln_final.w"] == {0: "residual"} and view["unembed.W_U"] == {0: "residual"}
    assert "unembed.b_U" not in view and "blocks.0.attn.b_O" in view
    assert "b_O" not in "".join(n for n, _ in spec.heads[0].axes)  # b_O is shared by all heads
    assert "GL(d_head)" in spec.describe() and "rescaling" in spec.describe()


def test_interpolation_resets_batchnorm_statistics():
    """At every t the BatchNorm running statistics are re-estimated from the data, so stale statistics stored in
    the end points do not enter the loss."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    x = 3 + 2 * torch.randn(256, 3)
    y = torch.randn(256, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    loss = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    stale = {k: v.clone() for k, v in net.state_dict().items()}  # running mean 0, var 1: wrong for this data
    curve = interpolate(stale, stale, loader, loss, num_points=3, model=net)
    fresh = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8, momentum=None), nn.ReLU(), nn.Linear(8, 1))
    fresh.load_state_dict(stale)
    fresh.train()
    with torch.no_grad():
        fresh(x)
    fresh.eval()
    net.eval()
    expected = float(loss(fresh, (x, y)))
    np.testing.assert_allclose(curve.losses, expected, rtol=1e-5)
    assert abs(float(loss(net, (x, y))) - expected) > 0.01  # the stale statistics would have given another loss
    assert curve.barrier() == pytest.approx(0.0, abs=1e-6)


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
    with pytest.raises(ValueError, match="LayerNorm"):
        symmetry_spec(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="two Linear layers in a row"):
        symmetry_spec(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="no residual stream"):
        symmetry_spec(model, residual_stream=True)
    with pytest.raises(ValueError, match="gauge"):
        slt.symmetry.UnitGroup("u", 2, [("a", 0)], [("a", 0)], [], gauge="rotate")
    with pytest.raises(ValueError, match="unknown alignment method"):
        align(model, model, method="activation_matching")
    with pytest.raises(TypeError, match="state dict"):
        canonicalize([1, 2], spec=symmetry_spec(model))
    with pytest.raises(ValueError, match="definition"):
        interpolate(model, model, [(torch.zeros(2, 3),)], lambda m, b: m(b[0]).sum(), 3).barrier("max")


def test_symmetry_doc_examples_run():
    """Every Python block of docs/symmetry.md runs; the alignment example lowers the barrier between two seeds."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "symmetry.md").read_text()
    namespace: dict = {}
    for code in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        exec(compile(code, "docs/symmetry.md", "exec"), namespace)  # noqa: S102
    assert namespace["after"].barrier() < 0.5 * namespace["before"].barrier()
