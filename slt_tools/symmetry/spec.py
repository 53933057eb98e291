"""Declarative description of a network's parameter symmetries.

A :class:`UnitGroup` is a set of interchangeable hidden units: a permutation of them acts on every (parameter, axis)
listed in ``axes`` (in blocks of ``block`` consecutive indices, so packed attention heads can be described too).
``incoming`` are the slices that compute the unit (weight rows and biases), ``outgoing`` those that read it.
``gauge`` names the continuous or discrete symmetry of a single unit:

* ``"scale"`` — positively homogeneous activations (ReLU, LeakyReLU: σ(αz) = ασ(z) for α > 0):
  incoming × α, outgoing × 1/α;
* ``"sign"`` — odd activations (tanh: σ(−z) = −σ(z)): incoming × −1, outgoing × −1;
* ``None`` — permutation only (GELU, SiLU, softplus, …, and the residual stream).

A :class:`HeadGroup` is one attention layer in TransformerLens layout (``W_Q[h, d_model, d_head]`` …): heads permute
along axis 0 of ``W_Q, W_K, W_V, W_O, b_Q, b_K, b_V`` (whole d_head blocks move together — permuting Q/K columns across
head boundaries changes the function), and within head h any invertible A, B act as
(W̃_Q, W̃_K) → (W̃_Q A, W̃_K A^{-T}) and (W̃_V, W_O) → (W̃_V B, B^{-1} W_O), with W̃ = [W; b] the bias-augmented maps
(the attention score x̃ᵀW̃_QW̃_Kᵀx̃' and the value-output map x̃ᵀW̃_VW_O only see the products).

``SymmetrySpec.residual`` holds optional permutations of a residual stream (off by default, see
:func:`symmetry_spec`); they are canonicalised first, since every other group reads the residual basis.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

POSITIVE_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU)
ODD = (nn.Tanh,)
PERMUTATION_ONLY = (nn.GELU, nn.SiLU, nn.Sigmoid, nn.Softplus, nn.ELU)
TRANSPARENT = (nn.Dropout, nn.Identity)

Axes = list[tuple[str, int]]


@dataclass
class UnitGroup:
    """Interchangeable units: permuted together along ``axes``; ``gauge`` acts on ``incoming``/``outgoing``."""

    name: str
    size: int
    axes: Axes
    incoming: Axes
    outgoing: Axes
    gauge: str | None = None
    block: int = 1

    def __post_init__(self) -> None:
        if self.gauge not in (None, "scale", "sign"):
            raise ValueError(f"unit group {self.name}: gauge must be None, 'scale' or 'sign', got {self.gauge!r}")
        missing = [a for a in self.incoming + self.outgoing if a not in self.axes]
        if missing:
            raise ValueError(f"unit group {self.name}: incoming/outgoing slices {missing} are not in its axes")


@dataclass
class HeadGroup:
    """The heads of one attention layer (parameters ``prefix + 'W_Q'`` …, TransformerLens shapes)."""

    name: str
    n_heads: int
    prefix: str  # e.g. "blocks.0.attn."

    def p(self, short: str) -> str:
        return self.prefix + short

    @property
    def axes(self) -> Axes:
        return [(self.p(k), 0) for k in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")]


@dataclass
class SymmetrySpec:
    """All symmetries of a model. ``units`` are in forward order (units that read other units come later)."""

    units: list[UnitGroup] = field(default_factory=list)
    heads: list[HeadGroup] = field(default_factory=list)
    residual: list[UnitGroup] = field(default_factory=list)

    def permutation_groups(self) -> list[tuple[str, int, Axes, int]]:
        """(name, size, axes, block) of every permutation group: residual streams, units and heads."""
        return ([(u.name, u.size, u.axes, u.block) for u in self.residual + self.units]
                + [(h.name, h.n_heads, h.axes, 1) for h in self.heads])

    def axes_to_perm(self) -> dict[str, dict[int, str]]:
        """Per parameter, which permutation group acts on which axis (Git Re-Basin's ``axes_to_perm`` view)."""
        out: dict[str, dict[int, str]] = {}
        for name, _, axes, _ in self.permutation_groups():
            for param, axis in axes:
                if axis in out.setdefault(param, {}):
                    raise ValueError(f"axis {axis} of {param} is claimed by both {out[param][axis]} and {name}")
                out[param][axis] = name
        return out

    def describe(self) -> str:
        """A readable list of the symmetry groups."""
        lines = [f"residual permutation {u.name}: S_{u.size}" for u in self.residual]
        lines += [f"units {u.name}: S_{u.size}" + {None: "", "scale": " ⋉ (R_{>0})^n rescaling",
                                                    "sign": " ⋉ {±1}^n sign flips"}[u.gauge] for u in self.units]
        lines += [f"heads {h.name}: S_{h.n_heads} ⋉ (GL(d_head) × GL(d_head))^n (QK and OV gauges)"
                  for h in self.heads]
        return "\n".join(lines)


def _gauge_of(act: nn.Module | None) -> str | None:
    if act is None or isinstance(act, PERMUTATION_ONLY):
        return None
    if isinstance(act, POSITIVE_HOMOGENEOUS):
        return "scale"
    if isinstance(act, ODD):
        return "sign"
    raise ValueError(f"unsupported activation {type(act).__name__} for symmetry analysis")


def _dense_unit(name: str, fc_in: str, fc_out: str, size: int, has_bias_in: bool, gauge: str | None) -> UnitGroup:
    incoming = [(f"{fc_in}.weight", 0)] + ([(f"{fc_in}.bias", 0)] if has_bias_in else [])
    outgoing = [(f"{fc_out}.weight", 1)]
    return UnitGroup(name, size, incoming + outgoing, incoming, outgoing, gauge)


def spec_for_sequential(model: nn.Sequential, prefix: str = "") -> SymmetrySpec:
    """Linear → activation → Linear → … : each hidden layer's units permute (and rescale or flip by activation)."""
    layers, acts, pending = [], [], None
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            if pending is None and layers:
                raise ValueError(f"two Linear layers in a row at {prefix + name}: their hidden space has a full "
                                 "GL(n) symmetry that is not described; merge them or pass spec= explicitly")
            layers.append((prefix + name, module))
            acts.append(pending)
            pending = None
        elif isinstance(module, TRANSPARENT):
            continue
        elif isinstance(module, POSITIVE_HOMOGENEOUS + ODD + PERMUTATION_ONLY):
            if pending is not None:
                raise ValueError(f"two activations in a row at {prefix + name}: cannot describe its symmetries")
            if not layers:
                raise ValueError(f"activation {type(module).__name__} ({prefix + name!r}) before the first Linear")
            pending = module
        else:
            raise ValueError(f"cannot derive the symmetries of {type(module).__name__} (module {prefix + name!r}); "
                             "supported in nn.Sequential: Linear, ReLU, LeakyReLU, Tanh, GELU/SiLU/… , Dropout")
    if not layers:
        raise ValueError("the nn.Sequential has no Linear layers")
    spec = SymmetrySpec()
    for k in range(len(layers) - 1):
        (n_in, lin), (n_out, _) = layers[k], layers[k + 1]
        spec.units.append(_dense_unit(f"{n_in}.units", n_in, n_out, lin.out_features, lin.bias is not None,
                                      _gauge_of(acts[k + 1])))
    return spec


def _residual_mlp_spec(model: nn.Module, residual_stream: bool) -> SymmetrySpec:
    spec = SymmetrySpec()
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        spec.units.append(_dense_unit(f"{p}hidden", p + "fc1", p + "fc2", block.fc1.out_features, True,
                                      _gauge_of(block.act)))
    if residual_stream:
        incoming = [("inp.weight", 0), ("inp.bias", 0)]
        outgoing = [("out.weight", 1)]
        axes = incoming + outgoing
        for i in range(len(model.blocks)):
            axes += [(f"blocks.{i}.fc1.weight", 1), (f"blocks.{i}.fc2.weight", 0), (f"blocks.{i}.fc2.bias", 0)]
        spec.residual.append(UnitGroup("residual", model.inp.out_features, axes, incoming, outgoing))
    return spec


def _transformer_spec(model: nn.Module, residual_stream: bool) -> SymmetrySpec:
    cfg = model.cfg
    spec = SymmetrySpec()
    for i in range(cfg.n_layers):
        spec.heads.append(HeadGroup(f"blocks.{i}.heads", cfg.n_heads, f"blocks.{i}.attn."))
        if not cfg.attn_only:
            p = f"blocks.{i}.mlp."
            incoming = [(p + "W_in", 1), (p + "b_in", 0)]
            outgoing = [(p + "W_out", 0)]
            spec.units.append(UnitGroup(f"blocks.{i}.mlp.units", cfg.d_mlp, incoming + outgoing, incoming, outgoing,
                                        "scale" if cfg.act_fn == "relu" else None))
    if residual_stream:
        incoming = [("embed.W_E", 1), ("pos_embed.W_pos", 1)]
        outgoing = [("unembed.W_U", 0)]
        axes = incoming + outgoing
        ln = cfg.normalization == "LN"
        for i in range(cfg.n_layers):
            a = f"blocks.{i}.attn."
            axes += [(a + "W_Q", 1), (a + "W_K", 1), (a + "W_V", 1), (a + "W_O", 2), (a + "b_O", 0)]
            axes += [(f"blocks.{i}.ln1.w", 0), (f"blocks.{i}.ln1.b", 0)] if ln else []
            if not cfg.attn_only:
                m = f"blocks.{i}.mlp."
                axes += [(m + "W_in", 0), (m + "W_out", 1), (m + "b_out", 0)]
                axes += [(f"blocks.{i}.ln2.w", 0), (f"blocks.{i}.ln2.b", 0)] if ln else []
        axes += [("ln_final.w", 0), ("ln_final.b", 0)] if ln else []
        spec.residual.append(UnitGroup("residual", cfg.d_model, axes, incoming, outgoing))
    return spec


def symmetry_spec(model: nn.Module, residual_stream: bool = False) -> SymmetrySpec:
    """The symmetry spec of a supported architecture (nn.Sequential MLPs, ResidualMLP, slt_tools' Transformer).

    ``residual_stream=True`` adds the permutation of the residual stream's coordinates (ResidualMLP, Transformer).
    It is off by default: it is a symmetry (LayerNorm's mean and variance are permutation-invariant), but it mixes
    every layer into one group, so matching it is slower and canonical forms then reorder the embedding dimensions.
    Without LayerNorm the residual stream even has a full GL(d_model) symmetry, which is not described here.
    """
    from slt_tools.models.mlp import ResidualMLP
    from slt_tools.models.transformer import Transformer

    if isinstance(model, nn.Sequential):
        if residual_stream:
            raise ValueError("an nn.Sequential MLP has no residual stream (residual_stream=True)")
        return spec_for_sequential(model)
    if isinstance(model, ResidualMLP):
        return _residual_mlp_spec(model, residual_stream)
    if isinstance(model, Transformer):
        return _transformer_spec(model, residual_stream)
    raise ValueError(f"no symmetry spec for {type(model).__name__}: supported are nn.Sequential MLPs "
                     "(Linear + ReLU/LeakyReLU/Tanh/GELU), slt_tools.models.ResidualMLP and "
                     "slt_tools.models.Transformer; pass spec= explicitly for other architectures")
