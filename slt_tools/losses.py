"""Ready loss functions ``loss_fn(model, batch)`` for language models, for the LLC estimators.

:func:`causal_lm` is the mean next-token cross-entropy over real (unpadded, unignored) target tokens;
:func:`per_token_loss` gives the per-position losses and their validity mask for observables; both use
:func:`token_cross_entropy`, ``F.cross_entropy`` with one vocabulary-sized buffer per step instead of three. Models
may return a logits tensor (``slt_tools.models.Transformer``, TransformerLens ``HookedTransformer``), a Hugging Face
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
    # all), the last position's target ignored, its loss dropped after
    shifted = F.pad(targets.clamp_min(0), (0, 1), value=IGNORE_INDEX)
    losses = token_cross_entropy(logits.flatten(0, 1), shifted.flatten())
    valid = valid.to(losses.dtype)
    return losses.view(ids.shape)[:, :-1] * valid, valid


class _TokenCrossEntropy(torch.autograd.Function):
    """ℓ_i = logsumexp_v(z_iv) − z_{i,y_i} (0 where y_i = −100), ∂ℓ_i/∂z_iv = softmax(z_i)_v − [v = y_i].

    The backward builds that gradient in one vocabulary-sized buffer (exp of z − logsumexp in place, the targets'
    −1 scattered in), from the saved logits and the (N,) logsumexp. ``F.cross_entropy`` saves an (N, V)
    log-softmax instead (the same memory between forward and backward), and its backward fills an (N, V) zero
    gradient for the gather and then writes a third (N, V) buffer. Those are a language-model step's largest
    tensors (N·V = 1 M per chain in experiments/bench_refined.py), and on a CPU each fresh one costs a page fault
    per 4 KiB (docs/transformers.md, "Speed"). Under create_graph (a Hessian-vector product) the backward is the
    same formula out of place, differentiable in the logits. ``torch.func`` transforms use the generated vmap
    rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return torch.where(target != IGNORE_INDEX, lse - picked, torch.zeros_like(lse)), lse

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: tuple[torch.Tensor, ...]) -> None:
        ctx.save_for_backward(inputs[0], inputs[1], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _: Any) -> tuple[torch.Tensor, None]:
        logits, target, lse = ctx.saved_tensors
        g = torch.where(target != IGNORE_INDEX, grad, torch.zeros_like(grad)).unsqueeze(-1)
        index = target.clamp_min(0).unsqueeze(-1)
        if torch.is_grad_enabled():     # create_graph: differentiable in the logits
            onehot = torch.zeros_like(logits).scatter(-1, index, 1.0)
            return (torch.softmax(logits, dim=-1) - onehot) * g, None
        out = (logits - lse.unsqueeze(-1)).exp_().mul_(g)
        return out.scatter_add_(-1, index, -g), None


def token_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of ``logits`` (N, V) against ``target`` (N,), 0 where the target is −100: equal to
    ``F.cross_entropy(..., reduction="none", ignore_index=-100)`` to float rounding, with one vocabulary-sized
    buffer in its backward instead of three (:class:`_TokenCrossEntropy`)."""
    return _TokenCrossEntropy.apply(logits, target)[0]


def causal_lm(model: Any, batch: Any) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's valid target tokens: ``loss_fn=slt.losses.causal_lm``."""
    losses, valid = per_token_loss(model, batch)
    return losses.sum() / valid.sum().clamp_min(1.0)
