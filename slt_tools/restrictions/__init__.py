"""Element-level restrictions: which coordinates of which parameters a weight-refined LLC lets move.

A :class:`Restriction` is a name plus, per parameter name, a bool mask of that parameter's shape; only the selected
coordinates move, everything else stays at w*. Builders read head counts and sizes from the model's own config through
a short declarative table (:data:`FAMILIES`: per attention-module class, an ``einops`` pattern per parameter, e.g.
``"d (three h e)"`` for GPT-2's fused ``c_attn``)::

    heads = slt.restrictions.heads(model)                  # {"l0h0": Restriction, ..., "l1h7": ...}
    names = slt.restrictions.parameter_names(model, heads)  # the parameters any of them touches, model order
    masks = slt.restrictions.flat_masks(heads, names, shapes)  # (R, D) bool over θ = cat(flattened params)

Covered: ``slt_tools.models.Transformer``, TransformerLens ``HookedTransformer`` (incl. grouped-query attention),
Hugging Face GPT-2, GPT-NeoX/Pythia, LLaMA/Qwen2/Mistral and ``nn.MultiheadAttention``. A head's restriction holds
its Q/K/V rows (weights and biases) and its slice of the output projection, never the shared output bias; under
grouped-query attention it includes the K/V head it shares with the other query heads of its group (so those
overlap) unless ``shared_kv=False``. Anything else: :func:`from_spec` or :func:`register`. See docs/transformers.md.
"""
from slt_tools.restrictions.core import (
    SPEC_HELP,
    Restriction,
    as_restriction,
    collect,
    flat_masks,
    from_spec,
    group_by_parameters,
    parameter_names,
    partition,
)
from slt_tools.restrictions.families import (
    FAMILIES,
    Family,
    attention_modules,
    embeddings,
    family_of,
    head,
    heads,
    layers,
    mlps,
    register,
    unembedding,
)

__all__ = [
    "FAMILIES", "SPEC_HELP", "Family", "Restriction", "as_restriction", "attention_modules", "collect", "embeddings",
    "family_of", "flat_masks", "from_spec", "group_by_parameters", "head", "heads", "layers", "mlps",
    "parameter_names", "partition", "register", "unembedding",
]
