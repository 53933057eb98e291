"""Element-level restrictions: the Restriction algebra, flat masks, bad input, and head slices proved by function on
our Transformer and on nn.MultiheadAttention (Hugging Face and TransformerLens: test_restrictions_hf.py)."""
import warnings

import pytest
import torch
from head_checks import check_heads
from torch import nn
from torch.func import functional_call, grad, vmap

import slt_tools as slt
from slt_tools.models import Transformer, TransformerConfig, vmappable_attention

R = slt.restrictions


def ours(**kw) -> Transformer:
    cfg = dict(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=13, n_ctx=8, attn_only=False,
               normalization="LN", init_std=0.3)
    return Transformer(TransformerConfig(**{**cfg, **kw}))


def capture_ours(model, tokens, layer, ablate=None):
    attn, seen = model.blocks[layer].attn, {}
    handle = attn.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(tokens)
        handle.remove()
        x = seen["x"]
        pattern = attn.pattern(x)
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, torch.einsum("bpd,hde->bphe", x, attn.W_V) + attn.b_V)
        if ablate is not None:
            z = z.clone()
            z[:, :, ablate] = 0
        out = torch.einsum("bqhe,hed->bqd", z, attn.W_O) + attn.b_O
        if ablate is None:  # the recomputation is the module's own forward
            torch.testing.assert_close(out, attn(x))
    return {"pattern": pattern, "z": z, "out": out}


class MHABlock(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        a, _ = self.attn(x, x, x, attn_mask=causal, need_weights=True, average_attn_weights=False)
        x = x + a
        return x + self.mlp(x)


class MHAModel(nn.Module):
    """A tiny decoder built on torch's own nn.MultiheadAttention."""

    def __init__(self, vocab: int = 13, d: int = 16, h: int = 4, n_layers: int = 2, n_ctx: int = 8) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(n_ctx, d)
        self.layers = nn.ModuleList(MHABlock(d, h) for _ in range(n_layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[-1], device=tokens.device))
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def capture_mha(model, tokens, layer, ablate=None):
    seen = {}
    handle = model.layers[layer].attn.register_forward_hook(lambda m, a, out: seen.setdefault("o", out))
    with torch.no_grad(), vmappable_attention():
        model(tokens)
    handle.remove()
    out, pattern = seen["o"]
    return {"pattern": pattern, "z": None, "out": out}


def tokens(vocab=13, n=8, batch=3, seed=0):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- by function


def test_heads_of_our_transformer_by_function():
    model = ours()
    assert check_heads(model, tokens(), capture_ours, ("attn.W_O",), lambda l: f"blocks.{l}.attn") == 8


def test_heads_of_torch_multihead_attention_by_function():
    model = MHAModel()
    with torch.no_grad():  # non-zero in-projection biases, so zeroing them is part of what is checked
        for layer in model.layers:
            layer.attn.in_proj_bias.normal_()
    assert check_heads(model, tokens(), capture_mha, ("attn.out_proj.weight",), lambda l: f"layers.{l}.attn") == 8


def test_head_restrictions_partition_the_attention_parameters():
    model = ours()
    hs = R.heads(model)
    assert list(hs) == [f"l{l}h{h}" for l in range(2) for h in range(4)]
    R.partition(hs)
    union = hs["l0h0"].union(*[hs[f"l0h{h}"] for h in range(1, 4)])
    attn = {n: p for n, p in model.named_parameters() if n.startswith("blocks.0.attn.") and n != "blocks.0.attn.b_O"}
    assert set(union.masks) == set(attn) and all(bool(m.all()) for m in union.masks.values())
    assert hs["l1h2"].numel == 3 * (16 * 4 + 4) + 4 * 16
    groups = R.group_by_parameters([*hs.values(), R.embeddings(model)])
    assert list(groups.values()) == [[f"l0h{h}" for h in range(4)], [f"l1h{h}" for h in range(4)], ["embed"]]
    assert hs["l1h2"].masks["blocks.1.attn.W_Q"][2].all() and hs["l1h2"].masks["blocks.1.attn.W_Q"].sum() == 64


def test_layers_mlps_embeddings_unembedding_of_our_transformer():
    model = ours()
    ls, ms = R.layers(model), R.mlps(model)
    assert list(ls) == ["l0", "l1"] and list(ms) == ["l0mlp", "l1mlp"]
    assert all(n.startswith("blocks.1.") for n in ls["l1"].masks) and ls["l1"].numel == sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("blocks.1."))
    assert set(ms["l0mlp"].masks) == {f"blocks.0.mlp.{k}" for k in ("W_in", "b_in", "W_out", "b_out")}
    assert set(R.embeddings(model).masks) == {"embed.W_E", "pos_embed.W_pos"}
    assert set(R.unembedding(model).masks) == {"unembed.W_U", "unembed.b_U"}
    R.partition([*ls.values(), R.embeddings(model), R.unembedding(model)])
    with pytest.raises(ValueError, match="no MLP"):
        R.mlps(ours(attn_only=True))


def test_mha_builders_and_separate_projection_weights():
    model = MHAModel()
    assert set(R.mlps(model)["l1mlp"].masks) == {f"layers.1.mlp.{k}.{w}" for k in (0, 2) for w in ("weight", "bias")}
    assert set(R.embeddings(model).masks) == {"embed.weight", "pos.weight"}
    assert set(R.unembedding(model).masks) == {"head.weight", "head.bias"}
    cross = nn.ModuleDict({"blocks": nn.ModuleList([nn.MultiheadAttention(8, 2, kdim=6, vdim=5)])})
    h = R.heads(cross)["l0h1"]
    counts = h.counts()
    assert counts == {"blocks.0.q_proj_weight": 4 * 8, "blocks.0.k_proj_weight": 4 * 6, "blocks.0.v_proj_weight": 4 * 5,
                      "blocks.0.in_proj_bias": 3 * 4, "blocks.0.out_proj.weight": 8 * 4}
    assert h.masks["blocks.0.q_proj_weight"][4:].all() and not h.masks["blocks.0.q_proj_weight"][:4].any()


# ---------------------------------------------------------------------------------------------- flat masks


def test_flat_mask_follows_the_given_parameter_order():
    model = ours()
    spec = {"blocks.0.attn.W_Q": (1,), "unembed.b_U": [0, 5], "embed.W_E": (slice(2, 4), slice(None, 3))}
    r = R.from_spec(model, spec, name="mine")
    assert r.numel == 64 + 2 + 6 and r.names == tuple(spec)
    params = dict(model.named_parameters())
    for names in (list(params), list(reversed(params))):
        flat = r.flat_mask(names, [params[n].shape for n in names])
        theta = torch.cat([params[n].detach().reshape(-1) for n in names])
        want = torch.cat([params[n].detach()[r.masks[n]] if n in r.masks else torch.zeros(0) for n in names])
        assert flat.shape == theta.shape and torch.equal(theta[flat], want)
    names = R.parameter_names(model, [r])
    assert names == ["embed.W_E", "blocks.0.attn.W_Q", "unembed.b_U"]  # model order
    hs = R.heads(model)
    names = R.parameter_names(model, [r, *hs.values()])
    shapes = [params[n].shape for n in names]
    stacked = R.flat_masks(hs, names, shapes)
    assert stacked.shape == (8, sum(s.numel() for s in shapes)) and not stacked[:, :13 * 16].any()
    assert stacked.sum(1).tolist() == [h.numel for h in hs.values()] and stacked.sum(0).max() == 1
    with pytest.raises(ValueError, match="absent from the flat layout"):
        r.flat_mask(["embed.W_E"], [params["embed.W_E"].shape])


def test_union_overlap_and_partition():
    model = ours()
    a = R.from_spec(model, {"embed.W_E": (slice(0, 3),)}, "a")
    b = R.from_spec(model, {"embed.W_E": (slice(2, 5),), "unembed.b_U": True}, "b")
    assert a.overlap(b) == 16 and a.overlaps(b) and (a | b).numel == 5 * 16 + 13
    with pytest.raises(ValueError, match="'a' and 'b' share 16 coordinates"):
        R.partition({"a": a, "b": b})
    with pytest.raises(ValueError, match="named 'a'"):
        R.partition([a, a])
    assert R.as_restriction(model, lambda n: n.startswith("unembed")).numel == 16 * 13 + 13
    assert R.as_restriction(model, ["embed.W_E"]).numel == 13 * 16


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_value_error():
    model = ours()
    with pytest.raises(ValueError, match=r"heads of layer 1 \[4\] do not exist.*0\.\.3"):
        R.head(model, 1, 4)
    with pytest.raises(ValueError, match=r"layers \[2\] do not exist"):
        R.heads(model, layers=[2])
    with pytest.raises(ValueError, match="is empty"):
        R.Restriction("nothing", {"embed.W_E": torch.zeros(13, 16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="spec is empty"):
        R.from_spec(model, {})
    with pytest.raises(ValueError, match="selects nothing"):
        R.from_spec(model, {"embed.W_E": (slice(5, 5),)})
    with pytest.raises(ValueError, match=r"has shape \(3, 3\), the parameter has \(13, 16\)"):
        R.from_spec(model, {"embed.W_E": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="does not fit"):
        R.from_spec(model, {"unembed.b_U": (20,)})
    with pytest.raises(ValueError, match="not a parameter.*did you mean"):
        R.from_spec(model, {"blocks.7.attn.W_Q": True})
    wrong = R.Restriction("w", {"embed.W_E": torch.ones(16, 13, dtype=torch.bool)})
    with pytest.raises(ValueError, match="has shape"):
        wrong.validate(model)
    with pytest.raises(ValueError, match="bool tensor"):
        R.Restriction("f", {"embed.W_E": torch.ones(13, 16)})


class MyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.n_heads, self.d_head = 2, 3
        self.qkv = nn.Parameter(torch.randn(6, 3, 2, 3))  # [d, three, h, e]
        self.out = nn.Parameter(torch.randn(6, 6))


def test_unknown_architecture_says_how_to_write_a_spec_and_register_fixes_it():
    model = nn.Sequential(nn.Linear(6, 6), nn.ModuleList([MyAttention(), MyAttention()]))
    with pytest.raises(ValueError, match=r"unknown attention architecture.*MyAttention.*from_spec"):
        R.heads(model)
    with pytest.raises(ValueError, match="no attention module"):
        R.heads(nn.Sequential(nn.Linear(3, 3)))
    name = f"{MyAttention.__module__}.{MyAttention.__qualname__}"
    try:
        R.register(R.Family("mine", (name,), lambda m: {"h": m.n_heads, "e": m.d_head, "kv": m.n_heads},
                            {"qkv": "d three h e", "out": "(h e) d"}))
        hs = R.heads(model)
        assert hs["l1h1"].masks["1.1.qkv"][:, :, 1].all() and hs["l1h1"].numel == 6 * 3 * 3 + 3 * 6
        R.register(R.Family("mine", (name,), lambda m: {"h": m.n_heads, "e": 4, "kv": m.n_heads},
                            {"qkv": "d three h e", "out": "(h e) d"}))
        with pytest.raises(ValueError, match="does not fit the layout"):
            R.heads(model)
        R.register(R.Family("mine", (name,), lambda m: {"h": 2, "e": 3, "kv": 2}, {"qkv": "d three h e"}))
        with pytest.raises(ValueError, match="'out' of a mine attention module is not in the table"):
            R.heads(model)
    finally:
        R.FAMILIES[:] = [f for f in R.FAMILIES if f.name != "mine"]


# ---------------------------------------------------------------------------------------------- MHA under vmap


def test_vmappable_attention_gives_vmapped_gradients_through_multihead_attention_in_eval_mode():
    model = MHAModel().eval()
    x = tokens()
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    stacked = {k: v + 0.01 * torch.randn((4, *v.shape), generator=gen) for k, v in params.items()}

    def loss(p):
        return functional_call(model, p, (x,)).logsumexp(-1).mean()

    before = torch.backends.mha.get_fastpath_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "performance drop ... batching rule" fallback warnings either
        with vmappable_attention():
            grads = vmap(grad(loss))(stacked)
    assert torch.backends.mha.get_fastpath_enabled() == before
    for c in range(4):  # each chain's gradient equals plain autograd on that chain alone
        one = {k: v[c].clone().requires_grad_(True) for k, v in stacked.items()}
        with vmappable_attention():
            loss(one).backward()
        for k in one:
            torch.testing.assert_close(grads[k][c], one[k].grad, rtol=1e-4, atol=1e-6)
