"""The declarative architecture table and the builders that read it: heads, layers, MLPs, embeddings.

Each :class:`Family` names the attention-module classes it covers, how to read the head counts and sizes from the
module (and so from the model's own config), and, per parameter of the module, an ``einops`` pattern of its shape
with ``h`` = query heads, ``kv`` = key/value heads, ``e`` = head size, ``three`` = the fused Q/K/V axis, and any other
letter for an axis that belongs to every head. Head h's coordinates are those whose ``h`` index is h (or whose
``kv`` index is h's key/value head). A module parameter listed neither in ``layouts`` nor in ``shared`` is an error,
so a layout the table does not know is never sliced silently.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import einops
import torch
from torch import nn

from slt_tools.restrictions.core import SPEC_HELP, Restriction

Sizes = dict[str, int]


@dataclass(frozen=True)
class Family:
    """How one family of attention modules lays out its heads.

    ``classes``: qualified names (``module.QualName``) of the attention classes, matched against the module's MRO.
    ``sizes``: module → {"h": query heads, "e": head size, "kv": key/value heads}.
    ``layouts``: parameter name relative to the module → einops pattern of its shape (absent ones are skipped:
    bias-free variants). ``shared``: parameters that belong to no single head (the output bias).
    """

    name: str
    classes: tuple[str, ...]
    sizes: Callable[[nn.Module], Mapping[str, int]]
    layouts: Mapping[str, str]
    shared: tuple[str, ...] = field(default=())


def _slt_sizes(m: nn.Module) -> Sizes:
    return {"h": m.cfg.n_heads, "e": m.cfg.d_head, "kv": m.cfg.n_heads}


def _tl_sizes(m: nn.Module) -> Sizes:
    h = m.cfg.n_heads
    return {"h": h, "e": m.cfg.d_head, "kv": getattr(m.cfg, "n_key_value_heads", None) or h}


def _hf_sizes(m: nn.Module) -> Sizes:
    c = m.config
    h = c.num_attention_heads
    e = getattr(c, "head_dim", None) or c.hidden_size // h
    return {"h": h, "e": e, "kv": getattr(c, "num_key_value_heads", None) or h}


def _mha_sizes(m: nn.Module) -> Sizes:
    return {"h": m.num_heads, "e": m.head_dim, "kv": m.num_heads}


_STACKED = {"W_Q": "h d e", "W_K": "h d e", "W_V": "h d e", "W_O": "h e d", "b_Q": "h e", "b_K": "h e", "b_V": "h e"}
_QKVO = {"q_proj.weight": "(h e) d", "q_proj.bias": "(h e)", "k_proj.weight": "(kv e) d", "k_proj.bias": "(kv e)",
         "v_proj.weight": "(kv e) d", "v_proj.bias": "(kv e)", "o_proj.weight": "d (h e)"}

FAMILIES: list[Family] = [
    Family("slt_tools", ("slt_tools.models.transformer.Attention",), _slt_sizes, _STACKED, ("b_O",)),
    Family("transformer_lens", ("transformer_lens.components.abstract_attention.AbstractAttention",), _tl_sizes,
           {**_STACKED, "_W_K": "kv d e", "_W_V": "kv d e", "_b_K": "kv e", "_b_V": "kv e"}, ("b_O",)),
    Family("gpt2", ("transformers.models.gpt2.modeling_gpt2.GPT2Attention",), _hf_sizes,
           {"c_attn.weight": "d (three h e)", "c_attn.bias": "(three h e)", "c_proj.weight": "(h e) d"},
           ("c_proj.bias",)),
    Family("gpt_neox", ("transformers.models.gpt_neox.modeling_gpt_neox.GPTNeoXAttention",), _hf_sizes,
           {"query_key_value.weight": "(h three e) d", "query_key_value.bias": "(h three e)",
            "dense.weight": "d (h e)"}, ("dense.bias",)),
    Family("llama", ("transformers.models.llama.modeling_llama.LlamaAttention",
                     "transformers.models.qwen2.modeling_qwen2.Qwen2Attention",
                     "transformers.models.mistral.modeling_mistral.MistralAttention"), _hf_sizes, _QKVO,
           ("o_proj.bias",)),
    Family("torch_mha", ("torch.nn.modules.activation.MultiheadAttention",), _mha_sizes,
           {"in_proj_weight": "(three h e) d", "in_proj_bias": "(three h e)", "q_proj_weight": "(h e) d",
            "k_proj_weight": "(h e) d", "v_proj_weight": "(h e) d", "out_proj.weight": "d (h e)",
            "bias_k": "a b (h e)", "bias_v": "a b (h e)"}, ("out_proj.bias",)),
]


def register(family: Family) -> None:
    """Add (or, by name, replace) a family in the table, e.g. for an in-house attention class."""
    FAMILIES[:] = [f for f in FAMILIES if f.name != family.name] + [family]


def family_of(module: nn.Module) -> Family | None:
    """The table entry covering this module's class (any class in its MRO), or None."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__}
    for fam in reversed(FAMILIES):  # registered last wins
        if names.intersection(fam.classes):
            return fam
    return None


_LOOKS_LIKE_ATTENTION = re.compile(r"attention|attn", re.I)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, Family]]:
    """(path, module, family) of every attention module of ``model`` in module order.

    ``ValueError`` if there is none, or if a module whose class looks like attention is not in the table (it would
    otherwise be skipped silently): the message says how to write a spec instead.
    """
    found, unknown = [], []
    for path, mod in model.named_modules():
        fam = family_of(mod)
        if fam is not None:
            found.append((path, mod, fam))
        elif _LOOKS_LIKE_ATTENTION.search(type(mod).__name__):
            unknown.append((path, mod))
    inside = [p for p, _, _ in found]

    def related(path: str) -> bool:  # inside a known attention module, or an ancestor of one
        return any(path.startswith(p + ".") or p.startswith(path + ".") or not path for p in inside)

    unknown = [(p, m) for p, m in unknown if not related(p)]
    if unknown:
        listed = ", ".join(f"{p or '<root>'} ({type(m).__module__}.{type(m).__qualname__})" for p, m in unknown[:4])
        raise ValueError(f"unknown attention architecture: {listed} is not in slt_tools.restrictions.FAMILIES. "
                         + SPEC_HELP)
    if not found:
        raise ValueError(f"no attention module of a known architecture in {type(model).__name__}. " + SPEC_HELP)
    return found


def _sizes(module: nn.Module, fam: Family) -> Sizes:
    sizes = {k: int(v) for k, v in fam.sizes(module).items()}
    if sizes["h"] < 1 or sizes["e"] < 1 or sizes["kv"] < 1 or sizes["h"] % sizes["kv"]:
        raise ValueError(f"{fam.name}: inconsistent head sizes {sizes} (n_heads must be a multiple of n_kv_heads)")
    return {**sizes, "three": 3}


def _axes(pattern: str) -> list[str]:
    return pattern.replace("(", " ").replace(")", " ").split()


def _unpacked_ids(shape: torch.Size, pattern: str, sizes: Sizes, where: str) -> torch.Tensor:
    """Flat coordinate indices of a parameter, rearranged to the pattern's axes one by one (einops checks sizes)."""
    axes = _axes(pattern)
    known = {a: sizes[a] for a in axes if a in sizes}
    ids = torch.arange(math.prod(shape)).reshape(shape)
    try:
        return einops.rearrange(ids, f"{pattern} -> {' '.join(axes)}", **known)
    except einops.EinopsError as exc:
        raise ValueError(f"{where} of shape {tuple(shape)} does not fit the layout {pattern!r} with {known}: the "
                         f"table entry or the config is wrong. " + SPEC_HELP) from exc


def _layer_layouts(path: str, module: nn.Module, fam: Family) -> tuple[Sizes, dict[str, tuple[torch.Tensor, list]]]:
    """Sizes and, per parameter full name, (unpacked ids, axes) for one attention module."""
    sizes = _sizes(module, fam)
    per_param = {}
    for rel, p in module.named_parameters():
        full = f"{path}.{rel}" if path else rel
        if rel in fam.layouts:
            per_param[full] = (_unpacked_ids(p.shape, fam.layouts[rel], sizes, full), _axes(fam.layouts[rel]))
        elif rel not in fam.shared:
            raise ValueError(f"{full}: parameter {rel!r} of a {fam.name} attention module is not in the table's "
                             f"layouts {sorted(fam.layouts)} (a variant the table does not know). " + SPEC_HELP)
    if not per_param:
        raise ValueError(f"{path}: no per-head parameter found in a {fam.name} attention module. " + SPEC_HELP)
    return sizes, per_param


def _head_masks(per_param: dict[str, tuple[torch.Tensor, list]], shapes: dict[str, torch.Size], sizes: Sizes,
                head: int, shared_kv: bool) -> dict[str, torch.Tensor]:
    masks = {}
    for full, (ids, axes) in per_param.items():
        axis, index = ("h", head) if "h" in axes else ("kv", head // (sizes["h"] // sizes["kv"]))
        if axis == "kv" and not shared_kv and sizes["kv"] != sizes["h"]:
            continue
        mask = torch.zeros(ids.numel(), dtype=torch.bool)
        mask[ids.select(axes.index(axis), index).reshape(-1)] = True
        masks[full] = mask.reshape(shapes[full])
    return masks


def _pick(what: str, wanted: int | Iterable[int] | None, n: int) -> list[int]:
    if wanted is None:
        return list(range(n))
    chosen = [wanted] if isinstance(wanted, int) else list(wanted)
    bad = [i for i in chosen if not isinstance(i, int) or not 0 <= i < n]
    if bad or not chosen:
        raise ValueError(f"{what} {bad or chosen} do not exist: the model has {n} (0..{n - 1})")
    return chosen


def heads(model: nn.Module, layers: int | Iterable[int] | None = None, heads: int | Iterable[int] | None = None,
          shared_kv: bool = True) -> dict[str, Restriction]:
    """One restriction per attention head, ``{"l{layer}h{head}": Restriction}``, read from the model's config.

    ``layers`` numbers the attention modules in module order (the block index when each block has one). A head's
    restriction holds its Q/K/V weights and biases and its slice of the output projection (not the shared output
    bias). Under grouped-query attention it includes its shared K/V head unless ``shared_kv=False``.
    """
    mods = attention_modules(model)
    out: dict[str, Restriction] = {}
    for layer in _pick("layers", layers, len(mods)):
        path, module, fam = mods[layer]
        sizes, per_param = _layer_layouts(path, module, fam)
        shapes = {f"{path}.{rel}" if path else rel: p.shape for rel, p in module.named_parameters()}
        for h in _pick(f"heads of layer {layer}", heads, sizes["h"]):
            out[f"l{layer}h{h}"] = Restriction(f"l{layer}h{h}", _head_masks(per_param, shapes, sizes, h, shared_kv))
    return out


def head(model: nn.Module, layer: int, index: int, shared_kv: bool = True) -> Restriction:
    """The restriction of one head (``ValueError`` if that layer or head does not exist)."""
    return heads(model, layers=[layer], heads=[index], shared_kv=shared_kv)[f"l{layer}h{index}"]


def _layer_prefixes(model: nn.Module) -> list[str]:
    """Per attention module, the path of its block: the path up to the first numeric component."""
    prefixes = []
    for path, _, _ in attention_modules(model):
        parts = path.split(".")
        digit = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if digit is None:
            raise ValueError(f"cannot tell the blocks apart: attention module {path or '<root>'} is not inside a "
                             "numbered container (ModuleList). " + SPEC_HELP)
        prefix = ".".join(parts[: digit + 1])
        if prefix not in prefixes:
            prefixes.append(prefix)
    return prefixes


def _whole(model: nn.Module, name: str, keep: Callable[[str], bool]) -> Restriction:
    masks = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters() if keep(n)}
    if not masks:
        raise ValueError(f"no parameter found for {name!r}. " + SPEC_HELP)
    return Restriction(name, masks)


def layers(model: nn.Module) -> dict[str, Restriction]:
    """One restriction per block, ``{"l0": ..., "l1": ...}``: every parameter under the block's path."""
    return {f"l{i}": _whole(model, f"l{i}", lambda n, p=p: n.startswith(p + "."))
            for i, p in enumerate(_layer_prefixes(model))}


MLP_CHILDREN: tuple[tuple[str, ...], ...] = (("mlp",), ("feed_forward",), ("ffn",), ("linear1", "linear2"))


def mlps(model: nn.Module) -> dict[str, Restriction]:
    """One restriction per block's MLP, ``{"l0mlp": ...}`` (children named as in :data:`MLP_CHILDREN`)."""
    names = [n for n, _ in model.named_parameters()]
    out = {}
    for i, prefix in enumerate(_layer_prefixes(model)):
        for group in MLP_CHILDREN:
            starts = tuple(f"{prefix}.{c}." for c in group)
            if any(n.startswith(starts) for n in names):
                out[f"l{i}mlp"] = _whole(model, f"l{i}mlp", lambda n, s=starts: n.startswith(s))
                break
    if not out:
        raise ValueError(f"no MLP found in the blocks of {type(model).__name__} (an attention-only model?). "
                         + SPEC_HELP)
    return out


def _names_of(model: nn.Module, modules: Iterable[nn.Module]) -> set[str]:
    ids = {id(p) for m in modules for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def embeddings(model: nn.Module) -> Restriction:
    """Token and position embeddings: every ``nn.Embedding`` plus TransformerLens-style ``W_E``/``W_pos``."""
    emb = _names_of(model, (m for m in model.modules() if isinstance(m, nn.Embedding)))
    return _whole(model, "embed", lambda n: n in emb or n.rsplit(".", 1)[-1] in ("W_E", "W_pos"))


UNEMBED_CHILDREN = ("lm_head", "embed_out", "unembed", "head", "output")


def unembedding(model: nn.Module) -> Restriction:
    """The unembedding: HF ``get_output_embeddings()``, else a top-level child named as in
    :data:`UNEMBED_CHILDREN`. With tied weights (GPT-2) it is the embedding matrix itself."""
    getter = getattr(model, "get_output_embeddings", None)
    module = getter() if callable(getter) else None
    if module is None:
        module = next((c for n, c in model.named_children() if n in UNEMBED_CHILDREN), None)
    names = _names_of(model, [module]) if module is not None else set()
    return _whole(model, "unembed", lambda n: n in names)
