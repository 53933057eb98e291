"""Head restrictions proved by function on tiny random Hugging Face (GPT-2, GPT-NeoX, LLaMA, Qwen2, Mistral) and
TransformerLens (HookedTransformer, with and without grouped-query attention) models built locally from configs;
nothing downloads weights."""
import einops
import pytest
import torch
from head_checks import check_heads

import slt_tools as slt

pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")

R = slt.restrictions
VOCAB, N, D, H = 13, 8, 16, 4


def tokens(seed=0):
    return torch.randint(0, VOCAB, (3, N), generator=torch.Generator().manual_seed(seed))


def hf_capture(attn_of, oproj_of):
    """capture() for an HF model: pattern from output_attentions, z from a pre-hook on the output projection (whose
    input the model itself lays out as (head, d_head)), out from a hook on the attention module."""
    def capture(model, toks, layer, ablate=None):
        attn, seen = attn_of(model, layer), {}

        def pre(module, args):
            seen["z"] = einops.rearrange(args[0], "b t (h e) -> b t h e", h=H).clone()
            if ablate is not None:
                z = seen["z"].clone()
                z[:, :, ablate] = 0
                return (einops.rearrange(z, "b t h e -> b t (h e)"),)
            return None

        def post(module, args, out):
            seen["out"] = out[0]

        handles = [oproj_of(attn).register_forward_pre_hook(pre), attn.register_forward_hook(post)]
        with torch.no_grad():
            res = model(toks, output_attentions=True)
        for hd in handles:
            hd.remove()
        return {"pattern": res.attentions[layer], "z": seen["z"], "out": seen["out"]}
    return capture


def hf_model(kind: str, **kw):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=VOCAB, attn_implementation="eager", initializer_range=0.3)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_positions=N, n_embd=D, n_layer=2, n_head=H, bos_token_id=0,
                                       eos_token_id=0, **common)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if kind == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=H,
                                         intermediate_size=32, max_position_embeddings=N, **common)
        return transformers.GPTNeoXForCausalLM(cfg).eval()
    config, cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                   "mistral": ("MistralConfig", "MistralForCausalLM")}[kind]
    cfg = getattr(transformers, config)(hidden_size=D, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=H, max_position_embeddings=N, **{**common, **kw})
    return getattr(transformers, cls)(cfg).eval()


def test_gpt2_fused_c_attn_heads_by_function():
    model = hf_model("gpt2")
    cap = hf_capture(lambda m, l: m.transformer.h[l].attn, lambda a: a.c_proj)
    assert check_heads(model, tokens(), cap, ("attn.c_proj.weight",), lambda l: f"transformer.h.{l}.attn") == 8
    R.partition(R.heads(model))
    r = R.head(model, 1, 2)
    assert r.counts() == {"transformer.h.1.attn.c_attn.weight": D * 3 * 4, "transformer.h.1.attn.c_attn.bias": 12,
                          "transformer.h.1.attn.c_proj.weight": 4 * D}


def test_gpt_neox_interleaved_query_key_value_heads_by_function():
    model = hf_model("gpt_neox")
    cap = hf_capture(lambda m, l: m.gpt_neox.layers[l].attention, lambda a: a.dense)
    assert check_heads(model, tokens(), cap, ("attention.dense.weight",),
                       lambda l: f"gpt_neox.layers.{l}.attention") == 8
    mask = R.head(model, 0, 1).masks["gpt_neox.layers.0.attention.query_key_value.weight"]
    assert mask[12:24].all() and not mask[:12].any() and not mask[24:].any()  # rows [h, three, e]: head 1 = 12..23


@pytest.mark.parametrize("kind,kv", [("llama", 2), ("qwen2", 1), ("mistral", 4)])
def test_llama_family_grouped_query_heads_by_function(kind, kv):
    model = hf_model(kind, num_key_value_heads=kv)
    if kind == "qwen2":  # Qwen2 has Q/K/V biases: make them non-zero so that their slices matter
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("_proj.bias"):
                    p.normal_()
    cap = hf_capture(lambda m, l: m.model.layers[l].self_attn, lambda a: a.o_proj)
    assert check_heads(model, tokens(), cap, ("self_attn.o_proj.weight",), lambda l: f"model.layers.{l}.self_attn",
                       group=H // kv) == 8
    if kv < H:
        with pytest.raises(ValueError, match="not a partition.*shared_kv=False"):
            R.partition(R.heads(model))
    R.partition(R.heads(model, shared_kv=False))
    assert len(R.heads(model, layers=1, heads=[0, 3])) == 2


def test_hf_layers_mlps_embeddings_and_tied_unembedding():
    model = hf_model("gpt2")
    assert list(R.layers(model)) == ["l0", "l1"]
    assert all(n.startswith("transformer.h.0.mlp.") for n in R.mlps(model)["l0mlp"].masks)
    assert set(R.embeddings(model).masks) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert set(R.unembedding(model).masks) == {"transformer.wte.weight"}  # lm_head is tied to the embedding
    llama = hf_model("llama", num_key_value_heads=2, tie_word_embeddings=False)
    assert set(R.unembedding(llama).masks) == {"lm_head.weight"}
    assert set(R.mlps(llama)["l1mlp"].masks) == {f"model.layers.1.mlp.{k}_proj.weight" for k in ("gate", "up", "down")}


def tl_model(**kw):
    tl = pytest.importorskip("transformer_lens")
    cfg = tl.HookedTransformerConfig(n_layers=2, d_model=D, n_ctx=N, d_head=4, n_heads=H, d_vocab=VOCAB,
                                     act_fn="gelu", normalization_type="LN", initializer_range=0.3, device="cpu",
                                     seed=0, **kw)
    model = tl.HookedTransformer(cfg).eval()
    with torch.no_grad():  # TransformerLens initialises biases to zero: make them matter
        for n, p in model.named_parameters():
            if "attn.b_" in n or "attn._b_" in n:
                p.normal_()
    return model


def capture_tl(model, toks, layer, ablate=None):
    seen = {}

    def save(name):
        def hook(t, hook):
            seen[name] = t.detach().clone()
        return hook

    def zero(t, hook):
        t = t.clone()
        t[:, :, ablate] = 0
        return t

    a = f"blocks.{layer}.attn"
    hooks = [(f"{a}.hook_pattern", save("pattern")), (f"{a}.hook_z", save("z"))]
    hooks += [(f"{a}.hook_z", zero)] if ablate is not None else []
    hooks += [(f"blocks.{layer}.hook_attn_out", save("out"))]
    with torch.no_grad():
        model.run_with_hooks(toks, fwd_hooks=hooks)
    return seen


@pytest.mark.parametrize("kw,group", [({}, 1), ({"n_key_value_heads": 2, "positional_embedding_type": "rotary"}, 2)])
def test_transformer_lens_heads_by_function(kw, group):
    model = tl_model(**kw)
    assert check_heads(model, tokens(), capture_tl, ("attn.W_O",), lambda l: f"blocks.{l}.attn", group=group) == 8
    r = R.head(model, 1, 3)
    k = "blocks.1.attn.W_K" if group == 1 else "blocks.1.attn._W_K"
    assert r.masks[k][3 // group].all() and r.masks[k].sum() == D * 4
    assert set(R.embeddings(model).masks) == ({"embed.W_E", "pos_embed.W_pos"} if group == 1 else {"embed.W_E"})
    assert set(R.unembedding(model).masks) == {"unembed.W_U", "unembed.b_U"}
