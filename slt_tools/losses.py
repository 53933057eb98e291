"""Ready loss functions ``loss_fn(model, batch)`` for language models, for the LLC estimators.

:func:`causal_lm` is the mean next-token cross-entropy over real (unpadded, unignored) target tokens;
:func:`per_token_loss` gives the per-position losses and their validity mask for observables. Models may return a
logits tensor (``slt_tools.models.Transformer``, TransformerLens ``HookedTransformer``), a Hugging Face
``ModelOutput`` with ``.logits``, or a tuple whose first element is the logits. Batches may be a token tensor
``[batch, pos]``, a tuple ``(input_ids,)`` / ``(input_ids, attention_mask)``, or a dict with ``"input_ids"`` and
optionally ``"attention_mask"`` (1 = real token) and ``"labels"`` (Hugging Face convention: unshifted, ``-100`` =
ignore). The mask is passed to models whose ``forward`` takes ``attention_mask``; for the others pad on the right,
where a causal model never attends to the padding from a real position.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
_ACCEPTS: dict[Any, frozenset[str]] = {}


def _as_tokens(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value
    else:
        rows = list(value)
        lengths = {len(r) for r in rows} if rows and not isinstance(rows[0], int) else None
        if lengths is not None and len(lengths) > 1:
            raise ValueError(f"{what} is ragged (sequence lengths {sorted(lengths)}): pad the sequences to one "
                             "length and pass an attention_mask (1 = real token, 0 = padding)")
        t = torch.as_tensor(rows)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise ValueError(f"{what} must be [batch, pos], got shape {tuple(t.shape)}")
    return t


def token_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(input_ids, attention_mask or None, labels or None) from a tensor, tuple/list or dict batch, validated:
    integer token ids ``[batch, pos]`` and masks/labels of the same shape, else ``ValueError``."""
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise ValueError(f"a dict batch needs 'input_ids', got keys {sorted(batch)}")
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    elif isinstance(batch, (tuple, list)) and batch and not isinstance(batch[0], int):
        if len(batch) > 2:
            raise ValueError(f"a tuple batch is (input_ids,) or (input_ids, attention_mask), got {len(batch)} items")
        ids, mask, labels = batch[0], (batch[1] if len(batch) == 2 else None), None
    else:
        ids, mask, labels = batch, None, None
    ids = _as_tokens(ids, "input_ids")
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    out = [ids]
    for name, value in (("attention_mask", mask), ("labels", labels)):
        if value is not None:
            value = _as_tokens(value, name).to(ids.device)
            if value.shape != ids.shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, input_ids {tuple(ids.shape)}: the batch "
                                 "is ragged or mismatched")
        out.append(value)
    if ids.shape[1] < 2:
        raise ValueError("next-token losses need sequences of at least 2 tokens")
    return out[0], out[1], out[2]


def _accepted(model: Any) -> frozenset[str]:
    forward = getattr(model, "forward", model)
    key = getattr(forward, "__func__", forward)
    if key not in _ACCEPTS:
        try:
            _ACCEPTS[key] = frozenset(inspect.signature(forward).parameters)
        except (TypeError, ValueError):
            _ACCEPTS[key] = frozenset()
    return _ACCEPTS[key]


def logits_of(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits ``[batch, pos, vocab]`` whatever it returns (tensor, ``.logits``, tuple)."""
    accepted = _accepted(model)
    kwargs: dict[str, Any] = {}
    if attention_mask is not None and "attention_mask" in accepted:
        kwargs["attention_mask"] = attention_mask
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    out = model(input_ids, **kwargs)
    if isinstance(out, torch.Tensor):
        logits = out
    elif getattr(out, "logits", None) is not None:
        logits = out.logits
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    else:
        raise ValueError(f"cannot find logits in the model's output of type {type(out).__name__}")
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    return logits


def per_token_loss(model: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses, valid), both ``[batch, pos - 1]``: the cross-entropy of predicting token t+1 at position t, zero
    where the target is padding or ``-100``, and the float mask of positions that count."""
    ids, mask, labels = token_batch(batch)
    logits = logits_of(model, ids, mask)
    targets = (labels if labels is not None else ids)[:, 1:]
    valid = targets != IGNORE_INDEX
    if mask is not None:
        valid = valid & mask[:, 1:].bool() & mask[:, :-1].bool()
    # every position's row of the logits as they are (a view: slicing off the last position first would copy them
    # all before log_softmax makes its own copy), the last position's target ignored, its loss dropped after
    shifted = F.pad(targets.clamp_min(0), (0, 1), value=IGNORE_INDEX)
    losses = F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
    valid = valid.to(losses.dtype)
    return losses.view(ids.shape)[:, :-1] * valid, valid


def causal_lm(model: Any, batch: Any) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's valid target tokens: ``loss_fn=slt.losses.causal_lm``."""
    losses, valid = per_token_loss(model, batch)
    return losses.sum() / valid.sum().clamp_min(1.0)
