"""Checkpoint discovery and safe loading.

Formats: safetensors (preferred; the step is stored in the file's metadata as ``{"step": "1200"}``) and
``torch.save`` files loaded with ``weights_only=True`` — plain state dicts, or dicts ``{"step": int,
"state_dict" | "model" | "model_state_dict": {...}}``. Arbitrary pickled objects are refused, never executed.

**The step of a file** comes from its metadata first: safetensors metadata ``step`` (or ``global_step``), or a torch
dict's ``step`` (or ``global_step``) entry. It must be a non-negative integer (an int, an integer tensor with one
element, or a string of decimal digits); anything else is an error for that file, never a guess. Only without
metadata is the name used, by one rule (:data:`NAME_RULE`): the file name without its suffix must be

* all digits (``1200.pt``), or
* a prefix without digits that ends with one of the words ``step``, ``steps``, ``global_step``, ``iter``,
  ``iteration``, ``ckpt``, ``checkpoint`` (at the start or after ``-``, ``_`` or ``.``), then at most one
  ``-``/``_``/``.``, then the digits, which end the name: ``step_001200.pt``, ``ckpt-1200.safetensors``,
  ``model.step1200.pt``.

Anything else is refused as ambiguous: ``model_v2.pt`` (a version?), ``step600_seed0.pt`` (two numbers),
``step_1e3.pt``, ``step_-1.pt``, ``epoch_3.pt``, ``model_1200.pt`` — save such checkpoints with the step in their
metadata (:func:`save_checkpoint` does). Two checkpoints with the same step (``step_10.pt`` and ``step_010.pt``) are
an error naming both files.
"""
from __future__ import annotations

import glob
import numbers
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slt_tools.files import atomic_write_path

SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
STEP_KEYS = ("step", "global_step")
NAME_RULE = re.compile(r"^(?:(?:[^\d]*[-_.])?(?:step|steps|global_step|iter|iteration|ckpt|checkpoint)[-_.]?)?"
                       r"(?P<step>\d+)$", re.IGNORECASE)


class CheckpointError(ValueError):
    """A checkpoint cannot be read safely, does not fit the model, or its training step cannot be told."""


@dataclass
class CheckpointRef:
    """One checkpoint: its training step, an id for the results store, and where its weights come from."""

    step: int
    id: str
    path: Path | None = None
    state_dict: Mapping[str, torch.Tensor] | None = None

    def load(self) -> dict[str, torch.Tensor]:
        if self.state_dict is not None:
            return dict(self.state_dict)
        assert self.path is not None
        return read_checkpoint(self.path)[0]


def save_checkpoint(path: str | Path, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], step: int,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors checkpoint atomically (:func:`slt_tools.files.atomic_write_path`) with ``step`` in its
    metadata. Returns ``path``."""
    from safetensors.torch import save_file

    step = parse_step(step, f"save_checkpoint({path!s})")
    path = Path(path)
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    meta = {"step": str(step), **{str(k): str(v) for k, v in (metadata or {}).items()}}
    atomic_write_path(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def parse_step(value: Any, where: str) -> int:
    """A training step as a non-negative int; :class:`CheckpointError` naming ``where`` for anything else."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = int(value.item())
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise CheckpointError(f"{where}: the training step must be a non-negative integer, got {value!r}")
    return int(value)


def _step_of(meta: Mapping[str, Any], where: str) -> int | None:
    for key in STEP_KEYS:
        if key in meta:
            return parse_step(meta[key], f"{where} ('{key}' entry)")
    return None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """(state_dict, step from the file's metadata or None) from a safetensors or weights-only torch file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            return sd, _step_of(meta, str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load — it contains pickled objects that are not plain tensors "
                              f"(loading with weights_only=True; never unpickle untrusted data): {exc}") from exc
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any read failure is reported with the file name
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    step = None
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        step = _step_of(obj, str(path))
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (or a dict with a 'state_dict'/'model' entry)")
    return dict(obj), step


def step_from_name(path: str | Path) -> int | None:
    """The step the file name gives by :data:`NAME_RULE` (module docstring), or None if the name is ambiguous."""
    match = NAME_RULE.match(Path(path).stem)
    return int(match.group("step")) if match else None


def _metadata_step(path: Path) -> int | None:
    """The step in a file's metadata (None if it has none); reads only the metadata where the format allows."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # noqa: BLE001 - reported with the file name
            raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
        return _step_of(meta, str(path))
    try:  # mmap: the tensors are not read, only the pickle's small dict
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy format, or unreadable: read_checkpoint reports the latter
        obj = read_checkpoint(path)[1]
        return obj
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _step_of(obj, str(path))
    return None


def _ref_from_path(path: Path) -> CheckpointRef:
    step = _metadata_step(path)
    if step is None:
        step = step_from_name(path)
    if step is None:
        raise CheckpointError(f"{path}: cannot tell its training step — it has no 'step' metadata and its name does "
                              "not follow the naming rule (e.g. step_001200.pt; see slt_tools.trajectory.checkpoints)"
                              "; save it with the step in its metadata or rename it")
    return CheckpointRef(step=step, id=path.name, path=path)


def _paths(source: str | Path) -> list[Path]:
    text = str(source)
    if any(ch in text for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(text))]
    elif Path(text).is_dir():
        paths = sorted(p for p in Path(text).iterdir() if not p.name.startswith("."))
    elif Path(text).is_file():
        return [Path(text)]
    else:
        raise CheckpointError(f"no checkpoint directory, file or glob matches {text!r}")
    return [p for p in paths if p.suffix in SUFFIXES and p.is_file()]


def find_checkpoints(source: str | Path | Iterable[Any]) -> tuple[list[CheckpointRef], dict[str, str]]:
    """(checkpoints sorted by step, {file name: why it is unusable}) — per-file failures are collected, not raised.

    Set-level problems raise :class:`CheckpointError`: nothing matches, or two checkpoints share a step or an id.
    """
    items: list[Any] = _paths(source) if isinstance(source, (str, Path)) else list(source)
    refs, failed = [], {}
    for item in items:
        if isinstance(item, (str, Path)):
            try:
                refs.append(_ref_from_path(Path(item)))
            except CheckpointError as exc:
                failed[Path(item).name] = str(exc)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Mapping):
            step = parse_step(item[0], "a (step, state_dict) pair")
            refs.append(CheckpointRef(step=step, id=f"step-{step}", state_dict=item[1]))
        else:
            raise CheckpointError(f"cannot use {type(item).__name__} as a checkpoint: give paths or "
                                  "(step, state_dict) pairs")
    if not items:
        raise CheckpointError(f"the checkpoint set {source!r} is empty")
    by_step: dict[int, CheckpointRef] = {}
    for ref in refs:
        if ref.step in by_step:
            other = by_step[ref.step]
            raise CheckpointError(f"two checkpoints claim step {ref.step}: {other.path or other.id} and "
                                  f"{ref.path or ref.id}; remove one or give them distinct steps")
        by_step[ref.step] = ref
    ids = [r.id for r in refs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise CheckpointError(f"duplicate checkpoints {dupes}")
    return sorted(refs, key=lambda r: (r.step, r.id)), failed


def discover_checkpoints(source: str | Path | Iterable[Any]) -> list[CheckpointRef]:
    """Checkpoints sorted by step from a directory, a glob pattern, a list of paths, or (step, state_dict) pairs;
    raises :class:`CheckpointError` if any file's step cannot be told (:func:`find_checkpoints` collects instead)."""
    refs, failed = find_checkpoints(source)
    if failed:
        raise CheckpointError("; ".join(failed.values()))
    return refs


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy a state dict into ``model`` after checking keys and shapes; errors name the file and the keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or shapes:
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
                 f"shape mismatches {shapes}" if shapes else ""]
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(p for p in parts if p))
    model.load_state_dict(dict(state_dict), strict=True)
