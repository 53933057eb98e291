"""Restrictions: named sets of parameter coordinates, their flat masks, partitions and hand-written specs."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

IndexSpec = Any  # True / "all" / ... (whole tensor), an index expression, a bool mask, or a list of those

SPEC_HELP = (
    "Write the restriction by hand: slt.restrictions.from_spec(model, {'<param name>': <index>, ...}, name='...'), "
    "where <index> is True (the whole tensor), an index expression such as (3,) or (slice(None), slice(16, 32)), "
    "a bool mask of the parameter's shape, or a list of those; or describe the attention class once with "
    "slt.restrictions.register(Family(...)) (see docs/transformers.md)."
)


@dataclass(frozen=True, eq=False)
class Restriction:
    """A named set of coordinates: parameter name → bool mask of the parameter's shape (True = moves).

    Parameters absent from ``masks`` do not move at all. Masks are stored on the CPU; entries selecting nothing are
    dropped, and a restriction selecting nothing at all is a ``ValueError``.
    """

    name: str
    masks: Mapping[str, torch.Tensor] = field(repr=False)

    def __post_init__(self) -> None:
        clean: dict[str, torch.Tensor] = {}
        for pname, mask in self.masks.items():
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise ValueError(f"restriction {self.name!r}: the mask of {pname!r} must be a bool tensor")
            if mask.any():
                clean[pname] = mask.detach().to("cpu", copy=True)
        if not clean:
            raise ValueError(f"restriction {self.name!r} is empty: it selects no coordinate")
        object.__setattr__(self, "masks", clean)

    @property
    def names(self) -> tuple[str, ...]:
        """The parameters this restriction touches."""
        return tuple(self.masks)

    @property
    def numel(self) -> int:
        """Number of selected coordinates."""
        return sum(int(m.sum()) for m in self.masks.values())

    def __repr__(self) -> str:
        return f"Restriction({self.name!r}, {self.numel} coordinates in {len(self.masks)} parameters)"

    def counts(self) -> dict[str, int]:
        """Selected coordinates per parameter (for headers, reports and ``to_dict``)."""
        return {k: int(m.sum()) for k, m in self.masks.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "numel": self.numel, "counts": self.counts()}

    def validate(self, model: nn.Module) -> Restriction:
        """Check every name is a parameter of ``model`` and every mask has its shape; returns self."""
        params = dict(model.named_parameters())
        for pname, mask in self.masks.items():
            if pname not in params:
                raise ValueError(f"restriction {self.name!r} names {pname!r}, which is not a parameter of the model")
            if tuple(mask.shape) != tuple(params[pname].shape):
                raise ValueError(f"restriction {self.name!r}: mask of {pname!r} has shape {tuple(mask.shape)}, "
                                 f"the parameter has {tuple(params[pname].shape)}")
        return self

    def flat_mask(self, names: Sequence[str], shapes: Sequence[Sequence[int]],
                  device: torch.device | str | None = None) -> torch.Tensor:
        """Bool mask over θ = cat([p.reshape(-1) for p in params in the order ``names``]) (e.g. a ``FlatParams``
        layout's ``names``/``shapes``). Parameters in ``names`` but not here are all False; a parameter here but
        not in ``names`` would be silently frozen, so it is a ``ValueError``."""
        index = {n: i for i, n in enumerate(names)}
        missing = [n for n in self.masks if n not in index]
        if missing:
            raise ValueError(f"restriction {self.name!r} selects {missing}, absent from the flat layout {list(names)}")
        pieces = []
        for n, shape in zip(names, shapes):
            if n in self.masks:
                if tuple(self.masks[n].shape) != tuple(shape):
                    raise ValueError(f"restriction {self.name!r}: mask of {n!r} has shape "
                                     f"{tuple(self.masks[n].shape)}, the layout says {tuple(shape)}")
                pieces.append(self.masks[n].reshape(-1))
            else:
                pieces.append(torch.zeros(math.prod(shape), dtype=torch.bool))
        return torch.cat(pieces).to(device) if pieces else torch.zeros(0, dtype=torch.bool, device=device)

    def overlap(self, other: Restriction) -> int:
        """Number of coordinates selected by both."""
        return sum(int((m & other.masks[k]).sum()) for k, m in self.masks.items() if k in other.masks)

    def overlaps(self, other: Restriction) -> bool:
        return self.overlap(other) > 0

    def union(self, *others: Restriction, name: str | None = None) -> Restriction:
        """Coordinates selected by any of ``self`` and ``others``."""
        masks = dict(self.masks)
        for other in others:
            for k, m in other.masks.items():
                if k in masks and masks[k].shape != m.shape:
                    raise ValueError(f"cannot unite {self.name!r} and {other.name!r}: masks of {k!r} differ in shape")
                masks[k] = masks[k] | m if k in masks else m
        return Restriction(name or "+".join([self.name, *(o.name for o in others)]), masks)

    __or__ = union


# ---------------------------------------------------------------------------------------------- collections


def _as_list(restrictions: Mapping[str, Restriction] | Iterable[Restriction]) -> list[Restriction]:
    rs = list(restrictions.values()) if isinstance(restrictions, Mapping) else list(restrictions)
    if not rs:
        raise ValueError("no restrictions given")
    for r in rs:
        if not isinstance(r, Restriction):
            raise ValueError(f"expected Restriction objects, got {type(r).__name__}")
    return rs


def partition(restrictions: Mapping[str, Restriction] | Iterable[Restriction]) -> dict[str, Restriction]:
    """Validate that no two restrictions share a coordinate (a partition of their union); returns them by name.

    Raises ``ValueError`` naming the first overlapping pair (e.g. GQA heads sharing a K/V head) or a repeated name.
    """
    rs = _as_list(restrictions)
    out: dict[str, Restriction] = {}
    for r in rs:
        if r.name in out:
            raise ValueError(f"two restrictions are named {r.name!r}")
        out[r.name] = r
    for i, a in enumerate(rs):
        for b in rs[i + 1:]:
            if (shared := a.overlap(b)) > 0:
                raise ValueError(f"restrictions {a.name!r} and {b.name!r} share {shared} coordinates: not a "
                                 "partition (with grouped-query attention use heads(model, shared_kv=False))")
    return out


def parameter_names(model: nn.Module, restrictions: Mapping[str, Restriction] | Iterable[Restriction]) -> list[str]:
    """The parameters any restriction touches, in ``model.named_parameters()`` order (validating each restriction):
    the names of the flat layout a batched run over these restrictions needs."""
    rs = _as_list(restrictions)
    for r in rs:
        r.validate(model)
    touched = {n for r in rs for n in r.masks}
    return [n for n, _ in model.named_parameters() if n in touched]


def flat_masks(restrictions: Mapping[str, Restriction] | Iterable[Restriction], names: Sequence[str],
               shapes: Sequence[Sequence[int]], device: torch.device | str | None = None) -> torch.Tensor:
    """(R, D) bool: row r is restriction r's :meth:`Restriction.flat_mask` over the layout (names, shapes)."""
    return torch.stack([r.flat_mask(names, shapes, device) for r in _as_list(restrictions)])


def group_by_parameters(restrictions: Mapping[str, Restriction] | Iterable[Restriction]
                        ) -> dict[tuple[str, ...], list[str]]:
    """Restriction names grouped by the set of parameters they touch (sorted tuple → names, first-seen order): the
    heads of one layer form one group, so a batched run can share everything upstream of that layer."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for r in _as_list(restrictions):
        groups.setdefault(tuple(sorted(r.masks)), []).append(r.name)
    return groups


# ---------------------------------------------------------------------------------------------- hand-written specs


def _select(mask: torch.Tensor, spec: IndexSpec, pname: str) -> None:
    if spec is True or spec is Ellipsis or spec == "all":
        mask[...] = True
    elif isinstance(spec, torch.Tensor) and spec.dtype == torch.bool:
        if tuple(spec.shape) != tuple(mask.shape):
            raise ValueError(f"mask for {pname!r} has shape {tuple(spec.shape)}, the parameter has "
                             f"{tuple(mask.shape)}")
        mask |= spec.to(mask.device)
    elif isinstance(spec, list) and not all(isinstance(s, int) for s in spec):
        for s in spec:
            _select(mask, s, pname)
    else:
        try:
            mask[spec] = True
        except (IndexError, TypeError, RuntimeError) as exc:
            raise ValueError(f"index {spec!r} does not fit {pname!r} of shape {tuple(mask.shape)}: {exc}") from exc


def from_spec(model: nn.Module, spec: Mapping[str, IndexSpec], name: str = "custom") -> Restriction:
    """A restriction written by hand: parameter name → True (whole tensor), an index expression (``(3,)``,
    ``(slice(None), slice(16, 32))``, ``[0, 2]``), a bool mask of the parameter's shape, or a list of those.

    Works for any architecture; every entry must name a parameter and select something (else ``ValueError``).
    """
    params = dict(model.named_parameters())
    if not spec:
        raise ValueError(f"restriction {name!r}: the spec is empty")
    masks = {}
    for pname, sel in spec.items():
        if pname not in params:
            close = [n for n in params if n.split(".")[-1] == pname.split(".")[-1]][:5]
            raise ValueError(f"restriction {name!r}: {pname!r} is not a parameter of the model"
                             + (f" (did you mean one of {close}?)" if close else ""))
        mask = torch.zeros(params[pname].shape, dtype=torch.bool)
        _select(mask, sel, pname)
        if not mask.any():
            raise ValueError(f"restriction {name!r}: the entry for {pname!r} selects nothing")
        masks[pname] = mask
    return Restriction(name, masks)


def as_restriction(model: nn.Module, restrict_to: Sequence[str] | Callable[[str], bool] | Restriction,
                   name: str = "restricted") -> Restriction:
    """``restrict_to``'s whole-tensor forms (a list of names or a predicate on names) as a :class:`Restriction`."""
    if isinstance(restrict_to, Restriction):
        return restrict_to.validate(model)
    names = [restrict_to] if isinstance(restrict_to, str) else None
    if callable(restrict_to):
        names = [n for n, _ in model.named_parameters() if restrict_to(n)]
        if not names:
            raise ValueError("restrict_to matched no parameter")
    return from_spec(model, dict.fromkeys(names if names is not None else list(restrict_to), True), name)


def collect(restrictions: Mapping[str, Restriction] | Iterable[Restriction] | Restriction,
            model: nn.Module | None = None, disjoint: bool = False) -> dict[str, Restriction]:
    """Restrictions as ``{name: Restriction}``, checked: at least one, each a :class:`Restriction`, names unique
    (and equal to their keys in a mapping), pairwise disjoint if ``disjoint`` (:func:`partition`), and — given
    ``model`` — naming only its parameters with masks of their shapes. Every failure is a ``ValueError`` (callers
    check before sampling)."""
    if isinstance(restrictions, Restriction):
        restrictions = [restrictions]
    if isinstance(restrictions, Mapping):
        for key, r in restrictions.items():
            if isinstance(r, Restriction) and key != r.name:
                raise ValueError(f"restriction {r.name!r} is stored under the key {key!r}: keys must be the names")
    if disjoint:
        out = partition(restrictions)
    else:
        out = {}
        for r in _as_list(restrictions):
            if r.name in out:
                raise ValueError(f"two restrictions are named {r.name!r}")
            out[r.name] = r
    if model is not None:
        for r in out.values():
            r.validate(model)
    return out
