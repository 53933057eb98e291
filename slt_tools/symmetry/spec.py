"""Declarative description of a network's parameter symmetries.

A :class:`UnitGroup` is a set of interchangeable hidden units: a permutation of them acts on every (parameter, axis)
listed in ``axes`` (in blocks of ``block`` consecutive indices, so packed attention heads can be described too).
``incoming`` are the slices that compute the unit (weight rows and biases), ``outgoing`` those that read it.
``gauge`` names the continuous or discrete symmetry of a single unit:

* ``"scale"`` — positively homogeneous activations (ReLU, LeakyReLU): incoming × α, outgoing × 1/α, α > 0;
* ``"sign"`` — odd activations (tanh): incoming × −1, outgoing × −1;
* ``None`` — permutation only (GELU, softplus, …).

A :class:`HeadGroup` is one attention layer in TransformerLens layout (``W_Q[h, d_model, d_head]`` …): heads permute
along axis 0 of ``W_Q, W_K, W_V, W_O, b_Q, b_K, b_V``, and within head h any invertible A, B act as
(W̃_Q, W̃_K) → (W̃_Q A, W̃_K A^{-T}) and (W̃_V, W_O) → (W̃_V B, B^{-1} W_O), with W̃ = [W; b] the bias-augmented maps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

POSITIVE_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU)
ODD = (nn.Tanh,)
PERMUTATION_ONLY = (nn.GELU, nn.SiLU, nn.Sigmoid, nn.Softplus, nn.ELU)
TRANSPARENT = (nn.Dropout, nn.Identity)


@dataclass
class UnitGroup:
    name: str
    size: int
    axes: list[tuple[str, int]]
    incoming: list[tuple[str, int]]
    outgoing: list[tuple[str, int]]
    gauge: str | None = None
    block: int = 1


@dataclass
class HeadGroup:
    name: str
    n_heads: int
    prefix: str  # e.g. "blocks.0.attn."

    def p(self, short: str) -> str:
        return self.prefix + short

    @property
    def axes(self) -> list[tuple[str, int]]:
        return [(self.p(k), 0) for k in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")]


@dataclass
class SymmetrySpec:
    """All symmetries of a model, in forward order (units that read other units come later)."""

    units: list[UnitGroup] = field(default_factory=list)
    heads: list[HeadGroup] = field(default_factory=list)

    def permutation_groups(self) -> list[tuple[str, int, list[tuple[str, int]], int]]:
        """(name, size, axes, block) of every permutation group, units and heads alike."""
        return ([(u.name, u.size, u.axes, u.block) for u in self.units]
                + [(h.name, h.n_heads, h.axes, 1) for h in self.heads])


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
            layers.append((prefix + name, module))
            acts.append(pending)
            pending = None
        elif isinstance(module, TRANSPARENT):
            continue
        elif isinstance(module, POSITIVE_HOMOGENEOUS + ODD + PERMUTATION_ONLY):
            if pending is not None:
                raise ValueError(f"two activations in a row at {prefix + name}: cannot describe its symmetries")
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


def symmetry_spec(model: nn.Module) -> SymmetrySpec:
    """The symmetry spec of a supported architecture (nn.Sequential MLPs, ResidualMLP, slt_tools' Transformer)."""
    from slt_tools.models.mlp import ResidualMLP
    from slt_tools.models.transformer import Transformer

    if isinstance(model, nn.Sequential):
        return spec_for_sequential(model)
    if isinstance(model, ResidualMLP):
        spec = SymmetrySpec()
        for i, block in enumerate(model.blocks):
            p = f"blocks.{i}."
            spec.units.append(_dense_unit(f"{p}hidden", p + "fc1", p + "fc2", block.fc1.out_features, True,
                                          _gauge_of(block.act)))
        return spec
    if isinstance(model, Transformer):
        spec = SymmetrySpec()
        for i in range(model.cfg.n_layers):
            spec.heads.append(HeadGroup(f"blocks.{i}.heads", model.cfg.n_heads, f"blocks.{i}.attn."))
            if not model.cfg.attn_only:
                p = f"blocks.{i}.mlp."
                incoming = [(p + "W_in", 1), (p + "b_in", 0)]
                outgoing = [(p + "W_out", 0)]
                spec.units.append(UnitGroup(f"blocks.{i}.mlp.units", model.cfg.d_mlp, incoming + outgoing, incoming,
                                            outgoing, "scale" if model.cfg.act_fn == "relu" else None))
        return spec
    raise ValueError(f"no symmetry spec for {type(model).__name__}: supported are nn.Sequential MLPs "
                     "(Linear + ReLU/LeakyReLU/Tanh/GELU), slt_tools.models.ResidualMLP and "
                     "slt_tools.models.Transformer; pass spec= explicitly for other architectures")
