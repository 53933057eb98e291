"""Checkpoint discovery and safe loading.

Formats: safetensors (preferred; the step may be stored in the file's metadata as ``{"step": "1200"}``) and
``torch.save`` files loaded with ``weights_only=True`` — plain state dicts, or dicts ``{"step": int,
"state_dict" | "model": {...}}``. Arbitrary pickled objects are refused, never executed.

The step of a file comes from its metadata when present, otherwise from the last integer in the file name
(regex ``(\\d+)(?!.*\\d)`` on the stem: ``step_001200.pt``, ``ckpt-1200.safetensors``, ``1200.pt`` → 1200).
"""
from __future__ import annotations

import glob
import os
import pickle
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_STEP_RE = re.compile(r"(\d+)(?!.*\d)")


class CheckpointError(ValueError):
    """A checkpoint cannot be read safely or does not fit the model."""


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
    """Write a safetensors checkpoint atomically (temp file + rename) with ``step`` in its metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    meta = {"step": str(int(step)), **{str(k): str(v) for k, v in (metadata or {}).items()}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """(state_dict, step or None) from a safetensors or weights-only torch file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            step = int(meta["step"]) if "step" in meta else None
            return sd, step
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
        step = int(obj["step"]) if "step" in obj else None
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (or a dict with a 'state_dict'/'model' entry)")
    return dict(obj), step


def step_from_name(path: Path) -> int | None:
    match = _STEP_RE.search(path.stem)
    return int(match.group(1)) if match else None


def _ref_from_path(path: Path) -> CheckpointRef:
    step = None
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            step = int(meta["step"]) if "step" in meta else None
        except Exception:  # noqa: BLE001 - unreadable files are reported when loaded
            step = None
    if step is None:
        step = step_from_name(path)
    if step is None:
        raise CheckpointError(f"{path}: cannot tell its training step (no 'step' metadata and no number in the name)")
    return CheckpointRef(step=step, id=path.name, path=path)


def discover_checkpoints(source: str | Path | Iterable[Any]) -> list[CheckpointRef]:
    """Checkpoints sorted by step from a directory, a glob pattern, a list of paths, or (step, state_dict) pairs."""
    if isinstance(source, (str, Path)):
        text = str(source)
        if any(ch in text for ch in "*?["):
            paths = [Path(p) for p in sorted(glob.glob(text))]
        elif Path(text).is_dir():
            paths = sorted(p for p in Path(text).iterdir() if p.suffix in SUFFIXES and not p.name.startswith("."))
        elif Path(text).is_file():
            paths = [Path(text)]
        else:
            raise CheckpointError(f"no checkpoint directory, file or glob matches {text!r}")
        refs = [_ref_from_path(p) for p in paths if p.suffix in SUFFIXES]
    else:
        refs = []
        for item in source:
            if isinstance(item, (str, Path)):
                refs.append(_ref_from_path(Path(item)))
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Mapping):
                refs.append(CheckpointRef(step=int(item[0]), id=f"step-{int(item[0])}", state_dict=item[1]))
            else:
                raise CheckpointError(f"cannot use {type(item).__name__} as a checkpoint: give paths or "
                                      "(step, state_dict) pairs")
    if not refs:
        raise CheckpointError(f"the checkpoint set {source!r} is empty")
    ids = [r.id for r in refs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise CheckpointError(f"duplicate checkpoints {dupes}")
    return sorted(refs, key=lambda r: (r.step, r.id))


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
