"""A small reference transformer with TransformerLens parameter names and shapes.

``embed.W_E[d_vocab, d_model]``, ``pos_embed.W_pos[n_ctx, d_model]``; per block ``blocks.{i}.attn.W_Q/W_K/W_V
[n_heads, d_model, d_head]``, ``W_O[n_heads, d_head, d_model]``, ``b_Q/b_K/b_V[n_heads, d_head]``, ``b_O[d_model]``;
optional ``blocks.{i}.mlp.W_in[d_model, d_mlp]``, ``b_in``, ``W_out[d_mlp, d_model]``, ``b_out``; optional LayerNorms
``blocks.{i}.ln1.w/b``, ``ln2``, ``ln_final``; ``unembed.W_U[d_model, d_vocab]``, ``b_U``. Causal attention, written
with einsum only (no in-place ops, no data-dependent control flow) so it can be ``vmap``-ed over stacked parameters.

:func:`moving_head` evaluates an attention layer with one head's weights replaced and the others at the module's
own: the layer output is a sum over heads, attn(x) = Σ_k z_k(x)·W_O[k] + b_O, so with head h moved to u it is
Σ_{k≠h} z_k(x; w*)·W_O*[k] + z_h(x; u)·W_O(u) + b_O. Under ``vmap`` over (restriction, chain) pairs whose input x
is the same for all (everything upstream at w*), the w* terms are computed once and each pair computes one head.

Without LayerNorm the residual stream is carried further in factored form: the moved layer's output differs from
the shared part by a matrix of rank ≤ 2·d_head, δ = z_h(x; u)·W_O(u) − z_h(x; w*)·W_O*[h] = L·R with L = [z_h(u),
−z_h(w*)] (B, T, 2e) and R = [W_O(u); W_O*[h]] (2e, d) (:class:`LowRank`). Every linear map of the next layer (its
W_Q, W_K, W_V, or an MLP's W_in) and the unembedding act on it as x*·W + L·(R·W): the shared product once per step,
a rank-2e product per pair (for 8 heads of size 32 in d_model 256, about 1/3 of a full projection's multiply-adds
per pair with R·W; for the unembedding of a last-layer head, about 1/4 of x·W_U). It is the same function, summed
in another order.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TransformerConfig:
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_head: int = 16
    d_mlp: int = 256
    d_vocab: int = 64
    n_ctx: int = 64
    attn_only: bool = True
    normalization: str | None = None  # None or "LN"
    act_fn: str = "relu"  # "relu" or "gelu"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.normalization not in (None, "LN"):
            raise ValueError(f"normalization must be None or 'LN', got {self.normalization!r}")
        if self.act_fn not in ("relu", "gelu"):
            raise ValueError(f"act_fn must be 'relu' or 'gelu', got {self.act_fn!r}")
        if min(self.n_layers, self.d_model, self.n_heads, self.d_head, self.d_vocab, self.n_ctx) < 1:
            raise ValueError(f"all sizes must be positive: {self}")


class _Param(nn.Module):
    """A module holding named parameters (keeps TransformerLens-style dotted names)."""

    def __init__(self, **shapes: tuple[int, ...] | torch.Tensor) -> None:
        super().__init__()
        for name, value in shapes.items():
            self.register_parameter(name, nn.Parameter(value if isinstance(value, torch.Tensor)
                                                       else torch.zeros(value)))


class LayerNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w, self.b, eps=1e-5)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        h, d, e = cfg.n_heads, cfg.d_model, cfg.d_head
        self.cfg = cfg
        for name in ("W_Q", "W_K", "W_V"):
            self.register_parameter(name, nn.Parameter(torch.randn(h, d, e) * cfg.init_std))
        self.W_O = nn.Parameter(torch.randn(h, e, d) * cfg.init_std)
        for name in ("b_Q", "b_K", "b_V"):
            self.register_parameter(name, nn.Parameter(torch.zeros(h, e)))
        self.b_O = nn.Parameter(torch.zeros(d))

    #: set by :func:`moving_head`: (keep (n_heads,), the moved head's tensors, the unmoved heads' tensors)
    _moved: tuple[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]] | None = None

    def pattern(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities [batch, head, query_pos, key_pos]."""
        q = torch.einsum("bpd,hde->bphe", x, self.W_Q) + self.b_Q
        k = torch.einsum("bpd,hde->bphe", x, self.W_K) + self.b_K
        return _causal_softmax(torch.einsum("bqhe,bkhe->bhqk", q, k), self.cfg)

    def forward(self, x: torch.Tensor | LowRank) -> torch.Tensor:
        """The layer's output attn(x) = Σ_k z_k(x)·W_O[k] + b_O; x may be a :class:`LowRank` residual."""
        if self._moved is not None:
            if isinstance(x, LowRank):
                x = x.dense()
            return self.moved_parts(x, *self._moved).dense()
        if isinstance(x, LowRank):
            q, k, v = (x.per_head(getattr(self, f"W_{n}")) + getattr(self, f"b_{n}") for n in "QKV")
        else:
            q, k, v = (torch.einsum("bpd,hde->bphe", x, getattr(self, f"W_{n}")) + getattr(self, f"b_{n}")
                       for n in "QKV")
        z = torch.einsum("bhqk,bkhe->bqhe", _causal_softmax(torch.einsum("bqhe,bkhe->bhqk", q, k), self.cfg), v)
        return torch.einsum("bqhe,hed->bqd", z, self.W_O) + self.b_O

    def moved_parts(self, x: torch.Tensor, keep: torch.Tensor, head: Mapping[str, torch.Tensor],
                    own: Mapping[str, torch.Tensor]) -> LowRank:
        """The moved forward as a :class:`LowRank`: base Σ_k z_k(x; own)·own W_O[k] + b_O over every head (once
        per step when x and ``own`` are shared) plus δ = z_h(x; head)·W_O(head) − z_h(x; own)·own W_O[h] as L·R,
        h the head ``keep`` drops."""
        q, k, v = (torch.einsum("bpd,hde->bphe", x, own[f"W_{n}"]) + own[f"b_{n}"] for n in "QKV")
        z = torch.einsum("bhqk,bkhe->bqhe", _causal_softmax(torch.einsum("bqhe,bkhe->bhqk", q, k), self.cfg), v)
        every = torch.einsum("bqhe,hed->bqd", z, own["W_O"]) + self.b_O     # once per step when x is shared
        drop = 1.0 - keep                                                   # one-hot of the moved head
        q, k = x @ head["W_Q"] + head["b_Q"], x @ head["W_K"] + head["b_K"]
        z_h = _causal_softmax(torch.einsum("bqe,bke->bqk", q, k), self.cfg) @ (x @ head["W_V"] + head["b_V"])
        left = torch.cat([z_h, -torch.einsum("bqhe,h->bqe", z, drop)], dim=-1)
        right = torch.cat([head["W_O"], torch.tensordot(drop, own["W_O"], dims=1)], dim=0)
        return LowRank(every, left, right)


@dataclass
class LowRank:
    """A residual stream x = base + left·right: ``base`` (…, d) shared by all pairs of a vmapped block, ``left``
    (…, r) and ``right`` (r, d) per pair, r ≤ 2·d_head ≪ d (module docstring)."""

    base: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.base + self.left @ self.right

    def __matmul__(self, w: torch.Tensor) -> torch.Tensor:
        """x·W = base·W + left·(right·W), for W (d, m)."""
        return self.base @ w + self.left @ (self.right @ w)

    def per_head(self, w: torch.Tensor) -> torch.Tensor:
        """x·W[k] for every head k of W (n_heads, d, e): (…, n_heads, e)."""
        return (torch.einsum("bpd,hde->bphe", self.base, w)
                + torch.einsum("bpr,rhe->bphe", self.left, torch.einsum("rd,hde->rhe", self.right, w)))


def _causal_softmax(scores: torch.Tensor, cfg: TransformerConfig) -> torch.Tensor:
    """softmax over keys of scores/√d_head with keys after the query masked out (last two dims: query, key)."""
    n = scores.shape[-1]
    mask = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
    return torch.softmax((scores / math.sqrt(cfg.d_head)).masked_fill(~mask, float("-inf")), dim=-1)


HEAD_SHAPES = {"W_Q": "d e", "W_K": "d e", "W_V": "d e", "W_O": "e d", "b_Q": "e", "b_K": "e", "b_V": "e"}


@contextmanager
def moving_head(attn: Attention, keep: torch.Tensor, head: Mapping[str, torch.Tensor],
                own: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, ``attn``'s forward is Σ_k keep_k·(head k of the tensors ``own``) + (one head of the
    tensors ``head``) + b_O, ``keep`` = 1 − one-hot of the moved head h; ``head`` and ``own`` hold every name of
    :data:`HEAD_SHAPES` (``head`` with the per-head shapes). With ``own`` = the module's weights and ``head`` = head
    h's slices of the weights to evaluate at, this is :meth:`Attention.forward` at those weights, its sum over
    heads regrouped (equal to float rounding); ``own`` may be the unbatched w* while the module's own tensors are
    per-chain, so the unmoved heads are computed once."""
    if not 0 < keep.shape[-1] == attn.cfg.n_heads:
        raise ValueError(f"keep must have n_heads = {attn.cfg.n_heads} entries, got shape {tuple(keep.shape)}")
    previous = attn._moved
    attn._moved = (keep, head, own)
    try:
        yield
    finally:
        attn._moved = previous


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.act = cfg.act_fn
        self.W_in = nn.Parameter(torch.randn(cfg.d_model, cfg.d_mlp) * cfg.init_std)
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.randn(cfg.d_mlp, cfg.d_model) * cfg.init_std)
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x: torch.Tensor | LowRank) -> torch.Tensor:
        pre = x @ self.W_in + self.b_in
        return (F.relu(pre) if self.act == "relu" else F.gelu(pre)) @ self.W_out + self.b_out


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.normalization == "LN":
            self.ln1 = LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        if not cfg.attn_only:
            if cfg.normalization == "LN":
                self.ln2 = LayerNorm(cfg.d_model)
            self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x) if self.cfg.normalization else x)
        if not self.cfg.attn_only:
            x = x + self.mlp(self.ln2(x) if self.cfg.normalization else x)
        return x

    def forward_factored(self, x: torch.Tensor | LowRank) -> torch.Tensor | LowRank:
        """The block without LayerNorm, its residual stream kept as a :class:`LowRank` where it is one: the moved
        layer turns a shared x into shared + δ, the next linear maps consume δ in factored form."""
        if self.attn._moved is not None and not isinstance(x, LowRank):
            out = self.attn.moved_parts(x, *self.attn._moved)
            x = LowRank(x + out.base, out.left, out.right)
        else:
            x = (x.dense() if isinstance(x, LowRank) else x) + self.attn(x)
        if not self.cfg.attn_only:
            x = (x.dense() if isinstance(x, LowRank) else x) + self.mlp(x)
        return x


class Transformer(nn.Module):
    """Decoder-only transformer: tokens [batch, pos] → logits [batch, pos, d_vocab]."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = _Param(W_E=torch.randn(cfg.d_vocab, cfg.d_model) * cfg.init_std)
        self.pos_embed = _Param(W_pos=torch.randn(cfg.n_ctx, cfg.d_model) * cfg.init_std)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        if cfg.normalization == "LN":
            self.ln_final = LayerNorm(cfg.d_model)
        self.unembed = _Param(W_U=torch.randn(cfg.d_model, cfg.d_vocab) * cfg.init_std, b_U=torch.zeros(cfg.d_vocab))

    def residual(self, tokens: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        if tokens.shape[-1] > self.cfg.n_ctx:
            raise ValueError(f"sequence length {tokens.shape[-1]} exceeds n_ctx = {self.cfg.n_ctx}")
        x = self.embed.W_E[tokens] + self.pos_embed.W_pos[: tokens.shape[-1]]
        for block in self.blocks[:upto]:
            x = block(x)
        return x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalization is None and any(b.attn._moved is not None for b in self.blocks):
            return self._forward_factored(tokens)
        x = self.residual(tokens)
        if self.cfg.normalization == "LN":
            x = self.ln_final(x)
        return x @ self.unembed.W_U + self.unembed.b_U

    def _forward_factored(self, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` under :func:`moving_head` without LayerNorm: the residual stream in factored form
        (:meth:`Block.forward_factored`) from the moved layer on, the unembedding applied to it as x*·W_U + L·(R·W_U)
        when it is still a :class:`LowRank` (a moved last-layer head of an attention-only model)."""
        x: torch.Tensor | LowRank = self.residual(tokens, upto=0)
        for block in self.blocks:
            x = block.forward_factored(x)
        return x @ self.unembed.W_U + self.unembed.b_U

    def attention_patterns(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, attention probabilities [batch, head, query, key] (for induction-head scores)."""
        out, x = [], self.embed.W_E[tokens] + self.pos_embed.W_pos[: tokens.shape[-1]]
        for block in self.blocks:
            out.append(block.attn.pattern(block.ln1(x) if self.cfg.normalization else x))
            x = block(x)
        return out
